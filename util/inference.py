"""Whole-image predictions from a patch predictor: original, center-crop and sliding-window modes.

Every function takes ``predict(images) -> logits`` and returns class probabilities of shape
(B, nclass, H, W), so callers can average or fuse them without caring how they were tiled.
"""
from typing import Callable

import torch

from util.resize import rescale, resize_to

Predictor = Callable[[torch.Tensor], torch.Tensor]


PLACEMENTS = ("release", "flush")


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with windows of ``window`` (the last one flush with the end)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def window_spans(length: int, window: int, stride: int, placement: str = "release") -> list[tuple[int, int]]:
    """(start, end) of the sliding windows along one side of ``length`` pixels.

    release: a window starts at 0 and every ``stride`` pixels after while it starts inside the image, and is cut at
    the border, so the last ones may be narrow slivers (the release's evaluate()); flush: full windows, the last one
    flush with the end (window_starts). Windows longer than the side are the whole side in both.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "release":
        return [(start, min(length, start + window)) for start in range(0, length, stride)]
    window = min(window, length)
    return [(start, start + window) for start in window_starts(length, window, stride)]


def predict_sliding_window(predict: Predictor, images: torch.Tensor, crop_size: int, window_batch: int = 8,
                           placement: str = "release") -> torch.Tensor:
    """Average the softmax of overlapping crop_size windows (stride 2/3 of the crop) placed by ``placement``
    (window_spans); windows of one size run in batches."""
    batch, _, height, width = images.shape
    stride = max(1, crop_size * 2 // 3)
    boxes = [(rows, columns) for rows in window_spans(height, crop_size, stride, placement)
             for columns in window_spans(width, crop_size, stride, placement)]
    by_size: dict[tuple[int, int], list] = {}
    for rows, columns in boxes:
        by_size.setdefault((rows[1] - rows[0], columns[1] - columns[0]), []).append((rows, columns))
    probs = None
    counts = images.new_zeros(1, 1, height, width)
    for same_size in by_size.values():
        for first in range(0, len(same_size), window_batch):
            chunk = same_size[first:first + window_batch]
            windows = torch.cat([images[:, :, top:bottom, left:right] for (top, bottom), (left, right) in chunk])
            window_probs = predict(windows).float().softmax(dim=1)
            if probs is None:
                probs = images.new_zeros(batch, window_probs.shape[1], height, width, dtype=torch.float32)
            for index, ((top, bottom), (left, right)) in enumerate(chunk):
                probs[:, :, top:bottom, left:right] += window_probs[index * batch:(index + 1) * batch]
                counts[:, :, top:bottom, left:right] += 1
    return probs / counts


def center_crop(images: torch.Tensor, masks: torch.Tensor, crop_size: int):
    """Crop the central crop_size square (or less, for smaller images) of images and masks.

    A side shorter than crop_size is kept whole. The release does not: its start offset (side - crop_size) // 2 is
    negative there and Python's slicing wraps it around, so it keeps only the last -offset pixels of that side (an
    11-pixel strip of a 300-pixel side at crop 321). docs/release.md lists the difference.
    """
    height, width = images.shape[-2:]
    top = max(0, (height - crop_size) // 2)
    left = max(0, (width - crop_size) // 2)
    window = (slice(top, top + crop_size), slice(left, left + crop_size))
    return images[..., window[0], window[1]], masks[..., window[0], window[1]]


def predict_probs(predict: Predictor, images: torch.Tensor, mode: str, crop_size: int,
                  placement: str = "release") -> torch.Tensor:
    """Class probabilities for ``images`` in evaluation ``mode`` ('original' or 'center_crop' run the
    images as given; the caller crops for 'center_crop'; 'sliding_window' tiles them by ``placement``)."""
    if mode == "sliding_window":
        return predict_sliding_window(predict, images, crop_size, placement=placement)
    return predict(images).float().softmax(dim=1)


def rescaled_predictor(predict: Predictor, scale: float) -> Predictor:
    """A predictor that runs ``predict`` on a copy rescaled by ``scale`` and resizes logits back."""
    def rescaled(batch: torch.Tensor) -> torch.Tensor:
        return resize_to(predict(rescale(batch, scale)).float(), batch.shape[-2:])
    return rescaled
