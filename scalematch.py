"""ScaleMatch training: FixMatch weak-to-strong with CutMix and feature perturbation (as in UniMatch), plus
the scale branches of ScaleMatch (ISVC, FSVC, CIF), launched by ``scripts/train.sh`` with or without torchrun.
Every switch off (isvc, fsvc, cif) is the FixMatch baseline; train_mode: supervised the labeled-only baseline.

    python scalematch.py --config configs/synthetic.yaml split=1_16 epochs=2
"""
import argparse
import hashlib
import json
import os
import random
import re
import signal
import sys
import threading

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid
from tqdm import tqdm

from dataset.classes import class_names, class_palette
from dataset.semi import DatasetError, build_datasets, dataset_summary
from eval import autocast_dtype, denormalize, evaluate
from model import build_model
from model.backbone import PretrainedError
from util.checkpoint import (CheckpointError, RunDirectoryError, directories_to_create, load_checkpoint,
                              load_model_state, lock_run_directory, release_run_directory, remove_stale_temporaries,
                              remove_unstarted_run, save_checkpoint, write_atomically)
from util.compat import distributed_data_parallel
from util.config import ConfigError, dump_config, load_config
from util.dist import (all_reduce_sum, broadcast_from_main, cleanup, gather_to_main, init_distributed, report_failure,
                       under_torchrun, watch_launcher)
from util.logging import setup_logger
from util.losses import OHEMCrossEntropy, masked_cross_entropy
from util.metrics import MeanIoU, format_iou_table
from util.sampling import ResumableSampler, SeededDataset, rng_state, set_rng_state
from util.visualize import colourize

IGNORE_INDEX = 255


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/pascal.yaml")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, dotted keys for nested values (loss_weights.strong=0.25)")
    return parser.parse_args(argv)


# Settings that change how a run is watched or where it lives, never what it trains: the run name leaves them out.
OPERATIONAL_KEYS = ("workers", "log_interval", "image_log_interval", "checkpoint_interval", "on_nonfinite_loss",
                    "exp_dir", "run_name")


def run_directory(cfg: dict, overrides: list[str]) -> str:
    """exp/DATASET/SPLIT/<run name>. The default name is the command's overrides, cut to stay readable, then a hash
    of the whole resolved experiment: rerunning a command finds (and resumes) its run, and two experiments that differ
    in any setting, however long their command lines, never share one."""
    name = cfg["run_name"]
    if name is None:
        kept = [o for o in overrides if o.split("=", 1)[0].strip() not in ("split", *OPERATIONAL_KEYS)]
        readable = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(kept))[:80] or "default"
        experiment = {key: value for key, value in cfg.items() if key not in OPERATIONAL_KEYS}
        digest = hashlib.sha256(json.dumps(experiment, sort_keys=True).encode()).hexdigest()[:12]
        name = f"{readable}-{digest}"
    return os.path.join(cfg["exp_dir"], cfg["dataset"], cfg["split"], name)


def without_idle_cif(cfg: dict) -> tuple[dict, str | None]:
    """`cfg` with cif off where nothing would run it (train_mode supervised; isvc off with fusion none, so no
    rescaled view), and a line saying so. Kept, an untrained CIF would be saved and used by --multiscale-cif as if
    trained, and under DDP its parameters, which get no gradient, fail the step."""
    semi = cfg["train_mode"] == "semi"
    if not cfg["cif"] or (semi and (cfg["isvc"] or cfg["fusion"] != "none")):
        return cfg, None
    why = "isvc off and fusion none (no rescaled view)" if semi else "train_mode supervised"
    return {**cfg, "cif": False, "fusion": "none"}, f"cif: false, since with {why} nothing would train it"


