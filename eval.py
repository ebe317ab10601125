"""Evaluate a checkpoint on its validation set, print per-class IoU and mIoU, optionally save predictions;
or, with --predict-dir, segment a folder of images that have no masks.

    python eval.py                                  # best.pth of the newest run under exp/
    python eval.py --checkpoint exp/pascal/1_16/default/best.pth --mode sliding_window --save-dir preds/
    python eval.py --save-dir preds/ --overlays     # also image | prediction | ground truth pictures
    python eval.py --predict-dir photos/ --save-dir preds/ --multiscale-cif   # palette PNGs and overlays
    python eval.py --multiscale-cif --cif-scales 0.5 2.0   # multi-scale inference through the CIF gate
    python eval.py --scales 0.5 1.0 2.0             # mIoU with the input rescaled by each factor

Without --checkpoint it takes the newest run under --exp-dir and says which file and why: its best.pth, or its
latest.pth while no validation has recorded a best; a run whose best.pth is missing although its latest.pth records
a best is refused rather than evaluated at another epoch (pass that latest.pth with --checkpoint to evaluate it).
"""
import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from dataset.classes import class_names, class_palette
from dataset.semi import DatasetError, build_val_dataset, load_sample
from dataset.transforms import denormalize, normalize
from model import build_model
from util.checkpoint import CheckpointError, load_checkpoint, load_model_state, write_atomically
from util.config import ConfigError, validate
from util.dist import cleanup, init_distributed, report_failure
from util.run_dir import find_latest_run
from util.evaluation import autocast_dtype, averaged_predictor, evaluate, predict_labels
from util.inference import rescaled_predictor
from util.metrics import format_iou_table
from util.visualize import overlay_figure, palette_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_CIF_SCALES = [0.5, 2.0]


class OutputError(Exception):
    """An output that cannot be written, in one line naming the file."""


def save_prediction(save_dir: str, stem: str, prediction: torch.Tensor, names: list[str], colors: list[int],
                    image: np.ndarray | None = None, ground_truth: np.ndarray | None = None) -> None:
    """SAVE_DIR/STEM.png as a palette PNG of the (H, W) prediction and, when ``image`` ((H, W, 3) uint8) is given,
    SAVE_DIR/STEM_overlay.png: image | prediction | ground truth (when given) with a legend of class names."""
    labels = prediction.cpu().numpy().astype(np.uint8)
    path = os.path.join(save_dir, f"{stem}.png")
    try:
        palette_image(labels, colors).save(writable(path))
        if image is not None:
            path = os.path.join(save_dir, f"{stem}_overlay.png")
            overlay_figure(image, labels, names, colors, ground_truth).save(writable(path))
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from error


def writable(path: str) -> str:
    """``path``, refused in words where a FIFO or a device is in its place (PIL would fail seeking it)."""
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise OutputError(f"cannot write {path}: a FIFO or device is in its place, not a file")
    return path


def prediction_saver(save_dir: str, cfg: dict, overlays: bool) -> Callable:
    """What evaluate() calls on each prediction to save it in ``save_dir`` (with ``overlays`` also as a picture)."""
    names, colors = class_names(cfg), class_palette(cfg)

    def save(sample_id: str, image: torch.Tensor, mask: torch.Tensor, prediction: torch.Tensor) -> None:
        stem = os.path.splitext(os.path.basename(sample_id))[0]
        picture, ground_truth = None, None
        if overlays:
            picture, ground_truth = denormalize(image), mask.cpu().numpy().astype(np.uint8)
        save_prediction(save_dir, stem, prediction, names, colors, picture, ground_truth)
    return save


def write_json(path: str, figures: dict) -> None:
    """``figures`` as JSON at ``path``, written whole or not at all."""
    try:
        write_atomically(path, lambda temporary: temporary.write_text(json.dumps(figures, indent=1)))
    except CheckpointError as error:
        raise OutputError(str(error)) from None


