"""The paper's ablations on the synthetic benchmark: every configuration x seed trained with the same CPU
budget through scripts/train.sh, then evaluated by eval.py; writes a Markdown report (default docs/study.md) and,
when matplotlib is installed (`pip install matplotlib`; training never needs it), PNG plots next to it.

    python scripts/study.py [key=value ...] --seeds 0 1 2 [--runs NAME ...] [--exp-dir exp/study] [--out FILE]

Runs already finished are reused (rerunning the study resumes it). Extra key=value overrides apply to every run
(e.g. a different budget: epochs=6 iters_per_epoch=40).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (overrides, label): Table 4 (components) and Table 6 (fusion, warm-up).
RUNS = {
    "supervised": (["train_mode=supervised"], "Supervised only"),
    "fixmatch": (["isvc=false", "fsvc=false", "cif=false"], "FixMatch baseline"),
    "isvc": (["fsvc=false", "cif=false"], "+ ISVC"),
    "isvc_fsvc": (["cif=false"], "+ ISVC + FSVC (fusion: none)"),
    "scalematch": ([], "+ ISVC + FSVC + CIF (ScaleMatch)"),
    "average": (["cif=false", "fusion=average"], "+ ISVC + FSVC, fusion: average"),
    "no_warm_up": (["warm_up=0"], "ScaleMatch without warm-up"),
    "supervise_1x": (["supervise_1x=true"], "ScaleMatch, labeled loss also on 1x (not in the paper)"),
    "no_quarter": (["img_scales=[0.5,1.5,2.0]"], "ScaleMatch, v in {0.5, 1.5, 2} (no 0.25; not in the paper)"),
    "bn_1x_only": (["scaled_views_update_bn=false"], "ScaleMatch, BN statistics from the 1x views only (not the release)"),
}
TABLE4 = ["supervised", "fixmatch", "isvc", "isvc_fsvc", "scalematch", "bn_1x_only", "supervise_1x", "no_quarter"]
TABLE6 = ["isvc_fsvc", "average", "scalematch", "no_warm_up"]
CIF_RUNS = ["scalematch", "no_warm_up", "supervise_1x", "no_quarter", "bn_1x_only"]


def run(command: list[str]) -> str:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return result.stdout + result.stderr


def train(name: str, seed: int, args) -> tuple[str, float] | None:
    """Train one configuration with one seed (or reuse a finished run); returns its run dir and minutes taken
    (None for an unfinished run with --report-only)."""
    run_dir = os.path.join(args.exp_dir, "synthetic", args.split, f"{name}_seed{seed}")
    done_marker = os.path.join(run_dir, "study_minutes.txt")
    if os.path.exists(done_marker):
        return run_dir, float(open(done_marker).read())
    if args.report_only:
        return None
    start = time.time()
    # The run's own overrides come last so that they win over the study-wide budget (e.g. warm_up=0).
    run(["bash", "scripts/train.sh", "synthetic", args.split, "0", *args.overrides, *RUNS[name][0], f"seed={seed}",
         f"exp_dir={args.exp_dir}", f"run_name={name}_seed{seed}"])
    minutes = (time.time() - start) / 60
    with open(done_marker, "w") as handle:
        handle.write(f"{minutes:.2f}")
    return run_dir, minutes


def miou_of(output: str) -> float:
    return float(re.findall(r"^mIoU\s+([\d.]+)", output, re.M)[-1])


def final_miou(run_dir: str) -> float:
    """mIoU of the last epoch (the budget's end; best-epoch selection on val would flatter every method)."""
    return miou_of(open(os.path.join(run_dir, "train.log")).read())


def pseudo_label_curves(run_dir: str) -> dict[str, list[float]]:
    curves: dict[str, list[float]] = {}
    for line in open(os.path.join(run_dir, "train.log")):
        if "pseudo-label mIoU" in line:
            for name, value in re.findall(r"(1x|average|cif) ([\d.]+)", line.split(":", 3)[-1]):
                curves.setdefault(name, []).append(float(value))
    return curves


def evaluate(run_dir: str, *flags: str) -> str:
    return run([sys.executable, "eval.py", "--cpu", "--checkpoint", os.path.join(run_dir, "latest.pth"), *flags])


def scale_mious(run_dir: str, scales: list[float]) -> list[float]:
    output = evaluate(run_dir, "--scales", *map(str, scales))
    return [float(re.search(rf"^\s*{scale:.2f}\s+([\d.]+)", output, re.M).group(1)) for scale in scales]


def gate_figures(run_dir: str) -> dict[str, dict[str, float]]:
    """scripts/cif_gate.py's figures per scale: mean gate, % contested pixels, % of them where the gate is right."""
    output = run([sys.executable, "scripts/cif_gate.py", "--cpu", "--checkpoint", os.path.join(run_dir, "latest.pth")])
    rows = re.findall(r"^\| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% \| ([\d.]+)% \|", output, re.M)
    return {scale: {"mean_gate": float(gate), "contested": float(contested), "right": float(right)}
            for scale, gate, contested, right in rows}


def evaluate_run(name: str, run_dir: str, minutes: float) -> dict:
    """The figures of one finished run, cached in its directory so that re-reporting costs nothing."""
    cache = os.path.join(run_dir, "study_eval.json")
    if os.path.exists(cache):
        with open(cache) as handle:
            entry = json.load(handle)
    else:
        entry = {"final": final_miou(run_dir), "minutes": minutes, "curves": pseudo_label_curves(run_dir),
                 "scales": scale_mious(run_dir, [0.5, 1.0, 2.0])}
    if name in CIF_RUNS and "multiscale_cif" not in entry:
        entry["multiscale_cif"] = miou_of(evaluate(run_dir, "--multiscale-cif"))
        entry["multiscale_avg"] = miou_of(evaluate(run_dir, "--multiscale-avg"))
    if name in CIF_RUNS and "gate" not in entry:  # added after the first studies: filled in for their caches
        entry["gate"] = gate_figures(run_dir)
    with open(cache, "w") as handle:
        json.dump(entry, handle)
    return entry


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({len(values)} seeds)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", default="1_16")
    parser.add_argument("--exp-dir", default=os.path.join("exp", "study"))
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", default=os.path.join("docs", "study.md"), help="the report; plots go next to it")
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs finished so far")
    parser.add_argument("--note", help="a paragraph under the report's title (e.g. the commit the runs used)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    results = {}
    for seed in args.seeds:
        for name in args.runs:
            finished = train(name, seed, args)
            if finished is None:
                continue
            run_dir, minutes = finished
            entry = evaluate_run(name, run_dir, minutes)
            results.setdefault(name, []).append(entry)
            print(f"{name} seed {seed}: mIoU {entry['final']:.2f} ({minutes:.1f} min)", flush=True)
    write_report(results, args)


def write_report(results: dict, args) -> None:
    lines = [
        "# ScaleMatch's claims on the synthetic benchmark", "", *([args.note, ""] if args.note else []),
        f"Command: `python scripts/study.py{''.join(f' {o}' for o in args.overrides)} --seeds "
        f"{' '.join(map(str, args.seeds))} --split {args.split} --runs {' '.join(args.runs)}`, on this "
        "repository's CPU machine (2 cores).",
        "Every run: `configs/synthetic.yaml` (tv_resnet18 from scratch, crop 96, batch 4+4, the same iteration "
        "budget), differing only in the overrides named. mIoU (%) on the 80 validation images at the end of the "
        "budget, mean ± std over seeds.", "",
        "## Table 4: components", "",
        "| method | mIoU | minutes, fastest seed (wall clock; other seeds may have shared the CPU) |",
        "| --- | --- | --- |"]
    for name in TABLE4:
        if name in results:
            entries = results[name]
            lines.append(f"| {RUNS[name][1]} | {mean_std([e['final'] for e in entries])} | "
                         f"{min(e['minutes'] for e in entries):.1f} |")
    lines += ["", "## Table 6: pseudo-label fusion and warm-up", "", "| fusion | mIoU |", "| --- | --- |"]
    for name in TABLE6:
        if name in results:
            lines.append(f"| {RUNS[name][1]} | {mean_std([e['final'] for e in results[name]])} |")
    lines += ["", "## Fig. 1a: scale robustness (mIoU with the input rescaled)", "",
              "| method | x0.5 | x1.0 | x2.0 |", "| --- | --- | --- | --- |"]
    for name in RUNS:
        if name in results:
            cells = [mean_std([e["scales"][i] for e in results[name]]) for i in range(3)]
            lines.append(f"| {RUNS[name][1]} | " + " | ".join(cells) + " |")
    lines += ["", "## Multi-scale inference (scales 1.0 + 0.5 + 2.0)", "",
              "| model | single-scale | average | CIF gate |", "| --- | --- | --- | --- |"]
    for name in CIF_RUNS:
        if name in results:
            entries = results[name]
            lines.append(f"| {RUNS[name][1]} | {mean_std([e['final'] for e in entries])} | "
                         f"{mean_std([e['multiscale_avg'] for e in entries])} | "
                         f"{mean_std([e['multiscale_cif'] for e in entries])} |")
    lines += ["", "## CIF gate on the validation set (`scripts/cif_gate.py`, mean over seeds)", "",
              "Where the 1x and the v prediction disagree and one is right (contested pixels), how often the gate "
              "leans to the right one; 50 % is a coin toss.", "",
              "| model | v | mean gate (weight of 1x) | contested pixels (%) | gate right where contested (%) |",
              "| --- | --- | --- | --- | --- |"]
    for name in CIF_RUNS:
        entries = [e for e in results.get(name, []) if "gate" in e]
        for scale in sorted({s for e in entries for s in e["gate"]}, key=float):
            cells = [mean_std([e["gate"][scale][key] for e in entries if scale in e["gate"]])
                     for key in ("mean_gate", "contested", "right")]
            lines.append(f"| {RUNS[name][1]} | {scale} | " + " | ".join(cells) + " |")
    lines += ["", "## Fig. 5: pseudo-label mIoU on the unlabeled images, per epoch (ScaleMatch, mean over seeds)", ""]
    if "scalematch" in results:
        curves = results["scalematch"][0]["curves"]
        epochs = len(curves.get("1x", []))
        lines += ["| source | " + " | ".join(f"ep {i}" for i in range(epochs)) + " |",
                  "| --- |" + " --- |" * epochs]
        for source in ("1x", "average", "cif"):
            per_seed = [e["curves"].get(source, []) for e in results["scalematch"]]
            if per_seed and all(len(c) == epochs for c in per_seed):
                means = [statistics.mean(c[i] for c in per_seed) for i in range(epochs)]
                lines.append(f"| {source} | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    plot(results, args)
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def plot(results: dict, args) -> None:
    """PNG plots next to the report, when matplotlib is available (never needed for training)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return
    prefix = os.path.splitext(args.out)[0]  # plots sit next to their report: REPORT_scale_robustness.png, ...
    names = [name for name in RUNS if name in results]
    finals = [[e["final"] for e in results[name]] for name in names]
    figure, axis = plt.subplots(figsize=(6, 0.4 * len(names) + 1))
    axis.barh(range(len(names)), [statistics.mean(f) for f in finals],
              xerr=[statistics.stdev(f) if len(f) > 1 else 0 for f in finals], capsize=3)
    axis.set_yticks(range(len(names)), [f"{RUNS[n][1]} ({len(f)} seeds)" for n, f in zip(names, finals)], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("mIoU (%), mean and std over seeds")
    figure.tight_layout()
    figure.savefig(f"{prefix}_miou.png", dpi=120)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for name in RUNS:
        if name in results:
            means = [statistics.mean(e["scales"][i] for e in results[name]) for i in range(3)]
            axis.plot([0.5, 1.0, 2.0], means, marker="o", label=RUNS[name][1])
    axis.set_xscale("log", base=2)
    axis.set_xticks([0.5, 1.0, 2.0], ["0.5", "1", "2"])
    axis.set_xlabel("input scale")
    axis.set_ylabel("mIoU (%)")
    axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(f"{prefix}_scale_robustness.png", dpi=120)
    if "scalematch" in results:
        figure, axis = plt.subplots(figsize=(5, 3.5))
        for source in ("1x", "average", "cif"):
            per_seed = [e["curves"].get(source, []) for e in results["scalematch"]]
            if per_seed and per_seed[0]:
                epochs = min(len(c) for c in per_seed)
                axis.plot(range(epochs), [statistics.mean(c[i] for c in per_seed) for i in range(epochs)],
                          marker="o", label=source)
                axis.set_xticks(range(epochs))
        axis.set_xlabel("epoch")
        axis.set_ylabel("pseudo-label mIoU (%)")
        axis.legend()
        figure.tight_layout()
        figure.savefig(f"{prefix}_pseudo_label_quality.png", dpi=120)


if __name__ == "__main__":
    main()
