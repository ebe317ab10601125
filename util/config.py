"""The configuration schema, and loading, validating and documenting configurations against it.

SCHEMA is the single source of every key: its type, default, allowed values and meaning. Adding a key is adding an
entry (a Key, or a Section of Keys for a nested mapping); validation, defaults and the README table follow from it.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(Exception):
    """A configuration problem, told in one line that names its source and key."""


@dataclass(frozen=True)
class Key:
    """One configuration value. A key without `required` takes `default` when it is not given."""

    type: type  # bool, int, float, str or list
    doc: str
    default: Any = None
    required: bool = False
    nullable: bool = False
    choices: tuple = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    item: type | None = None  # element type of a list; the bounds above apply to each element
    length: int | None = None  # exact length of a list (None: any non-empty list)
    ascending: bool = False  # list elements must not decrease
    path: bool = False  # a filesystem path: a leading ~ is expanded
    operational: bool = False  # how a run is watched or where it lives, never what it trains: not in the run's name
    resumable: bool = False  # a resumed run may change it (operational keys always may)
    # How runs behaved before the key existed, where that differs from its default: such a run resumes only with it.
    before_key: Any = None


@dataclass(frozen=True)
class Section:
    """A nested mapping of keys, written `section.key` on the command line."""

    doc: str
    keys: dict[str, Key | Section]


SCHEMA: dict[str, Key | Section] = {
    "dataset": Key(str, "Dataset family; selects class names, palette and split layout (folder: your own images "
                   "and masks, see configs/folder_example.yaml).", required=True,
                   choices=("pascal", "cityscapes", "synthetic", "folder")),
    "data_root": Key(str, "Dataset root directory.", required=True, path=True, resumable=True),
    "nclass": Key(int, "Number of classes (21 for pascal, 19 for cityscapes).", required=True, ge=2),
    "class_names": Key(list, "Names of classes 0 ... nclass-1 (null: the built-in names; required for folder).",
                       nullable=True, item=str, resumable=True),
    "palette": Key(list, "Colours [r, g, b, r, g, b, ...] of classes 0 ... nclass-1 in saved predictions and "
                   "TensorBoard (null: the built-in palette; Pascal's for folder).", nullable=True, item=int, ge=0,
                   le=255, resumable=True),
    "split": Key(str, "Labeled split, a folder of splits/DATASET/ (e.g. 1_16 or 732).", default="1_16"),
    "splits_dir": Key(str, "Folder holding DATASET/SPLIT/{labeled,unlabeled}.txt and DATASET/val.txt.",
                      default="splits", path=True, resumable=True),
    "train_mode": Key(str, "semi: labeled and unlabeled images; supervised: labeled images only.", default="semi",
                      choices=("semi", "supervised")),
    "epochs": Key(int, "Training epochs.", default=80, ge=1, resumable=True),
    "iters_per_epoch": Key(int, "Caps the iterations of an epoch (null: one pass over the loader).", nullable=True,
                           ge=1),
    "batch_size": Key(int, "Images per process and step, labeled and unlabeled each.", default=2, ge=1),
    "crop_size": Key(int, "Side of the square training crop in pixels.", default=513, ge=16),
    "scale_range": Key(list, "Range [lo, hi] of the random rescale factor of training images.", default=[0.5, 2.0],
                       item=float, length=2, gt=0, ascending=True),
    "augmentation": Key(str, "Training augmentation: release is the release's PIL/torchvision pipeline (whole-image "
                        "resize, ColorJitter on PIL images, PIL Gaussian blur, its CutMix box rule); fast is the "
                        "tensor pipeline (2.4x faster per worker at crop 513, equal to the release within the "
                        "tolerances of tests/test_transforms.py, hue as a rotation about the gray axis).",
                        default="release", choices=("release", "fast")),
    "data_order": Key(str, "release: the labeled and the unlabeled loader walk one permutation, the one torch's "
                      "DistributedSampler(shuffle=True, seed=sampler_seed) gives each process after set_epoch(epoch) "
                      "(the release's multi-GPU runs; unlabeled image j shares its step with labeled image j mod L); "
                      "independent: each loader its own permutation, drawn from seed.", default="release",
                      choices=("release", "independent"), before_key="independent"),
    "sampler_seed": Key(int, "Seed of the data order with data_order: release. The release leaves DistributedSampler's "
                        "seed at 0, so all its runs see one order; it does not follow seed (which seeds "
                        "augmentation, initialisation and dropout): to vary the order with seed, set it too.",
                        default=0, ge=0),
    "cutmix_partner": Key(str, "Image mixed into each unlabeled image by CutMix: same_image is the unlabeled batch "
                          "itself, augmented independently (the release zips its unlabeled loader with itself); "
                          "other_image is another unlabeled image, from a loader shuffled on its own.",
                          default="same_image", choices=("same_image", "other_image"), before_key="other_image"),
    "truncate_labeled": Key(bool, "In semi mode, cut the labeled list to the unlabeled list's length where it is "
                            "longer, as the release does (Cityscapes 1_2: one labeled image is never used; the log "
                            "warns how many); false keeps every labeled image. A shorter labeled list is repeated to "
                            "the unlabeled length either way.", default=True, before_key=False),
    "workers": Key(int, "Data loader worker processes per loader.", default=4, ge=0, operational=True),
    "lr": Key(float, "Learning rate of the backbone.", default=0.001, gt=0),
    "lr_multi": Key(float, "Learning-rate multiplier of the parameters outside the backbone.", default=10.0, gt=0),
    "optimizer": Key(str, "Optimizer.", default="sgd", choices=("sgd", "adamw")),
    "momentum": Key(float, "SGD momentum.", default=0.9, ge=0, lt=1),
    "weight_decay": Key(float, "Weight decay.", default=1e-4, ge=0),
    "poly_power": Key(float, "Exponent of the poly schedule lr * (1 - iter / total) ** power.", default=0.9, gt=0),
    "criterion": Key(str, "Supervised loss: cross-entropy, or online hard example mining cross-entropy.",
                     default="ce", choices=("ce", "ohem")),
    "ohem_thresh": Key(float, "OHEM keeps pixels whose probability of the true class is at most this.", default=0.7,
                       gt=0, le=1),
    "ohem_min_kept": Key(int, "OHEM keeps at least this many hardest pixels per batch; 0 keeps every pixel "
                         "(no mining), as the release.", default=200000, ge=0),
    "conf_thresh": Key(float, "Pseudo-labels less confident than this stay out of the unsupervised loss.",
                       default=0.95, ge=0, le=1),
    "strong_views": Key(int, "Strongly augmented views per unlabeled image.", default=1, choices=(1, 2)),
    "fp": Key(bool, "Train the feature-perturbed branch (UniMatch FP; FSVC when fsvc is on).", default=True),
    "isvc": Key(bool, "ScaleMatch ISVC: supervise the view rescaled by v with the pseudo-label.", default=True),
    "fsvc": Key(bool, "ScaleMatch FSVC: resize the perturbed features by t (needs fp).", default=True),
    "cif": Key(bool, "ScaleMatch CIF: learn a gate fusing the 1x and v predictions.", default=True),
    "scaled_views_update_bn": Key(bool, "Let the passes of the views rescaled by v update the BatchNorm running "
                                  "statistics, as the release does (evaluation then normalises 1x images with "
                                  "statistics mixed across scales; false keeps them to the 1x views).", default=True),
    "supervise_1x": Key(bool, "With cif: the labeled loss is the mean of the CIF-fused and the 1x prediction's, "
                        "not the fused one's alone (the release: fused alone). Without cif it is on 1x anyway.",
                        default=False),
    "fusion": Key(str, "Pseudo-labels after warm-up from: cif, the average of 1x and v, or 1x alone "
                  "(null: cif when cif is on, else none).", nullable=True, choices=("cif", "average", "none")),
    "warm_up": Key(int, "Epochs whose pseudo-labels come from the 1x prediction before fusion takes over.",
                   default=10, ge=0),
    "img_scales": Key(list, "Image scales v; one is drawn per iteration (all at once with mri).",
                      default=[0.25, 0.5, 1.5, 2.0], item=float, gt=0),
    "mri": Key(bool, "Multi-resolution input: every scale of img_scales in every iteration (Table 5).",
               default=False),
    "feature_scales": Key(list, "Feature scales t of FSVC.", default=[0.75, 1.0, 1.25], item=float, gt=0),
    "feature_scale_rule": Key(str, "paired: t <= 1 when v > 1 and t >= 1 when v < 1 (the released logs); "
                              "random: any t.", default="paired", choices=("paired", "random")),
    "cif_channels": Key(int, "Channels of CIF after the 1x1 reduction (the RWKV width; the release: 32).", default=32,
                        ge=4),
    "cif_blocks": Key(int, "Vision-RWKV blocks in CIF (the release: 1).", default=1, ge=1),
    "cif_gate_channels": Key(int, "Channels of the gate's second depth-wise stage (the release: 128).", default=128,
                             ge=1),
    "cif_gate": Key(str, "Scale-Aware Gate and fusion. release: squeeze-excitation over the concatenated decoder "
                    "features and the interacted features, the gate applied at the lower-resolution prediction's "
                    "size; paper: over the interacted features alone, gate and predictions blended at the 1x image "
                    "size (Eqs. 10-13 as written).", default="release", choices=("release", "paper")),
    "cif_wkv": Key(str, "Arithmetic of the CIF's Bi-WKV. formula: the Vision-RWKV formula, exactly; release_kernel: "
                   "what the release's CUDA kernel computes, forward and backward (32 token chunks: a one-step "
                   "longer decay across chunks and after the token, a within-chunk residual; its k, v, u gradients "
                   "are the formula's terms at its outputs), emulated step for step and slower (docs/release.md).",
                   default="formula", choices=("formula", "release_kernel")),
    "loss_weights": Section("Weights of the unsupervised loss terms.", {
        "strong": Key(float, "Weight of the strong-view loss, shared equally by the strong views.", default=0.25,
                      ge=0),
        "isvc": Key(float, "Weight of the ISVC loss.", default=0.25, ge=0),
        "fp": Key(float, "Weight of the feature-branch loss (FSVC when fsvc is on).", default=0.5, ge=0),
    }),
    "loss_divisor": Key(float, "The total loss is (supervised + weighted unsupervised) / loss_divisor.", default=2.0,
                        gt=0),
    "backbone": Key(str, "Backbone: deep-stem ResNets, or torchvision's ResNets (tv_*; tv_resnet10, one block a "
                    "stage, for tests and quick CPU runs).", default="resnet101",
                    choices=("resnet50", "resnet101", "tv_resnet10", "tv_resnet18", "tv_resnet34", "tv_resnet50",
                             "tv_resnet101")),
    "pretrained": Key(str, "Local backbone checkpoint (null: random initialisation).", nullable=True, path=True,
                      resumable=True),
    "replace_stride_with_dilation": Key(list, "Per ResNet stage 2-4: dilate instead of striding.",
                                        default=[False, False, True], item=bool, length=3),
    "dilations": Key(list, "Atrous rates of the ASPP branches.", default=[6, 12, 18], item=int, length=3, ge=1),
    "head_channels": Key(int, "Channels of the ASPP and the decoder, which CIF reads (the release: 256).", default=256,
                         ge=1),
    "amp": Key(bool, "Automatic mixed precision on CUDA.", default=True, resumable=True),
    "amp_dtype": Key(str, "Autocast dtype with amp: float16 with a gradient scaler (the release), or bfloat16 (no "
                     "scaler, a float32 exponent range; needs an Ampere or newer GPU).", default="float16",
                     choices=("float16", "bfloat16"), resumable=True),
    "deterministic": Key(bool, "Deterministic algorithms: reproducible, slower.", default=False, resumable=True),
    "seed": Key(int, "Random seed.", default=42, ge=0),
    "eval_mode": Key(str, "Validation inference: whole image, centre crop, or sliding windows of crop_size.",
                     default="original", choices=("original", "center_crop", "sliding_window"), resumable=True),
    "sliding_window_placement": Key(str, "Windows of eval_mode sliding_window: release starts one at 0 and every 2/3 "
                                    "of crop_size after, cutting those that cross the border (slivers included: "
                                    "Cityscapes 1024 x 2048 at crop 801 gives 8 windows, 5 of them cut), as the "
                                    "release's evaluate() does; flush keeps every window whole, the last one flush "
                                    "with the border.", default="release", choices=("release", "flush"),
                                    resumable=True),
    "eval_interval": Key(int, "Evaluate every this many epochs.", default=1, ge=1, resumable=True),
    "log_interval": Key(int, "Log the losses every this many iterations.", default=20, ge=1, operational=True),
    "image_log_interval": Key(int, "Log image panels every this many iterations (0: never).", default=200, ge=0,
                              operational=True),
    "checkpoint_interval": Key(int, "Also write latest.pth every this many iterations (0: at epoch ends only).",
                               default=500, ge=0, operational=True),
    "on_nonfinite_loss": Key(str, "A NaN/inf loss stops the run (the last checkpoint stays intact), or skips the step "
                             "and counts it.", default="stop", choices=("stop", "skip"), operational=True),
    "run_name": Key(str, "Run directory name under exp_dir (null: generated).", nullable=True, operational=True),
    "exp_dir": Key(str, "Directory of the run directories.", default="exp", path=True, operational=True),
}



def operational_keys() -> tuple[str, ...]:
    """Keys that change how a run is watched or where it lives, never what it trains: the run name leaves them out."""
    return tuple(name for name, entry in SCHEMA.items() if isinstance(entry, Key) and entry.operational)


def keys_added_since(saved: dict) -> dict[str, Any]:
    """Keys that a run's ``saved`` config predates and whose default changed its behaviour: {key: how it behaved}."""
    return {name: entry.before_key for name, entry in SCHEMA.items()
            if isinstance(entry, Key) and entry.before_key is not None and name not in saved}