def check_batch_size(cfg: dict, world_size: int, device: torch.device) -> None:
    """BatchNorm in training mode needs two values per channel, and ASPP's image pooling gives one per image: a pass
    of a single image (the strong view's, or the labeled one's in supervised mode, with batch_size 1) works only where
    SyncBatchNorm pools the images of several GPUs, as in the release's 1 x 2 GPUs on Cityscapes."""
    images_per_pass = cfg["batch_size"] * (cfg["strong_views"] if cfg["train_mode"] == "semi" else 1)
    if images_per_pass >= 2 or (device.type == "cuda" and world_size > 1):
        return
    where = "one process" if world_size == 1 else f"{world_size} CPU processes, whose BatchNorm is not synchronised"
    raise ConfigError(f"batch_size 1 on {where}: a training pass would hold one image, and BatchNorm (ASPP's image "
                      "pooling) needs two; set batch_size=2 (as many images per BatchNorm as the release's 1 x 2 "
                      "GPUs) or train on 2 or more GPUs")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def ignore_sigterm(worker_id: int) -> None:
    """A data loader worker leaves SIGTERM to the training process, which checkpoints before it stops: torchrun's
    agent and cluster schedulers signal whole process groups, and a worker killed that way fails the step instead."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, cfg: dict, seed: int, world_size: int, rank: int, batch_size: int) -> DataLoader:
    """A shuffled loader whose order and augmentation can resume mid-epoch (util/sampling.py)."""
    sampler = ResumableSampler(len(dataset), seed, rank, world_size)
    # Its own generator: creating an iterator draws a worker seed, which must not consume the global stream.
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=cfg["workers"],
                      pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=cfg["workers"] > 0,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_sigterm)


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


def labeled_criterion(cfg: dict) -> nn.Module:
    if cfg["criterion"] == "ohem":
        return OHEMCrossEntropy(cfg["ohem_thresh"], cfg["ohem_min_kept"], ignore_index=IGNORE_INDEX)
    return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)


def pseudo_label_from(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and class of each pixel from (detached) class probabilities."""
    confidence, pseudo_label = probs.detach().max(dim=1)
    return confidence, pseudo_label


def mean_probs(logits: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([p.detach().float().softmax(dim=1) for p in logits]).mean(dim=0)


def cutmix_targets(box, pseudo_label, confidence, ignore_mask, partner):
    """Targets of a CutMix-ed strong view: inside the box, the partner image's pseudo-label."""
    inside = box == 1
    return (torch.where(inside, partner["pseudo_label"], pseudo_label),
            torch.where(inside, partner["confidence"], confidence),
            torch.where(inside, partner["ignore_mask"], ignore_mask))


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


def fused_probs(out: dict, fusion: str, first: int) -> torch.Tensor:
    """Class probabilities of images [first:] after fusing the 1x and rescaled predictions."""
    if fusion == "cif":
        return mean_probs([p[first:] for p in out["pred_cif"]])
    if fusion == "average":
        return mean_probs([out["pred"][first:]] + [p[first:] for p in out["pred_scaled"]])
    return mean_probs([out["pred"][first:]])


class RunEvents:
    """The run's TensorBoard events (rank 0). A write that fails (a full disk) is told once on stderr, in one line, and
    the run goes on without events, as it does without train.log: its checkpoints are its record."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.failed = False
        # TensorBoard writes from a thread of its own, whose OSError would otherwise be printed as a traceback.
        self.previous_excepthook = threading.excepthook
        threading.excepthook = self._thread_failed
        try:
            self.writer = SummaryWriter(run_dir)
        except OSError as error:  # it writes and flushes the file's first record at once
            self._failed(error)

    def _failed(self, error: OSError) -> None:
        if not self.failed:
            print(f"warning: {self.run_dir}: cannot write the TensorBoard events ({error.strerror or error}); the run "
                  "goes on without them", file=sys.stderr)
        self.failed = True

    def _thread_failed(self, args) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            self._failed(args.exc_value)
        else:
            self.previous_excepthook(args)

    def _write(self, method: str, *args) -> None:
        if self.failed:
            return
        try:
            getattr(self.writer, method)(*args)
        except OSError as error:  # the writer thread's, raised again at the next call
            self._failed(error)

    def add_scalar(self, *args) -> None:
        self._write("add_scalar", *args)

    def add_image(self, *args) -> None:
        self._write("add_image", *args)

    def add_images(self, *args) -> None:
        self._write("add_images", *args)

    def close(self) -> None:
        self._write("close")
        threading.excepthook = self.previous_excepthook


def log_pictures(writer, tag: str, images, panels, palette, step: int, max_images: int = 4) -> None:
    """One TensorBoard grid: a row of images, then one row per label map in the dataset's colours."""
    count = min(max_images, len(images))
    tiles = [denormalize(images[i]) for i in range(count)]
    tiles += [colourize(labels[i].cpu().numpy(), palette) for labels in panels for i in range(count)]
    writer.add_image(tag, make_grid(torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2), nrow=count), step)


