"""ScaleMatch training: FixMatch weak-to-strong with CutMix and feature perturbation (as in UniMatch), plus the scale
branches of ScaleMatch (ISVC, FSVC, CIF), launched by ``scripts/train.sh`` with or without torchrun. Every switch off
(isvc, fsvc, cif) is the FixMatch baseline; train_mode: supervised the labeled-only baseline.

    python scalematch.py --config configs/synthetic.yaml split=1_16 epochs=2

The file reads as the method (scale draws, pseudo-labels, CutMix targets, each loss term and the total of Eq. 17, one
training step), then the loop (train_one_epoch, train, main). The run machinery lives in util/: lifecycle.py (lock,
signals, non-finite steps, exit codes), resume.py, events.py, loaders.py, evaluation.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from dataset.classes import class_names, class_palette
from dataset.semi import DatasetError, build_datasets, dataset_summary
from dataset.transforms import denormalize
from model import build_model
from model.backbone import PretrainedError
from util.bounded_exit import Teardown
from util.checkpoint import save_checkpoint, write_atomically
from util.compat import distributed_data_parallel
from util.config import ConfigError, check_batch_size, dump_config, load_config, without_idle_cif
from util.dist import broadcast_from_main, cleanup, init_distributed
from util.evaluation import autocast_dtype, evaluate
from util.events import RunEvents, log_step_pictures
from util.lifecycle import (NonFiniteLoss, StopSignal, agree, claimed_run_directory, ensure_finite, exit_code, on_main,
                            seed_everything)
from util.loaders import train_loaders
from util.logging import LOGGER_NAME, close_logger, setup_logger
from util.losses import OHEMCrossEntropy, masked_cross_entropy
from util.metrics import MeanIoU, format_iou_table
from util.resume import checkpoint_state, fresh_progress, recorded_best_miou, reconcile_best, resume
from util.results import RunResults
from util.run_dir import RunDirectoryError, run_directory

IGNORE_INDEX = 255
# Failures before training starts: the run directory this launch made is removed again.
START_UP_ERRORS = (ConfigError, DatasetError, PretrainedError)


# ---------------------------------------------------------------------------------------------------------------------
# The method

def draw_scales(cfg: dict) -> tuple[tuple[float, ...], float | None]:
    """This iteration's image scales v (one drawn, or all with mri) and feature scale t (None: no FP branch).
    The paired rule shrinks features when the image was enlarged and vice versa (the released training logs)."""
    uses_scaled_view = cfg["isvc"] or cfg["fusion"] != "none"
    image_scales = tuple(cfg["img_scales"]) if cfg["mri"] else (random.choice(cfg["img_scales"]),)
    image_scales = image_scales if uses_scaled_view else ()
    if not cfg["fp"]:
        return image_scales, None
    if not cfg["fsvc"]:
        return image_scales, 1.0
    candidates = cfg["feature_scales"]
    if cfg["feature_scale_rule"] == "paired" and len(image_scales) == 1:
        if image_scales[0] > 1:
            candidates = [t for t in candidates if t <= 1] or candidates
        elif image_scales[0] < 1:
            candidates = [t for t in candidates if t >= 1] or candidates
    return image_scales, random.choice(candidates)


def pseudo_label_source(cfg: dict, epoch: int) -> str:
    """The 1x prediction ('none') during warm-up, the configured fusion afterwards."""
    return "none" if epoch < cfg["warm_up"] else cfg["fusion"]


def mean_probs(logits: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([p.detach().float().softmax(dim=1) for p in logits]).mean(dim=0)


def fused_probs(out: dict, fusion: str, first: int) -> torch.Tensor:
    """Class probabilities of images [first:] after fusing the 1x and rescaled predictions."""
    if fusion == "cif":
        return mean_probs([p[first:] for p in out["pred_cif"]])
    if fusion == "average":
        return mean_probs([out["pred"][first:]] + [p[first:] for p in out["pred_scaled"]])
    return mean_probs([out["pred"][first:]])


def pseudo_label_from(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and class of each pixel from (detached) class probabilities."""
    confidence, pseudo_label = probs.detach().max(dim=1)
    return confidence, pseudo_label


def cutmix_targets(box, pseudo_label, confidence, ignore_mask, partner):
    """Targets of a CutMix-ed strong view: inside the box, the partner image's pseudo-label."""
    inside = box == 1
    return (torch.where(inside, partner["pseudo_label"], pseudo_label),
            torch.where(inside, partner["confidence"], confidence),
            torch.where(inside, partner["ignore_mask"], ignore_mask))


