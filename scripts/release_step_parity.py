"""Training-step parity against the authors' release: its own training iteration, read from its ScaleMatch.py, beside
this codebase's step, on the same weights, batches, scales and dropout masks.

    python scripts/release_step_parity.py RELEASE_DIR [--backbone resnet50] [--size 65] [--markdown step.md]
                                          [key=value ...]

RELEASE_DIR is the release's git directory (the `fetch` tool's mirror of github:lvliang6879/ScaleMatch) or a
checkout. The release's side: its network from ../shared/tools/release_model.py (--tool); from its ScaleMatch.py,
parsed with `ast` and executed, never copied: the statements of main() that build the optimizer, the criteria and the
schedule length, and the body of the training loop (`for i, (...) in enumerate(loader):`), run once per iteration
with `.cuda()` the identity, amp and DDP off, the logger and the TensorBoard writer silent. This codebase's side:
the network converted from the same weights (scripts/convert_release_checkpoint.py, eval.py's loader), trained by
`ours_step` (one call into scalematch.py's trainer).

For every (v, t) the release can draw (each v of img_scales with t from feat_s_scales when v > 1, else from
feat_l_scales), both sides start from the same weights and fresh optimizers and take the same three consecutive
iterations: the last two of the last warm-up epoch (pseudo-labels from the 1x prediction) and the first one after it
(from the CIF), with the release's learning-rate schedule and momentum carried from one to the next. Each iteration's
batch is 2 labeled + 2 unlabeled + 2 partner images of --size pixels, with ignore strips and CutMix boxes, drawn from
--seed; both sides draw the case's (v, t) and, under the tool's deterministic Dropout2d, the same channel masks.
conf_thresh is --conf-thresh on both sides, so that a share of the pixels of the randomly initialised network is
confident and every unsupervised term counts (the release's 0.95 leaves none). After each iteration this codebase's
side takes the release's weights, momentum buffers and BatchNorm statistics, so that every iteration is compared
from one state; with --free-running each side keeps its own, and the float32 rounding differences of one step
(1e-7 of the weights) grow, in this randomly initialised network, into differences of the next step's gradients that
would hide a real one (docs/release.md gives the figures).

Compared, worst over cases and iterations (relative: max|ours - release| / max|release|, per
tensor where per tensor): pseudo-labels and the partner's (exact), their confidences and every loss term and the total
(<= 1e-6), each parameter's gradient (<= 1e-4: tensors with tiny gradients differ by float32 operation order), the
momentum buffers (the step is -lr times the buffer) and the weights after the step (<= 1e-4: they inherit the
gradient's differences, and in this randomly initialised network a step can be larger than its weight), the BatchNorm
running statistics (<= 1e-5) and each param group's learning rate (exact), after every iteration of every case;
with --free-running, per iteration. Exit status 1 when a row fails, 2 on bad input. key=value overrides
configs/pascal.yaml on this codebase's side, e.g. loss_weights.strong=0.3, which must fail; with
cif_wkv=release_kernel the release's WKV op runs the kernels of its own wkv_cuda.cu (use_translated_kernels).

--write-fixture PATH pins the release's step for tests/test_release_step.py: the weights are then this codebase's
network initialised under torch.manual_seed(--seed) (seeded_model), exported to the release's names, so the test
rebuilds them without the release's code.
"""
import argparse
import ast
import contextlib
import importlib.util
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import scalematch  # noqa: E402
from eval import load_trained_model  # noqa: E402
from model import build_model  # noqa: E402
from model.release import project_name  # noqa: E402
from scripts.convert_release_checkpoint import convert  # noqa: E402
from scripts.release_parity import DEFAULT_TOOL, load_tool  # noqa: E402
from scripts.release_wkv_backward import ReleaseKernels  # noqa: E402
from util.config import load_config  # noqa: E402

RELEASE_SOURCES = ("ScaleMatch.py", "util/train_utils.py", "util/ohem.py")
# The statements of the release's main() that the loop body needs, by the name they assign.
SETUP_NAMES = ("conf_thresh", "optimizer", "criterion_l", "criterion_u", "total_epochs", "total_iters")
ITERS_PER_EPOCH = 8  # the release logs every len(loader) // 8 iterations, so 8 is its smallest loader
TERMS = {"supervised": "loss_x", "strong": "loss_u_s1", "isvc": "loss_u_size", "fp": "loss_u_w_fp"}
NCLASS = 21


