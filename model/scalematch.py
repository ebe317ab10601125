"""The network used in training: one call returns every named prediction of a training step.

DistributedDataParallel only synchronises gradients of work done inside ``forward``, so the
branches of a step (weak view, feature perturbation) are all produced by this one call.
"""
import torch
import torch.nn.functional as F
from torch import nn


def resize_to(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


class ScaleMatchNet(nn.Module):
    """Wraps a segmenter with ``encode``/``decode`` (DeepLabV3Plus) and exposes the training branches."""

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        self.segmenter = segmenter

    @property
    def backbone(self) -> nn.Module:
        return self.segmenter.backbone

    def forward(self, images: torch.Tensor, feature_perturb: bool = False) -> dict[str, torch.Tensor]:
        """Return ``pred`` (logits at the image size) and, with ``feature_perturb``, ``pred_fp``:
        the decoder run on dropout-perturbed copies of the same encoder features."""
        size = images.shape[-2:]
        low, high = self.segmenter.encode(images)
        logits, _ = self.segmenter.decode(low, high)
        out = {"pred": resize_to(logits, size)}
        if feature_perturb:
            logits_fp, _ = self.segmenter.decode(low, high, perturb=True)
            out["pred_fp"] = resize_to(logits_fp, size)
        return out

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Plain inference: logits at the image size."""
        return self.segmenter(images)
