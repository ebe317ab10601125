"""Reading the authors' training logs (the release's train_logs/): settings, loss curves and evaluations.

A release log is the console output of the release's ScaleMatch.py on rank 0: a pprint'ed settings header, then per
epoch an `Epoch:` line, every len(loader) // 8 iterations an `Iters:` line of running means since the epoch began,
and an evaluation block (per-class IoU, then mIoU). A resumed run starts a new log with `Load from checkpoint at
epoch N`; join_run() puts such parts back together. Values are written with fixed decimals (losses 3, IoU 2), which
is how a line cut short at the end of a file is told from a complete one.
"""
from __future__ import annotations

import ast
import math
import re
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path

# The release's names of the logged terms, and the short column names used here; the FP loss was renamed when FSVC
# took over the feature branch, so both names are one column.
RELEASE_TERMS = {"Total loss": "total", "Loss x": "x", "Loss u_s": "u_s", "Loss u_scale": "u_scale",
                 "Loss w_fp": "w_fp", "Loss w_fp_scale": "w_fp", "Mask ratio": "mask_ratio"}
TERMS = ("total", "x", "u_s", "u_scale", "w_fp", "mask_ratio")

_STAMP = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]\[\s*\w+\] "
_HEADER = re.compile(_STAMP + r"(\{.*)$")
_RESUME = re.compile(_STAMP + r"\*+ Load from checkpoint at epoch (\d+)\s*$")
_EPOCH = re.compile(_STAMP + r"=+> Epoch: (\d+), LR: (\d+\.\d{5}), Previous best: (\d+\.\d{2}), ETA: (\d+\.\d{2})M\s*$")
_ITERS = re.compile(_STAMP + r"Iters: (\d+), (.*?)\s*$")
_FIELD = re.compile(r"^([A-Za-z][A-Za-z_ ]*): (\d+\.\d{3})$")
_CLASS = re.compile(_STAMP + r"\*+ Evaluation \*+ >>>> Class \[(\d+) (.+)\] IoU: (\d+\.\d{2})\s*$")
_MEAN = re.compile(_STAMP + r"\*+ Evaluation (\w+) \*+ >>>> MeanIoU: (\d+\.\d{2})\s*$")
_PARAMS = re.compile(_STAMP + r"Total params: ")

# Header keys that say where the authors' files were, not how training went.
MACHINE_KEYS = ("config", "data_root", "save_path", "local_rank", "port", "labeled_id_path", "unlabeled_id_path")
# Header keys with the same name and meaning in this codebase's configuration.
SAME_KEYS = ("nclass", "crop_size", "epochs", "batch_size", "lr", "lr_multi", "conf_thresh", "backbone",
             "replace_stride_with_dilation", "dilations", "amp", "img_scales", "warm_up")
# What this codebase's defaults stand for where a log predates a key (the release code of that day is not shipped).
UNRECORDED = {"img_scales": "img_scales", "feat_s_scales": "feature_scales", "feat_l_scales": "feature_scales",
              "warm_up": "warm_up"}


class ReleaseLogError(Exception):
    """A release log that cannot be read, told in one line naming the file."""


@dataclass
class LossRecord:
    epoch: int
    iteration: int  # index within the epoch, 0-based, as logged
    iter_time: float | None
    terms: dict[str, float]
    log: str


@dataclass
class EvalRecord:
    epoch: int
    miou: float | None  # None: the block's mIoU line is missing
    iou: dict[int, float]  # class index -> IoU (%); a class whose line is missing is absent
    class_names: dict[int, str]
    mode: str | None
    log: str


