"""Segmentation metrics: per-class intersection and union, and mean IoU accumulated over batches and processes."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from util.dist import all_reduce_sum


def intersection_and_union(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                           ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class pixel counts of pred ∩ target, pred ∪ target and target, over pixels whose target is not
    `ignore_index`. `pred` and `target` are integer label maps of one shape; results are int64 on pred's device."""
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}")
    valid = target != ignore_index
    pred = pred[valid].long()
    target = target[valid].long()
    intersection = torch.bincount(target[pred == target], minlength=num_classes)
    area_pred = torch.bincount(pred, minlength=num_classes)
    area_target = torch.bincount(target, minlength=num_classes)
    # bincount grows past minlength only for a label >= num_classes.
    if area_target.numel() > num_classes or area_pred.numel() > num_classes:
        source = "target" if area_target.numel() > num_classes else "pred"
        label = int((target if source == "target" else pred).max())
        raise ValueError(f"{source} contains label {label}, outside 0..{num_classes - 1} and not {ignore_index}")
    return intersection, area_pred + area_target - intersection, area_target


class MeanIoU:
    """Accumulates intersections and unions over batches; iou() and miou() are percentages (0-100)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.intersection = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.union = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.target_area = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add the counts of a batch of predicted and ground-truth label maps."""
        intersection, union, target_area = intersection_and_union(pred, target, self.num_classes, self.ignore_index)
        self.intersection += intersection.to(self.intersection.device)
        self.union += union.to(self.union.device)
        self.target_area += target_area.to(self.target_area.device)

    def all_reduce(self) -> None:
        """Sum the counts over all processes (call once, after the last update); no-op when running alone."""
        counts = all_reduce_sum(torch.stack([self.intersection, self.union, self.target_area]))
        self.intersection, self.union, self.target_area = counts.unbind(0)

    def iou(self) -> torch.Tensor:
        """Per-class IoU in percent (float64, CPU); nan for a class absent from both predictions and targets."""
        intersection = self.intersection.cpu().double()
        union = self.union.cpu().double()
        return torch.where(union > 0, 100.0 * intersection / union, torch.nan)

    def miou(self) -> float:
        """Mean IoU in percent over the classes with a non-empty union (nan when there is none)."""
        return torch.nanmean(self.iou()).item()

    def miou_all_classes(self) -> float:
        """Mean IoU in percent over all num_classes, a class absent from predictions and targets counting 0: the
        release's mIoU (its intersection / (union + 1e-10)). Equal to miou() when every class is present."""
        return all_classes_mean(self.iou())


def all_classes_mean(iou: torch.Tensor) -> float:
    """Mean of per-class IoU (percent, nan for an absent class) over all classes, an absent class counting 0."""
    return torch.nan_to_num(iou.double(), nan=0.0).mean().item()


def format_iou_table(class_names: Sequence[str], iou: torch.Tensor) -> str:
    """Per-class IoU (percent, e.g. from MeanIoU.iou()) as aligned text, one class a line, then two means: over all
    classes, an absent one counting 0 (the release's mIoU), and, last, over the classes present."""
    if len(class_names) != len(iou):
        raise ValueError(f"{len(class_names)} class names for {len(iou)} IoU values")
    all_classes = "mIoU (all)"
    width = max(len(name) for name in [*class_names, all_classes])

    def row(name: str, value: float) -> str:
        return f"{name:<{width}}  {'n/a' if math.isnan(value) else f'{value:.2f}':>7}"

    present = int((~iou.isnan()).sum())
    lines = [f"{'class':<{width}}  {'IoU (%)':>7}"]
    lines += [row(name, value) for name, value in zip(class_names, iou.tolist())]
    lines.append(row(all_classes, all_classes_mean(iou))
                 + f"  over all {len(iou)} classes, 0 for a class absent from predictions and masks (the release's)")
    lines.append(row("mIoU", torch.nanmean(iou.double()).item()) + f"  over the {present} classes present")
    return "\n".join(lines)
