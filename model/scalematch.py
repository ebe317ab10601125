"""The network used in training: one call returns every named prediction of a training step.

DistributedDataParallel only synchronises gradients of work done inside ``forward``, so all branches of
a step (weak view, rescaled views, perturbed and rescaled features, CIF fusion) come from this one call.
"""
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from model.cif import CrossScaleInteractionFusion
from util.resize import rescale, resize_to


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
    """A segmenter with ``encode``/``decode``/``decode_perturbed`` (DeepLabV3Plus) plus, optionally, the CIF module.

    The views rescaled by v update the segmenter's BatchNorm running statistics, as in the release, only with
    ``scaled_views_update_bn``: statistics of 24-pixel (v = 0.25) to 2x views are not those of the 1x images that
    evaluation sees, and mixing them in cost 1x mIoU on the synthetic benchmark (docs/results.md).
    """

    def __init__(self, segmenter: nn.Module, cif: CrossScaleInteractionFusion | None = None,
                 scaled_views_update_bn: bool = True):
        super().__init__()
        self.segmenter = segmenter
        self.cif = cif
        self.scaled_views_update_bn = scaled_views_update_bn

    @property
    def backbone(self) -> nn.Module:
        return self.segmenter.backbone

    def _one_x(self, images: torch.Tensor, feature_scale: float | None):
        """The 1x view: logits at the image size, decoder features (the CIF's grid), perturbed logits or None."""
        size = images.shape[-2:]
        low, high = self.segmenter.encode(images)
        if feature_scale is None:
            logits, features = self.segmenter.decode(low, high)
            return resize_to(logits, size), features, None
        logits, features, logits_fp = self.segmenter.decode_perturbed(low, high, feature_scale)
        return resize_to(logits, size), features, resize_to(logits_fp, size)

    def _scaled_view(self, images: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The view rescaled by ``scale``: logits at that view's image size, and its decoder features."""
        view = rescale(images, scale)
        with nullcontext() if self.scaled_views_update_bn else running_stats_frozen(self.segmenter):
            logits, features = self.segmenter.decode(*self.segmenter.encode(view))
        return resize_to(logits, view.shape[-2:]), features

    def forward(self, images: torch.Tensor, feature_scale: float | None = None,
                image_scales: tuple[float, ...] = ()) -> dict:
        """Named predictions, all logits at the image size:

        pred        the weak (1x) view; with ``feature_scale`` t decoded from features resized by t, as the clean
                    half of the perturbed batch (the release's pred_ori)
        pred_fp     with ``feature_scale``: the decoder on Dropout2d-perturbed encoder features resized by t
                    (UniMatch's feature perturbation at t = 1, ScaleMatch's FSVC otherwise)
        pred_scaled one per v in ``image_scales``: the view rescaled by v, resized to its own size, then to 1x (ISVC)
        pred_cif    one per v when the CIF module exists: the 1x and v predictions fused by the gate
        gate        one per v: the weight of the 1x prediction in that fusion, at the image size
        """
        size = images.shape[-2:]
        # Views in the release's order, lower resolution first: the order decides BatchNorm's running statistics.
        views = {scale: self._scaled_view(images, scale) for scale in image_scales if scale <= 1}
        pred, features, pred_fp = self._one_x(images, feature_scale)
        views.update({scale: self._scaled_view(images, scale) for scale in image_scales if scale > 1})
        out = {"pred": pred, "pred_scaled": [], "pred_cif": [], "gate": []}
        if pred_fp is not None:
            out["pred_fp"] = pred_fp
        for scale in image_scales:
            logits_v, features_v = views[scale]
            pred_v = resize_to(logits_v, size)
            out["pred_scaled"].append(pred_v)
            if self.cif is not None:
                fused, gate = self.cif(features, pred, features_v, pred_v if scale > 1 else logits_v, scale)
                out["pred_cif"].append(fused)
                out["gate"].append(gate)
        return out

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Single-scale inference: logits at the image size."""
        return self.segmenter(images)

    def predict_multiscale_cif(self, images: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
        """The paper's multi-scale inference through the trained gate: starting from the 1x prediction, fuse the
        running prediction with the view at each scale in turn, p <- CIF(p, p_v), the gate computed from the 1x and
        v features and weighting the lower-resolution side, exactly as in training."""
        if self.cif is None:
            raise ValueError("multi-scale CIF inference needs a model trained with cif: true")
        size = images.shape[-2:]
        fused, features, _ = self._one_x(images, None)
        for scale in scales:
            logits_v, features_v = self._scaled_view(images, scale)
            fused, _ = self.cif(features, fused, features_v, resize_to(logits_v, size) if scale > 1 else logits_v,
                                scale)
        return fused