def list_images(folder: str) -> list[Path]:
    """The images of ``folder`` (by extension, not recursive), sorted by name; refuses a folder without any, image
    names that are broken symlinks and names whose outputs would overwrite each other (a.jpg and a.png, or a.jpg
    and a_overlay.jpg)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DatasetError(f"--predict-dir {folder} is a file, not a folder")
    if not os.path.isdir(folder):
        raise DatasetError(f"--predict-dir {folder}: no such folder")
    named = [path for path in Path(folder).iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS]
    broken = sorted(str(path) for path in named if path.is_symlink() and not path.exists())
    if broken:
        raise DatasetError(f"--predict-dir {folder}: {len(broken)} image(s) are broken or looping symlinks: "
                           f"{', '.join(broken[:5])}{', ...' if len(broken) > 5 else ''}")
    images = sorted(path for path in named if path.is_file())
    if not images:
        raise DatasetError(f"--predict-dir {folder}: no {'/'.join(IMAGE_EXTENSIONS)} images")
    writers = {}
    for path in images:
        for output in (f"{path.stem}.png", f"{path.stem}_overlay.png"):
            if output in writers:
                raise DatasetError(f"{writers[output]} and {path} would both write {output}; rename one")
            writers[output] = path
    return images


@torch.no_grad()
def predict_folder(predict: Callable, image_dir: str, save_dir: str, cfg: dict, device: torch.device,
                   amp_dtype=None, mode: str = "original", mask_dir: str | None = None, rank: int = 0,
                   world_size: int = 1, progress: bool = False) -> int:
    """Segment every image of ``image_dir`` one at a time (sizes differ) and write SAVE_DIR/STEM.png (palette PNG)
    and SAVE_DIR/STEM_overlay.png (image | prediction | ground truth from MASK_DIR/STEM.png when that exists).
    Stops at the first unreadable file, keeping what was written. With several processes each image goes to one
    of them. The caller puts the model in eval mode. Returns the number of images this process wrote."""
    if mode not in ("original", "sliding_window"):
        raise ValueError(f"prediction mode must be original or sliding_window, got {mode!r}")
    images = list_images(image_dir)[rank::world_size]
    if mask_dir is not None and not os.path.isdir(mask_dir):
        raise DatasetError(f"--mask-dir {mask_dir}: no such folder")
    names, colors = class_names(cfg), class_palette(cfg)
    os.makedirs(save_dir, exist_ok=True)
    with tqdm(images, disable=not progress, desc="predict", leave=False) as paths:
        for path in paths:
            mask_path = Path(mask_dir, f"{path.stem}.png") if mask_dir else None
            image, mask = load_sample(path, mask_path if mask_path and mask_path.is_file() else None, cfg["nclass"])
            prediction = predict_labels(predict, normalize(image)[None].to(device), mode, cfg, amp_dtype)
            save_prediction(save_dir, path.stem, prediction[0], names, colors, image.permute(1, 2, 0).numpy(),
                            None if mask is None else mask.numpy())
    return len(images)


def load_trained_model(checkpoint: str, device: torch.device, data_root: str | None = None) -> tuple:
    """(model in eval mode on ``device``, validated config, checkpoint dict) of a checkpoint written by training or
    by scripts/convert_release_checkpoint.py; a network that does not fit its tensors is a one-line CheckpointError."""
    if os.path.isdir(checkpoint):
        raise CheckpointError(f"{checkpoint} is a folder; pass a checkpoint file in it (best.pth or latest.pth)")
    state = load_checkpoint(checkpoint, map_location="cpu")
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CheckpointError(f"{checkpoint}: not a scalematch checkpoint (no 'config' and 'model'); a checkpoint of "
                              "the authors' release needs scripts/convert_release_checkpoint.py first")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{checkpoint}: its 'config' is a {type(state['config']).__name__}, not a mapping of "
                              "config keys")
    if not isinstance(state["model"], dict) or not all(isinstance(t, torch.Tensor) for t in state["model"].values()):
        raise CheckpointError(f"{checkpoint}: its 'model' is not a mapping of tensor names to tensors")
    cfg = dict(state["config"])
    if data_root:
        cfg["data_root"] = os.path.expanduser(data_root)
    cfg = validate(cfg, source=checkpoint)
    model = build_model(dict(cfg, pretrained=None))
    load_model_state(model, state["model"], checkpoint)
    return model.to(device).eval(), cfg, state


def build_predictor(model, args) -> Callable:
    """Single-scale, multi-scale through the CIF gate, or multi-scale softmax average; optionally with flips."""
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


def _positive_scales(option: str, scales: list[float] | None) -> None:
    bad = [scale for scale in scales or [] if not (math.isfinite(scale) and scale > 0)]
    if bad:
        raise SystemExit(f"error: {option} takes positive factors, got {' '.join(f'{scale:g}' for scale in bad)}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint to evaluate (default: best.pth of the newest run)")
    parser.add_argument("--exp-dir", help="where to look for the newest run without --checkpoint (default: exp)")
    parser.add_argument("--mode", choices=["original", "center_crop", "sliding_window"],
                        help="evaluation mode (default: the checkpoint config's eval_mode)")
    parser.add_argument("--data-root", help="dataset root, if it moved since training")
    parser.add_argument("--splits-dir", help="folder of the split files (DATASET/val.txt), if it moved since training")
    parser.add_argument("--save-dir", help="write predictions here as palette PNGs")
    parser.add_argument("--overlays", action="store_true",
                        help="with --save-dir, also write STEM_overlay.png: image | prediction | ground truth")
    parser.add_argument("--predict-dir",
                        help="segment the .jpg/.jpeg/.png/.bmp images of this folder instead of the validation set; "
                             "writes palette PNGs and overlays to --save-dir")
    parser.add_argument("--mask-dir", help="with --predict-dir: ground truth MASK_DIR/STEM.png shown where present")
    parser.add_argument("--scales", type=float, nargs="+",
                        help="evaluate with the input rescaled by each factor; prints mIoU per factor")
    parser.add_argument("--multiscale-cif", action="store_true",
                        help="fuse the 1x prediction with each of --cif-scales in turn through the trained CIF gate")
    parser.add_argument("--multiscale-avg", action="store_true",
                        help="average the softmax over 1x and --cif-scales (fixed-weight multi-scale, for comparison)")
    parser.add_argument("--cif-scales", type=float, nargs="+",
                        help="extra scales of the multi-scale modes (default: 0.5 2.0)")
    parser.add_argument("--flip", action="store_true", help="also average horizontally flipped predictions")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    parser.add_argument("--json", help="also write the printed figures to this file as JSON (mIoU, per-class IoU, "
                                       "per-scale mIoU)")
    args = parser.parse_args(argv)
    # Options another one would silently ignore are refused, so that no result is mistaken for what was asked.
    if args.checkpoint is not None and args.exp_dir is not None:
        raise SystemExit("error: --exp-dir picks a run when no --checkpoint is given; pass one of them")
    args.exp_dir = "exp" if args.exp_dir is None else args.exp_dir
    if args.multiscale_cif and args.multiscale_avg:
        raise SystemExit("error: choose one of --multiscale-cif and --multiscale-avg")
    if args.cif_scales is not None and not (args.multiscale_cif or args.multiscale_avg):
        raise SystemExit("error: --cif-scales needs --multiscale-cif or --multiscale-avg")
    args.cif_scales = DEFAULT_CIF_SCALES if args.cif_scales is None else args.cif_scales
    _positive_scales("--scales", args.scales)
    _positive_scales("--cif-scales", args.cif_scales)
    if args.scales:
        ignored = [option for option, given in (("--save-dir", args.save_dir), ("--flip", args.flip),
                                                ("--multiscale-cif", args.multiscale_cif),
                                                ("--multiscale-avg", args.multiscale_avg)) if given]
        if ignored:
            raise SystemExit(f"error: --scales measures single-scale mIoU per factor; it cannot be combined with "
                             f"{' or '.join(ignored)}")
    if args.predict_dir is not None:
        if args.save_dir is None:
            raise SystemExit("error: --predict-dir needs --save-dir")
        if args.mode == "center_crop":
            raise SystemExit("error: --mode center_crop is for evaluation; --predict-dir takes original or "
                             "sliding_window")
        if args.scales:
            raise SystemExit("error: --scales is for evaluation; --predict-dir cannot be combined with it")
        for option, given in (("--data-root", args.data_root), ("--splits-dir", args.splits_dir)):
            if given is not None:
                raise SystemExit(f"error: {option} is for evaluation; --predict-dir reads no dataset")
        if args.json is not None:
            raise SystemExit("error: --json writes evaluation figures; --predict-dir has none")
    elif args.mask_dir is not None:
        raise SystemExit("error: --mask-dir needs --predict-dir")
    if args.overlays and args.save_dir is None:
        raise SystemExit("error: --overlays needs --save-dir")
    return args


def run_checkpoint(exp_dir: str) -> tuple[str, str]:
    """(checkpoint, why it was picked) of the newest run under ``exp_dir``: its best.pth; its latest.pth while no
    validation has recorded a best. A best.pth that is missing although latest.pth records a best is a
    CheckpointError: evaluating another epoch in its place would report the wrong result."""
    run = find_latest_run(exp_dir)
    if run is None:
        raise CheckpointError(f"no run with a checkpoint under {exp_dir}/; pass --checkpoint")
    best, latest = os.path.join(run, "best.pth"), os.path.join(run, "latest.pth")
    if os.path.isfile(best):
        return best, f"the best epoch of the newest run under {exp_dir}/"
    state = load_checkpoint(latest, map_location="cpu")
    best_miou = state.get("best_miou") if isinstance(state, dict) else None
    if isinstance(best_miou, (int, float)) and best_miou > 0:
        raise CheckpointError(f"{run}: latest.pth records best mIoU {best_miou:.2f} but best.pth is missing; pass "
                              f"--checkpoint {latest} to evaluate the last saved epoch instead")
    return latest, f"the newest run under {exp_dir}/ has no best.pth: no validation has recorded a best yet"


@contextlib.contextmanager
def output_folder(path: str | None):
    """Create ``path`` (and missing parents) for the outputs; if what follows fails, remove those of them that are
    still empty, so a failed start leaves no empty folder behind (written outputs are kept)."""
    if path is None:
        yield
        return
    created = []
    folder = Path(path).absolute()
    while not folder.exists() and not folder.is_symlink():
        created.append(folder)
        folder = folder.parent
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"--save-dir {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise OutputError(f"--save-dir {path}: cannot create it: {error.strerror or error}") from error
    try:
        yield
    except BaseException:
        for folder in created:  # deepest first; one that holds outputs stops the removal
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world_size, _, device = init_distributed(force_cpu=args.cpu)
    # The process group is left on every way out: left to the interpreter's exit, gloo could abort the process.
    try:
        with output_folder(args.save_dir):
            checkpoint, why = (args.checkpoint, None) if args.checkpoint is not None else run_checkpoint(args.exp_dir)
            model, cfg, state = load_trained_model(checkpoint, device, args.data_root)
            picked = f"checkpoint {checkpoint}" + (f" (epoch {state['epoch']})" if "epoch" in state else "")
            if why is not None:
                picked += f", {why}"
            evaluate_or_predict(args, model, cfg, device, rank, world_size, picked)
    finally:
        cleanup()


def evaluate_or_predict(args, model, cfg: dict, device: torch.device, rank: int, world_size: int,
                        picked: str) -> None:
    """The evaluation, or with --predict-dir the prediction, that args ask of a loaded model; ``picked`` is the
    line's opening that names the checkpoint."""
    amp_dtype = autocast_dtype(cfg, device)
    if args.predict_dir is not None:
        # A checkpoint whose eval_mode is center_crop predicts whole images.
        mode = args.mode or ("original" if cfg["eval_mode"] == "center_crop" else cfg["eval_mode"])
        if rank == 0:
            print(f"{picked}, predicting {args.predict_dir}, mode {mode}")
        count = predict_folder(build_predictor(model, args), args.predict_dir, args.save_dir, cfg, device, amp_dtype,
                               mode, args.mask_dir, rank, world_size, progress=rank == 0)
        print(f"wrote {count} predictions and overlays to {args.save_dir}")
        return
    val_set = build_val_dataset(cfg, args.splits_dir or cfg["splits_dir"], data_root_hint="pass --data-root DIR",
                                splits_dir_hint="pass --splits-dir DIR if the split files moved")
    mode = args.mode or cfg["eval_mode"]
    names = class_names(cfg)
    if rank == 0:
        print(f"{picked}, {len(val_set)} val images, mode {mode}")

    if args.scales:
        results = []
        for scale in args.scales:
            predict = rescaled_predictor(model.predict, scale) if scale != 1.0 else model.predict
            metric = evaluate(predict, val_set, cfg, device, amp_dtype, rank, world_size, mode, progress=rank == 0)
            results.append((scale, metric.miou(), metric.miou_all_classes()))
        if rank == 0:
            print("input scale   mIoU  mIoU (all)")
            for scale, miou, miou_all in results:
                print(f"{scale:>11.2f}  {miou:5.2f}  {miou_all:10.2f}")
            print("mIoU: over the classes present; mIoU (all): over every class, an absent one counting 0 (the "
                  "release's)")
        figures = {"mode": mode, "scales": {f"{scale:g}": miou for scale, miou, _ in results},
                   "scales_all_classes": {f"{scale:g}": miou_all for scale, _, miou_all in results}}
    else:
        predict = build_predictor(model, args)
        saver = prediction_saver(args.save_dir, cfg, args.overlays) if args.save_dir is not None else None
        metric = evaluate(predict, val_set, cfg, device, amp_dtype, rank, world_size, mode, on_prediction=saver,
                          progress=rank == 0)
        if rank == 0:
            print(format_iou_table(names, metric.iou()))
        figures = {"mode": mode, "miou": metric.miou(), "miou_all_classes": metric.miou_all_classes(),
                   "iou": dict(zip(names, metric.iou().tolist()))}
    if args.json is not None and rank == 0:
        write_json(args.json, {"checkpoint": picked, **figures})


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DatasetError, CheckpointError, OutputError) as error:
        # Under torchrun the launcher prints it, once for all processes.
        report_failure(f"error: {error}")
        sys.exit(2)
