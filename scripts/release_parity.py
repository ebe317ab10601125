"""Parity against the authors' release: its own network code and this codebase's, the same weights, the same inputs.

    python scripts/release_parity.py RELEASE_DIR [--backbone resnet101] [--markdown parity.md] [--kernel] [key=value ...]
    python scripts/release_parity.py RELEASE_DIR --eval [--eval-data VOC_DIR] [--eval-crop 321] [--backbone resnet50]

RELEASE_DIR is the release's git directory (the `fetch` tool's mirror of github:lvliang6879/ScaleMatch) or a
checkout. The release's network is built by ../shared/tools/release_model.py (--tool), which replaces only what cannot
run on a CPU. That tool writes a release-format checkpoint; scripts/convert_release_checkpoint.py converts it; eval.py's
loader builds this codebase's network from the result. Then, under the tool's deterministic Dropout2d:

  eval mode, 2 images of 65 x 65: the single-scale prediction, and for every v in {0.25, 0.5, 1.5, 2.0} and t in
    {0.75, 1.0, 1.25}: pred_ori, pred_size, pred_joint and the gate against pred, pred_scaled[0], pred_cif[0] and
    the CIF's gate;
  train mode (BatchNorm on batch statistics), the batch the trainer sends through: 2 labeled + 2 unlabeled images,
    the same outputs plus pred_fp, then the strong view's plain forward, and finally every BatchNorm running statistic
    after all those passes (the views' order and the rescaled views' updates included).

An output passes when max|ours - release| <= 1e-4 x max|release output| in every case. With --kernel also: how far
the release's CUDA kernel (emulated by the tool) is from the paper's Bi-WKV formula that this codebase computes, on
the op (T = 289 and 16641 tokens; the latter takes minutes) and on pred_joint. Exit status 1 when an output fails.
key=value overrides configs/pascal.yaml for this codebase's side, e.g. cif_gate=paper, to measure how far a switch
takes the network from the release; with cif_wkv=release_kernel the release side runs the tool's kernel emulation. With --eval it compares evaluation instead: the release's evaluate() and
eval.py's, in every mode (scripts/release_eval_parity.py says how).
"""
import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from eval import load_trained_model  # noqa: E402
from model.release import project_name  # noqa: E402
from model.rwkv import bi_wkv  # noqa: E402
from scripts.convert_release_checkpoint import convert  # noqa: E402
from scripts.release_eval_parity import evaluation_parity  # noqa: E402
from util.config import load_config  # noqa: E402

TOLERANCE = 1e-4
DEFAULT_TOOL = ROOT.parent / "shared" / "tools" / "release_model.py"