def labeled_criterion(cfg: dict) -> nn.Module:
    if cfg["criterion"] == "ohem":
        return OHEMCrossEntropy(cfg["ohem_thresh"], cfg["ohem_min_kept"], ignore_index=IGNORE_INDEX)
    return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)


@dataclass
class StepOutput:
    """One step's named loss terms and total, its pseudo-labels, and what the logs show of it."""
    terms: dict
    loss: torch.Tensor | None = None
    pseudo_label: torch.Tensor | None = None  # of the weak unlabeled images, before the confidence threshold
    confidence: torch.Tensor | None = None
    fusion_probs: dict = field(default_factory=dict)  # each fusion the step computed: class probabilities
    extras: dict = field(default_factory=dict)  # logged beside the terms (mask_ratio)
    pictures: dict = field(default_factory=dict)
    skipped: bool = False  # a non-finite loss, skipped with on_nonfinite_loss: skip
    stop_requested: bool = False  # some process was asked to stop: checkpoint and stop after this step
    lr: float | None = None  # the backbone's rate for the next step


def semi_supervised_terms(model, batch: dict, cfg: dict, epoch: int, criterion: nn.Module) -> StepOutput:
    """The loss terms of one ScaleMatch step (FixMatch / UniMatch when isvc, fsvc and cif are off) on a batch already
    on the device: batch['labeled'], batch['unlabeled'] and batch['partner'] (the CutMix partner)."""
    labeled, unlabeled, partner_batch = batch["labeled"], batch["unlabeled"], batch["partner"]
    image_x, mask_x, image_w = labeled["image"], labeled["mask"], unlabeled["image_weak"]
    ignore_mask, image_s, boxes = unlabeled["ignore_mask"], list(unlabeled["image_strong"]), unlabeled["cutmix_box"]
    num_x = len(image_x)

    # CutMix partner: its pseudo-label needs no graph, and eval mode keeps BN statistics clean.
    with torch.no_grad():
        model.eval()
        partner_probs = model(partner_batch["image_weak"])["pred"].float().softmax(1)
        model.train()
    partner_confidence, partner_label = pseudo_label_from(partner_probs)
    partner = {"pseudo_label": partner_label, "confidence": partner_confidence,
               "ignore_mask": partner_batch["ignore_mask"]}
    for view, box in enumerate(boxes):
        image_s[view] = torch.where((box == 1).unsqueeze(1), partner_batch["image_strong"][view], image_s[view])

    # Labeled and weak unlabeled images in one pass: 1x, rescaled by v, perturbed features at t, CIF.
    image_scales, feature_scale = draw_scales(cfg)
    out = model(torch.cat((image_x, image_w)), feature_scale=feature_scale, image_scales=image_scales)
    pred_s = model(torch.cat(image_s))["pred"].chunk(len(image_s))

    # Each fusion the step computed, once: one is the pseudo-label source, all are scored against the truth.
    fusions = ["none"] + (["average"] if out["pred_scaled"] else []) + (["cif"] if out["pred_cif"] else [])
    probs = {fusion: fused_probs(out, fusion, num_x) for fusion in fusions}
    confidence, pseudo_label = pseudo_label_from(probs[pseudo_label_source(cfg, epoch)])
    confident = confidence >= cfg["conf_thresh"]

    terms = {}
    # L_s (Eq. 16): ground truth on the CIF-fused prediction, so CIF learns from labels; else on 1x.
    if out["pred_cif"]:
        terms["supervised"] = sum(criterion(p[:num_x], mask_x) for p in out["pred_cif"]) / len(image_scales)
        if cfg["supervise_1x"]:  # the single-scale predictor also learns from labels directly, not via the gate
            terms["supervised"] = (terms["supervised"] + criterion(out["pred"][:num_x], mask_x)) / 2
    else:
        terms["supervised"] = criterion(out["pred"][:num_x], mask_x)
    # L_strong: CutMix-ed strong views supervised by the weak pseudo-labels, averaged over views.
    strong_losses = []
    for view, box in enumerate(boxes):
        label_mix, conf_mix, ignore_mix = cutmix_targets(box, pseudo_label, confidence, ignore_mask, partner)
        strong_losses.append(masked_cross_entropy(pred_s[view], label_mix, conf_mix >= cfg["conf_thresh"], ignore_mix))
    terms["strong"] = sum(strong_losses) / len(strong_losses)
    # L_ISVC (Eq. 14): the view rescaled by v, resized back, supervised by the same pseudo-label.
    if cfg["isvc"]:
        terms["isvc"] = sum(masked_cross_entropy(p[num_x:], pseudo_label, confident, ignore_mask)
                            for p in out["pred_scaled"]) / len(out["pred_scaled"])
    # L_FSVC (Eq. 15): decoder on dropout-perturbed features resized by t (t = 1: UniMatch's FP).
    if feature_scale is not None:
        terms["fp"] = masked_cross_entropy(out["pred_fp"][num_x:], pseudo_label, confident, ignore_mask)

    valid = ignore_mask != IGNORE_INDEX
    extras = {"mask_ratio": (confident & valid).float().sum() / valid.float().sum().clamp(min=1)}
    pictures = {"image_x": image_x, "mask_x": mask_x, "pred_x": out["pred"][:num_x], "image_w": image_w,
                "truth_u": unlabeled["mask"], "pred_w": out["pred"][num_x:],
                "pseudo_label": torch.where(confident, pseudo_label, IGNORE_INDEX),
                "gate": out["gate"][0][num_x:] if out["gate"] else None}
    return StepOutput(terms, pseudo_label=pseudo_label, confidence=confidence, fusion_probs=probs, extras=extras,
                      pictures=pictures)


