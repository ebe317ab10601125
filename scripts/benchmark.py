"""Benchmark suite: training step time, memory of ISVC against multi-resolution input, bi_wkv, data pipeline,
evaluation throughput and compute efficiency, printed as Markdown (one table per section, nothing else on stdout).

    python scripts/benchmark.py [--sections 1,2,3,4,5,6] [--quick] [--device cpu|cuda] [--backbone tv_resnet18]
                                [--crop 96] [--batch 2] [--steps 5] [--threads N]

Sections: 1 training step time (supervised, FixMatch, ScaleMatch per image scale v, interleaved, medians) against the
pixel-count prediction; 2 peak memory of ISVC and MRI for the scale groups of the paper's Table 5; 3 bi_wkv error and
time against the O(T^2) oracle (functions of scripts/benchmark_wkv.py); 4 unlabeled samples per second of one data
worker, against a UniMatch-style PIL pipeline; 5 evaluation images per second; 6 achieved FLOP/s of a training step
relative to a large matrix multiply.

Defaults fit a small CPU (tv_resnet18, crop 96, batch 2); with --device cuda they are the Pascal setting (resnet101
with the deep stem, 21 classes, crop 513, batch 2 labeled + 2 unlabeled, fp16 autocast with the gradient scaler as the
release), section 1 also compares the step with the release's logged time and section 2 adds the peak memory of a
whole training process per image scale. Models are randomly initialised and inputs synthetic: speed and memory do not
depend on the weights. --quick shrinks everything (tv_resnet10, a 32-channel head, crop 32) to check that the suite
runs (its numbers mean nothing). On a CPU shared with other work, --threads 1 keeps timings stable: with every core
busy, each multi-threaded op waits for its slowest thread.
"""
import argparse
import inspect
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import scalematch  # noqa: E402
from benchmark_wkv import (LENGTHS, OtherLoad, fast_step, float32_error, median_seconds,  # noqa: E402
                           quadratic_step, timing_inputs)
from benchmark_wkv import TARGETS as WKV_TARGETS  # noqa: E402
from dataset.semi import SemiDataset  # noqa: E402
from dataset.transforms import IMAGENET_MEAN, IMAGENET_STD, cutmix_box  # noqa: E402
from model import build_model  # noqa: E402
from util.config import SCHEMA, ConfigError, validate  # noqa: E402
from util.evaluation import averaged_predictor  # noqa: E402
from util.inference import predict_probs, predict_sliding_window, window_spans  # noqa: E402

NCLASS = 6
PASCAL_NCLASS = 21  # the GPU default is the Pascal setting: the logits of every view have this many channels
SECTIONS = (1, 2, 3, 4, 5, 6)
TARGETS = {"step_vs_pixels": 1.1, "isvc_vs_largest": 1.05, "data_speedup": 1.5, "window_batching": 2.0,
           "peak_per_gpu_gib": 12.0, "release_step_s": 0.85}
# Scale groups of the paper's Table 5 (the baseline has no rescaled view).
SCALE_GROUPS = ((), (0.5,), (2.0,), (0.5, 2.0), (0.25, 0.5, 1.5, 2.0))
# (crop, name, image width, height, file format, timed samples) of the data pipeline: Pascal VOC and Cityscapes.
DATA_INPUTS = ((513, "Pascal-like", 500, 375, "JPEG", 30), (801, "Cityscapes-like", 2048, 1024, "PNG", 12))
EVAL_SCALES = (0.5, 2.0)
NO_GRAD_COST = 1 / 3  # a forward pass without backward, in trained passes (backward costs about two forwards)
MIB = 2 ** 20
GIB = 2 ** 30
MOMENTUM_TRIES = 8  # steps a memory measurement waits for fp16's scaler to apply an update (halving its scale each)


@dataclass
class Setup:
    """What every section runs on: device, network, classes, crop, batch and how many timed repetitions."""
    device: torch.device
    backbone: str
    crop: int
    batch: int
    steps: int
    warmup: int
    quick: bool
    nclass: int = NCLASS
    head_channels: int = SCHEMA["head_channels"].default  # the release's
    image_scales: tuple[float, ...] = ()
    scale_groups: tuple[tuple[float, ...], ...] = SCALE_GROUPS
    amp_dtype: torch.dtype | None = None
    cache: dict = field(default_factory=dict)

    def config(self, **overrides) -> dict:
        base = {"dataset": "synthetic", "data_root": "unused", "nclass": self.nclass, "backbone": self.backbone,
                "head_channels": self.head_channels, "pretrained": None, "crop_size": self.crop,
                "batch_size": self.batch}
        return validate(dict(base, **overrides), "benchmark")

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, run: Callable[[], object]) -> float:
        """Wall seconds of one call of ``run``, with the GPU's queue drained before and after."""
        self.synchronize()
        start = time.perf_counter()
        run()
        self.synchronize()
        return time.perf_counter() - start

    def autocast(self):
        enabled = self.amp_dtype is not None
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=enabled)


# ---------------------------------------------------------------------------------------------------------------------
# Training steps