def semi_supervised_losses(model, labeled, unlabeled, partner_batch, cfg, epoch, device, criterion_labeled,
                           quality):
    """The loss terms of one ScaleMatch step (FixMatch / UniMatch when isvc, fsvc and cif are off), and what
    the logs show of it."""
    image_x = labeled["image"].to(device, non_blocking=True)
    mask_x = labeled["mask"].to(device, non_blocking=True)
    image_w = unlabeled["image_weak"].to(device, non_blocking=True)
    ignore_mask = unlabeled["ignore_mask"].to(device, non_blocking=True)
    image_s = [s.to(device, non_blocking=True) for s in unlabeled["image_strong"]]
    boxes = [b.to(device, non_blocking=True) for b in unlabeled["cutmix_box"]]
    num_x = len(image_x)

    # CutMix partner: its pseudo-label needs no graph, and eval mode keeps BN statistics clean.
    with torch.no_grad():
        model.eval()
        partner_probs = model(partner_batch["image_weak"].to(device, non_blocking=True))["pred"].float().softmax(1)
        model.train()
    partner_confidence, partner_label = pseudo_label_from(partner_probs)
    partner = {"pseudo_label": partner_label, "confidence": partner_confidence,
               "ignore_mask": partner_batch["ignore_mask"].to(device, non_blocking=True)}
    for view, box in enumerate(boxes):
        partner_s = partner_batch["image_strong"][view].to(device, non_blocking=True)
        image_s[view] = torch.where((box == 1).unsqueeze(1), partner_s, image_s[view])

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
        terms["supervised"] = sum(criterion_labeled(p[:num_x], mask_x) for p in out["pred_cif"]) / len(image_scales)
        if cfg["supervise_1x"]:  # the single-scale predictor also learns from labels directly, not via the gate
            terms["supervised"] = (terms["supervised"] + criterion_labeled(out["pred"][:num_x], mask_x)) / 2
    else:
        terms["supervised"] = criterion_labeled(out["pred"][:num_x], mask_x)
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

    # Pseudo-label quality against the unlabeled ground truth, where it is on disk (Fig. 5).
    truth = unlabeled["mask"].to(device, non_blocking=True)
    for fusion, fusion_probs in probs.items():
        quality["1x" if fusion == "none" else fusion].update(fusion_probs.argmax(1), truth)

    valid = ignore_mask != IGNORE_INDEX
    extras = {"mask_ratio": (confident & valid).float().sum() / valid.float().sum().clamp(min=1)}
    pictures = {"image_x": image_x, "mask_x": mask_x, "pred_x": out["pred"][:num_x], "image_w": image_w,
                "truth_u": truth, "pred_w": out["pred"][num_x:],
                "pseudo_label": torch.where(confident, pseudo_label, IGNORE_INDEX),
                "gate": out["gate"][0][num_x:] if out["gate"] else None}
    return terms, extras, pictures


class Preempted(Exception):
    """SIGTERM arrived, or under torchrun the launcher ended; a checkpoint was written."""


class NonFiniteLoss(Exception):
    """A NaN or infinite loss with on_nonfinite_loss: stop."""


class NonFiniteModel(Exception):
    """The model's weights or running statistics hold NaN or inf: nothing more is saved."""