def load_tool(path: Path):
    if not path.is_file():
        raise SystemExit(f"error: {path}: no release_model.py (pass --tool)")
    spec = importlib.util.spec_from_file_location("release_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Worst:
    """The largest relative difference seen per (mode, output)."""

    def __init__(self):
        self.rows: dict[tuple[str, str], list] = {}

    def add(self, mode: str, output: str, ours: torch.Tensor, release: torch.Tensor) -> None:
        if ours.shape != release.shape:
            raise SystemExit(f"error: {mode} {output}: shape {tuple(ours.shape)} here, {tuple(release.shape)} in the "
                             "release")
        difference = float((ours.double() - release.double()).abs().max())
        scale = float(release.double().abs().max())
        row = self.rows.setdefault((mode, output), [0, 0.0, 0.0, 0.0])
        row[0] += 1
        if difference / max(scale, 1e-30) >= row[1]:
            row[1:] = [difference / max(scale, 1e-30), difference, scale]

    def table(self) -> str:
        lines = ["| mode | output (release / here) | cases | worst max abs diff | max abs release | relative | "
                 "within 1e-4 |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for (mode, output), (cases, relative, difference, scale) in self.rows.items():
            lines.append(f"| {mode} | {output} | {cases} | {difference:.2e} | {scale:.2e} | {relative:.2e} | "
                         f"{'yes' if relative <= TOLERANCE else '**no**'} |")
        return "\n".join(lines)

    def passed(self) -> bool:
        return all(relative <= TOLERANCE for _, relative, _, _ in self.rows.values())


@contextlib.contextmanager
def last_output(module):
    """Inside, {"out": ...} holds ``module``'s output of its last call (here the gate on the CIF grid, the weight of
    the lower-resolution view); the hook is removed on leaving."""
    seen = {}
    handle = module.register_forward_hook(lambda _, args, out: seen.update(out=out.detach()))
    try:
        yield seen
    finally:
        handle.remove()


def compare_case(worst: Worst, mode: str, ours: dict, gate: torch.Tensor, release: dict, with_fp: bool) -> None:
    worst.add(mode, "pred_ori / pred", ours["pred"], release["pred_ori"])
    worst.add(mode, "pred_size / pred_scaled", ours["pred_scaled"][0], release["pred_size"])
    worst.add(mode, "pred_joint / pred_cif", ours["pred_cif"][0], release["pred_joint"])
    worst.add(mode, "scale_attn / gate", gate, release["gate"])
    if with_fp:
        worst.add(mode, "pred_fp", ours["pred_fp"], release["pred_fp"])


def eval_parity(tool, net, model, worst: Worst, seed: int) -> None:
    x = tool.reference_input(65, 2, seed)
    reference = tool.release_outputs(net, x, seed=seed)
    with torch.no_grad(), tool.deterministic_dropout(seed), last_output(model.cif.gate_head) as gate:
        worst.add("eval", "predict / predict", model.predict(x), reference["predict"])
        for case in reference["cases"]:
            out = model(x, feature_scale=case["t"], image_scales=(case["v"],))
            compare_case(worst, "eval", out, gate["out"], case, with_fp=False)


def train_parity(tool, net, model, worst: Worst, seed: int) -> None:
    labeled, unlabeled = tool.reference_input(65, 2, seed + 10), tool.reference_input(65, 2, seed + 20)
    batch = torch.cat((labeled, unlabeled))
    net.train(), model.train()
    with (torch.no_grad(), tool.deterministic_dropout(seed), last_output(model.cif.gate_head) as gate,
          last_output(net.scale_attn) as release_gate):
        for v in tool.IMAGE_SCALES:
            for t in tool.FEATURE_SCALES:
                release = dict(net.two_scale_forward(batch, v, t), gate=release_gate["out"])
                out = model(batch, feature_scale=t, image_scales=(v,))
                compare_case(worst, "train", out, gate["out"], release, with_fp=True)
        worst.add("train", "strong view model(x) / pred", model(unlabeled)["pred"], net(unlabeled))
    net.eval(), model.eval()
    ours = {name: tensor for name, tensor in model.segmenter.state_dict().items() if "running_" in name}
    ours.update({f"cif.{name}": tensor for name, tensor in model.cif.state_dict().items() if "running_" in name})
    release = {name: tensor for name, tensor in net.state_dict().items() if "running_" in name}
    if len(ours) != len(release):
        raise SystemExit(f"error: {len(ours)} BatchNorm statistics here, {len(release)} in the release")
    for name, tensor in release.items():
        ours_name = project_name(name).removeprefix("segmenter.")
        worst.add("train", "BatchNorm running stats after the passes", ours[ours_name], tensor)


def kernel_deviation(tool, net, kernel_net, seed: int, lengths: list[int]) -> list[str]:
    """The release kernel's distance from the paper's formula: on the op, and on pred_joint through the network
    (``kernel_net``: the release's network, its WKV op the kernel's emulation, given ``net``'s weights and buffers)."""
    lines = ["| measured | tokens T | max abs diff / max abs (paper formula) |", "| --- | --- | --- |"]
    block = net.RWKV_layers.layers[0].attn
    generator = torch.Generator().manual_seed(seed)
    for length in lengths:
        k = torch.randn(1, length, block.spatial_decay.numel(), generator=generator, dtype=torch.float64)
        v = torch.randn(1, length, block.spatial_decay.numel(), generator=generator, dtype=torch.float64)
        w, u = block.spatial_decay.detach().double() / length, block.spatial_first.detach().double() / length
        paper = tool.wkv_paper(w, u, k, v)
        kernel = tool.wkv_kernel(w, u, k, v)
        ours = bi_wkv(w.float(), u.float(), k.float(), v.float()).double()
        scale = float(paper.abs().max())
        lines.append(f"| release kernel vs paper formula, Bi-WKV op | {length} | "
                     f"{float((kernel - paper).abs().max()) / scale:.2e} |")
        lines.append(f"| this codebase (float32) vs paper formula, Bi-WKV op | {length} | "
                     f"{float((ours - paper).abs().max()) / scale:.2e} |")
    kernel_net.load_state_dict(net.state_dict())
    x = tool.reference_input(65, 2, seed)
    with torch.no_grad(), tool.deterministic_dropout(seed):
        worst = 0.0
        for v in tool.IMAGE_SCALES:
            paper = net.two_scale_forward(x, v, 1.0)["pred_joint"]
            kernel = kernel_net.two_scale_forward(x, v, 1.0)["pred_joint"]
            worst = max(worst, float((kernel - paper).abs().max() / paper.abs().max()))
    side = (65 - 1) // 4 + 1
    lines.append(f"| release with its kernel vs with the paper formula, pred_joint (eval, t = 1, every v) | "
                 f"{side * side} | {worst:.2e} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("release_dir", help="the release's git directory or a checkout of it")
    parser.add_argument("--tool", type=Path, default=DEFAULT_TOOL, help=f"release_model.py (default: {DEFAULT_TOOL})")
    parser.add_argument("--backbone", choices=("resnet101", "resnet50"), default="resnet101")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernel", action="store_true", help="also measure the release kernel's deviation")
    parser.add_argument("--eval", action="store_true", help="compare the release's evaluate() with eval.py's instead "
                        "of the networks (scripts/release_eval_parity.py)")
    parser.add_argument("--eval-data", help="with --eval: a folder of JPEGImages/ and SegmentationClass/ (default: "
                        "synthetic images)")
    parser.add_argument("--eval-crop", type=int, default=321, help="with --eval: crop_size (default 321)")
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for this codebase's side")
    args = parser.parse_intermixed_args(argv)  # key=value may follow the options
    tool = load_tool(args.tool)
    started = time.time()
    if args.eval:
        lines, passed = evaluation_parity(tool, args.release_dir, args.backbone, args.seed, args.eval_data,
                                          args.eval_crop)
        lines += ["", f"{time.time() - started:.0f} s on {os.cpu_count()} CPU cores."]
        return print_report(lines, args.markdown, passed)
    # This codebase's emulation of the release kernel is compared with the tool's; its formula with the formula.
    ours = load_config(str(ROOT / "configs" / "pascal.yaml"), [f"backbone={args.backbone}", *args.overrides])
    release_wkv = "kernel" if ours["cif_wkv"] == "release_kernel" else "paper"
    try:
        net = tool.build_release_model(args.release_dir, nclass=21, backbone=args.backbone, seed=args.seed,
                                       wkv=release_wkv)
    except tool.ReleaseError as error:
        raise SystemExit(f"error: {error}") from None
    with tempfile.TemporaryDirectory() as folder:
        release_checkpoint, converted = os.path.join(folder, "release.pth"), os.path.join(folder, "converted.pth")
        tool.write_release_checkpoint(net, release_checkpoint)
        convert(release_checkpoint, converted, str(ROOT / "configs" / "pascal.yaml"),
                [f"backbone={args.backbone}", *args.overrides])
        model, _, _ = load_trained_model(converted, torch.device("cpu"))
    info = net.release_info
    header = (f"Release {info['commit']}, {args.backbone}, nclass 21, seed {args.seed}, Bi-WKV '{info['wkv']}' "
              f"(float64), stand-ins: {', '.join(info['stand_ins']) or 'none'}; torch {torch.__version__}; "
              f"overrides: {' '.join(args.overrides) or 'none'}.")
    worst = Worst()
    eval_parity(tool, net, model, worst, args.seed)
    train_parity(tool, net, model, worst, args.seed)
    report = [header, "", worst.table()]
    if args.kernel:
        kernel_net = tool.build_release_model(args.release_dir, nclass=21, backbone=args.backbone, wkv="kernel",
                                              seed=args.seed)
        report += ["", *kernel_deviation(tool, net, kernel_net, args.seed, [289, 16641])]
    report += ["", f"{time.time() - started:.0f} s on {os.cpu_count()} CPU cores."]
    return print_report(report, args.markdown, worst.passed())


def print_report(lines: list[str], markdown: str | None, passed: bool) -> int:
    """Print ``lines`` (and write them to ``markdown``); the exit status: 0 when ``passed``, else 1."""
    text = "\n".join(lines)
    print(text)
    if markdown:
        Path(markdown).write_text(text + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