# The three settings of section 1; FixMatch is spelled out although fp and one strong view are the defaults.
SUPERVISED = {"train_mode": "supervised"}
FIXMATCH = {"isvc": False, "fsvc": False, "cif": False, "fp": True, "strong_views": 1}


def scalematch_at(scale: float | None = None, mri_group: tuple[float, ...] | None = None) -> dict:
    """ScaleMatch defaults with the image scale(s) pinned and the feature scale t = 1 (a draw the paired rule allows
    for every v), so that every measured step does the same work."""
    if mri_group is not None:
        return {"img_scales": list(mri_group), "mri": True, "feature_scales": [1.0]}
    return {"img_scales": [scale], "feature_scales": [1.0]}


def synthetic_batches(setup: Setup, seed: int = 0) -> tuple[dict, dict, dict]:
    """Labeled, unlabeled and CutMix-partner batches shaped like the data loaders', already on the device."""
    g = torch.Generator().manual_seed(seed)
    size, batch = setup.crop, setup.batch

    def images() -> torch.Tensor:
        return torch.randn(batch, 3, size, size, generator=g).to(setup.device)

    def labels(high: int = setup.nclass) -> torch.Tensor:
        return torch.randint(0, high, (batch, size, size), generator=g).to(setup.device)

    ignore = torch.zeros(batch, size, size, dtype=torch.long, device=setup.device)
    ignore[:, :, -size // 8:] = 255  # padding on the right, as after a rescale below the crop size
    labeled = {"image": images(), "mask": labels()}
    # 0/1 maps stand in for CutMix boxes: the mixing costs the same whatever their shape.
    unlabeled = {"image_weak": images(), "image_strong": [images()], "cutmix_box": [labels(2)],
                 "ignore_mask": ignore, "mask": labels()}
    partner = {"image_weak": images(), "image_strong": [images()], "cutmix_box": [labels(2)], "ignore_mask": ignore}
    return labeled, unlabeled, partner


class Trainer:
    """A model and optimizer of one setting; ``step(cfg)`` runs scalematch.train_step, the trainer's own iteration, on
    fixed synthetic batches (forward, loss of Eq. 17, backward, SGD update, through the gradient scaler under fp16)."""

    def __init__(self, setup: Setup, cfg: dict, seed: int = 0):
        self.setup = setup
        torch.manual_seed(seed)
        self.model = build_model(cfg).to(setup.device).train()
        self.optimizer = scalematch.build_optimizer(cfg, self.model)
        # A schedule long enough that the measured steps run at the configured rate.
        self.run = scalematch.Run(cfg, self.model, self.optimizer, setup.device, total_iters=10 ** 9,
                                  scaler=torch.amp.GradScaler("cuda", enabled=setup.amp_dtype == torch.float16),
                                  amp_dtype=setup.amp_dtype)
        self.batches = synthetic_batches(setup, seed)

    def step(self, cfg: dict) -> None:
        self.run.cfg = cfg
        labeled, unlabeled, partner = self.batches
        # After warm-up, so pseudo-labels come from the configured fusion as in most of training.
        scalematch.train_step(self.run, {"labeled": labeled, "unlabeled": unlabeled, "partner": partner},
                              epoch=cfg["warm_up"])
        # Freed here rather than at the next step's start, so no step's peak includes the last step's gradients.
        self.optimizer.zero_grad(set_to_none=True)


def step_flops(trainer: Trainer, cfg: dict) -> int:
    """FLOPs of one training step (forward and backward; convolutions and matrix products) by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        trainer.step(cfg)
    return counter.get_total_flops()


def decoder_share(trainer: Trainer) -> float:
    """The decoder's share of the FLOPs of a forward pass at 1x: the cost of UniMatch's feature-perturbed branch,
    which reruns only the decoder, relative to a whole pass."""
    segmenter = trainer.model.segmenter
    images = torch.cat((trainer.batches[0]["image"], trainer.batches[1]["image_weak"]))
    with torch.no_grad(), FlopCounterMode(display=False) as encoder:
        low, high = segmenter.encode(images)
    with torch.no_grad(), FlopCounterMode(display=False) as decoder:
        segmenter.decode(low, high)
    return decoder.get_total_flops() / (encoder.get_total_flops() + decoder.get_total_flops())


def fixmatch_pixels(share: float) -> float:
    """Work of a FixMatch step in trained passes of B images at 1x: labeled + weak unlabeled (2), the perturbed
    decoder on both (2 x decoder share), the strong view (1) and the CutMix partner without gradient (1/3)."""
    return 2 + 2 * share + 1 + NO_GRAD_COST


def predicted_ratio(share: float, scale: float) -> float:
    """ScaleMatch / FixMatch step time predicted from pixels: the rescaled view adds labeled + unlabeled at v^2."""
    return (fixmatch_pixels(share) + 2 * scale ** 2) / fixmatch_pixels(share)


def training_measurements(setup: Setup) -> dict:
    """Median step seconds and FLOPs of supervised, FixMatch and ScaleMatch at each image scale, measured once for
    sections 1 and 6: all settings interleaved (A B C ... A B C ...) so that a change of machine load hits them
    alike, ``setup.warmup`` rounds discarded (the first counts the FLOPs)."""
    if "training" in setup.cache:
        return setup.cache["training"]
    scales = list(setup.image_scales)
    trainers = {"supervised": Trainer(setup, setup.config(**SUPERVISED)),
                "FixMatch": Trainer(setup, setup.config(**FIXMATCH)),
                "ScaleMatch": Trainer(setup, setup.config(**scalematch_at(scales[0])))}
    settings = [("supervised", "supervised", setup.config(**SUPERVISED)),
                ("FixMatch", "FixMatch", setup.config(**FIXMATCH))]
    settings += [(f"ScaleMatch v={v:g}", "ScaleMatch", setup.config(**scalematch_at(v))) for v in scales]
    times = {name: [] for name, _, _ in settings}
    flops = {name: step_flops(trainers[trainer], cfg) for name, trainer, cfg in settings}
    load = OtherLoad()
    load.start()
    for round_ in range(1, setup.warmup + setup.steps):
        for name, trainer, cfg in settings:
            seconds = setup.timed(lambda: trainers[trainer].step(cfg))
            if round_ >= setup.warmup:
                times[name].append(seconds)
    other = load.share()
    result = {"scales": scales, "median": {name: statistics.median(t) for name, t in times.items()},
              "spread": {name: (min(t), max(t)) for name, t in times.items()}, "flops": flops,
              "decoder_share": decoder_share(trainers["FixMatch"]), "other_load": other}
    setup.cache["training"] = result
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Output


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def load_note(share: float | None) -> str:
    return "other processes' CPU share: n/a" if share is None else f"other processes took {share:.0%} of the CPU time"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_header(setup: Setup, argv: list[str]) -> str:
    device = "CPU (no GPU)"
    classes = ""
    if setup.device.type == "cuda":
        memory = torch.cuda.get_device_properties(setup.device).total_memory / GIB
        device = f"{torch.cuda.get_device_name(setup.device)}, {memory:.0f} GiB, CUDA {torch.version.cuda}"
        classes = f", {setup.nclass} classes"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = [["command", f"`{shlex.join(['python', 'scripts/benchmark.py', *argv])}`"],
            ["CPU", f"{cpu_model()}, {os.cpu_count()} logical cores, torch threads: {torch.get_num_threads()}"],
            ["device", device], ["torch", f"{torch.__version__}, Python {platform.python_version()}"],
            ["setting", f"{setup.backbone}{classes}, crop {setup.crop}, "
                        f"batch {setup.batch} labeled + {setup.batch} unlabeled, "
                        f"{'autocast ' + str(setup.amp_dtype).removeprefix('torch.') if setup.amp_dtype else 'float32'}"
                        f", {setup.steps} timed repetitions after {setup.warmup} warm-up"],
            ["load average at start", load]]
    return "# scalematch benchmarks\n\n" + table(["", ""], rows)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Training step time


def section_step_time(setup: Setup) -> str:
    m = training_measurements(setup)
    median, flops, share = m["median"], m["flops"], m["decoder_share"]
    fixmatch, supervised = median["FixMatch"], median["supervised"]

    def row(name: str, seconds: float, spread: str, predicted: float | None, counted: float) -> list[str]:
        measured = seconds / fixmatch
        return [name, f"{seconds * 1e3:.0f}", spread, f"{seconds / supervised:.2f}", f"{measured:.2f}",
                "" if predicted is None else f"{predicted:.2f}",
                "" if predicted is None else f"{measured / predicted:.2f}", f"{counted / flops['FixMatch']:.2f}"]

    def spread(name: str) -> str:
        low, high = m["spread"][name]
        return f"{low * 1e3:.0f}-{high * 1e3:.0f}"

    rows = [row(name, median[name], spread(name), None, flops[name]) for name in ("supervised", "FixMatch")]
    names = [f"ScaleMatch v={v:g}" for v in m["scales"]]
    rows += [row(name, median[name], spread(name), predicted_ratio(share, v), flops[name])
             for name, v in zip(names, m["scales"])]
    # v is drawn uniformly from img_scales, so the expected step is the mean of the per-v steps.
    mean_predicted = statistics.mean(predicted_ratio(share, v) for v in m["scales"])
    mean_step = statistics.mean(median[n] for n in names)
    rows.append(row(f"ScaleMatch, mean over img_scales {m['scales']}", mean_step, "", mean_predicted,
                    statistics.mean(flops[n] for n in names)))
    mean_ratio = float(rows[-1][6])
    worst_v, worst = max(((v, median[n] / fixmatch / predicted_ratio(share, v)) for n, v in zip(names, m["scales"])),
                         key=lambda check: check[1])
    limit = TARGETS["step_vs_pixels"]
    notes = (f"Median (and range) of {setup.steps} interleaved steps per setting ({load_note(m['other_load'])}). "
             f"Pixel model: a FixMatch step is {fixmatch_pixels(share):.2f} trained passes of B images at 1x "
             f"(labeled + weak unlabeled 2, perturbed decoder 2 x {share:.2f} = its FLOP share of a pass, strong view "
             f"1, CutMix partner without gradient {NO_GRAD_COST:.2f}); ScaleMatch adds labeled + unlabeled at v^2 "
             f"(2 v^2). FixMatch: isvc, fsvc, cif off, fp on, 1 strong view. ScaleMatch: defaults with v pinned and "
             f"t = 1.\n\n"
             f"Target: ScaleMatch within {limit}x of the pixel prediction: mean over img_scales "
             f"{mean_ratio:.2f} {verdict(mean_ratio <= limit)}; worst single v ({worst_v:g}) {worst:.2f} "
             f"{verdict(worst <= limit)}.")
    if setup.device.type == "cuda":
        release = TARGETS["release_step_s"]
        notes += (f"\n\nTarget: a ScaleMatch step no slower than the release's {release} s per iteration of "
                  f"{setup.batch} + {setup.batch} images per GPU (its training log, 4 x RTX 4090, other GPUs than "
                  f"this one): mean over img_scales {mean_step:.3f} s {verdict(mean_step <= release)}. The step here "
                  f"excludes data loading and DDP's gradient all-reduce.")
    header = ["setting", "step ms", "range ms", "x supervised", "x FixMatch", "x FixMatch predicted (pixels)",
              "measured / predicted", "FLOPs x FixMatch"]
    return "## 1. Training step time\n\n" + table(header, rows) + "\n\n" + notes


# ---------------------------------------------------------------------------------------------------------------------
# 2. Memory of ISVC and multi-resolution input


class SavedActivations:
    """Bytes of the distinct storages autograd saves for backward while active (parameters excluded): the
    activation memory of a step, the part that grows with the input size. Exact and deterministic."""

    def __init__(self, model: torch.nn.Module):
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[tuple[str, int], int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameters:
            self.storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
        return tensor

    def run(self, step: Callable[[], None]) -> int:
        self.storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            step()
        return sum(self.storages.values())


def peak_allocated(setup: Setup, step: Callable[[], None]) -> int:
    """Peak bytes allocated during ``step`` above what was allocated before it: torch.cuda.max_memory_allocated on a
    GPU; on the CPU the allocator's running total ('Total Allocated' of the memory events) that torch.profiler
    records with profile_memory=True."""
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(setup.device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        trace = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as file:
            events = json.load(file)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not memory:
        return 0
    # The counter's value before the first event of the step is that event's total minus its own bytes.
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - start


def resident_bytes(trainer: Trainer) -> int:
    """Bytes a training process holds between steps: parameters, buffers, optimizer state and its batches."""
    tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
    tensors += [t for state in trainer.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    for batch in trainer.batches:
        for value in batch.values():
            tensors += value if isinstance(value, list) else [value]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def measure_memory(setup: Setup, trainer: Trainer, cfg: dict) -> tuple[int, int, int, int | None] | None:
    """(saved activation bytes, peak allocated bytes, bytes held between steps, torch.cuda.max_memory_reserved during
    the step, None on the CPU) of a training step; the step that counts the saved tensors comes first and creates the
    momentum buffers, so the peak is that of a step in the middle of training. None when the GPU runs out of memory."""
    try:
        saved = SavedActivations(trainer.model).run(lambda: trainer.step(cfg))
        # fp16's scaler skips the update of a step whose gradients overflow, and the momentum buffers come with it.
        for _ in range(MOMENTUM_TRIES):
            if trainer.optimizer.state:
                break
            trainer.step(cfg)
        peak = peak_allocated(setup, lambda: trainer.step(cfg))
        # peak_allocated reset the peak statistics before the step, the reserved one included.
        reserved = torch.cuda.max_memory_reserved(setup.device) if setup.device.type == "cuda" else None
        return saved, peak, resident_bytes(trainer), reserved
    except torch.cuda.OutOfMemoryError:
        pass
    # Outside the except block, whose traceback still holds the failed step's tensors.
    trainer.optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return None


def mebibytes(value: int | None) -> str:
    return "OOM" if value is None else f"{value / MIB:.1f}"


def section_memory(setup: Setup) -> str:
    baseline = measure_memory(setup, Trainer(setup, setup.config(**FIXMATCH)), setup.config(**FIXMATCH))
    trainer = Trainer(setup, setup.config(**scalematch_at(1.0)))
    single = {v: measure_memory(setup, trainer, setup.config(**scalematch_at(v)))
              for v in sorted({v for group in setup.scale_groups for v in group})}
    saved, peak = (None, None) if baseline is None else baseline[:2]
    rows = [["baseline (FixMatch)", "-", mebibytes(saved), "", "", mebibytes(peak), "", "", "", ""]]
    isvc_ratios, mri_ratios = [], []
    for group in setup.scale_groups[1:]:
        largest = single[max(group)]
        # ISVC: one scale per step, so the most any step of the group needs; MRI: all scales in one step.
        isvc = None if any(single[v] is None for v in group) else tuple(max(single[v][i] for v in group)
                                                                          for i in (0, 1))
        mri = measure_memory(setup, trainer, setup.config(**scalematch_at(mri_group=group)))
        ratios = []
        for result, collected in ((isvc, isvc_ratios), (mri, mri_ratios)):
            ratio = None if result is None or largest is None else result[1] / largest[1]
            ratios.append("" if ratio is None else f"{ratio:.2f}")
            if ratio is not None:
                collected.append((group, ratio))
        rows.append([" + ".join(f"{v:g}" for v in group), f"{max(group):g}"]
                    + [mebibytes(r and r[i]) for i in (0, 1) for r in (isvc, mri, largest)] + ratios)
    limit = TARGETS["isvc_vs_largest"]
    worst_isvc = max((ratio for _, ratio in isvc_ratios), default=None)
    isvc_verdict = "n/a (out of memory)" if worst_isvc is None else f"{worst_isvc:.2f}x {verdict(worst_isvc <= limit)}"
    mri_growth = ", ".join(f"{' + '.join(f'{v:g}' for v in group)}: {ratio:.2f}x"
                           for group, ratio in mri_ratios if len(group) > 1) or "n/a"
    kind = "GPU max_memory_allocated" if setup.device.type == "cuda" else "CPU allocator peak (torch.profiler)"
    notes = (f"MiB of one training step (forward, backward, update) once the momentum buffers exist. 'saved' is the "
             f"exact size of the distinct tensors autograd keeps for backward (torch.autograd.graph."
             f"saved_tensors_hooks, parameters excluded); 'peak' is the {kind} above the memory in use before the "
             f"step. ISVC draws one scale per step, so its peak is the largest over steps at each scale of the "
             f"group; MRI runs every scale of the group in the same step. ScaleMatch defaults with t = 1.\n\n"
             f"Target: ISVC peak within {limit - 1:.0%} of the largest-scale-only step: worst {isvc_verdict}. "
             f"MRI peak over largest-scale-only: {mri_growth}.")
    header = ["scale group", "largest v", "ISVC saved", "MRI saved", "largest-only saved", "ISVC peak", "MRI peak",
              "largest-only peak", "ISVC / largest-only (peak)", "MRI / largest-only (peak)"]
    text = ("## 2. Peak memory: ISVC against multi-resolution input (Table 5 groups)\n\n" + table(header, rows)
            + "\n\n" + notes)
    if setup.device.type == "cuda":
        text += "\n\n" + gpu_peak_table(setup, baseline, single)
    return text


def gigibytes(value: int | None) -> str:
    return "OOM" if value is None else f"{value / GIB:.2f}"


def gpu_peak_table(setup: Setup, baseline: tuple | None, single: dict) -> str:
    """Peak memory of a whole training process on the GPU, per setting and per image scale v: what it holds between
    steps plus the step's peak above that, beside what the caching allocator reserved at most during the step."""
    settings = [("FixMatch (baseline)", baseline)] + [(f"ScaleMatch v={v:g}", single[v]) for v in sorted(single)]
    rows, totals = [], []
    for name, result in settings:
        held, step, reserved = (None, None, None) if result is None else (result[2], result[1], result[3])
        total = None if result is None else held + step
        rows.append([name, gigibytes(held), gigibytes(step), gigibytes(total), gigibytes(reserved)])
        if name.startswith("ScaleMatch"):
            totals.append(total)
    limit = TARGETS["peak_per_gpu_gib"]
    if None in totals:
        largest = "n/a (out of memory)"
    else:
        largest = f"{max(totals) / GIB:.2f} GiB {verdict(max(totals) <= limit * GIB)}"
    notes = (f"GiB (2^30 bytes) of one training process on the GPU: 'held' is what it keeps between steps (parameters, "
             f"buffers, SGD momentum, its batch); 'step' the peak of torch.cuda.max_memory_allocated during a step "
             f"above that; 'peak' their sum, what one process of a run with {setup.batch} + {setup.batch} images per "
             f"GPU allocates at most at that v ({setup.nclass} classes, CIF on, t = 1); 'reserved' the largest "
             f"torch.cuda.max_memory_reserved during the step, what the caching allocator held from the GPU, unused "
             f"reserve included. The CUDA context, which nvidia-smi also counts, comes on top.\n\n"
             f"Target: at most {limit:g} GiB per GPU at every v (the paper reports 15.5 GB): largest {largest}.")
    header = ["setting", "held", "step", "peak", "reserved"]
    return "**Peak per GPU of a training process**\n\n" + table(header, rows) + "\n\n" + notes


# ---------------------------------------------------------------------------------------------------------------------
# 3. bi_wkv


def section_wkv(setup: Setup) -> str:
    device = setup.device.type
    batch, channels = 2 * setup.batch, setup.config()["cif_channels"]
    lengths = (256,) if setup.quick else LENGTHS
    # The oracle is timed where its extrapolated time fits this budget (seconds per run); on a GPU it keeps the run
    # of scripts/gpu_check.py within its time.
    oracle_budget = 2.0 if setup.quick else 5.0 if device == "cuda" else 20.0
    rows, oracle_seconds, load = [], None, OtherLoad()
    load.start()
    for num_tokens in lengths:
        error = float32_error(num_tokens, channels, device)
        inputs = timing_inputs(batch, num_tokens, channels, device)
        grad_y = torch.randn_like(inputs[2])
        fast = median_seconds(fast_step(inputs, grad_y), setup.steps, device)
        expected = None if oracle_seconds is None else oracle_seconds[1] * (num_tokens / oracle_seconds[0]) ** 2
        if expected is None or expected <= oracle_budget:
            quadratic = median_seconds(quadratic_step(inputs, grad_y), 1, device)
            oracle_seconds = (num_tokens, quadratic)
            oracle = f"{quadratic * 1e3:.0f}"
            speedup = f"{quadratic / fast:.0f}x"
        else:
            oracle = f"~{expected * 1e3:.0f} (T^2 extrapolation, not run)"
            speedup = f"~{expected / fast:.0f}x"
        side = int(round(num_tokens ** 0.5))
        grid = f"{side}^2" if side * side == num_tokens else str(num_tokens)
        rows.append([f"{num_tokens} ({grid})", f"{error:.1e}", f"{fast * 1e3:.1f}", oracle, speedup])
    notes = (f"B = {batch}, C = {channels} (CIF's width at this batch), float32, forward + backward, median of "
             f"{setup.steps} after one warm-up ({load_note(load.share())}). Error: max |y - oracle| / max |v| over "
             f"adversarial keys and decays (scripts/benchmark_wkv.py), the float64 O(T^2) oracle evaluated on sampled "
             f"rows. The oracle's forward + backward is timed where its T^2 extrapolation fits {oracle_budget:g} s. "
             f"benchmark_wkv's targets: error <= {WKV_TARGETS['error']:g}, time at T = 16641 <= "
             f"{WKV_TARGETS['time_16641']} s on a 2-core CPU (its own setting: B = 4, C = 32).")
    header = ["T (grid)", "float32 error", "bi_wkv ms", "O(T^2) oracle ms", "speed-up"]
    return "## 3. bi_wkv against the O(T^2) oracle\n\n" + table(header, rows) + "\n\n" + notes


# ---------------------------------------------------------------------------------------------------------------------
# 4. Data pipeline


class PilReferencePipeline:
    """The UniMatch-style unlabeled pipeline on PIL images that dataset/ replaces, for comparison: PIL decode, resize
    of the long side by a random factor, padding (image 0, mask 254 marking padding), random crop and flip; weak view
    to a normalised tensor; per strong view PIL colour jitter, grayscale and blur, then the same conversion; the
    ignore mask from the padded mask through numpy."""

    def __init__(self, root: Path, samples: list[tuple[str, None]], crop_size: int, scale_range: tuple[float, float],
                 strong_views: int):
        self.paths = [root / image for image, _ in samples]
        self.crop_size, self.scale_range, self.strong_views = crop_size, scale_range, strong_views
        self.jitter = T.RandomApply([T.ColorJitter(0.5, 0.5, 0.5, 0.25)], p=0.8)
        self.grayscale = T.RandomGrayscale(p=0.2)

    @staticmethod
    def to_tensor(image: Image.Image) -> torch.Tensor:
        return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)

    def strong(self, image: Image.Image) -> torch.Tensor:
        image = self.grayscale(self.jitter(image))
        if random.random() < 0.5:
            image = image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return self.to_tensor(image)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        image = Image.open(self.paths[index]).convert("RGB")
        mask = Image.new("L", image.size, 0)  # unlabeled: no mask is read
        width, height = image.size
        long_side = max(width, height)
        new_long = random.randint(int(long_side * self.scale_range[0]), int(long_side * self.scale_range[1]))
        size = (round(width * new_long / long_side), round(height * new_long / long_side))
        image, mask = image.resize(size, Image.Resampling.BILINEAR), mask.resize(size, Image.Resampling.NEAREST)
        pad = (0, 0, max(0, self.crop_size - size[0]), max(0, self.crop_size - size[1]))
        image, mask = ImageOps.expand(image, pad, fill=0), ImageOps.expand(mask, pad, fill=254)
        left = random.randint(0, image.size[0] - self.crop_size)
        top = random.randint(0, image.size[1] - self.crop_size)
        box = (left, top, left + self.crop_size, top + self.crop_size)
        image, mask = image.crop(box), mask.crop(box)
        if random.random() < 0.5:
            flip = Image.Transpose.FLIP_LEFT_RIGHT
            image, mask = image.transpose(flip), mask.transpose(flip)
        mask_array = np.array(mask)
        ignore = np.where(mask_array == 254, 255, 0)
        return {"image_weak": self.to_tensor(image),
                "image_strong": [self.strong(image) for _ in range(self.strong_views)],
                "cutmix_box": [cutmix_box(self.crop_size) for _ in range(self.strong_views)],
                "ignore_mask": torch.from_numpy(ignore).long(),
                "mask": torch.full(mask_array.shape, 255, dtype=torch.long)}