class ReleaseSourceError(Exception):
    """The release cannot be read or run as this script reads it (exit status 2); one line."""


def extract_sources(release_dir: str, dest: str) -> None:
    """RELEASE_SOURCES of a checkout (copied) or of a git directory (`git archive HEAD`) into ``dest``."""
    if os.path.isfile(os.path.join(release_dir, RELEASE_SOURCES[0])):
        for rel in RELEASE_SOURCES:
            os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
            shutil.copyfile(os.path.join(release_dir, rel), os.path.join(dest, rel))
        return
    archive = subprocess.run(["git", "-c", "safe.directory=*", "--git-dir", release_dir, "archive", "--format=tar",
                              "HEAD", "--", *RELEASE_SOURCES], capture_output=True)
    if archive.returncode != 0:
        raise ReleaseSourceError(f"{release_dir}: {archive.stderr.decode(errors='replace').strip() or 'no archive'}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")


def load_module(path: str, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assigned_names(statement: ast.stmt) -> set[str]:
    return {node.id for node in ast.walk(statement) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}


def release_step_code(source: str, filename: str) -> tuple:
    """(setup, loop body) compiled from the release's ScaleMatch.py: main()'s top-level statements assigning
    SETUP_NAMES, and the body of its `for i, (...) in enumerate(loader)` loop, preceded by that loop's own target
    unpacking of ``_batch``."""
    tree = ast.parse(source, filename)
    main = next((node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"), None)
    if main is None:
        raise ReleaseSourceError(f"{filename}: no main()")
    setup = [statement for statement in main.body if assigned_names(statement) & set(SETUP_NAMES)
             and not isinstance(statement, (ast.For, ast.While))]
    missing = set(SETUP_NAMES) - set().union(*(assigned_names(s) for s in setup))
    if missing:
        raise ReleaseSourceError(f"{filename}: main() no longer assigns {', '.join(sorted(missing))}")
    loops = [node for node in ast.walk(main) if isinstance(node, ast.For) and isinstance(node.iter, ast.Call)
             and getattr(node.iter.func, "id", None) == "enumerate"
             and getattr(node.iter.args[0], "id", None) == "loader"]
    if len(loops) != 1:
        raise ReleaseSourceError(f"{filename}: {len(loops)} loops over enumerate(loader), expected 1")
    loop = loops[0]
    unpack = ast.Assign(targets=[loop.target], value=ast.Name("_batch", ast.Load()))
    body = ast.Module(body=[unpack, *loop.body], type_ignores=[])
    ast.fix_missing_locations(body)
    setup_module = ast.Module(body=setup, type_ignores=[])
    return compile(setup_module, filename, "exec"), compile(body, filename, "exec")


class ScriptedChoice:
    """Stands in for the `random` module: choice() returns the next scripted value, which must be among the
    choices (a (v, t) that a side's config cannot draw is a failure, not a silent substitute)."""

    def __init__(self, picks, side: str):
        self.picks, self.side = list(picks), side

    def choice(self, sequence):
        if not self.picks:
            raise ReleaseSourceError(f"{self.side}: more random draws than the scripted (v, t)")
        value = self.picks.pop(0)
        if value not in list(sequence):
            raise ReleaseSourceError(f"{self.side}: {value} is not among its choices {list(sequence)}")
        return value


class Silent:
    """The release's logger and SummaryWriter: every method accepted, nothing written."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class Loader:
    """What the release's loop body asks of trainloader_u: its length."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self):
        return self.length


@contextlib.contextmanager
def cpu_release():
    """`.cuda()` of tensors and modules the identity, the CUDA autocast context (amp off) a null context."""
    tensor_cuda, module_cuda, autocast = torch.Tensor.cuda, nn.Module.cuda, torch.cuda.amp.autocast

    def null_autocast(enabled=True, **kwargs):
        if enabled:
            raise ReleaseSourceError("amp must be off on the CPU")
        return contextlib.nullcontext()

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.amp.autocast = null_autocast
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda, torch.cuda.amp.autocast = tensor_cuda, module_cuda, autocast


class ReleaseTrainer:
    """The release's training iteration, executed from its source on ``net`` (the tool's network)."""

    def __init__(self, source_dir: str, net: nn.Module, cfg: dict):
        path = os.path.join(source_dir, "ScaleMatch.py")
        with open(path) as f:
            self.setup_code, self.body_code = release_step_code(f.read(), "ScaleMatch.py")
        self.train_utils = load_module(os.path.join(source_dir, "util", "train_utils.py"), "release_train_utils")
        ohem = load_module(os.path.join(source_dir, "util", "ohem.py"), "release_ohem")
        self.namespace = {
            "cfg": cfg, "model": net, "torch": torch, "nn": nn, "SGD": torch.optim.SGD,
            "ProbOhemCrossEntropy2d": ohem.ProbOhemCrossEntropy2d, "local_rank": 0,
            "trainloader_u": Loader(ITERS_PER_EPOCH), "amp": False, "ddp": False, "rank": 0, "writer": Silent(),
            "logger": Silent(), "log_avg": self.train_utils.DictAverageMeter(), "time": time,
            "cutmix_img_": self.train_utils.cutmix_img_, "cutmix_mask": self.train_utils.cutmix_mask,
            "confidence_weighted_loss": self.train_utils.confidence_weighted_loss}
        with cpu_release():
            exec(self.setup_code, self.namespace)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.namespace["optimizer"]

    def step(self, batch: dict, epoch: int, index: int, scales: tuple[float, float]) -> dict:
        """One iteration of the loop at (epoch, index); the loop body's variables afterwards."""
        tensors = {name: tensor.clone() for name, tensor in batch.items()}  # its CutMix writes in place
        loader_item = ((tensors["img_x"], tensors["mask_x"]),
                       tuple(tensors[name] for name in ("img_u_w", "img_u_s1", "img_u_s2", "ignore_mask",
                                                        "cutmix_box1", "cutmix_box2", "mask_u_w_gt")),
                       tuple(tensors[name] for name in ("img_u_w_mix", "img_u_s1_mix", "img_u_s2_mix",
                                                        "ignore_mask_mix", "cutmix_box1_mix", "cutmix_box2_mix",
                                                        "mask_u_w_gt_mix")))
        chooser = ScriptedChoice(scales, "the release")
        self.namespace.update(_batch=(index, loader_item), epoch=epoch, random=chooser)
        with cpu_release():
            exec(self.body_code, self.namespace)
        if chooser.picks:
            raise ReleaseSourceError("the release drew fewer scales than (v, t)")
        return self.namespace


def ours_optimizer(model, cfg: dict, iteration: int) -> torch.optim.Optimizer:
    """A fresh optimizer at the learning rate the schedule set after the iteration before ``iteration``."""
    optimizer = scalematch.build_optimizer(cfg, model)
    scalematch.set_poly_lr(optimizer, cfg, iteration - 1, ITERS_PER_EPOCH * cfg["epochs"])
    return optimizer


def ours_step(model, optimizer, batch: dict, cfg: dict, epoch: int, index: int, iters_per_epoch: int,
              scales: tuple[float, float]) -> dict:
    """This codebase's training iteration at (epoch, index) with (v, t) = ``scales``: every call into its trainer
    is here. Returns the pseudo-labels and confidences (unlabeled and partner), the loss terms and the total."""
    labeled = {"image": batch["img_x"], "mask": batch["mask_x"]}
    unlabeled = {"image_weak": batch["img_u_w"], "image_strong": [batch["img_u_s1"], batch["img_u_s2"]],
                 "cutmix_box": [batch["cutmix_box1"], batch["cutmix_box2"]], "ignore_mask": batch["ignore_mask"],
                 "mask": batch["mask_u_w_gt"]}
    partner = {"image_weak": batch["img_u_w_mix"], "image_strong": [batch["img_u_s1_mix"], batch["img_u_s2_mix"]],
               "ignore_mask": batch["ignore_mask_mix"]}
    views = cfg["strong_views"]
    for item, keys in ((unlabeled, ("image_strong", "cutmix_box")), (partner, ("image_strong",))):
        item.update({key: item[key][:views] for key in keys})
    labels = []
    pseudo_label_from = scalematch.pseudo_label_from

    def recording_pseudo_label_from(probs):
        labels.append(pseudo_label_from(probs))
        return labels[-1]

    chooser = ScriptedChoice(scales, "this codebase")
    run = scalematch.Run(cfg, model, optimizer, torch.device("cpu"), iters_per_epoch * cfg["epochs"],
                         iters_per_epoch=iters_per_epoch, logger=logging.getLogger("release_step_parity"))
    run.progress.update(epoch=epoch, step=index, iteration=epoch * iters_per_epoch + index)
    saved = scalematch.random, scalematch.pseudo_label_from
    scalematch.random, scalematch.pseudo_label_from = chooser, recording_pseudo_label_from
    try:
        model.train()
        output = scalematch.train_step(run, {"labeled": labeled, "unlabeled": unlabeled, "partner": partner}, epoch)
    finally:
        scalematch.random, scalematch.pseudo_label_from = saved
    if chooser.picks:
        raise ReleaseSourceError("this codebase drew fewer scales than (v, t)")
    partner_confidence, partner_label = labels[0]
    return {"pseudo_label": output.pseudo_label, "confidence": output.confidence,
            "partner_pseudo_label": partner_label, "partner_confidence": partner_confidence,
            "terms": {name: value.detach() for name, value in output.terms.items()}, "total": output.loss.detach()}


def make_batch(size: int, batch: int, seed: int, iteration: int) -> dict:
    """One iteration's loader output, named as the release's loop unpacks it (the partner's with _mix): images,
    labels with an ignored strip, unlabeled ignore maps (255 on a padding strip of the first image, the partner's
    on the second), and one random CutMix box per strong view and image."""
    generator = torch.Generator().manual_seed(1000 * seed + iteration)
    images = lambda: torch.randn(batch, 3, size, size, generator=generator)
    labels = lambda: torch.randint(0, NCLASS, (batch, size, size), generator=generator)
    strip = max(1, size // 6)

    def ignore_map(image: int) -> torch.Tensor:
        ignore = torch.zeros(batch, size, size, dtype=torch.long)
        ignore[image % batch, -strip:, :] = 255
        return ignore

    def boxes() -> torch.Tensor:
        box = torch.zeros(batch, size, size)
        for image in range(batch):
            height, width = (int(n) for n in torch.randint(size // 4, size // 2 + 1, (2,), generator=generator))
            top, left = (int(n) for n in torch.randint(0, size - max(height, width) + 1, (2,), generator=generator))
            box[image, top:top + height, left:left + width] = 1
        return box

    mask_x = labels()
    mask_x[:, :, :strip] = 255
    tensors = {"img_x": images(), "mask_x": mask_x}
    for suffix, ignored in (("", 0), ("_mix", 1)):
        tensors.update({f"img_u_w{suffix}": images(), f"img_u_s1{suffix}": images(), f"img_u_s2{suffix}": images(),
                        f"ignore_mask{suffix}": ignore_map(ignored), f"cutmix_box1{suffix}": boxes(),
                        f"cutmix_box2{suffix}": boxes(), f"mask_u_w_gt{suffix}": labels()})
    return tensors


def release_cases(cfg: dict) -> list[tuple[float, float]]:
    """Every (v, t) the release's loop can draw."""
    return [(float(v), float(t)) for v in cfg["img_scales"]
            for t in (cfg["feat_s_scales"] if v > 1 else cfg["feat_l_scales"])]


def iteration_positions(warm_up: int) -> list[tuple[int, int]]:
    """(epoch, index): the last two iterations of the last warm-up epoch, then the first after it."""
    return [(warm_up - 1, ITERS_PER_EPOCH - 2), (warm_up - 1, ITERS_PER_EPOCH - 1), (warm_up, 0)]


def calibrate_batchnorm(model: nn.Module, size: int, seed: int) -> None:
    """Running statistics of a fresh network set to one random batch's (train-mode pass, cumulative average), so
    its eval-mode partner pass normalises as in training."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the feature-perturbation branch's dropout masks
        model(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed + 5)), image_scales=(2.0,),
              feature_scale=1.0)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def step_config(backbone: str, conf_thresh: float, overrides: list[str]) -> dict:
    return load_config(str(ROOT / "configs" / "pascal.yaml"),
                       [f"backbone={backbone}", "pretrained=null", f"conf_thresh={conf_thresh}", "amp=false",
                        *overrides])


def seeded_model(cfg: dict, size: int, seed: int) -> nn.Module:
    """This codebase's network initialised under torch.manual_seed(seed), BatchNorm statistics calibrated."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg)
    calibrate_batchnorm(model, size, seed)
    return model


def release_state_from(model: nn.Module, net: nn.Module) -> dict:
    """``model``'s tensors under the release network's names."""
    ours = model.state_dict()
    return {name: ours[project_name(name)].clone().reshape(tensor.shape) for name, tensor in net.state_dict().items()}


def relative(ours: torch.Tensor, release: torch.Tensor) -> float:
    if ours.numel() == release.numel():  # a few CIF tensors are stored (C,) here, (1, 1, C) in the release
        ours = ours.reshape(release.shape)
    if ours.shape != release.shape:
        raise ReleaseSourceError(f"shape {tuple(ours.shape)} here, {tuple(release.shape)} in the release")
    difference = float((ours.double() - release.double()).abs().max()) if ours.numel() else 0.0
    return difference / max(float(release.double().abs().max()) if release.numel() else 0.0, 1e-30)


class Table:
    """Per compared quantity: how many comparisons, the worst value, and where."""

    def __init__(self, per_iteration: bool = False):
        self.rows: dict[str, list] = {}
        self.mask_ratios: list[float] = []
        self.per_iteration, self.iteration = per_iteration, 0

    def add(self, name: str, value: float, tolerance: float, where: str, unit: str = "relative") -> None:
        if self.per_iteration:
            name = f"iteration {self.iteration + 1}: {name}"
        row = self.rows.setdefault(name, [0, -1.0, tolerance, "", unit])
        row[0] += 1
        if value > row[1]:
            row[1], row[3] = value, where

    def markdown(self) -> str:
        lines = ["| compared after each step | comparisons | worst | tolerance | worst at | passes |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for name, (count, worst, tolerance, where, unit) in self.rows.items():
            shown = f"{worst:.0f} pixels" if unit == "pixels" else ("exact" if unit == "exact" and worst == 0
                                                                     else f"{worst:.2e}")
            limit = "exact" if unit in ("pixels", "exact") else f"{tolerance:.0e}"
            lines.append(f"| {name} | {count} | {shown} | {limit} | {where} | "
                         f"{'yes' if worst <= tolerance else '**no**'} |")
        return "\n".join(lines)

    def passed(self) -> bool:
        return all(worst <= tolerance for _, worst, tolerance, _, _ in self.rows.values())


def compare_step(table: Table, where: str, release: dict, net: nn.Module, ours: dict, model: nn.Module,
                 optimizer: torch.optim.Optimizer) -> None:
    table.mask_ratios.append(float(release["mask_ratio"]))
    for prefix, suffix in (("", ""), ("partner_", "_mix")):
        label = release[f"mask_u_w{suffix}"]
        table.add(f"{prefix or 'unlabeled '}pseudo-label".replace("_", " "),
                  float((ours[f"{prefix}pseudo_label"] != label).sum()), 0, where, "pixels")
        table.add(f"{prefix or 'unlabeled '}confidence".replace("_", " "),
                  relative(ours[f"{prefix}confidence"], release[f"conf_u_w{suffix}"]), 1e-6, where)
    for name, release_name in TERMS.items():
        table.add(f"loss {name} / {release_name}", relative(ours["terms"][name], release[release_name].detach()),
                  1e-6, where)
    table.add("total loss", relative(ours["total"], release["total_loss"].detach()), 1e-6, where)
    parameters = dict(model.named_parameters())
    momentum = lambda opt, p: opt.state[p]["momentum_buffer"]
    release_optimizer = release["optimizer"]
    rows = ("gradient", "momentum buffer", "weight after the step")
    worst = {what: (0.0, "") for what in rows}
    for name, release_parameter in net.named_parameters():
        parameter = parameters[project_name(name)]
        for what, ours_tensor, release_tensor in (
                ("gradient", parameter.grad, release_parameter.grad),
                ("momentum buffer", momentum(optimizer, parameter), momentum(release_optimizer, release_parameter)),
                ("weight after the step", parameter.detach(), release_parameter.detach())):
            value = relative(ours_tensor, release_tensor)
            if value >= worst[what][0]:
                worst[what] = (value, name)
    for what in rows:
        table.add(f"{what} (worst tensor)", worst[what][0], 1e-4, f"{where}, {worst[what][1]}")
    buffers = dict(model.named_buffers())
    statistics, counts = (0.0, ""), 0
    for name, release_buffer in net.named_buffers():
        buffer = buffers[project_name(name)]
        if name.endswith("num_batches_tracked"):
            counts += int(not torch.equal(buffer, release_buffer))
            continue
        value = relative(buffer, release_buffer)
        if value >= statistics[0]:
            statistics = (value, name)
    table.add("BatchNorm running mean / var (worst tensor)", statistics[0], 1e-5, f"{where}, {statistics[1]}")
    table.add("BatchNorm num_batches_tracked (differing tensors)", counts, 0, where, "exact")
    lr_differences = sum(ours_group["lr"] != release_group["lr"]
                         for ours_group, release_group in zip(optimizer.param_groups, release_optimizer.param_groups))
    table.add("learning rate of each group (differing groups)", lr_differences, 0, where, "exact")


def check_groups(model: nn.Module, optimizer, net: nn.Module, release_optimizer) -> None:
    """Both optimizers hold the same tensors in the same groups."""
    names = {id(p): project_name(name) for name, p in net.named_parameters()}
    ours = {id(p): name for name, p in model.named_parameters()}
    for index, (ours_group, release_group) in enumerate(zip(optimizer.param_groups, release_optimizer.param_groups)):
        if {ours[id(p)] for p in ours_group["params"]} != {names[id(p)] for p in release_group["params"]}:
            raise ReleaseSourceError(f"param group {index} holds other tensors here than in the release")


def fresh_optimizers(model, cfg, trainer, net, release_cfg, epoch, index):
    """Both optimizers, fresh, at the learning rate the schedule set after the iteration before (epoch, index)."""
    optimizer = ours_optimizer(model, cfg, epoch * ITERS_PER_EPOCH + index)
    with cpu_release():
        exec(trainer.setup_code, trainer.namespace)
    check_groups(model, optimizer, net, trainer.optimizer)
    previous = epoch * ITERS_PER_EPOCH + index - 1
    lr = release_cfg["lr"] * (1 - previous / (ITERS_PER_EPOCH * release_cfg["epochs"])) ** 0.9
    for group, scale in zip(trainer.optimizer.param_groups, (1.0, release_cfg["lr_multi"])):
        group["lr"] = lr * scale
    return optimizer


def run_case(tool, trainer, net, release_start, model, ours_start, cfg, release_cfg, case, args, table, record):
    """The case's iterations. Consecutive ones unless a fixture is written: then one from the start state (the test
    that reads the fixture has no release state to continue from), the last warm-up iteration for the first case,
    the first after warm-up for the second, and so on alternately."""
    positions = iteration_positions(release_cfg["warm_up"])
    if record is not None:
        positions = [positions[1 + len(record) % 2]]
    for number, (epoch, index) in enumerate(positions):
        if number == 0 or record is not None:
            net.load_state_dict(release_start)
            model.load_state_dict(ours_start)
            optimizer = fresh_optimizers(model, cfg, trainer, net, release_cfg, epoch, index)
        batch = make_batch(args.size, 2, args.seed, number)
        dropout_seed, keep = 100 * args.seed + number, {}
        with tool.deterministic_dropout(dropout_seed, keep):
            release = trainer.step(batch, epoch, index, case)
        with tool.deterministic_dropout(dropout_seed):
            ours = ours_step(model, optimizer, batch, cfg, epoch, index, ITERS_PER_EPOCH, case)
        where = f"v={case[0]} t={case[1]} epoch {epoch} i {index}"
        table.iteration = number
        compare_step(table, where, release, net, ours, model, optimizer)
        if record is not None:
            record.append(pinned_step(case, epoch, index, number, keep, release, net, release_start,
                                      trainer.optimizer))
        elif not args.free_running:
            take_release_state(model, optimizer, net, trainer.optimizer)


def take_release_state(model, optimizer, net, release_optimizer) -> None:
    """Our weights, momentum buffers and BatchNorm statistics set to the release's (see the module docstring)."""
    parameters, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    with torch.no_grad():
        for name, release_parameter in net.named_parameters():
            parameter = parameters[project_name(name)]
            parameter.copy_(release_parameter.reshape(parameter.shape))
            buffer = release_optimizer.state[release_parameter].get("momentum_buffer")
            if buffer is not None:
                optimizer.state[parameter]["momentum_buffer"].copy_(buffer.reshape(parameter.shape))
        for name, release_buffer in net.named_buffers():
            buffers[project_name(name)].copy_(release_buffer.reshape(buffers[project_name(name)].shape))


def pinned_step(case, epoch, index, number, keep, release, net, release_start, release_optimizer) -> dict:
    """What the fixture keeps of one release iteration: per tensor (in the release network's order) the gradient's
    norm, the norm of the step's change of the weight, the BatchNorm statistics' norms."""
    parameters = [(name, p) for name, p in net.named_parameters()]
    statistics = [(name, b) for name, b in net.named_buffers() if not name.endswith("_tracked")]
    return {"v": case[0], "t": case[1], "epoch": epoch, "index": index, "batch": number, "dropout_keep": keep,
            "pseudo_label": release["mask_u_w"].to(torch.uint8), "confidence": release["conf_u_w"].clone(),
            "partner_pseudo_label": release["mask_u_w_mix"].to(torch.uint8),
            "terms": {name: float(release[release_name].detach()) for name, release_name in TERMS.items()},
            "total": float(release["total_loss"].detach()),
            "gradient_norm": torch.stack([p.grad.double().norm() for _, p in parameters]),
            "update_norm": torch.stack([(p.detach().double() - release_start[name].double()).norm()
                                        for name, p in parameters]),
            "statistic_norm": torch.stack([b.double().norm() for _, b in statistics]),
            "lr": [group["lr"] for group in release_optimizer.param_groups]}


def use_translated_kernels(net: nn.Module, release_dir: str) -> None:
    """The release network's WKV op (vrwkv.RUN_CUDA) as its wkv_cuda.cu computes it, forward and backward: the
    kernels translated from that source at run time (scripts/release_wkv_backward.py), in float64."""
    kernels = ReleaseKernels(release_dir)

    class TranslatedWKV(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w, u, k, v):
            ctx.save_for_backward(w, u, k, v)
            return kernels.forward(w.double(), u.double(), k.double(), v.double()).to(v.dtype)

        @staticmethod
        def backward(ctx, grad_y):
            w, u, k, v = ctx.saved_tensors
            gradients, _ = kernels.backward(w.double(), u.double(), k.double(), v.double(), grad_y.double())
            return tuple(g.to(x.dtype) for g, x in zip(gradients, (w, u, k, v)))

    namespaces = [type(module).forward.__globals__ for module in net.modules()
                  if "RUN_CUDA" in type(module).forward.__globals__]
    if not namespaces:
        raise ReleaseSourceError("no module of the release's network calls RUN_CUDA")
    for namespace in namespaces:
        namespace["RUN_CUDA"] = TranslatedWKV.apply


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("release_dir", help="the release's git directory or a checkout of it")
    parser.add_argument("--tool", type=Path, default=DEFAULT_TOOL, help=f"release_model.py (default: {DEFAULT_TOOL})")
    parser.add_argument("--backbone", choices=("resnet101", "resnet50"), default="resnet101")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=65, help="image side (default: 65)")
    parser.add_argument("--conf-thresh", type=float, default=0.08,
                        help="conf_thresh of both sides (default: 0.08)")
    parser.add_argument("--case", action="append", metavar="V,T", help="only this (v, t) of the release's (repeatable)")
    parser.add_argument("--free-running", action="store_true",
                        help="each side continues from its own state (default: ours takes the release's after each)")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--write-fixture", metavar="PATH", help="pin the release's step on seeded weights")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for this codebase's side")
    args = parser.parse_intermixed_args(argv)
    tool = load_tool(args.tool)
    started = time.time()
    cfg = step_config(args.backbone, args.conf_thresh, args.overrides)
    try:
        net = tool.build_release_model(args.release_dir, nclass=NCLASS, backbone=args.backbone, seed=args.seed,
                                       calibrate=not args.write_fixture)
    except tool.ReleaseError as error:
        raise ReleaseSourceError(str(error)) from None
    # This codebase's emulation of the release kernel meets the kernels of the release's own source.
    wkv = "the formula (float64)"
    if cfg["cif_wkv"] == "release_kernel":
        use_translated_kernels(net, args.release_dir)
        wkv = "its wkv_cuda.cu kernels translated (float64)"
    release_cfg = dict(net.release_config, conf_thresh=args.conf_thresh, amp=False)
    with tempfile.TemporaryDirectory() as folder:
        extract_sources(args.release_dir, folder)
        trainer = ReleaseTrainer(folder, net, release_cfg)
        if args.write_fixture:
            model = seeded_model(cfg, args.size, args.seed)
            net.load_state_dict(release_state_from(model, net))
        else:
            release_checkpoint, converted = os.path.join(folder, "release.pth"), os.path.join(folder, "ours.pth")
            tool.write_release_checkpoint(net, release_checkpoint)
            convert(release_checkpoint, converted, str(ROOT / "configs" / "pascal.yaml"),
                    [f"backbone={args.backbone}", *args.overrides])
            model = load_trained_model(converted, torch.device("cpu"))[0]
    if release_cfg["warm_up"] != cfg["warm_up"] or release_cfg["epochs"] != cfg["epochs"]:
        raise ReleaseSourceError(f"warm_up/epochs {cfg['warm_up']}/{cfg['epochs']} here, "
                                 f"{release_cfg['warm_up']}/{release_cfg['epochs']} in the release")
    cases = release_cases(release_cfg)
    if args.case:
        chosen = [tuple(float(x) for x in text.split(",")) if re.fullmatch(r"[\d.]+,[\d.]+", text) else text
                  for text in args.case]
        unknown = [case for case in chosen if case not in cases]
        if unknown:
            parser.error(f"--case {unknown[0]}: the release draws only {cases}")
        cases = chosen
    release_start = {name: tensor.clone() for name, tensor in net.state_dict().items()}
    ours_start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    table, record = Table(per_iteration=args.free_running), [] if args.write_fixture else None
    for case in cases:
        run_case(tool, trainer, net, release_start, model, ours_start, cfg, release_cfg, case, args, table, record)
    info = net.release_info
    if args.write_fixture:
        steps = (f"1 iteration from the seeded state (alternately epoch {release_cfg['warm_up'] - 1} i "
                 f"{ITERS_PER_EPOCH - 1} and epoch {release_cfg['warm_up']} i 0)")
    else:
        steps = (f"3 consecutive iterations (epoch {release_cfg['warm_up'] - 1} i {ITERS_PER_EPOCH - 2}, "
                 f"{ITERS_PER_EPOCH - 1}; epoch {release_cfg['warm_up']} i 0; {ITERS_PER_EPOCH} per epoch), "
                 + ("each side on its own state" if args.free_running else
                    "ours taking the release's state after each"))
    header = (f"Release {info['commit']}, {args.backbone}, seed {args.seed}, {len(cases)} (v, t) x {steps}; 2 + 2 + 2 "
              f"images of {args.size} x {args.size}, conf_thresh {args.conf_thresh}, float32 CPU, Bi-WKV "
              f"{wkv} in the release; torch {torch.__version__}; overrides: "
              f"{' '.join(args.overrides) or 'none'}.")
    confident = (f"Confident share of the unlabeled pixels (the release's mask_ratio): {min(table.mask_ratios):.2f} to "
                 f"{max(table.mask_ratios):.2f} over the iterations.")
    timing = f"{time.time() - started:.0f} s on {os.cpu_count()} CPU cores ({torch.get_num_threads()} threads)."
    text = "\n".join([header, "", table.markdown(), "", confident, timing])
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.write_fixture:
        torch.save({"format": "scalematch-release-step/1", "info": {
            "commit": info["commit"], "backbone": args.backbone, "seed": args.seed, "size": args.size,
            "conf_thresh": args.conf_thresh, "iters_per_epoch": ITERS_PER_EPOCH, "torch": str(torch.__version__),
            "parameter_names": [project_name(name) for name, _ in net.named_parameters()],
            "statistic_names": [project_name(name) for name, b in net.named_buffers()
                                if not name.endswith("_tracked")]},
            "steps": record}, args.write_fixture)
        print(f"wrote {args.write_fixture} ({os.path.getsize(args.write_fixture) / 1024:.0f} KiB)")
    return 0 if table.passed() else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ReleaseSourceError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
