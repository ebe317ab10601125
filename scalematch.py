"""Semi-supervised semantic segmentation training (FixMatch weak-to-strong with CutMix and feature
perturbation, as in UniMatch), launched by ``scripts/train.sh`` with or without torchrun.

    python scalematch.py --config configs/synthetic.yaml split=1_16 epochs=2
"""
import argparse
import os
import random
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid
from tqdm import tqdm

from dataset.classes import CLASS_NAMES, palette
from dataset.semi import DatasetError, build_datasets
from eval import evaluate
from model import build_model
from util.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from util.config import ConfigError, dump_config, load_config
from util.dist import barrier, cleanup, init_distributed
from util.logging import setup_logger
from util.losses import OHEMCrossEntropy, masked_cross_entropy
from util.metrics import format_iou_table

IGNORE_INDEX = 255
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/pascal.yaml")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, dotted keys for nested values (loss_weights.strong=0.25)")
    return parser.parse_args(argv)


def run_directory(cfg: dict, overrides: list[str]) -> str:
    """exp/DATASET/SPLIT/<run name>; the default name is derived from the overrides so that rerunning
    the same command finds (and resumes) the same run."""
    name = cfg["run_name"]
    if name is None:
        kept = [o for o in overrides if o.split("=", 1)[0] not in ("split", "run_name", "exp_dir")]
        name = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(kept))[:120] or "default"
    return os.path.join(cfg["exp_dir"], cfg["dataset"], cfg["split"], name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def seed_worker(worker_id: int) -> None:
    # Each worker's torch seed already differs (base seed + worker id); propagate it to Python and NumPy.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset, cfg: dict, seed: int, world_size: int, rank: int, batch_size: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg["workers"],
                      pin_memory=torch.cuda.is_available(), drop_last=True, worker_init_fn=seed_worker,
                      generator=generator, persistent_workers=cfg["workers"] > 0)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


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
    lr = cfg["lr"] * (1 - iteration / total_iters) ** cfg["poly_power"]
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return lr


def autocast_dtype(cfg: dict, device: torch.device):
    """bf16 where the GPU supports it, fp16 (with GradScaler) otherwise, None (off) on the CPU."""
    if not cfg["amp"] or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def labeled_criterion(cfg: dict) -> nn.Module:
    if cfg["criterion"] == "ohem":
        return OHEMCrossEntropy(cfg["ohem_thresh"], cfg["ohem_min_kept"], ignore_index=IGNORE_INDEX)
    return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)


