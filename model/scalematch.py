"""The network used in training: one call returns every named prediction of a training step.

DistributedDataParallel only synchronises gradients of work done inside ``forward``, so all branches of
a step (weak view, rescaled views, perturbed and rescaled features, CIF fusion) come from this one call.
"""
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from model.cif import CrossScaleInteractionFusion


def resize_to(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def rescale(images: torch.Tensor, scale: float) -> torch.Tensor:
    size = [max(1, round(side * scale)) for side in images.shape[-2:]]
    return resize_to(images, size)


@contextmanager
def running_stats_frozen(module: nn.Module):
    """Inside, BatchNorm layers in training mode still normalise with batch statistics (gradients unchanged) but
    leave their running statistics, the ones evaluation uses, as they are."""
    norms = [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and m.training]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum


class ScaleMatchNet(nn.Module):
    """A segmenter with ``encode``/``decode`` (DeepLabV3Plus) plus, optionally, the CIF module.

    The views rescaled by v leave the segmenter's BatchNorm running statistics alone unless
    ``scaled_views_update_bn``: statistics of 24-pixel (v = 0.25) to 2x views are not those of the 1x images that
    evaluation sees, and mixing them in cost 1x mIoU on the synthetic benchmark (docs/results.md).
    """

    def __init__(self, segmenter: nn.Module, cif: CrossScaleInteractionFusion | None = None,
                 scaled_views_update_bn: bool = False):
        super().__init__()
        self.segmenter = segmenter
        self.cif = cif
        self.scaled_views_update_bn = scaled_views_update_bn

    def _encode_decode_scaled(self, images: torch.Tensor, scale: float):
        with nullcontext() if self.scaled_views_update_bn else running_stats_frozen(self.segmenter):
            return self.segmenter.decode(*self.segmenter.encode(rescale(images, scale)))

    @property
    def backbone(self) -> nn.Module:
        return self.segmenter.backbone

    def forward(self, images: torch.Tensor, feature_scale: float | None = None,
                image_scales: tuple[float, ...] = ()) -> dict:
        """Named predictions, all logits at the image size:

        pred        the weak (1x) view
        pred_fp     with ``feature_scale`` t: the decoder on dropout-perturbed encoder features resized by t
                    (UniMatch's feature perturbation at t = 1, ScaleMatch's FSVC otherwise)
        pred_scaled one per v in ``image_scales``: the view rescaled by v, resized back (ISVC)
        pred_cif    one per v when the CIF module exists: the 1x and v predictions fused by the gate
        gate        one per v: the CIF gate s (weight of the 1x prediction) at the image size
        """
        size = images.shape[-2:]
        low, high = self.segmenter.encode(images)
        logits, features = self.segmenter.decode(low, high)
        out = {"pred": resize_to(logits, size), "pred_scaled": [], "pred_cif": [], "gate": []}
        if feature_scale is not None:
            logits_fp, _ = self.segmenter.decode(low, high, perturb=True, feature_scale=feature_scale)
            out["pred_fp"] = resize_to(logits_fp, size)
        for scale in image_scales:
            logits_v, features_v = self._encode_decode_scaled(images, scale)
            out["pred_scaled"].append(resize_to(logits_v, size))
            if self.cif is not None:
                fused, gate = self.cif(features, features_v, logits, logits_v)
                out["pred_cif"].append(resize_to(fused, size))
                out["gate"].append(resize_to(gate, size))
        return out

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Single-scale inference: logits at the image size."""
        return self.segmenter(images)

    def predict_multiscale_cif(self, images: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
        """Fuse the 1x prediction with the prediction at each scale in turn through the trained CIF gate
        (the paper's multi-scale inference): p <- s * p + (1 - s) * p_v, s from the 1x and v features."""
        if self.cif is None:
            raise ValueError("multi-scale CIF inference needs a model trained with cif: true")
        size = images.shape[-2:]
        logits, features = self.segmenter.decode(*self.segmenter.encode(images))
        fused = logits
        for scale in scales:
            logits_v, features_v = self._encode_decode_scaled(images, scale)
            fused, _ = self.cif(features, features_v, fused, logits_v)
        return resize_to(fused, size)
