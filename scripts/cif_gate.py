"""Does the trained CIF gate know which scale to trust? On the validation set, for each scale v: where the 1x and the
v prediction disagree and one of them is right, how often the gate leans to the right one (s > 0.5 leans to 1x);
also the gate's mean and standard deviation over the valid pixels and the pixel accuracy of 1x, v and the fused
prediction. 50 % there is a coin toss.

Is the gate more than a per-scale constant? Two columns compare it with the constant gate of the same mean: the share
of contested pixels on which that constant leans the right way (always to the side the mean favours), and the pixel
accuracy of the fusion with that constant as the weight of 1x (a second pass over the validation set, since the mean
is known only after the first). A constant weight fuses the same way whichever gate the model was trained with:
mean * pred_1x + (1 - mean) * pred_v at the image size, the blend of both gates with their gate held constant.

    python scripts/cif_gate.py --checkpoint exp/synthetic/1_16/scalematch/latest.pth [--scales 0.5 2.0] [--cpu]

Whole validation images, batch 1, as `eval.py` in `original` mode; prints one Markdown table.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataset.semi import DatasetError, build_val_dataset  # noqa: E402
from eval import load_trained_model  # noqa: E402
from util.checkpoint import CheckpointError, write_atomically  # noqa: E402
from util.config import ConfigError  # noqa: E402

IGNORE_INDEX = 255
COUNTS = ("pixels", "contested", "gate_right", "contested_right_1x", "gate_sum", "gate_square_sum", "right_1x",
          "right_v", "right_fused", "right_constant")


def gate_counts(pred_1x: torch.Tensor, pred_v: torch.Tensor, pred_fused: torch.Tensor, gate: torch.Tensor,
                mask: torch.Tensor) -> dict[str, float]:
    """Pixel counts of one batch (class maps and the gate at the mask's size): 'contested' pixels are those where
    1x and v disagree and one of them is right; 'gate_right' those of them where the gate leans to the right one."""
    valid = mask != IGNORE_INDEX
    right_1x, right_v = (pred_1x == mask) & valid, (pred_v == mask) & valid
    contested = (pred_1x != pred_v) & (right_1x | right_v)
    leans_right = torch.where(gate > 0.5, right_1x, right_v)
    return {"pixels": float(valid.sum()), "contested": float(contested.sum()),
            "gate_right": float((leans_right & contested).sum()),
            "contested_right_1x": float((right_1x & contested).sum()), "gate_sum": float(gate[valid].sum()),
            # In float64: the variance is a difference of two sums over every validation pixel.
            "gate_square_sum": float(gate[valid].double().square().sum()),
            "right_1x": float(right_1x.sum()), "right_v": float(right_v.sum()),
            "right_fused": float(((pred_fused == mask) & valid).sum())}


def constant_gate_right(logits_1x: torch.Tensor, logits_v: torch.Tensor, weight: float, mask: torch.Tensor) -> float:
    """Pixels of one batch the fusion gets right when the gate is the constant ``weight`` of 1x everywhere."""
    fused = (weight * logits_1x + (1 - weight) * logits_v).argmax(1)
    return float(((fused == mask) & (mask != IGNORE_INDEX)).sum())


def gate_figures(total: dict[str, float]) -> dict[str, float]:
    """One scale's figures from its pixel counts summed over the validation set (fractions, not percentages)."""
    pixels = max(total["pixels"], 1.0)
    mean = total["gate_sum"] / pixels
    # Rounding can leave E[s^2] - E[s]^2 a hair below zero for a constant gate.
    variance = max(total["gate_square_sum"] / pixels - mean ** 2, 0.0)
    contested = max(total["contested"], 1.0)
    # A constant above 0.5 always leans to 1x, so it is right where 1x is; below 0.5 where v is.
    constant_right = (total["contested_right_1x"] if mean > 0.5
                      else total["contested"] - total["contested_right_1x"])
    return {"mean gate": mean, "gate std": math.sqrt(variance), "contested": total["contested"] / pixels,
            "gate right": total["gate_right"] / contested,
            "constant right": constant_right / contested,
            "accuracy 1x": total["right_1x"] / pixels, "accuracy v": total["right_v"] / pixels,
            "accuracy fused": total["right_fused"] / pixels, "accuracy constant": total["right_constant"] / pixels}


def gate_row(scale: float, total: dict[str, float]) -> str:
    """The table row of one scale."""
    figures = gate_figures(total)
    return (f"| {scale:g} | {figures['mean gate']:.4f} | {figures['gate std']:.4f} | {figures['contested']:.2%} | "
            f"{figures['gate right']:.2%} | {figures['accuracy 1x']:.2%} | {figures['accuracy v']:.2%} | "
            f"{figures['accuracy fused']:.2%} | {figures['constant right']:.2%} | {figures['accuracy constant']:.2%} |")


def predictions(model, val_set, scales: list[float], device: torch.device):
    """Each validation image's mask and the model's named predictions for it (one 1x pass shared by every scale)."""
    with torch.no_grad():
        for index in range(len(val_set)):
            sample = val_set[index]
            image = sample["image"][None].to(device)
            yield sample["mask"][None].to(device), model(image, image_scales=tuple(scales))


def gate_totals(model, val_set, scales: list[float], device: torch.device) -> dict[float, dict[str, float]]:
    """Per scale, the pixel counts of gate_counts summed over the validation set, and right_constant."""
    totals = {scale: dict.fromkeys(COUNTS, 0.0) for scale in scales}
    for mask, out in predictions(model, val_set, scales, device):
        pred_1x = out["pred"].argmax(1)
        for branch, scale in enumerate(scales):
            counts = gate_counts(pred_1x, out["pred_scaled"][branch].argmax(1), out["pred_cif"][branch].argmax(1),
                                 out["gate"][branch][:, 0], mask)
            for key, value in counts.items():
                totals[scale][key] += value
    means = {scale: gate_figures(total)["mean gate"] for scale, total in totals.items()}
    for mask, out in predictions(model, val_set, scales, device):
        for branch, scale in enumerate(scales):
            totals[scale]["right_constant"] += constant_gate_right(out["pred"], out["pred_scaled"][branch],
                                                                   means[scale], mask)
    return totals


def gate_report(totals: dict[float, dict[str, float]]) -> str:
    rows = ["| v | mean gate | gate std | contested pixels | gate right where contested | accuracy 1x | accuracy v | "
            "accuracy fused | constant gate right where contested | accuracy fused, constant gate |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows += [gate_row(scale, total) for scale, total in totals.items()]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--data-root", help="dataset root, if it moved since training")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--json", help="also write each scale's figures (fractions) to this file as JSON")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model, cfg, state = load_trained_model(args.checkpoint, device, args.data_root)
    if not cfg["cif"]:
        raise SystemExit(f"error: {args.checkpoint} was trained with cif: false, so it has no gate")
    val_set = build_val_dataset(cfg, cfg["splits_dir"], data_root_hint="pass --data-root DIR")
    print(f"checkpoint {args.checkpoint} (epoch {state['epoch']}), {len(val_set)} validation images\n")
    totals = gate_totals(model, val_set, args.scales, device)
    print(gate_report(totals))
    if args.json is not None:
        figures = {f"{scale:g}": gate_figures(total) for scale, total in totals.items()}
        write_atomically(args.json, lambda temporary: temporary.write_text(json.dumps(figures, indent=1)))


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DatasetError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