class StopSignal:
    """Remembers why the run should stop at the next step boundary, with a checkpoint: a SIGTERM (cluster
    pre-emption) or, under torchrun, the end of the launcher (its workers would otherwise train on unwatched)."""

    def __init__(self):
        self.reason = None
        signal.signal(signal.SIGTERM, self._handle)
        if under_torchrun():
            watch_launcher(lambda: self.request("the torchrun launcher ended"))

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def _handle(self, signum, frame):
        self.request("SIGTERM")

    @property
    def received(self) -> bool:
        return self.reason is not None


def agree(flags: list[bool], world_size: int, device: torch.device) -> list[bool]:
    """Whether any process raised each flag, so that all processes take the same branch."""
    if world_size == 1:
        return flags
    # On the training device: NCCL reduces CUDA tensors only.
    raised = torch.tensor([float(f) for f in flags], device=device)
    return [bool(v) for v in all_reduce_sum(raised).tolist()]


def on_main(action, is_main: bool):
    """``action()`` run by rank 0 alone (writing the run directory); its result, or its one-line error, in every
    process, so that all processes go on or stop together instead of waiting for a peer that has gone."""
    outcome = None
    if is_main:
        try:
            outcome = (action(), None)
        except (CheckpointError, RunDirectoryError) as error:
            outcome = (None, error)
    result, error = broadcast_from_main(outcome)
    if error is not None:
        raise error
    return result