def supervised_terms(model, batch: dict, criterion: nn.Module) -> StepOutput:
    """The labeled-only baseline's one term."""
    image_x, mask_x = batch["labeled"]["image"], batch["labeled"]["mask"]
    pred_x = model(image_x)["pred"]
    return StepOutput({"supervised": criterion(pred_x, mask_x)},
                      pictures={"image_x": image_x, "mask_x": mask_x, "pred_x": pred_x})


def total_loss(terms: dict, cfg: dict) -> torch.Tensor:
    """Eq. 17: (L_s + the weighted unsupervised terms) / loss_divisor (the release halves the sum)."""
    weights = cfg["loss_weights"]
    return (terms["supervised"] + sum(weights[name] * value for name, value in terms.items()
                                      if name != "supervised")) / cfg["loss_divisor"]


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    """Backbone at lr, everything else (decoder, later CIF) at lr * lr_multi."""
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    groups = [{"params": list(model.backbone.parameters()), "lr": cfg["lr"], "lr_scale": 1.0},
              {"params": head, "lr": cfg["lr"] * cfg["lr_multi"], "lr_scale": cfg["lr_multi"]}]
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])


def set_poly_lr(optimizer: torch.optim.Optimizer, cfg: dict, iteration: int, total_iters: int) -> float:
    """lr * (1 - iteration / total_iters) ** poly_power on every group (scaled by its lr_scale); returns it."""
    lr = cfg["lr"] * (1 - iteration / total_iters) ** cfg["poly_power"]
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return lr