def pseudo_label_from(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and argmax class of detached logits."""
    probs = logits.detach().float().softmax(dim=1)
    confidence, pseudo_label = probs.max(dim=1)
    return confidence, pseudo_label


def cutmix_targets(box, pseudo_label, confidence, ignore_mask, partner):
    """Targets of a CutMix-ed strong view: inside the box, the partner image's pseudo-label."""
    inside = box == 1
    return (torch.where(inside, partner["pseudo_label"], pseudo_label),
            torch.where(inside, partner["confidence"], confidence),
            torch.where(inside, partner["ignore_mask"], ignore_mask))


def denormalize(images: torch.Tensor) -> torch.Tensor:
    return (images.cpu().float() * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1)


def colorize(labels: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """(B, H, W) class indices -> (B, 3, H, W) colours in [0, 1]; 255 (ignore) shows white."""
    return colors[labels.cpu().long()].permute(0, 3, 1, 2)


def log_pictures(writer, tag, images, panels, dataset: str, step: int, max_images: int = 4) -> None:
    colors = torch.tensor(palette(dataset), dtype=torch.float32).view(256, 3) / 255
    colors[IGNORE_INDEX] = 1.0
    rows = [denormalize(images[:max_images])] + [colorize(p[:max_images], colors) for p in panels]
    writer.add_image(tag, make_grid(torch.cat(rows), nrow=min(max_images, len(images))), step)


def train_one_epoch(model, optimizer, scaler, loaders, cfg, epoch, start_iter, total_iters, iters_per_epoch,
                    device, amp_dtype, writer, logger, is_main):
    """One epoch of weak-to-strong training; returns the global iteration count at its end."""
    labeled_loader, unlabeled_loader, partner_loader = loaders
    criterion_labeled = labeled_criterion(cfg)
    semi = cfg["train_mode"] == "semi"
    weights = cfg["loss_weights"]
    model.train()
    batches = zip(labeled_loader, unlabeled_loader, partner_loader) if semi else ((b, None, None) for b in labeled_loader)
    progress = tqdm(batches, total=iters_per_epoch, disable=not is_main, desc=f"epoch {epoch}", leave=False)
    running = {}
    iteration = start_iter
    for step, (labeled, unlabeled, partner_batch) in enumerate(progress):
        if step >= iters_per_epoch:
            break
        image_x = labeled["image"].to(device, non_blocking=True)
        mask_x = labeled["mask"].to(device, non_blocking=True)
        terms = {}
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if not semi:
                pred_x = model(image_x)["pred"]
                terms["supervised"] = criterion_labeled(pred_x, mask_x)
            else:
                image_w = unlabeled["image_weak"].to(device, non_blocking=True)
                ignore_mask = unlabeled["ignore_mask"].to(device, non_blocking=True)
                image_s = [s.to(device, non_blocking=True) for s in unlabeled["image_strong"]]
                boxes = [b.to(device, non_blocking=True) for b in unlabeled["cutmix_box"]]

                # CutMix partner: its pseudo-label needs no graph, and eval mode keeps BN statistics clean.
                partner_w = partner_batch["image_weak"].to(device, non_blocking=True)
                with torch.no_grad():
                    model.eval()
                    partner_confidence, partner_label = pseudo_label_from(model(partner_w)["pred"])
                    model.train()
                partner = {"pseudo_label": partner_label, "confidence": partner_confidence,
                           "ignore_mask": partner_batch["ignore_mask"].to(device, non_blocking=True)}
                for view, box in enumerate(boxes):
                    partner_s = partner_batch["image_strong"][view].to(device, non_blocking=True)
                    inside = (box == 1).unsqueeze(1).expand_as(image_s[view])
                    image_s[view] = torch.where(inside, partner_s, image_s[view])

                # Weak view of labeled + unlabeled images in one pass, with the feature-perturbed decoder.
                out = model(torch.cat((image_x, image_w)), feature_perturb=cfg["fp"])
                pred_x, pred_w = out["pred"].split([len(image_x), len(image_w)])
                pred_s = model(torch.cat(image_s))["pred"].chunk(len(image_s))

                confidence, pseudo_label = pseudo_label_from(pred_w)
                confident = confidence >= cfg["conf_thresh"]

                # L_s: ground truth on labeled images.
                terms["supervised"] = criterion_labeled(pred_x, mask_x)
                # L_strong: strong views (CutMix-ed) supervised by weak pseudo-labels, averaged over views.
                strong_losses = []
                for view, box in enumerate(boxes):
                    label_mix, conf_mix, ignore_mix = cutmix_targets(box, pseudo_label, confidence, ignore_mask, partner)
                    strong_losses.append(masked_cross_entropy(pred_s[view], label_mix,
                                                              conf_mix >= cfg["conf_thresh"], ignore_mix))
                terms["strong"] = sum(strong_losses) / len(strong_losses)
                # L_fp: perturbed-feature prediction of the unlabeled images, same pseudo-label.
                if cfg["fp"]:
                    pred_fp = out["pred_fp"][len(image_x):]
                    terms["fp"] = masked_cross_entropy(pred_fp, pseudo_label, confident, ignore_mask)

        loss = (terms["supervised"] + sum(weights[name] * value for name, value in terms.items()
                                          if name != "supervised")) / cfg["loss_divisor"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = set_poly_lr(optimizer, cfg, iteration + 1, total_iters)
        iteration += 1

        terms["total"] = loss
        if semi:
            valid = (ignore_mask != IGNORE_INDEX).float().sum().clamp(min=1)
            terms["mask_ratio"] = (confident & (ignore_mask != IGNORE_INDEX)).float().sum() / valid
        for name, value in terms.items():
            running[name] = running.get(name, 0.0) + value.item()
        if is_main:
            progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            for name, value in terms.items():
                writer.add_scalar(f"train/{name}", value.item(), iteration)
            writer.add_scalar("train/lr", lr, iteration)
            if iteration % cfg["log_interval"] == 0:
                logger.info(f"epoch {epoch} iter {iteration}/{total_iters} lr {lr:.2e} "
                            + " ".join(f"{k} {v / (step + 1):.4f}" for k, v in running.items()))
            if cfg["image_log_interval"] and iteration % cfg["image_log_interval"] == 0:
                log_pictures(writer, "train/labeled (image, ground truth, prediction)", image_x,
                             [mask_x, pred_x.argmax(1)], cfg["dataset"], iteration)
                if semi:
                    gt_u = unlabeled["mask"].to(device)
                    log_pictures(writer, "train/unlabeled (image, ground truth, prediction, pseudo-label)", image_w,
                                 [gt_u, pred_w.argmax(1), torch.where(confident, pseudo_label, IGNORE_INDEX)],
                                 cfg["dataset"], iteration)
    return iteration


def load_resume_state(path: str, model, optimizer, scaler, device):
    state = load_checkpoint(path, map_location=device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return state["epoch"] + 1, state["iteration"], state["best_miou"]


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    rank, world_size, local_rank, device = init_distributed(force_cpu=args.cpu)
    is_main = rank == 0
    run_dir = run_directory(cfg, args.overrides)
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        dump_config(cfg, os.path.join(run_dir, "config.yaml"))
    barrier()
    logger = setup_logger(run_dir, rank)
    seed_everything(cfg["seed"] + rank, cfg["deterministic"])

    labeled_set, unlabeled_set, val_set = build_datasets(cfg, cfg["splits_dir"])
    semi = cfg["train_mode"] == "semi"
    logger.info(f"run {run_dir} | {world_size} process(es) on {device} | {len(labeled_set)} labeled (repeated), "
                f"{len(unlabeled_set)} unlabeled, {len(val_set)} val samples, {cfg['nclass']} classes")
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

    model = build_model(cfg).to(device)
    optimizer = build_optimizer(cfg, model)
    if world_size > 1:
        # SyncBatchNorm exists for CUDA only; CPU (gloo) processes keep per-process statistics.
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None,
                                                    broadcast_buffers=False)
    net = model.module if world_size > 1 else model
    amp_dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    if is_main:
        n_params = sum(p.numel() for p in net.parameters()) / 1e6
        logger.info(f"model {cfg['backbone']} DeepLabV3+ ({n_params:.1f}M parameters), "
                    f"amp {amp_dtype}, {iters_per_epoch} iterations x {cfg['epochs']} epochs")

    start_epoch, iteration, best_miou = 0, 0, 0.0
    latest = os.path.join(run_dir, "latest.pth")
    if os.path.exists(latest):
        start_epoch, iteration, best_miou = load_resume_state(latest, net, optimizer, scaler, device)
        logger.info(f"resumed from {latest}: epoch {start_epoch}, iteration {iteration}, best mIoU {best_miou:.2f}")

    writer = SummaryWriter(run_dir) if is_main else None
    class_names = CLASS_NAMES[cfg["dataset"]]
    for epoch in range(start_epoch, cfg["epochs"]):
        for loader in loaders:
            set_loader_epoch(loader, epoch)
        iteration = train_one_epoch(model, optimizer, scaler, loaders, cfg, epoch, iteration, total_iters,
                                    iters_per_epoch, device, amp_dtype, writer, logger, is_main)
        due = (epoch + 1) % cfg["eval_interval"] == 0 or epoch == cfg["epochs"] - 1
        miou, is_best = None, False
        if due:
            net.eval()
            metric = evaluate(net.predict, val_set, cfg, device, amp_dtype, rank, world_size)
            miou = metric.miou()
            is_best = miou > best_miou
            best_miou = max(best_miou, miou)
            if is_main:
                logger.info(f"epoch {epoch} validation ({cfg['eval_mode']})\n"
                            + format_iou_table(class_names, metric.iou())
                            + f"\nmIoU {miou:.2f} (best {best_miou:.2f})")
                writer.add_scalar("eval/mIoU", miou, epoch)
                for name, iou in zip(class_names, metric.iou().tolist()):
                    writer.add_scalar(f"eval/IoU/{name}", iou, epoch)
        if is_main:
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch, "iteration": iteration, "best_miou": best_miou, "miou": miou, "config": cfg}
            save_checkpoint(state, latest)
            if is_best:
                save_checkpoint(state, os.path.join(run_dir, "best.pth"))
        barrier()
    if is_main:
        writer.close()
        logger.info(f"done: best mIoU {best_miou:.2f}, checkpoints in {run_dir}")
    cleanup()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DatasetError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