def ensure_finite(net: nn.Module, iteration: int, world_size: int, device: torch.device) -> None:
    """Stop before a model holding NaN or inf is evaluated or saved: the last checkpoint stays the last good one."""
    broken = [name for name, tensor in net.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if agree([bool(broken)], world_size, device)[0]:
        where = ", ".join(broken[:3]) + (", ..." if len(broken) > 3 else "") if broken else "another process's copy"
        raise NonFiniteModel(f"iteration {iteration}: the model holds NaN/inf ({where}); the last checkpoint is left "
                             "as it was")


def train_one_epoch(model, optimizer, scaler, loaders, cfg, progress, iters_per_epoch, total_iters, device, amp_dtype,
                    writer, logger, is_main, world_size, save_latest, stop):
    """Train from ``progress['step']`` to the end of epoch ``progress['epoch']``, updating ``progress``."""
    epoch = progress["epoch"]
    labeled_loader, unlabeled_loader, partner_loader = loaders
    for loader in loaders:
        loader.sampler.set_epoch(epoch, start=progress["step"] * cfg["batch_size"])
    criterion_labeled = labeled_criterion(cfg)
    semi = cfg["train_mode"] == "semi"
    weights = cfg["loss_weights"]
    quality = {name: MeanIoU(cfg["nclass"], device=device) for name in ("1x", "average", "cif")}
    model.train()
    batches = zip(labeled_loader, unlabeled_loader, partner_loader) if semi else ((b, None, None) for b in labeled_loader)
    bar = tqdm(batches, total=iters_per_epoch - progress["step"], disable=not is_main, desc=f"epoch {epoch}",
               leave=False)
    running, counted = {}, 0
    skippable = cfg["on_nonfinite_loss"] == "skip"
    for labeled, unlabeled, partner_batch in bar:
        if progress["step"] >= iters_per_epoch:
            break
        # A skipped step must leave the model as it was, and its forward passes move BatchNorm's running statistics.
        buffers_before = [buffer.clone() for buffer in model.buffers()] if skippable else None
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if semi:
                terms, extras, pictures = semi_supervised_losses(model, labeled, unlabeled, partner_batch, cfg, epoch,
                                                                 device, criterion_labeled, quality)
            else:
                image_x = labeled["image"].to(device, non_blocking=True)
                mask_x = labeled["mask"].to(device, non_blocking=True)
                pred_x = model(image_x)["pred"]
                terms, extras = {"supervised": criterion_labeled(pred_x, mask_x)}, {}
                pictures = {"image_x": image_x, "mask_x": mask_x, "pred_x": pred_x}

        # Total loss (Eq. 17): (L_s + sum of weighted unsupervised terms) / loss_divisor.
        loss = (terms["supervised"] + sum(weights[name] * value for name, value in terms.items()
                                          if name != "supervised")) / cfg["loss_divisor"]
        nonfinite, stop_requested = agree([not torch.isfinite(loss.detach()).item(), stop.received], world_size, device)
        iteration = progress["iteration"] + 1
        if nonfinite:
            culprits = [name for name, value in terms.items() if not torch.isfinite(value.detach()).item()]
            where = f"iteration {iteration} (epoch {epoch}): non-finite loss in {', '.join(culprits) or 'another process'}"
            if cfg["on_nonfinite_loss"] == "stop":
                raise NonFiniteLoss(f"{where}; the last checkpoint is left as it was "
                                    "(set on_nonfinite_loss=skip to skip such steps)")
            progress["skipped_steps"] += 1
            logger.warning(f"{where}; step skipped ({progress['skipped_steps']} so far)")
            optimizer.zero_grad(set_to_none=True)
            for buffer, before in zip(model.buffers(), buffers_before):
                buffer.copy_(before)
        else:
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        # The next step's rate from this step's 0-based index, as the release schedules it.
        lr = set_poly_lr(optimizer, cfg, progress["iteration"], total_iters)
        progress["iteration"] = iteration
        progress["step"] += 1

        if not nonfinite:
            counted += 1
            logged = {**terms, **extras, "total": loss}
            for name, value in logged.items():
                running[name] = running.get(name, 0.0) + value.item()
            if is_main:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
                for name, value in logged.items():
                    writer.add_scalar(f"train/{name}", value.item(), iteration)
                writer.add_scalar("train/lr", lr, iteration)
                if iteration % cfg["log_interval"] == 0:
                    logger.info(f"epoch {epoch} iter {iteration}/{total_iters} lr {lr:.2e} "
                                + " ".join(f"{k} {v / counted:.4f}" for k, v in running.items()))
                if cfg["image_log_interval"] and iteration % cfg["image_log_interval"] == 0:
                    log_step_pictures(writer, pictures, class_palette(cfg), iteration)

        # The epoch's last step is saved after its evaluation instead, so a resume never skips that evaluation.
        interval = cfg["checkpoint_interval"]
        if stop_requested or (interval and iteration % interval == 0 and progress["step"] < iters_per_epoch):
            save_latest()
        if stop_requested:
            raise Preempted(f"{stop.reason or 'another process was stopped'}: checkpoint written at iteration "
                            f"{iteration}; rerun the same command to resume")

    if semi:
        for meter in quality.values():
            meter.all_reduce()
        measured = {name: meter.miou() for name, meter in quality.items() if meter.target_area.sum() > 0}
        if is_main and measured:
            logger.info(f"epoch {epoch} pseudo-label mIoU on unlabeled images: "
                        + ", ".join(f"{name} {value:.2f}" for name, value in measured.items()))
            for name, value in measured.items():
                writer.add_scalar(f"pseudo_label_miou/{name}", value, epoch)


def log_step_pictures(writer, pictures: dict, palette, step: int) -> None:
    log_pictures(writer, "train/labeled (image, ground truth, prediction)", pictures["image_x"],
                 [pictures["mask_x"], pictures["pred_x"].argmax(1)], palette, step)
    if "image_w" in pictures:
        log_pictures(writer, "train/unlabeled (image, ground truth, prediction, confident pseudo-label)",
                     pictures["image_w"], [pictures["truth_u"], pictures["pred_w"].argmax(1),
                                           pictures["pseudo_label"]], palette, step)
    if pictures.get("gate") is not None:
        writer.add_images("train/cif gate (weight of the 1x prediction)", pictures["gate"][:4].float().cpu(), step)


# Settings a resumed run may change: how it is watched, evaluated and computed, where its files are, and how long it
# trains (the schedule then stretches from where it is). Any other change would make it a mix of two experiments.
RESUMABLE_CHANGES = OPERATIONAL_KEYS + ("epochs", "eval_interval", "eval_mode", "amp", "amp_dtype", "deterministic",
                                        "data_root", "splits_dir", "pretrained", "class_names", "palette")


def flatten(cfg: dict, prefix: str = "") -> dict:
    """Nested sections as dotted keys: {'loss_weights.strong': 0.25, ...}."""
    flat = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_config(saved: dict, cfg: dict, path: str, logger) -> None:
    """Refuse, in one line naming every such key, a resume whose settings change the experiment."""
    before, now = flatten(saved), flatten(cfg)
    changed = [key for key in now if key in before and before[key] != now[key]]
    refused = [key for key in changed if key.split(".")[0] not in RESUMABLE_CHANGES]
    if refused:
        raise CheckpointError(f"{path}: refusing to resume: "
                              + ", ".join(f"'{key}' was {before[key]!r}, now {now[key]!r}" for key in refused)
                              + "; that is another experiment, so give it another run_name (or undo the change)")
    unrecorded = [key for key in now if key not in before]
    if changed:
        logger.warning(f"resuming {path} with changed settings: "
                       + ", ".join(f"{key} {before[key]!r} -> {now[key]!r}" for key in sorted(changed)))
    if unrecorded:
        logger.warning(f"resuming {path}, whose config predates {', '.join(unrecorded)}: taken as unchanged")


def process_state(net: nn.Module) -> dict:
    """What differs between the processes of a run: their random streams (each rank draws its own dropout masks and
    scales) and their BatchNorm running statistics (the same everywhere only under SyncBatchNorm, not on CPU)."""
    buffer_names = {name for name, _ in net.named_buffers()}
    return {"rng": rng_state(),
            "buffers": {name: value.cpu() for name, value in net.state_dict().items() if name in buffer_names}}


def checkpoint_state(net, optimizer, scaler, cfg: dict, progress: dict, miou=None) -> dict | None:
    """The checkpoint of this moment on rank 0, None elsewhere; every process must call it.

    Each rank's own state is gathered into the one file rather than written to a file per rank: one atomic rename
    then commits every rank's state at the same iteration, where a kill between per-rank writes would leave a mix."""
    processes = gather_to_main(process_state(net))
    if processes is None:
        return None
    return {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "config": cfg, "processes": processes, "miou": miou, **progress}


def recorded_best_miou(best_path: str) -> float:
    """The mIoU that best.pth was saved with, 0 without one. A new best is written to best.pth before latest.pth
    records it, so a run killed between the two writes still knows (and keeps) its best."""
    if not os.path.exists(best_path):
        return 0.0
    return load_checkpoint(best_path)["miou"]


def resume(path: str, net, optimizer, scaler, cfg: dict, device, iters_per_epoch: int, rank: int, world_size: int,
           logger) -> dict:
    """Restore a run from ``path`` (this rank's own random states and statistics); returns where to continue
    (epoch, step within it, iteration, best mIoU)."""
    # On the CPU: random states must stay CPU tensors; load_state_dict moves weights and optimizer state to the device.
    state = load_checkpoint(path, map_location="cpu")
    check_resume_config(state["config"], cfg, path, logger)
    # Checkpoints written before each rank's state was saved hold rank 0's random states alone.
    processes = state["processes"] if "processes" in state else [{"rng": state["rng"]}] * world_size
    if len(processes) != world_size:
        raise CheckpointError(f"{path}: refusing to resume: it was trained by {len(processes)} process(es), now "
                              f"{world_size}; rerun it with NGPUS {len(processes)} (the batch is per process)")
    own = processes[rank]
    load_model_state(net, {**state["model"], **own.get("buffers", {})}, path)
    optimizer.load_state_dict(state["optimizer"])
    # An empty scaler state was saved with the scaler off (on the CPU); an enabled scaler then starts afresh.
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(own["rng"])
    progress = {key: state[key] for key in ("epoch", "step", "iteration", "best_miou", "skipped_steps")}
    if progress["step"] >= iters_per_epoch:
        progress["epoch"] += 1
        progress["step"] = 0
    logger.info(f"resumed from {path}: epoch {progress['epoch']} step {progress['step']}, "
                f"iteration {progress['iteration']}")
    return progress


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg, cif_note = without_idle_cif(load_config(args.config, args.overrides))
    rank, world_size, local_rank, device = init_distributed(force_cpu=args.cpu)
    is_main = rank == 0
    stop = StopSignal()
    check_batch_size(cfg, world_size, device)
    run_dir = run_directory(cfg, args.overrides)
    lock, created = None, []

    def claim_run_directory():
        nonlocal lock, created
        created = directories_to_create(run_dir)
        lock, lock_note = lock_run_directory(run_dir)
        return lock_note, remove_stale_temporaries(run_dir, locked=lock is not None)

    try:
        lock_note, removed = on_main(claim_run_directory, is_main)
        train(cfg, run_dir, rank, world_size, local_rank, device, stop, [cif_note, lock_note] + [
            f"removed {name}, left by a save that was killed" for name in removed])
    except (ConfigError, DatasetError, PretrainedError):
        # A run that could not start leaves no directory behind, where this launch made it.
        release_run_directory(lock)
        lock = None
        remove_unstarted_run(run_dir, created)
        raise
    finally:
        release_run_directory(lock)
    cleanup()


def train(cfg, run_dir, rank, world_size, local_rank, device, stop, notes) -> None:
    """Train the run in ``run_dir`` (locked by rank 0) from its latest.pth, or from the start."""
    is_main = rank == 0
    latest, best = os.path.join(run_dir, "latest.pth"), os.path.join(run_dir, "best.pth")
    logger = setup_logger(run_dir, rank)
    for note in filter(None, notes):
        logger.info(note)
    seed_everything(cfg["seed"] + rank, cfg["deterministic"])

    labeled_set, unlabeled_set, val_set = build_datasets(cfg, cfg["splits_dir"])
    semi = cfg["train_mode"] == "semi"
    logger.info(f"run {run_dir} | {world_size} process(es) on {device} | "
                + dataset_summary(cfg, labeled_set, unlabeled_set, val_set))
    batch = cfg["batch_size"]
    loaders = (make_loader(labeled_set, cfg, cfg["seed"] + 1, world_size, rank, batch),
               make_loader(unlabeled_set, cfg, cfg["seed"] + 2, world_size, rank, batch),
               make_loader(unlabeled_set, cfg, cfg["seed"] + 3, world_size, rank, batch))
    iters_per_epoch = len(loaders[1]) if semi else len(loaders[0])
    if cfg["iters_per_epoch"] is not None:
        iters_per_epoch = min(iters_per_epoch, cfg["iters_per_epoch"])
    if iters_per_epoch == 0:
        raise DatasetError(f"split {cfg['split']}: fewer samples per process than batch_size {batch}")
    total_iters = iters_per_epoch * cfg["epochs"]

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
    net = model.module if world_size > 1 else model
    amp_dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    if is_main:
        n_params = sum(p.numel() for p in net.parameters()) / 1e6
        logger.info(f"model {cfg['backbone']} DeepLabV3+{' + CIF' if cfg['cif'] else ''} ({n_params:.1f}M parameters), "
                    f"amp {amp_dtype}, {iters_per_epoch} iterations x {cfg['epochs']} epochs")

    progress = {"epoch": 0, "step": 0, "iteration": 0, "best_miou": 0.0, "skipped_steps": 0}
    if resuming:
        progress = resume(latest, net, optimizer, scaler, cfg, device, iters_per_epoch, rank, world_size, logger)
    best_on_disk = on_main(lambda: recorded_best_miou(best), is_main)
    if resuming and best_on_disk != progress["best_miou"]:
        held = f"holds {best_on_disk:.2f}" if os.path.exists(best) else "does not exist"
        logger.warning(f"{latest} recorded best mIoU {progress['best_miou']:.2f}, but {best} {held}: the best so far "
                       "is taken from it")
    progress["best_miou"] = best_on_disk
    if resuming:
        logger.info(f"best mIoU so far {best_on_disk:.2f}")
    config_path = os.path.join(run_dir, "config.yaml")
    on_main(lambda: write_atomically(config_path, lambda temporary: dump_config(cfg, temporary)), is_main)

    def save(paths: list[str], miou=None) -> None:
        state = checkpoint_state(net, optimizer, scaler, cfg, progress, miou)
        on_main(lambda: [save_checkpoint(state, path) for path in paths], is_main)

    def save_latest() -> None:
        ensure_finite(net, progress["iteration"], world_size, device)
        save([latest])

    writer = RunEvents(run_dir) if is_main else None
    names = class_names(cfg)
    while progress["epoch"] < cfg["epochs"]:
        epoch = progress["epoch"]
        train_one_epoch(model, optimizer, scaler, loaders, cfg, progress, iters_per_epoch, total_iters, device,
                        amp_dtype, writer, logger, is_main, world_size, save_latest, stop)
        ensure_finite(net, progress["iteration"], world_size, device)
        miou, is_best = None, False
        if (epoch + 1) % cfg["eval_interval"] == 0 or epoch == cfg["epochs"] - 1:
            net.eval()
            metric = evaluate(net.predict, val_set, cfg, device, amp_dtype, rank, world_size)
            miou = metric.miou()
            is_best = miou > progress["best_miou"]
            progress["best_miou"] = max(progress["best_miou"], miou)
            if is_main:
                logger.info(f"epoch {epoch} validation ({cfg['eval_mode']})\n"
                            + format_iou_table(names, metric.iou())
                            + f"\nbest mIoU so far {progress['best_miou']:.2f}")
                writer.add_scalar("eval/mIoU", miou, epoch)
                for name, iou in zip(names, metric.iou().tolist()):
                    writer.add_scalar(f"eval/IoU/{name}", iou, epoch)
        # best.pth before latest.pth: a kill between the two writes must not leave a recorded best without its file.
        save([best, latest] if is_best else [latest], miou)
        progress["epoch"] += 1
        progress["step"] = 0
        if agree([stop.received], world_size, device)[0]:
            raise Preempted(f"{stop.reason or 'another process was stopped'}: checkpoint written at iteration "
                            f"{progress['iteration']}; rerun the same command to resume")
    if is_main:
        writer.close()
        logger.info(f"done: best mIoU {progress['best_miou']:.2f}, checkpoints in {run_dir}")


def exit_code(argv=None) -> int:
    """Run main(); tell a failure in one line (under torchrun through the launcher, once for all processes) and
    return the exit code: 0 done, 2 bad input or an unusable run directory or disk, 3 a non-finite loss or model,
    143 stopped with a checkpoint (SIGTERM), 130 interrupted, 1 a lost peer process."""
    try:
        main(argv)
    except (ConfigError, DatasetError, CheckpointError, PretrainedError, RunDirectoryError) as error:
        report_failure(f"error: {error}")
        return 2
    except (NonFiniteLoss, NonFiniteModel) as error:
        report_failure(f"error: {error}")
        return 3
    except Preempted as stopped:
        if os.environ.get("RANK", "0") == "0":
            print(str(stopped), file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        # Under torchrun the launcher says it, once.
        if not under_torchrun():
            print("interrupted: the last checkpoint is left as it was; rerun the same command to resume",
                  file=sys.stderr)
        return 130
    except RuntimeError as error:
        # A collective whose peer has ended (NCCL: DistError; gloo: the peer closed its connection) is a consequence;
        # the launcher prints the peer's own failure instead.
        text = str(error).strip()
        peer_gone = isinstance(error, torch.distributed.DistError) or any(words in text for words in (
            "closed by peer", "reset by peer"))
        if not (peer_gone and torch.distributed.is_initialized()):
            raise
        report_failure(f"error: lost another process of the run ({text.splitlines()[0]})",
                       caused_by_another_process=True)
        return 1
    except OSError as error:
        if error.filename is None:
            raise
        report_failure(f"error: {error.filename}: {error.strerror}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(exit_code())