def resumable_keys() -> tuple[str, ...]:
    """Keys a resumed run may change: how it is watched, evaluated and computed, where its files are, and how long
    it trains (the schedule then stretches from where it is). Any other change would mix two experiments."""
    return tuple(name for name, entry in SCHEMA.items()
                 if isinstance(entry, Key) and (entry.operational or entry.resumable))


_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers (2e-3 is a float, 1_16 a string) that refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key_node.value}'",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


# YAML 1.1 reads 2e-3 as a string and 1_16 as the int 116; a config wants neither.
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(_INT_TAG, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"""^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?
                  |[-+]?[0-9]+[eE][-+]?[0-9]+
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+.0123456789"),
)


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _number(value: float) -> str:
    return f"{value:g}"


def _yaml_text(value: Any) -> str:
    """A value as it is written in a config file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    return str(value)


def _got(value: Any) -> str:
    if value is None:
        return "got null"
    return f"got {type(value).__name__} {repr(value) if isinstance(value, str) else _yaml_text(value)}"


def _bounds(key: Key) -> str:
    low = key.ge if key.ge is not None else key.gt
    high = key.le if key.le is not None else key.lt
    if low is not None and high is not None:
        opening = "[" if key.ge is not None else "("
        closing = "]" if key.le is not None else ")"
        return f"in {opening}{_number(low)}, {_number(high)}{closing}"
    if low is not None:
        return f"{'>=' if key.ge is not None else '>'} {_number(low)}"
    if high is not None:
        return f"{'<=' if key.le is not None else '<'} {_number(high)}"
    return ""


def _describe(key: Key) -> str:
    """What a key accepts, in words; shared by error messages and the README table."""
    if key.choices:
        text = "one of " + ", ".join(_yaml_text(c) for c in key.choices)
    elif key.type is list:
        count = key.length if key.length is not None else "1 or more"
        text = " ".join(filter(None, [f"list of {count} {key.item.__name__}s", _bounds(key)]))
        if key.ascending:
            text += ", non-decreasing"
    else:
        text = " ".join(filter(None, [key.type.__name__, _bounds(key)]))
    return f"null or {text}" if key.nullable else text


def _has_type(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _in_bounds(value: float, key: Key) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return ((key.ge is None or value >= key.ge) and (key.gt is None or value > key.gt)
            and (key.le is None or value <= key.le) and (key.lt is None or value < key.lt))


def _check_value(name: str, key: Key, value: Any, source: str) -> Any:
    """Return `value` normalised (ints as floats where floats are expected, ~ expanded), or raise."""
    if value is None and key.nullable:
        return None
    hint = " (quote it)" if key.type is str and isinstance(value, (int, float)) else ""
    problem = f"{source}: '{name}' must be {_describe(key)}, {_got(value)}{hint}"
    if not _has_type(value, key.type):
        raise ConfigError(problem)
    if key.type is list:
        wrong_length = len(value) != key.length if key.length is not None else not value
        if wrong_length or not all(_has_type(v, key.item) for v in value):
            raise ConfigError(problem)
        if key.item is float:
            value = [float(v) for v in value]
        if key.item in (int, float) and not all(_in_bounds(v, key) for v in value):
            raise ConfigError(problem)
        if key.ascending and any(a > b for a, b in zip(value, value[1:])):
            raise ConfigError(problem)
        return value
    if key.choices and value not in key.choices:
        raise ConfigError(problem)
    if key.type is float:
        value = float(value)
    if key.type in (int, float) and not _in_bounds(value, key):
        raise ConfigError(problem)
    if key.type is str and not value:
        raise ConfigError(f"{source}: '{name}' must not be empty")
    return os.path.expanduser(value) if key.path else value


def _unknown(name: str, keys: dict, prefix: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(str(name), list(keys), n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: unknown key '{prefix}{name}'{hint}")


def _check_entries(values: dict, keys: dict[str, Key | Section], source: str, prefix: str = "") -> dict:
    """Check the keys present in `values` (a possibly partial config); return them normalised."""
    checked = {}
    for name, value in values.items():
        if name not in keys:
            raise _unknown(name, keys, prefix, source)
        entry = keys[name]
        if isinstance(entry, Section):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{prefix}{name}' must be a mapping with keys "
                                  f"{', '.join(entry.keys)}, {_got(value)}")
            checked[name] = _check_entries(value, entry.keys, source, f"{prefix}{name}.")
        else:
            checked[name] = _check_value(prefix + name, entry, value, source)
    return checked


def _with_defaults(values: dict, keys: dict[str, Key | Section], source: str, prefix: str = "") -> dict:
    complete = {}
    for name, entry in keys.items():
        if isinstance(entry, Section):
            complete[name] = _with_defaults(values.get(name, {}), entry.keys, source, f"{prefix}{name}.")
        elif name in values:
            complete[name] = values[name]
        elif entry.required:
            raise ConfigError(f"{source}: missing required key '{prefix}{name}' ({entry.doc})")
        else:
            complete[name] = copy.deepcopy(entry.default)
    return complete


def _check_combinations(cfg: dict, source: str) -> dict:
    """Rules that tie keys together; resolves fusion: null."""
    if cfg["fsvc"] and not cfg["fp"]:
        raise ConfigError(f"{source}: 'fsvc' resizes the feature-perturbation branch, so it needs fp: true")
    if cfg["fusion"] is None:
        cfg["fusion"] = "cif" if cfg["cif"] else "none"
    elif cfg["fusion"] == "cif" and not cfg["cif"]:
        raise ConfigError(f"{source}: 'fusion: cif' needs cif: true")
    return cfg


def validate(cfg: dict, source: str) -> dict:
    """Check `cfg` against SCHEMA; return a new plain dict with defaults filled in and values normalised."""
    return _check_combinations(_with_defaults(_check_entries(cfg, SCHEMA, source), SCHEMA, source), source)


def _merge(base: dict, update: dict) -> None:
    for name, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(name), dict):
            _merge(base[name], value)
        else:
            base[name] = value


def _parse_override(text: str) -> dict:
    """Turn `a.b=value` into the partial config {'a': {'b': value}}, checked against SCHEMA."""
    source = "command line"
    dotted, sep, raw = text.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted:
        raise ConfigError(f"{source}: malformed override '{text}' (expected key=value, e.g. lr=0.002)")
    names = dotted.split(".")
    keys: dict[str, Key | Section] = SCHEMA
    for depth, name in enumerate(names[:-1]):
        if name not in keys:
            raise _unknown(name, keys, "".join(f"{n}." for n in names[:depth]), source)
        if not isinstance(keys[name], Section):
            raise ConfigError(f"{source}: '{'.'.join(names[:depth + 1])}' has no keys, so '{dotted}' does not exist")
        keys = keys[name].keys
    try:
        value = yaml.load(raw, Loader=_ConfigLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: '{dotted}': cannot parse '{raw}' ({_yaml_problem(error)})") from None
    entry = keys.get(names[-1])
    # On the command line a string needs no quotes: split=1_16 or run_name=2024 mean the text as typed.
    if isinstance(entry, Key) and entry.type is str and value is not None and not isinstance(value, str):
        value = raw.strip()
    partial = _check_entries({names[-1]: value}, keys, source, "".join(f"{n}." for n in names[:-1]))
    for name in reversed(names[:-1]):
        partial = {name: partial}
    return partial


def without_idle_cif(cfg: dict) -> tuple[dict, str | None]:
    """`cfg` with cif off where nothing would run it (train_mode supervised; isvc off with fusion none, so no
    rescaled view), and a line saying so. Kept, an untrained CIF would be saved and used by --multiscale-cif as if
    trained, and under DDP its parameters, which get no gradient, fail the step."""
    semi = cfg["train_mode"] == "semi"
    if not cfg["cif"] or (semi and (cfg["isvc"] or cfg["fusion"] != "none")):
        return cfg, None
    why = "isvc off and fusion none (no rescaled view)" if semi else "train_mode supervised"
    return {**cfg, "cif": False, "fusion": "none"}, f"cif: false, since with {why} nothing would train it"


def check_batch_size(cfg: dict, world_size: int, device_type: str) -> None:
    """BatchNorm in training mode needs two values per channel, and ASPP's image pooling gives one per image: a pass
    of a single image (the strong view's, or the labeled one's in supervised mode, with batch_size 1) works only where
    SyncBatchNorm pools the images of several GPUs, as in the release's 1 x 2 GPUs on Cityscapes."""
    images_per_pass = cfg["batch_size"] * (cfg["strong_views"] if cfg["train_mode"] == "semi" else 1)
    if images_per_pass >= 2 or (device_type == "cuda" and world_size > 1):
        return
    where = "one process" if world_size == 1 else f"{world_size} CPU processes, whose BatchNorm is not synchronised"
    raise ConfigError(f"batch_size 1 on {where}: a training pass would hold one image, and BatchNorm (ASPP's image "
                      "pooling) needs two; set batch_size=2 (as many images per BatchNorm as the release's 1 x 2 "
                      "GPUs) or train on 2 or more GPUs")


def load_config(path: str | os.PathLike, overrides: Sequence[str] | None = ()) -> dict:
    """Read the YAML file at `path`, apply `overrides` (key=value, dotted keys for sections), fill in defaults
    and validate; return a plain dict. Every problem is a one-line ConfigError naming its source and key."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such config file") from None
    except OSError as error:
        raise ConfigError(f"{source}: cannot read config ({error.strerror})") from None
    try:
        # utf-8-sig: editors on Windows may open the file with a byte-order mark.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ConfigError(f"{source}: line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the config "
                          "as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: invalid YAML at {_yaml_problem(error)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of key: value, got {type(raw).__name__}")
    cfg = _check_entries(raw, SCHEMA, source)
    for override in overrides or ():
        _merge(cfg, _parse_override(override))
    return validate(cfg, source)


def dump_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML that load_config reads back to the same dict."""
    with open(path, "w") as file:
        yaml.safe_dump(cfg, file, sort_keys=False, default_flow_style=None)


def _table_rows(keys: dict[str, Key | Section], prefix: str = "") -> list[str]:
    rows = []
    for name, entry in keys.items():
        if isinstance(entry, Section):
            rows.append(f"| `{prefix}{name}` | | mapping of the keys below | {entry.doc} |")
            rows += _table_rows(entry.keys, f"{prefix}{name}.")
        else:
            default = "required" if entry.required else f"`{_yaml_text(entry.default)}`"
            doc = entry.doc + (" A leading ~ is expanded." if entry.path else "")
            if entry.operational:
                doc += " Not part of the run's name; a resumed run may change it."
            elif entry.resumable:
                doc += " A resumed run may change it."
            rows.append(f"| `{prefix}{name}` | {default} | {_describe(entry)} | {doc} |")
    return rows


def markdown_table() -> str:
    """Every key of SCHEMA as a Markdown table: key, default, allowed values, meaning."""
    header = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    return "\n".join(header + _table_rows(SCHEMA))


if __name__ == "__main__":
    print(markdown_table())