@dataclass
class Run:
    """What every step of a run shares: built by train(), or around its own model by a benchmark or a test."""
    cfg: dict
    model: nn.Module  # what is called: DistributedDataParallel-wrapped with several processes
    optimizer: torch.optim.Optimizer
    device: torch.device
    total_iters: int
    scaler: torch.amp.GradScaler | None = None  # None: a pass-through (no fp16)
    amp_dtype: torch.dtype | None = None
    rank: int = 0
    world_size: int = 1
    iters_per_epoch: int | None = None  # None: as many as the loaders give
    stop: StopSignal | None = None
    progress: dict = field(default_factory=fresh_progress)
    criterion: nn.Module | None = None  # None: labeled_criterion(cfg)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger(LOGGER_NAME))
    writer: RunEvents | None = None  # rank 0's TensorBoard events
    results: RunResults | None = None  # rank 0's results.json

    def __post_init__(self):
        self.scaler = self.scaler or torch.amp.GradScaler("cuda", enabled=False)
        self.criterion = self.criterion or labeled_criterion(self.cfg)

    @property
    def net(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def to_device(batch, device: torch.device):
    """Tensors of a (nested) batch on ``device``; names and other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def train_step(run: Run, batch: dict, epoch: int) -> StepOutput:
    """One training iteration: the loss terms and their total, then backward and the optimizer's step (or, for a
    non-finite loss with on_nonfinite_loss: skip, nothing, its BatchNorm updates undone), then the next step's rate.
    All processes take the same branch. Advances run.progress."""
    cfg, model, progress = run.cfg, run.model, run.progress
    if run.stop is not None:
        run.stop.check_interrupt()
    # A skipped step must leave the model as it was, and its forward passes move BatchNorm's running statistics.
    skippable = cfg["on_nonfinite_loss"] == "skip"
    buffers_before = [buffer.clone() for buffer in model.buffers()] if skippable else None
    batch = to_device(batch, run.device)
    with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        if cfg["train_mode"] == "semi":
            output = semi_supervised_terms(model, batch, cfg, epoch, run.criterion)
        else:
            output = supervised_terms(model, batch, run.criterion)
    output.loss = total_loss(output.terms, cfg)

    stop_requested = run.stop is not None and run.stop.received
    nonfinite, output.stop_requested = agree([not torch.isfinite(output.loss.detach()).item(), stop_requested],
                                             run.world_size, run.device)
    iteration = progress["iteration"] + 1
    if nonfinite:
        culprits = [name for name, value in output.terms.items() if not torch.isfinite(value.detach()).item()]
        where = f"iteration {iteration} (epoch {epoch}): non-finite loss in {', '.join(culprits) or 'another process'}"
        if not skippable:
            raise NonFiniteLoss(f"{where}; the last checkpoint is left as it was "
                                "(set on_nonfinite_loss=skip to skip such steps)")
        progress["skipped_steps"] += 1
        run.logger.warning(f"{where}; step skipped ({progress['skipped_steps']} so far)")
        run.optimizer.zero_grad(set_to_none=True)
        for buffer, before in zip(model.buffers(), buffers_before):
            buffer.copy_(before)
        output.skipped = True
    else:
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(output.loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    # The next step's rate from this step's 0-based index, as the release schedules it.
    output.lr = set_poly_lr(run.optimizer, cfg, progress["iteration"], run.total_iters)
    progress["iteration"] = iteration
    progress["step"] += 1
    return output


# ---------------------------------------------------------------------------------------------------------------------
# The loop

def log_step(run: Run, output: StepOutput, running: dict, bar) -> None:
    """Running means in train.log every log_interval steps; every step's terms in TensorBoard; pictures."""
    cfg, iteration = run.cfg, run.progress["iteration"]
    logged = {**output.terms, **output.extras, "total": output.loss}
    running["steps"] = running.get("steps", 0) + 1
    sums = running.setdefault("sums", {})
    for name, value in logged.items():
        sums[name] = sums.get(name, 0.0) + value.item()
    if not run.is_main:
        return
    bar.set_postfix(loss=f"{output.loss.item():.3f}", lr=f"{output.lr:.2e}")
    for name, value in logged.items():
        run.writer.add_scalar(f"train/{name}", value.item(), iteration)
    run.writer.add_scalar("train/lr", output.lr, iteration)
    if iteration % cfg["log_interval"] == 0:
        run.logger.info(f"epoch {run.progress['epoch']} iter {iteration}/{run.total_iters} lr {output.lr:.2e} "
                        + " ".join(f"{k} {v / running['steps']:.4f}" for k, v in running["sums"].items()))
    if cfg["image_log_interval"] and iteration % cfg["image_log_interval"] == 0:
        log_step_pictures(run.writer, output.pictures, class_palette(cfg), iteration, denormalize)