def write_photos(folder: Path, count: int, width: int, height: int, file_format: str, seed: int) -> list[str]:
    """``count`` photo-like images (smooth colour fields with edges and noise), paths relative to ``folder``."""
    rng = np.random.default_rng(seed)
    names = []
    for index in range(count):
        coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
        smooth, blocks = (np.asarray(Image.fromarray(grid).resize((width, height), resample), dtype=np.int16)
                          for grid, resample in ((coarse, Image.Resampling.BICUBIC),
                                                 (coarse[::-1], Image.Resampling.NEAREST)))
        pixels = (smooth + blocks) // 2 + rng.integers(-12, 13, (height, width, 3))
        name = f"{index}.{'jpg' if file_format == 'JPEG' else 'png'}"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / name, file_format)
        names.append(name)
    return names


def samples_per_second(pipelines: dict[str, object], count: int, warmup: int) -> dict[str, float]:
    """Samples per second of each pipeline, one sample of each in turn (interleaved), after ``warmup`` rounds."""
    seconds = {name: 0.0 for name in pipelines}
    for round_ in range(warmup + count):
        for name, pipeline in pipelines.items():
            start = time.perf_counter()
            pipeline[round_ % len(pipeline)]
            if round_ >= warmup:
                seconds[name] += time.perf_counter() - start
    return {name: count / total for name, total in seconds.items()}


