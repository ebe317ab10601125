"""Losses: OHEM cross-entropy for labeled images, and confidence-masked cross-entropy against pseudo-labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OHEMCrossEntropy(nn.Module):
    """Cross-entropy over the hard pixels: those whose probability of the true class is at most `thresh`, widened to
    the `min_kept` hardest when fewer qualify (the Cityscapes practice of CPS and UniMatch). Mean over kept pixels;
    0 when none is kept. `min_kept` 0 mines nothing: every valid pixel is kept (the release's ProbOhemCrossEntropy2d,
    whose index min_kept - 1 wraps to the easiest pixel); the threshold alone is `min_kept` 1."""

    def __init__(self, thresh: float = 0.7, min_kept: int = 200000, ignore_index: int = 255):
        super().__init__()
        if not 0 < thresh <= 1:
            raise ValueError(f"OHEM thresh must be in (0, 1], got {thresh}")
        if min_kept < 0:
            raise ValueError(f"OHEM min_kept must be >= 0, got {min_kept}")
        self.thresh = thresh
        self.min_kept = min_kept
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`logits` (N, C, H, W), `target` (N, H, W) class indices or ignore_index."""
        valid = target != self.ignore_index
        safe_target = target.masked_fill(~valid, 0)
        with torch.no_grad():
            prob = torch.softmax(logits.float(), dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
            valid_prob = prob[valid]
            threshold = torch.tensor(self.thresh, device=prob.device)
            num_ranked = min(self.min_kept, valid_prob.numel())
            if num_ranked > 0:
                threshold = torch.maximum(threshold, torch.kthvalue(valid_prob, num_ranked).values)
            kept = valid & (prob <= threshold) if self.min_kept > 0 else valid
        loss = F.cross_entropy(logits, safe_target, reduction="none")
        return torch.where(kept, loss, 0.0).sum() / kept.sum().clamp_min(1)


def masked_cross_entropy(logits: torch.Tensor, pseudo_label: torch.Tensor, confident: torch.Tensor,
                         ignore_mask: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy against pseudo-labels, summed over the confident pixels that `ignore_mask` does not mark with
    `ignore_index`, divided by the count of all unmarked pixels (UniMatch's convention: unconfident pixels dilute
    the mean). `logits` is (N, C, H, W); `pseudo_label`, bool `confident` and `ignore_mask` are (N, H, W).
    Returns a differentiable 0 when every pixel is marked."""
    counted = ignore_mask != ignore_index
    loss = F.cross_entropy(logits, pseudo_label, reduction="none", ignore_index=ignore_index)
    return torch.where(confident & counted, loss, 0.0).sum() / counted.sum().clamp_min(1)
