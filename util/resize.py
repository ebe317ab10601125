"""Bilinear resizing as the release does it everywhere: align_corners=True, rescaled sizes floored."""
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` (N, C, H, W) bilinearly resized to ``size`` with align_corners=True."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def scaled_size(size: Sequence[int], scale: float) -> list[int]:
    """Each side times ``scale``, floored (what F.interpolate(scale_factor=scale) gives), at least 1."""
    return [max(1, math.floor(side * scale)) for side in size]


def rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` resized by ``scale``: the release's ResizeX (and its feature resize) when the size is at least 1."""
    return resize_to(x, scaled_size(x.shape[-2:], scale))