def section_data(setup: Setup) -> str:
    strong_views, scale_range = 2, (0.5, 2.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker gets
    rows, speedups, load = [], [], OtherLoad()
    load.start()
    try:
        with tempfile.TemporaryDirectory() as folder:
            for crop, name, width, height, file_format, count in DATA_INPUTS:
                if setup.quick:  # everything shrunk 8x
                    crop, width, height, count = crop // 8, width // 8, height // 8, 2
                root = Path(folder) / str(crop)
                root.mkdir()
                samples = [(image, None) for image in write_photos(root, 6, width, height, file_format, crop)]
                pipelines = {
                    "dataset/ (torchvision tensors)": SemiDataset(root, samples, mode="train_u", nclass=NCLASS,
                                                                  crop_size=crop, scale_range=scale_range,
                                                                  strong_views=strong_views),
                    "UniMatch-style PIL reference": PilReferencePipeline(root, samples, crop, scale_range,
                                                                         strong_views)}
                rates = samples_per_second(pipelines, count, warmup=1)
                ours, reference = rates.values()
                speedups.append((crop, ours / reference))
                for pipeline, rate in rates.items():
                    rows.append([str(crop), f"{name} {width}x{height} {file_format}", pipeline, f"{rate:.1f}",
                                 f"{1e3 / rate:.0f}", f"{rate / reference:.2f}"])
    finally:
        torch.set_num_threads(threads)
    limit = TARGETS["data_speedup"]
    per_crop = ", ".join(f"crop {crop}: {s:.2f}x {verdict(s >= limit)}" for crop, s in speedups)
    notes = (f"One process with one torch thread (a DataLoader worker), unlabeled samples with {strong_views} strong "
             f"views (weak view, strong views, CutMix boxes, ignore mask), scale range {scale_range}, both pipelines "
             f"on the same files, interleaved sample by sample ({load_note(load.share())}).\n\n"
             f"Target: dataset/ at least {limit}x the PIL reference: {per_crop}.")
    header = ["crop", "input", "pipeline", "samples/s per worker", "ms/sample", "x PIL reference"]
    return "## 4. Data pipeline\n\n" + table(header, rows) + "\n\n" + notes


# ---------------------------------------------------------------------------------------------------------------------
# 5. Evaluation throughput


def section_eval(setup: Setup) -> str:
    cfg = setup.config()
    torch.manual_seed(0)
    model = build_model(cfg).to(setup.device).eval()
    crop = setup.crop
    # A Cityscapes image (1024 x 2048) shrunk like its 801 crop to this crop: sliding windows tile it 2 x 4.
    height, width = round(crop * 1024 / 801), round(crop * 2048 / 801)
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(setup.device)
    stride = max(1, crop * 2 // 3)
    windows = len(window_spans(height, crop, stride)) * len(window_spans(width, crop, stride))
    window_batch = inspect.signature(predict_sliding_window).parameters["window_batch"].default
    scales = "1, " + ", ".join(f"{s:g}" for s in EVAL_SCALES)
    predictors = {"single scale (1)": model.predict,
                  f"multi-scale CIF ({scales})": lambda x: model.predict_multiscale_cif(x, EVAL_SCALES),
                  f"multi-scale average ({scales})": averaged_predictor(model.predict, [1.0, *EVAL_SCALES], False)}
    # (mode, scales, windows, run); sliding_window batches windows as util.inference does by default.
    runs = [("original", label, 1, lambda p=predict: predict_probs(p, image, "original", crop))
            for label, predict in predictors.items()]
    batched = [(f"sliding window ({window_batch} per batch)", label, windows,
                lambda p=predict: predict_probs(p, image, "sliding_window", crop))
               for label, predict in predictors.items()]
    one_by_one = ("sliding window (window_batch=1)", batched[0][1], windows,
                  lambda: predict_sliding_window(model.predict, image, crop, window_batch=1))
    runs += [batched[0], one_by_one, *batched[1:]]
    times = {index: [] for index in range(len(runs))}
    load = OtherLoad()
    load.start()
    with torch.no_grad(), setup.autocast():
        for round_ in range(setup.warmup + setup.steps):
            for index, (_, _, _, run) in enumerate(runs):
                seconds = setup.timed(lambda: run().argmax(1))
                if round_ >= setup.warmup:
                    times[index].append(seconds)
    other = load.share()
    median = {index: statistics.median(t) for index, t in times.items()}
    rows = [[mode, label, str(count), f"{median[i] * 1e3:.0f}", f"{1 / median[i]:.2f}"]
            for i, (mode, label, count, _) in enumerate(runs)]
    speedup = median[runs.index(one_by_one)] / median[runs.index(batched[0])]
    limit = TARGETS["window_batching"]
    notes = (f"One {height}x{width} image at a time (batch 1, as eval.py), model in eval mode, softmax and argmax "
             f"included; sliding windows of {crop} with stride {crop * 2 // 3} (util/inference). "
             f"Median of {setup.steps} after {setup.warmup} warm-up ({load_note(other)}).\n\n"
             f"Target: batched sliding window at least {limit}x faster than window by window: {speedup:.2f}x "
             f"{verdict(speedup >= limit)}.")
    header = ["mode", "scales", "windows", "ms/image", "images/s"]
    return "## 5. Evaluation throughput\n\n" + table(header, rows) + "\n\n" + notes


# ---------------------------------------------------------------------------------------------------------------------
# 6. Compute efficiency


def matmul_flops_per_second(setup: Setup) -> tuple[float, str]:
    """FLOP/s of a large square matrix product in the step's compute dtype: the device's practical limit."""
    size = 512 if setup.quick else (8192 if setup.device.type == "cuda" else 2048)
    dtype = setup.amp_dtype or torch.float32
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(setup.device, dtype) for _ in range(2))
    setup.timed(lambda: a @ b)
    seconds = statistics.median(setup.timed(lambda: a @ b) for _ in range(setup.steps))
    return 2 * size ** 3 / seconds, f"{size}x{size} @ {size}x{size}, {str(dtype).removeprefix('torch.')}"


def section_efficiency(setup: Setup) -> str:
    m = training_measurements(setup)
    peak, description = matmul_flops_per_second(setup)
    rows = []
    names = ["supervised", "FixMatch"] + [f"ScaleMatch v={v:g}" for v in m["scales"]]
    for name in names:
        achieved = m["flops"][name] / m["median"][name]
        rows.append([name, f"{m['flops'][name] / 1e9:.1f}", f"{m['median'][name] * 1e3:.0f}",
                     f"{achieved / 1e9:.1f}", f"{achieved / peak:.0%}"])
    notes = (f"FLOPs of one step (forward + backward) counted by torch.utils.flop_counter.FlopCounterMode "
             f"(convolutions and matrix products; element-wise work, interpolation and the optimizer are not "
             f"counted), divided by the median step time of section 1. Reference: {description} at "
             f"{peak / 1e9:.1f} GFLOP/s on the same device.")
    header = ["setting", "GFLOP per step", "step ms", "achieved GFLOP/s", "of matmul"]
    return "## 6. Compute efficiency\n\n" + table(header, rows) + "\n\n" + notes


# ---------------------------------------------------------------------------------------------------------------------


SECTION_FUNCTIONS = {1: section_step_time, 2: section_memory, 3: section_wkv, 4: section_data, 5: section_eval,
                     6: section_efficiency}


def parse_sections(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) in SECTIONS for part in parts):
        raise argparse.ArgumentTypeError(f"--sections {text!r}: expected numbers from 1 to 6 separated by commas")
    return [int(part) for part in parts]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", type=parse_sections, default=list(SECTIONS), help="e.g. 1,2 (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the suite runs, in seconds")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--backbone", help="default: tv_resnet18 on the CPU, resnet101 on CUDA")
    parser.add_argument("--crop", type=int, help="training crop and sliding window (default: 96 CPU, 513 CUDA)")
    parser.add_argument("--batch", type=int, help="labeled and unlabeled images per step, each (default: 2)")
    parser.add_argument("--steps", type=int, help="timed repetitions per measurement (default: 5)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    for name, least in (("crop", 16), ("batch", 2), ("steps", 1), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name} {value}: must be at least {least}"
                         + (" (batch norm needs two images)" if name == "batch" else ""))
    return args


