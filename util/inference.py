"""Whole-image predictions from a patch predictor: original, center-crop and sliding-window modes.

Every function takes ``predict(images) -> logits`` and returns class probabilities of shape
(B, nclass, H, W), so callers can average or fuse them without caring how they were tiled.
"""
from typing import Callable

import torch

from util.resize import rescale, resize_to

Predictor = Callable[[torch.Tensor], torch.Tensor]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with windows of ``window`` (the last one flush with the end)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def predict_sliding_window(predict: Predictor, images: torch.Tensor, crop_size: int,
                           window_batch: int = 8) -> torch.Tensor:
    """Average the softmax of overlapping crop_size windows (stride 2/3 of the crop), run in batches."""
    batch, _, height, width = images.shape
    stride = max(1, crop_size * 2 // 3)
    win_h, win_w = min(crop_size, height), min(crop_size, width)
    boxes = [(top, left) for top in window_starts(height, win_h, stride)
             for left in window_starts(width, win_w, stride)]
    probs = None
    counts = images.new_zeros(1, 1, height, width)
    for first in range(0, len(boxes), window_batch):
        chunk = boxes[first:first + window_batch]
        windows = torch.cat([images[:, :, t:t + win_h, l:l + win_w] for t, l in chunk])
        window_probs = predict(windows).float().softmax(dim=1)
        if probs is None:
            probs = images.new_zeros(batch, window_probs.shape[1], height, width, dtype=torch.float32)
        for index, (t, l) in enumerate(chunk):
            probs[:, :, t:t + win_h, l:l + win_w] += window_probs[index * batch:(index + 1) * batch]
            counts[:, :, t:t + win_h, l:l + win_w] += 1
    return probs / counts


def center_crop(images: torch.Tensor, masks: torch.Tensor, crop_size: int):
    """Crop the central crop_size square (or less, for smaller images) of images and masks."""
    height, width = images.shape[-2:]
    top = max(0, (height - crop_size) // 2)
    left = max(0, (width - crop_size) // 2)
    window = (slice(top, top + crop_size), slice(left, left + crop_size))
    return images[..., window[0], window[1]], masks[..., window[0], window[1]]


def predict_probs(predict: Predictor, images: torch.Tensor, mode: str, crop_size: int) -> torch.Tensor:
    """Class probabilities for ``images`` in evaluation ``mode`` ('original' or 'center_crop' run the
    images as given; the caller crops for 'center_crop'; 'sliding_window' tiles them)."""
    if mode == "sliding_window":
        return predict_sliding_window(predict, images, crop_size)
    return predict(images).float().softmax(dim=1)


def rescaled_predictor(predict: Predictor, scale: float) -> Predictor:
    """A predictor that runs ``predict`` on a copy rescaled by ``scale`` and resizes logits back."""
    def rescaled(batch: torch.Tensor) -> torch.Tensor:
        return resize_to(predict(rescale(batch, scale)).float(), batch.shape[-2:])
    return rescaled