def train_one_epoch(run: Run, loaders, save_latest) -> None:
    """Train from ``run.progress['step']`` to the end of epoch ``run.progress['epoch']``; ``save_latest()`` writes
    latest.pth (every checkpoint_interval steps, and before a requested stop)."""
    cfg, progress = run.cfg, run.progress
    epoch = progress["epoch"]
    for loader in loaders:
        loader.sampler.set_epoch(epoch, start=progress["step"] * cfg["batch_size"])
    semi = cfg["train_mode"] == "semi"
    quality = {name: MeanIoU(cfg["nclass"], device=run.device) for name in ("1x", "average", "cif")}
    run.model.train()
    labeled_loader, unlabeled_loader, partner_loader = loaders
    batches = (zip(labeled_loader, unlabeled_loader, partner_loader) if semi
               else ((labeled, None, None) for labeled in labeled_loader))
    running = {}
    started, first_iteration = time.perf_counter(), progress["iteration"]
    # Closed however the epoch ends, so that an error's one line is not printed over a half-drawn bar.
    with tqdm(batches, total=run.iters_per_epoch - progress["step"], disable=not run.is_main, desc=f"epoch {epoch}",
              leave=False) as bar:
        for labeled, unlabeled, partner in bar:
            if progress["step"] >= run.iters_per_epoch:
                break
            output = train_step(run, {"labeled": labeled, "unlabeled": unlabeled, "partner": partner}, epoch)
            # Pseudo-label quality against the unlabeled ground truth, where it is on disk (Fig. 5).
            for fusion, probs in output.fusion_probs.items():
                quality["1x" if fusion == "none" else fusion].update(probs.argmax(1), output.pictures["truth_u"])
            if not output.skipped:
                log_step(run, output, running, bar)
            # The epoch's last step is saved after its evaluation instead, so a resume never skips that evaluation.
            interval = cfg["checkpoint_interval"]
            if output.stop_requested or (interval and progress["iteration"] % interval == 0
                                         and progress["step"] < run.iters_per_epoch):
                save_latest()
            if output.stop_requested:
                raise run.stop.preempted(progress["iteration"])
    if run.results is not None:
        run.results.add_training(time.perf_counter() - started, progress["iteration"] - first_iteration)

    if semi:
        for meter in quality.values():
            meter.all_reduce()
        measured = {name: meter.miou() for name, meter in quality.items() if meter.target_area.sum() > 0}
        if run.is_main and measured:
            run.logger.info(f"epoch {epoch} pseudo-label mIoU on unlabeled images: "
                            + ", ".join(f"{name} {value:.2f}" for name, value in measured.items()))
            for name, value in measured.items():
                run.writer.add_scalar(f"pseudo_label_miou/{name}", value, epoch)
            run.results.add_pseudo_label_miou(epoch, measured)


def validate(run: Run, val_set, epoch: int) -> tuple[float, bool]:
    """The epoch's validation mIoU, logged with its per-class table; whether it is the best so far."""
    run.net.eval()
    metric = evaluate(run.net.predict, val_set, run.cfg, run.device, run.amp_dtype, run.rank, run.world_size)
    miou = metric.miou()
    is_best = miou > run.progress["best_miou"]
    run.progress["best_miou"] = max(run.progress["best_miou"], miou)
    if run.is_main:
        names = class_names(run.cfg)
        run.logger.info(f"epoch {epoch} validation ({run.cfg['eval_mode']})\n" + format_iou_table(names, metric.iou())
                        + f"\nbest mIoU so far {run.progress['best_miou']:.2f}")
        run.writer.add_scalar("eval/mIoU", miou, epoch)
        for name, iou in zip(names, metric.iou().tolist()):
            run.writer.add_scalar(f"eval/IoU/{name}", iou, epoch)
        run.results.add_evaluation(epoch, run.progress["iteration"], miou, metric.iou().tolist())
    return miou, is_best