def make_setup(args: argparse.Namespace) -> Setup:
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is available")
    device = torch.device(device_name)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True  # as in training
    quick = args.quick
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup(device=device,
                  backbone=args.backbone or ("tv_resnet10" if quick else "tv_resnet18" if not gpu else "resnet101"),
                  crop=args.crop or (32 if quick else 513 if gpu else 96),
                  batch=args.batch or 2,
                  steps=args.steps or (1 if quick else 5),
                  warmup=1 if quick or not gpu else 2,
                  quick=quick,
                  nclass=PASCAL_NCLASS if gpu and not quick else NCLASS,
                  head_channels=32 if quick else SCHEMA["head_channels"].default)
    setup.amp_dtype = scalematch.autocast_dtype(setup.config(), device)
    # --quick keeps two image scales and one multi-scale group: enough to run every code path.
    setup.image_scales = (0.5, 2.0) if quick else tuple(setup.config()["img_scales"])
    setup.scale_groups = ((), (0.5, 2.0)) if quick else SCALE_GROUPS
    return setup


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    setup = make_setup(args)
    random.seed(0)
    torch.manual_seed(0)
    print(machine_header(setup, argv), flush=True)
    for section in args.sections:
        print("\n" + SECTION_FUNCTIONS[section](setup), flush=True)
    print(f"\nLoad average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:  # e.g. an unknown --backbone
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
