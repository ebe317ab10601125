"""Evaluate a checkpoint on its validation set, print per-class IoU and mIoU, optionally save predictions.

    python eval.py                                  # best.pth of the newest run under exp/
    python eval.py --checkpoint exp/pascal/1_16/default/best.pth --mode sliding_window --save-dir preds/
    python eval.py --multiscale-cif --cif-scales 0.5 2.0   # multi-scale inference through the CIF gate
    python eval.py --scales 0.5 1.0 2.0             # mIoU with the input rescaled by each factor
"""
import argparse
import os
import sys
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dataset.classes import CLASS_NAMES, palette
from dataset.semi import DatasetError, build_datasets
from model import build_model
from util.checkpoint import CheckpointError, find_latest_run, load_checkpoint
from util.config import ConfigError, validate
from util.dist import cleanup, init_distributed
from util.inference import center_crop, predict_probs, rescaled_predictor
from util.metrics import MeanIoU, format_iou_table


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


@torch.no_grad()
def evaluate(predict: Callable, val_set, cfg: dict, device: torch.device, amp_dtype=None, rank: int = 0,
             world_size: int = 1, mode: str | None = None, save_dir: str | None = None,
             progress: bool = False) -> MeanIoU:
    """mIoU of ``predict`` (images -> logits) over ``val_set``; with several processes each image is
    evaluated by exactly one of them (no sampler padding), then the counts are summed. The caller puts
    the model in eval mode."""
    mode = mode or cfg["eval_mode"]
    shard = Subset(val_set, range(rank, len(val_set), world_size))
    loader = DataLoader(shard, batch_size=1, shuffle=False, num_workers=min(cfg["workers"], 2))
    metric = MeanIoU(cfg["nclass"], device=device)
    colors = palette(cfg["dataset"])
    for sample in tqdm(loader, disable=not progress, desc="eval", leave=False):
        image = sample["image"].to(device)
        mask = sample["mask"].to(device)
        if mode == "center_crop":
            image, mask = center_crop(image, mask, cfg["crop_size"])
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            probs = predict_probs(predict, image, mode, cfg["crop_size"])
        prediction = probs.argmax(dim=1)
        metric.update(prediction, mask)
        if save_dir is not None:
            name = os.path.splitext(os.path.basename(sample["id"][0]))[0] + ".png"
            picture = Image.fromarray(prediction[0].cpu().numpy().astype(np.uint8), mode="P")
            picture.putpalette(colors)
            picture.save(os.path.join(save_dir, name))
    metric.all_reduce()
    return metric


def build_predictor(model, args) -> Callable:
    """Single-scale, multi-scale through the CIF gate, or multi-scale softmax average; optionally with flips."""
    if args.multiscale_cif and args.multiscale_avg:
        raise SystemExit("error: choose one of --multiscale-cif and --multiscale-avg")
    if args.multiscale_cif and model.cif is None:
        raise SystemExit("error: --multiscale-cif needs a checkpoint trained with cif: true")
    predict, scales = model.predict, [1.0]
    if args.multiscale_cif:
        def predict(images):
            return model.predict_multiscale_cif(images, tuple(args.cif_scales))
    elif args.multiscale_avg:
        scales = [1.0] + args.cif_scales
    if len(scales) > 1 or args.flip:
        return averaged_predictor(predict, scales, args.flip)
    return predict


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint to evaluate (default: best.pth of the newest run)")
    parser.add_argument("--exp-dir", default="exp", help="where to look for the newest run (default: exp)")
    parser.add_argument("--mode", choices=["original", "center_crop", "sliding_window"],
                        help="evaluation mode (default: the checkpoint config's eval_mode)")
    parser.add_argument("--data-root", help="dataset root, if it moved since training")
    parser.add_argument("--save-dir", help="write predictions here as palette PNGs")
    parser.add_argument("--scales", type=float, nargs="+",
                        help="evaluate with the input rescaled by each factor; prints mIoU per factor")
    parser.add_argument("--multiscale-cif", action="store_true",
                        help="fuse the 1x prediction with each of --cif-scales in turn through the trained CIF gate")
    parser.add_argument("--multiscale-avg", action="store_true",
                        help="average the softmax over 1x and --cif-scales (fixed-weight multi-scale, for comparison)")
    parser.add_argument("--cif-scales", type=float, nargs="+", default=[0.5, 2.0],
                        help="extra scales of the multi-scale modes (default: 0.5 2.0)")
    parser.add_argument("--flip", action="store_true", help="also average horizontally flipped predictions")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    checkpoint = args.checkpoint
    if checkpoint is None:
        run = find_latest_run(args.exp_dir)
        if run is None:
            raise SystemExit(f"error: no run with a checkpoint under {args.exp_dir}/; pass --checkpoint")
        checkpoint = os.path.join(run, "best.pth")
        if not os.path.exists(checkpoint):
            checkpoint = os.path.join(run, "latest.pth")
    rank, world_size, _, device = init_distributed(force_cpu=args.cpu)
    state = load_checkpoint(checkpoint, map_location="cpu")
    cfg = dict(state["config"])
    if args.data_root:
        cfg["data_root"] = os.path.expanduser(args.data_root)
    cfg = validate(cfg, source=checkpoint)
    model = build_model(dict(cfg, pretrained=None)).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    amp_dtype = None
    if device.type == "cuda" and cfg["amp"]:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    _, _, val_set = build_datasets(cfg, cfg["splits_dir"])
    if args.save_dir and rank == 0:
        os.makedirs(args.save_dir, exist_ok=True)
    mode = args.mode or cfg["eval_mode"]
    class_names = CLASS_NAMES[cfg["dataset"]]
    if rank == 0:
        print(f"checkpoint {checkpoint} (epoch {state['epoch']}), {len(val_set)} val images, mode {mode}")

    if args.scales:
        results = []
        for scale in args.scales:
            predict = rescaled_predictor(model.predict, scale) if scale != 1.0 else model.predict
            metric = evaluate(predict, val_set, cfg, device, amp_dtype, rank, world_size, mode, progress=rank == 0)
            results.append((scale, metric.miou()))
        if rank == 0:
            print("input scale  mIoU")
            for scale, miou in results:
                print(f"{scale:>11.2f}  {miou:.2f}")
    else:
        predict = build_predictor(model, args)
        metric = evaluate(predict, val_set, cfg, device, amp_dtype, rank, world_size, mode,
                          save_dir=args.save_dir, progress=rank == 0)
        if rank == 0:
            print(format_iou_table(class_names, metric.iou()))
            print(f"mIoU {metric.miou():.2f}")
    cleanup()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DatasetError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
