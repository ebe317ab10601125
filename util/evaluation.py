"""Evaluation shared by the trainer and eval.py: the autocast dtype of a config, predictors averaged over scales and
flips, class labels in an evaluation mode, and the mIoU of a predictor over a validation set."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from util.bounded_exit import Teardown
from util.config import ConfigError
from util.inference import center_crop, predict_probs, rescaled_predictor
from util.metrics import MeanIoU


def autocast_dtype(cfg: dict, device: torch.device):
    """The autocast dtype of ``amp_dtype`` on a GPU with amp on (float16 takes a GradScaler), None (off) otherwise."""
    if not cfg["amp"] or device.type != "cuda":
        return None
    if cfg["amp_dtype"] == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"amp_dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16; use float16")
    return torch.bfloat16 if cfg["amp_dtype"] == "bfloat16" else torch.float16


def averaged_predictor(predict: Callable, scales: list[float], flip: bool) -> Callable:
    """Logits-space predictor whose softmax is the mean softmax over ``scales`` (and flips): log of the mean."""
    def predict_averaged(images: torch.Tensor) -> torch.Tensor:
        probs = []
        for scale in scales:
            scaled = rescaled_predictor(predict, scale) if scale != 1.0 else predict
            probs.append(scaled(images).float().softmax(dim=1))
            if flip:
                probs.append(scaled(images.flip(-1)).float().softmax(dim=1).flip(-1))
        return torch.stack(probs).mean(dim=0).clamp_min(1e-12).log()
    return predict_averaged


def predict_labels(predict: Callable, image: torch.Tensor, mode: str, cfg: dict, amp_dtype=None) -> torch.Tensor:
    """(1, H, W) class indices of a normalised (1, 3, H, W) image in evaluation ``mode``, tiled as cfg says."""
    with torch.autocast(image.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        probs = predict_probs(predict, image, mode, cfg["crop_size"], cfg["sliding_window_placement"])
        return probs.argmax(dim=1)


@torch.no_grad()
def evaluate(predict: Callable, val_set, cfg: dict, device: torch.device, amp_dtype=None, rank: int = 0,
             world_size: int = 1, mode: str | None = None, on_prediction: Callable | None = None,
             progress: bool = False) -> MeanIoU:
    """mIoU of ``predict`` (images -> logits) over ``val_set``; with several processes each image is
    evaluated by exactly one of them (no sampler padding), then the counts are summed. The caller puts
    the model in eval mode. ``on_prediction(sample_id, image, mask, prediction)`` sees each evaluated image (after
    a centre crop) and its (H, W) prediction, e.g. to save it."""
    mode = mode or cfg["eval_mode"]
    shard = Subset(val_set, range(rank, len(val_set), world_size))
    # Its own generator keeps evaluation from consuming the training run's random stream.
    loader = DataLoader(shard, batch_size=1, shuffle=False, num_workers=min(cfg["workers"], 2),
                        generator=torch.Generator())
    metric = MeanIoU(cfg["nclass"], device=device)
    # The bar is closed however the loop ends, so that an error's one line is not printed over it.
    with Teardown() as teardown, tqdm(teardown.iterate(loader), total=len(loader), disable=not progress, desc="eval",
                                      leave=False) as samples:
        for sample in samples:
            image = sample["image"].to(device)
            mask = sample["mask"].to(device)
            if mode == "center_crop":
                image, mask = center_crop(image, mask, cfg["crop_size"])
            prediction = predict_labels(predict, image, mode, cfg, amp_dtype)
            metric.update(prediction, mask)
            if on_prediction is not None:
                on_prediction(sample["id"][0], image[0], mask[0], prediction[0])
    metric.all_reduce()
    return metric