def train(cfg, run_dir, rank, world_size, local_rank, device, stop, notes, teardown: Teardown) -> None:
    """Train the run in ``run_dir`` (locked by rank 0) from its latest.pth, or from the start; ``teardown`` ends its
    loader workers and event writer however training ends."""
    is_main = rank == 0
    latest, best = os.path.join(run_dir, "latest.pth"), os.path.join(run_dir, "best.pth")
    logger = setup_logger(run_dir, rank)
    teardown.calling(close_logger)
    for note in filter(None, notes):
        logger.info(note)
    seed_everything(cfg["seed"] + rank, cfg["deterministic"])

    labeled_set, unlabeled_set, val_set = build_datasets(cfg, cfg["splits_dir"])
    logger.info(f"run {run_dir} | {world_size} process(es) on {device} | "
                + dataset_summary(cfg, labeled_set, unlabeled_set, val_set))
    loaders = teardown.loaders(*train_loaders(cfg, labeled_set, unlabeled_set, rank, world_size))
    iters_per_epoch = len(loaders[1]) if cfg["train_mode"] == "semi" else len(loaders[0])
    if cfg["iters_per_epoch"] is not None:
        iters_per_epoch = min(iters_per_epoch, cfg["iters_per_epoch"])
    if iters_per_epoch == 0:
        raise DatasetError(f"split {cfg['split']}: fewer samples per process than batch_size {cfg['batch_size']}")

    resuming = broadcast_from_main(os.path.exists(latest))
    # Every node reads latest.pth: a node that cannot would train from another state than the others.
    if agree([resuming and not os.path.exists(latest)], world_size, device)[0]:
        raise RunDirectoryError(f"{latest}: rank 0 resumes from it, but a process on another node cannot see it; "
                                "exp_dir must be on a filesystem that every node shares")
    # A resumed run takes its weights from latest.pth: the pretrained file need not be there any more.
    model = build_model({**cfg, "pretrained": None} if resuming else cfg).to(device)
    optimizer = build_optimizer(cfg, model)
    if world_size > 1:
        # SyncBatchNorm exists for CUDA only; CPU (gloo) processes keep per-process statistics.
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Buffers are made equal once, here, and then stay each process's own (resume restores them per rank).
        model = distributed_data_parallel(model, [local_rank] if device.type == "cuda" else None)
    amp_dtype = autocast_dtype(cfg, device)
    run = Run(cfg, model, optimizer, device, iters_per_epoch * cfg["epochs"],
              torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16), amp_dtype, rank, world_size,
              iters_per_epoch, stop, logger=logger)
    if is_main:
        n_params = sum(p.numel() for p in run.net.parameters()) / 1e6
        logger.info(f"model {cfg['backbone']} DeepLabV3+{' + CIF' if cfg['cif'] else ''} ({n_params:.1f}M parameters), "
                    f"amp {amp_dtype}, {iters_per_epoch} iterations x {cfg['epochs']} epochs")
    if resuming:
        run.progress = resume(latest, run.net, optimizer, run.scaler, cfg, iters_per_epoch, rank, world_size, logger)
    reconcile_best(run.progress, on_main(lambda: recorded_best_miou(best), is_main), latest, best, resuming, logger)
    config_path = os.path.join(run_dir, "config.yaml")
    on_main(lambda: write_atomically(config_path, lambda temporary: dump_config(cfg, temporary)), is_main)

    def save(paths: list[str], miou=None) -> None:
        state = checkpoint_state(run.net, optimizer, run.scaler, cfg, run.progress, miou)
        on_main(lambda: [save_checkpoint(state, path) for path in paths], is_main)

    def save_latest() -> None:
        ensure_finite(run.net, run.progress["iteration"], world_size, device)
        save([latest])

    if is_main:
        run.writer = teardown.closing(RunEvents(run_dir))
        run.results = RunResults(run_dir, cfg, class_names(cfg), run.total_iters)
    while run.progress["epoch"] < cfg["epochs"]:
        epoch = run.progress["epoch"]
        train_one_epoch(run, loaders, save_latest)
        ensure_finite(run.net, run.progress["iteration"], world_size, device)
        miou, is_best = None, False
        if (epoch + 1) % cfg["eval_interval"] == 0 or epoch == cfg["epochs"] - 1:
            miou, is_best = validate(run, val_set, epoch)
        # best.pth before latest.pth: a kill between the two writes must not leave a recorded best without its file.
        save([best, latest] if is_best else [latest], miou)
        run.progress["epoch"] += 1
        run.progress["step"] = 0
        if agree([stop.received], world_size, device)[0]:
            raise stop.preempted(run.progress["iteration"])
    if is_main:
        run.writer.close()
        run.results.finish()
        logger.info(f"done: best mIoU {run.progress['best_miou']:.2f}, checkpoints in {run_dir}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/pascal.yaml")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, dotted keys for nested values (loss_weights.strong=0.25)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg, cif_note = without_idle_cif(load_config(args.config, args.overrides))
    rank, world_size, local_rank, device = init_distributed(force_cpu=args.cpu)
    with StopSignal() as stop:
        check_batch_size(cfg, world_size, device.type)
        run_dir = run_directory(cfg, args.overrides)
        # The teardown ends before the directory is released, so no worker outlives the lock or a start-up clean-up.
        with claimed_run_directory(run_dir, rank == 0, START_UP_ERRORS) as notes, Teardown() as teardown:
            train(cfg, run_dir, rank, world_size, local_rank, device, stop, [cif_note, *notes], teardown)
    cleanup()


def cli(argv=None) -> int:
    """Train as the command line asks; returns the exit code (util/lifecycle.py lists them)."""
    return exit_code(main, argv, START_UP_ERRORS)


if __name__ == "__main__":
    sys.exit(cli())