@dataclass
class ReleaseLog:
    path: str
    settings: dict
    started: str  # timestamp of the header
    resumed_from: int | None  # the checkpoint epoch a resumed part loads, else None
    epochs_started: list[int] = field(default_factory=list)
    losses: list[LossRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # lines not read, with why

    @property
    def name(self) -> str:
        return Path(self.path).name

    def log_step(self) -> int | None:
        """Iterations between two `Iters:` lines, len(loader) // 8 (None: too few lines to tell)."""
        steps = [b.iteration - a.iteration for a, b in zip(self.losses, self.losses[1:])
                 if a.epoch == b.epoch and b.iteration > a.iteration]
        return min(steps) if steps else None

    def iters_per_epoch(self) -> float | None:
        """len(loader), estimated as 8 x the logging step + 3.5: the step is len // 8, so the estimate is within 4."""
        step = self.log_step()
        return None if step is None else 8 * step + 3.5


def _split_lines(text: str) -> list[tuple[str, bool]]:
    """Lines of `text` whichever of \\r\\n, \\n or \\r ends them; with each, whether it was terminated."""
    pieces = re.split(r"(\r\n|\n|\r)", text)
    lines = []
    for index in range(0, len(pieces), 2):
        terminated = index + 1 < len(pieces)
        if pieces[index] or terminated:
            lines.append((pieces[index], terminated))
    return lines


def _header(lines: list[tuple[str, bool]], start: int, path: str) -> tuple[dict, int]:
    """The pprint'ed settings dict that begins on line `start`; returns it and the index of its last line."""
    text = _HEADER.match(lines[start][0]).group(2)
    end = start
    while text.count("{") > text.count("}"):
        end += 1
        if end >= len(lines):
            raise ReleaseLogError(f"{path}: the settings header beginning on line {start + 1} is cut short")
        text += "\n" + lines[end][0]
    try:
        settings = ast.literal_eval(text)
    except (ValueError, SyntaxError) as error:
        problem = error.msg if isinstance(error, SyntaxError) else str(error)
        raise ReleaseLogError(f"{path}: line {start + 1}: the settings header is not a Python dict "
                              f"({problem})") from None
    if not isinstance(settings, dict):
        raise ReleaseLogError(f"{path}: line {start + 1}: the settings header is not a dict")
    return settings, end


def read_release_log(path: str | Path) -> ReleaseLog:
    """Parse one release log. Lines that match no known form, or an `Iters:` or IoU line cut short, are left out and
    listed in `dropped`; a log without a settings header is an error."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise ReleaseLogError(f"{path}: cannot read the log ({error.strerror or error})") from None
    lines = _split_lines(text)
    log = None
    epoch = None
    fields = 0  # the fields of a complete Iters line: the first line's count
    block: EvalRecord | None = None
    index = 0
    while index < len(lines):
        line, terminated = lines[index]
        number = index + 1
        index += 1
        if log is None:
            if _HEADER.match(line):
                settings, last = _header(lines, number - 1, path)
                log = ReleaseLog(path, settings, _HEADER.match(line).group(1), None)
                index = last + 1
            continue
        if not line.strip() or _PARAMS.match(line) or set(line.strip()) == {"*"}:
            continue
        if match := _RESUME.match(line):
            log.resumed_from = int(match.group(2))
        elif match := _EPOCH.match(line):
            epoch = int(match.group(2))
            log.epochs_started.append(epoch)
            block = None
        elif match := _ITERS.match(line):
            record = _loss_record(match, epoch, log.name)
            count = 0 if record is None else len(record.terms) + (record.iter_time is not None)
            if record is None or count < fields:
                log.dropped.append(f"line {number}: an Iters line cut short or malformed")
                continue
            fields = fields or count
            log.losses.append(record)
        elif match := _CLASS.match(line):
            if block is None or block.miou is not None or int(match.group(2)) in block.iou:
                block = EvalRecord(epoch, None, {}, {}, None, log.name)
                log.evals.append(block)
            block.iou[int(match.group(2))] = float(match.group(4))
            block.class_names[int(match.group(2))] = match.group(3)
        elif match := _MEAN.match(line):
            if block is None or block.miou is not None:
                block = EvalRecord(epoch, None, {}, {}, None, log.name)
                log.evals.append(block)
            block.miou, block.mode = float(match.group(3)), match.group(2)
        else:
            why = "cut short" if not terminated and index == len(lines) else "of no known form"
            log.dropped.append(f"line {number}: {why}: {line[:60]!r}")
    if log is None:
        raise ReleaseLogError(f"{path}: no settings header (a line '[date][ INFO] {{...}}'); is it a release log?")
    log.evals = [e for e in log.evals if e.epoch is not None]
    return log


def _loss_record(match: re.Match, epoch: int | None, name: str) -> LossRecord | None:
    if epoch is None:
        return None
    terms, iter_time = {}, None
    for part in match.group(3).split(", "):
        found = _FIELD.match(part)
        if not found:
            return None
        label, value = found.group(1), float(found.group(2))
        if label == "iter time":
            iter_time = value
        elif label in RELEASE_TERMS:
            terms[RELEASE_TERMS[label]] = value
        else:
            terms[label.lower().replace(" ", "_")] = value
    return LossRecord(epoch, int(match.group(2)), iter_time, terms, name)


@dataclass
class ReleaseRun:
    """One training run, from one log or from the logs of its resumed parts (in order)."""

    parts: list[ReleaseLog]
    losses: list[LossRecord]
    evals: list[EvalRecord]

    @property
    def settings(self) -> dict:
        """The parts' headers merged, a later part's values standing (a key only an earlier part records kept)."""
        merged = {}
        for part in self.parts:
            merged.update(part.settings)
        return merged

    @property
    def epochs(self) -> int:
        return int(self.settings.get("epochs", 0)) or max(e.epoch for e in self.evals) + 1

    def best(self) -> EvalRecord | None:
        scored = [e for e in self.evals if e.miou is not None]
        return max(scored, key=lambda e: e.miou) if scored else None

    def iters_per_epoch(self, log: str) -> float | None:
        part = next(p for p in self.parts if p.name == log)
        return part.iters_per_epoch()

    def fraction(self, record: LossRecord) -> float | None:
        """Fraction of training done after the step that `record` reports."""
        per_epoch = self.iters_per_epoch(record.log)
        if per_epoch is None:
            return None
        return (record.epoch + (record.iteration + 1) / per_epoch) / self.epochs

    def differing_settings(self) -> list[str]:
        """Training settings that change between parts, as 'key: a -> b (log)'."""
        notes = []
        for before, after in zip(self.parts, self.parts[1:]):
            for key in sorted(set(before.settings) | set(after.settings)):
                if key in MACHINE_KEYS:
                    continue
                old, new = (part.settings.get(key, "(not recorded)") for part in (before, after))
                if old != new:
                    notes.append(f"{key}: {old} -> {new} ({after.name})")
        return notes

    def seconds_per_iteration(self) -> list[tuple[str, float, float]]:
        """Per part: (log, median over its epochs of the epoch's mean s/iter, estimated iterations per epoch)."""
        figures = []
        for part in self.parts:
            last_of_epoch = {}
            for record in part.losses:
                if record.iter_time is not None and record.iteration > 0:
                    last_of_epoch[record.epoch] = record.iter_time
            per_epoch = part.iters_per_epoch()
            if last_of_epoch and per_epoch:
                figures.append((part.name, statistics.median(last_of_epoch.values()), per_epoch))
        return figures

    def epochs_by_part(self) -> dict[str, list[int]]:
        kept = {}
        for record in self.losses:
            kept.setdefault(record.log, set()).add(record.epoch)
        return {name: sorted(epochs) for name, epochs in kept.items()}

    def wall_clock_hours(self) -> float | None:
        """Training time the logs show: per epoch of the joined run, the s/iter of the part that trained it x that
        part's iterations per epoch; an epoch no part reached counts at the last part's rate (evaluation excluded)."""
        rates = {name: seconds * per_epoch for name, seconds, per_epoch in self.seconds_per_iteration()}
        if not rates:
            return None
        owner = {}
        for name, epochs in self.epochs_by_part().items():
            for epoch in epochs:
                owner[epoch] = name
        fallback = rates.get(self.parts[-1].name, next(iter(rates.values())))
        return sum(rates.get(owner.get(epoch), fallback) for epoch in range(self.epochs)) / 3600


def join_run(logs: list[ReleaseLog]) -> ReleaseRun:
    """The run the logs are parts of: ordered by start time, each part after the first resuming from a checkpoint
    the one before reached; for an epoch in two parts the later part's records stand (the resumed run redid it)."""
    if not logs:
        raise ReleaseLogError("no release log given")
    parts = sorted(logs, key=lambda log: log.started)
    for before, after in zip(parts, parts[1:]):
        if after.resumed_from is None:
            raise ReleaseLogError(f"{after.path}: starts from scratch (no 'Load from checkpoint' line), so it is "
                                  f"another run, not a resumed part of {before.path}")
        reached = max(before.epochs_started, default=-1)
        if not (min(before.epochs_started, default=0) <= after.resumed_from <= reached):
            raise ReleaseLogError(f"{after.path}: resumes from epoch {after.resumed_from}, which {before.path} "
                                  f"(epochs {min(before.epochs_started, default=0)}-{reached}) did not reach")
    losses, evals = [], []
    for position, part in enumerate(parts):
        handed_over = parts[position + 1].resumed_from if position + 1 < len(parts) else None
        keep = (lambda epoch: True) if handed_over is None else (lambda epoch: epoch <= handed_over)
        losses += [r for r in part.losses if keep(r.epoch)]
        evals += [e for e in part.evals if keep(e.epoch)]
    return ReleaseRun(parts, losses, evals)


@dataclass
class Mapping:
    """A run's settings in this codebase's terms."""

    dataset: str | None
    split: str | None
    gpus: int | None
    overrides: dict  # key -> value, this codebase's keys
    unrecorded: list[str]  # this codebase's keys whose value the log does not record
    unmapped: dict  # header keys with no counterpart here
    notes: list[str]


def _paired_scales(small: list, large: list) -> tuple[list[float], str] | None:
    """feature_scales and feature_scale_rule that draw t from `small` when v > 1 and from `large` when v < 1, as the
    release does (None when no rule here does)."""
    union = sorted({float(t) for t in small} | {float(t) for t in large})
    if sorted(map(float, small)) == sorted(map(float, large)):
        return union, "random"
    if ({t for t in union if t <= 1} == set(map(float, small))
            and {t for t in union if t >= 1} == set(map(float, large))):
        return union, "paired"
    return None


def map_settings(settings: dict, eval_mode: str | None = None) -> Mapping:
    """This codebase's keys for a release settings header (and the evaluation mode its MeanIoU lines name)."""
    overrides, unmapped, notes = {}, {}, []
    for key in SAME_KEYS:
        if key in settings:
            value = settings[key]
            overrides[key] = [float(v) for v in value] if key == "img_scales" else value
    for key in ("lr", "lr_multi", "conf_thresh"):
        if key in overrides:
            overrides[key] = float(overrides[key])
    criterion = settings.get("criterion")
    if isinstance(criterion, dict):
        name, kwargs = criterion.get("name"), criterion.get("kwargs", {})
        if name == "CELoss":
            overrides["criterion"] = "ce"
        elif name == "OHEM":
            overrides["criterion"] = "ohem"
            if "thresh" in kwargs:
                overrides["ohem_thresh"] = float(kwargs["thresh"])
            if "min_kept" in kwargs:
                overrides["ohem_min_kept"] = int(kwargs["min_kept"])
        else:
            unmapped["criterion"] = criterion
        if kwargs.get("ignore_index", 255) != 255:
            unmapped["criterion.kwargs.ignore_index"] = kwargs["ignore_index"]
    if "feat_s_scales" in settings or "feat_l_scales" in settings:
        small = settings.get("feat_s_scales", settings.get("feat_l_scales"))
        large = settings.get("feat_l_scales", small)
        paired = _paired_scales(small, large)
        if paired is None:
            unmapped["feat_s_scales"], unmapped["feat_l_scales"] = small, large
            notes.append(f"t from {small} when v > 1 and from {large} when v < 1: no feature_scale_rule draws that")
        else:
            overrides["feature_scales"], overrides["feature_scale_rule"] = paired
    if settings.get("model", "deeplabv3plus") != "deeplabv3plus":
        unmapped["model"] = settings["model"]
    if eval_mode is not None:
        overrides["eval_mode"] = eval_mode
    dataset = settings.get("dataset")
    split = None
    labeled = settings.get("labeled_id_path")
    if isinstance(labeled, str):
        found = re.search(r"splits/([^/]+)/([^/]+)/labeled\.txt$", labeled)
        if found:
            split = found.group(2)
            if dataset is None:
                dataset = found.group(1)
                notes.append(f"dataset {dataset}: not in the header, taken from labeled_id_path {labeled}")
            unlabeled = settings.get("unlabeled_id_path", "")
            if not unlabeled.endswith(f"/{split}/unlabeled.txt"):
                notes.append(f"unlabeled_id_path {unlabeled} is not the unlabeled list of split {split}")
        else:
            notes.append(f"labeled_id_path {labeled} names no splits/DATASET/SPLIT/labeled.txt")
    handled = set(SAME_KEYS) | set(MACHINE_KEYS) | {"dataset", "criterion", "feat_s_scales", "feat_l_scales", "model",
                                                    "ngpus"}
    unmapped.update({key: value for key, value in settings.items() if key not in handled})
    unrecorded = sorted({mine for theirs, mine in UNRECORDED.items() if theirs not in settings})
    gpus = settings.get("ngpus")
    return Mapping(dataset, split, int(gpus) if gpus is not None else None, overrides, unrecorded, unmapped, notes)


def override_text(key: str, value) -> str:
    """key=value as this codebase's command line reads it (YAML flow syntax for lists and booleans)."""
    def text(item):
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, float):
            return repr(item)
        if isinstance(item, list):
            return "[" + ",".join(text(v) for v in item) + "]"
        return str(item)
    return f"{key}={text(value)}"


def train_command(mapping: Mapping) -> str:
    """The scripts/train.sh command line that trains with `mapping`'s settings."""
    args = ["bash", "scripts/train.sh", mapping.dataset or "DATASET", mapping.split or "SPLIT",
            str(mapping.gpus) if mapping.gpus is not None else "NGPUS"]
    args += [override_text(key, value) for key, value in mapping.overrides.items()]
    return " ".join(shlex.quote(arg) for arg in args)


def eval_mode_of(run: ReleaseRun) -> str | None:
    modes = {e.mode for e in run.evals if e.mode is not None}
    return modes.pop() if len(modes) == 1 else None


def loss_rows(run: ReleaseRun) -> tuple[list[str], list[list]]:
    """The loss curves as CSV columns and rows: one row per `Iters:` line of the joined run."""
    extra = sorted({name for r in run.losses for name in r.terms} - set(TERMS))
    columns = ["log", "epoch", "iter", "fraction", "iter_time", *TERMS, *extra]
    rows = []
    for record in run.losses:
        fraction = run.fraction(record)
        rows.append([record.log, record.epoch, record.iteration,
                     "" if fraction is None else f"{fraction:.5f}",
                     "" if record.iter_time is None else record.iter_time,
                     *(record.terms.get(name, "") for name in (*TERMS, *extra))])
    return columns, rows


def eval_rows(run: ReleaseRun) -> tuple[list[str], list[list]]:
    """Per-epoch mIoU and per-class IoU as CSV columns and rows (an empty cell: the line is missing in the log)."""
    names = {}
    for record in run.evals:
        names.update(record.class_names)
    classes = sorted(names)
    columns = ["log", "epoch", "fraction", "miou", *(f"{index} {names[index]}" for index in classes)]
    rows = [[e.log, e.epoch, f"{(e.epoch + 1) / run.epochs:.5f}", "" if e.miou is None else e.miou,
             *(e.iou.get(index, "") for index in classes)] for e in run.evals]
    return columns, rows


def release_curve(run: ReleaseRun, term: str) -> list[tuple[float, float]]:
    """(fraction of training, value) of one term over the joined run, in order."""
    points = []
    for record in run.losses:
        fraction = run.fraction(record)
        if fraction is not None and term in record.terms and math.isfinite(record.terms[term]):
            points.append((fraction, record.terms[term]))
    return sorted(points)
