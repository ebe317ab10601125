"""The paper's ablations on the synthetic benchmark: every configuration x seed of a study trained with the same CPU
budget through scripts/train.sh, evaluated by eval.py and scripts/cif_gate.py, and recorded as one row of a CSV
(default docs/study_runs.csv, committed); the Markdown report (default docs/study.md) and, when matplotlib is
installed (`pip install matplotlib`; training never needs it), its PNG plots are built from that CSV alone.

    python scripts/study.py --study NAME [key=value ...] [--seeds 0 1 2] [--runs NAME ...] [--split 1_16]
                            [--exp-dir exp/study] [--csv docs/study_runs.csv] [--out docs/study.md] [--note TEXT]
    python scripts/study.py --report-only [--studies NAME ...] [--csv docs/study_runs.csv] [--out docs/study.md]

A study names one regime (e.g. scratch600): key=value overrides apply to each of its runs (e.g. a different budget:
epochs=15 iters_per_epoch=40), each run adds its own (RUNS). Run directories: EXP_DIR/NAME/synthetic/SPLIT/RUN_seedS.

CSV columns, in this order (one row per finished run; numbers with 2 decimals, gate mean and std with 4):
    study, run, seed, split      the run's identity; (study, run, seed) is its key
    overrides                    the study's overrides then the run's own, space-separated, as passed to train.sh
    commit                       `git rev-parse --short HEAD` before training (for a finished run directory found
                                 unrecorded: before its evaluation), +dirty when tracked files outside exp/ and
                                 docs/ had changes
    date                         when the row was recorded, UTC, to the minute
    machine                      CPU count, processor, torch version
    minutes                      wall clock of the training
    miou                         validation mIoU at the last epoch (the run's results.json)
    miou_x0.5, miou_x1.0, miou_x2.0   eval.py --scales 0.5 1.0 2.0 (its --json figures, as every eval column)
    multiscale_avg, multiscale_cif    eval.py --multiscale-avg / --multiscale-cif
    gate_V_mean, gate_V_std, gate_V_contested, gate_V_right   for V in 0.25, 0.5, 1.5, 2.0: scripts/cif_gate.py's
                                 mean gate, its std over pixels, % contested pixels, % of them where the gate is right
    pseudo_label_1x, pseudo_label_average, pseudo_label_cif   pseudo-label mIoU per epoch (results.json), ';'-separated
The multiscale and gate columns are empty for runs without a trained CIF gate (cif: false, or train_mode:
supervised, which never trains it); a pseudo-label column is empty when results.json has no such curve.

Resuming: a run whose key the CSV holds when it is reached is skipped (neither trained nor evaluated). The CSV is
read again before each run, so two study processes can share it; give them different runs, since two that start the
same run at once meet its run lock and the second stops. Every row the CSV holds for the study must have the
overrides and split this command would give its run, else the script stops (one name, one experiment). A run
directory whose training finished (its study_minutes.txt marker) but which the CSV lacks is evaluated and appended
without retraining. Rows are appended one at a time, each written and synced to disk before the next run starts, so
a crash mid-study leaves every earlier row intact.
"""
import argparse
import csv
import datetime
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.results import RESULTS_NAME, load_results  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (overrides, label): Table 4 (components), Table 6 (fusion, warm-up) and the release's deviations.
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
    "paper_gate": (["cif_gate=paper"], "ScaleMatch, the paper's gate (not the release)"),
    "t_config": (["feature_scales=[0.75,1.25]"], "ScaleMatch, t as the release's configs (0.75 / 1.25)"),
    "t_random": (["feature_scale_rule=random"], "ScaleMatch, t drawn independently of v (paper reading)"),
    "fast_aug": (["augmentation=fast"], "ScaleMatch, tensor augmentation (not the release's PIL pipeline)"),
}
SCALES = (0.5, 1.0, 2.0)
GATE_SCALES = (0.25, 0.5, 1.5, 2.0)
GATE_FIGURES = ("mean", "std", "contested", "right")
CURVES = ("1x", "average", "cif")
COLUMNS = ["study", "run", "seed", "split", "overrides", "commit", "date", "machine", "minutes", "miou",
           *[f"miou_x{scale}" for scale in SCALES], "multiscale_avg", "multiscale_cif",
           *[f"gate_{scale}_{figure}" for scale in GATE_SCALES for figure in GATE_FIGURES],
           *[f"pseudo_label_{source}" for source in CURVES]]
# (minuend, subtrahend): the gains the paper claims, compared seed by seed.
PAIRS = [("fixmatch", "supervised"), ("scalematch", "fixmatch"), ("scalematch", "supervised")]
MARKER = "study_minutes.txt"  # written once train.sh has finished the run's last epoch; holds its minutes


def command_output(command: list[str]) -> str:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return result.stdout + result.stderr


def run_overrides(name: str, study_overrides: list[str]) -> list[str]:
    """The run's own overrides come last so that they win over the study's (e.g. warm_up=0)."""
    return [*study_overrides, *RUNS[name][0]]


def read_rows(csv_path: str) -> list[dict[str, str]]:
    """The CSV's rows (none when it does not exist yet), refused when it is not a file this script wrote."""
    if not os.path.exists(csv_path) or os.path.getsize(csv_path) == 0:
        return []
    with open(csv_path, newline="") as handle:
        text = handle.read()
    if not text.endswith("\n"):
        raise SystemExit(f"error: {csv_path}: the last line is incomplete (an interrupted write?); remove it")
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames != COLUMNS:
        raise SystemExit(f"error: {csv_path}: columns {reader.fieldnames} are not this script's {COLUMNS}")
    rows = list(reader)
    keys = [(row["study"], row["run"], row["seed"]) for row in rows]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:  # a hand edit; averaging over seeds would count the run twice
        raise SystemExit(f"error: {csv_path}: runs recorded twice: {', '.join('/'.join(key) for key in duplicates)}")
    return rows


def append_row(csv_path: str, row: dict) -> None:
    """One line per finished run (with the header when the file is new), in one write synced to disk."""
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    if not os.path.exists(csv_path) or os.path.getsize(csv_path) == 0:
        writer.writeheader()
    writer.writerow(row)
    os.makedirs(os.path.dirname(csv_path) or ".", exist_ok=True)
    with open(csv_path, "a", newline="") as handle:
        handle.write(text.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


def check_study_agrees(rows: list[dict[str, str]], args) -> None:
    """Every recorded run of the study must be what this command would train under its name."""
    for row in rows:
        if row["study"] != args.study or row["run"] not in RUNS:
            continue
        overrides = " ".join(run_overrides(row["run"], args.overrides))
        if (row["overrides"], row["split"]) != (overrides, args.split):
            raise SystemExit(
                f"error: {args.csv} records {args.study}/{row['run']} seed {row['seed']} with split {row['split']} "
                f"and overrides '{row['overrides']}', but this command gives it split {args.split} and overrides "
                f"'{overrides}'; give the new experiment another --study name")


def current_commit() -> str:
    commit = command_output(["git", "rev-parse", "--short", "HEAD"]).strip()
    changed = command_output(["git", "status", "--porcelain", "--untracked-files=no"]).splitlines()
    # exp/ and docs/ hold results (this CSV among them), not code that could change a run.
    if any(not line[3:].startswith(("exp/", "docs/")) for line in changed):
        return commit + "+dirty"
    return commit


def machine() -> str:
    return (f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
            f"torch {importlib.metadata.version('torch')}")


def train_run(run_dir: str, overrides: list[str], seed: int, exp_dir: str, split: str) -> float:
    """Train one run on the CPU (or reuse it when its training finished); returns the minutes training took."""
    marker = os.path.join(run_dir, MARKER)
    if os.path.exists(marker):
        with open(marker) as handle:
            return float(handle.read())
    start = time.time()
    command_output(["bash", "scripts/train.sh", "synthetic", split, "0", *overrides, f"seed={seed}",
                    f"exp_dir={exp_dir}", f"run_name={os.path.basename(run_dir)}"])
    minutes = (time.time() - start) / 60
    with open(marker, "w") as handle:
        handle.write(f"{minutes:.2f}")
    return minutes


def last_miou(results: dict) -> float:
    """The last epoch's validation mIoU of a run's results.json: the budget's end (best-epoch selection on val
    would flatter every method)."""
    return results["final_miou"]


def pseudo_label_curves(results: dict) -> dict[str, list[float]]:
    """Pseudo-label mIoU per epoch and source, from a run's results.json."""
    return {source: [values[epoch] for epoch in sorted(values, key=int)]
            for source, values in results["pseudo_label_miou"].items()}


def evaluate(run_dir: str, name: str, *flags: str) -> dict:
    """eval.py's figures of the run's latest.pth (its --json output, kept in the run directory as NAME.json)."""
    path = os.path.join(run_dir, f"{name}.json")
    command_output([sys.executable, "eval.py", "--cpu", "--checkpoint", os.path.join(run_dir, "latest.pth"),
                    "--json", path, *flags])
    with open(path) as handle:
        return json.load(handle)


def scale_mious(run_dir: str) -> list[float]:
    figures = evaluate(run_dir, "eval_scales", "--scales", *map(str, SCALES))
    return [figures["scales"][f"{scale:g}"] for scale in SCALES]


def gate_columns(figures: dict) -> dict[str, str]:
    """The gate columns from scripts/cif_gate.py's --json figures (fractions, recorded as percentages)."""
    columns = {}
    for scale in GATE_SCALES:
        scale_figures = figures[f"{scale:g}"]
        columns.update({f"gate_{scale}_mean": f"{scale_figures['mean gate']:.4f}",
                        f"gate_{scale}_std": f"{scale_figures['gate std']:.4f}",
                        f"gate_{scale}_contested": f"{100 * scale_figures['contested']:.2f}",
                        f"gate_{scale}_right": f"{100 * scale_figures['gate right']:.2f}"})
    return columns


def gate_figures_of(run_dir: str) -> dict:
    path = os.path.join(run_dir, "cif_gate.json")
    command_output([sys.executable, "scripts/cif_gate.py", "--cpu", "--checkpoint", os.path.join(run_dir, "latest.pth"),
                    "--json", path, "--scales", *map(str, GATE_SCALES)])
    with open(path) as handle:
        return json.load(handle)


def trains_gate(run_dir: str) -> bool:
    """Whether the run learned a CIF gate: its resolved config has cif on, and a supervised run never trains it."""
    with open(os.path.join(run_dir, "config.yaml")) as handle:
        cfg = yaml.safe_load(handle)
    return cfg["cif"] and cfg["train_mode"] == "semi"


def evaluate_run(run_dir: str) -> dict[str, str]:
    """The figure columns of one finished run, from its results.json and the --json figures of eval.py and
    scripts/cif_gate.py."""
    results = load_results(run_dir)
    if results is None:
        raise SystemExit(f"error: {run_dir} has no {RESULTS_NAME}; was it trained by this version of scalematch.py?")
    columns = {"miou": f"{last_miou(results):.2f}"}
    columns.update({f"miou_x{scale}": f"{miou:.2f}" for scale, miou in zip(SCALES, scale_mious(run_dir))})
    columns.update({f"pseudo_label_{source}": ";".join(f"{value:.2f}" for value in curve)
                    for source, curve in pseudo_label_curves(results).items()})
    if trains_gate(run_dir):
        columns["multiscale_avg"] = f"{evaluate(run_dir, 'eval_multiscale_avg', '--multiscale-avg')['miou']:.2f}"
        columns["multiscale_cif"] = f"{evaluate(run_dir, 'eval_multiscale_cif', '--multiscale-cif')['miou']:.2f}"
        columns.update(gate_columns(gate_figures_of(run_dir)))
    return columns


def record_run(name: str, seed: int, args) -> dict[str, str]:
    """Train (or reuse the finished training of) one run, evaluate it and append its row to the CSV."""
    overrides = run_overrides(name, args.overrides)
    exp_dir = os.path.join(args.exp_dir, args.study)
    run_dir = os.path.join(exp_dir, "synthetic", args.split, f"{name}_seed{seed}")
    commit = current_commit()  # before training: the code that trains the run
    minutes = train_run(run_dir, overrides, seed, exp_dir, args.split)
    row = {"study": args.study, "run": name, "seed": str(seed), "split": args.split, "overrides": " ".join(overrides),
           "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
           "machine": machine(), "minutes": f"{minutes:.2f}", **evaluate_run(run_dir)}
    append_row(args.csv, row)
    return row


def run_study(args) -> None:
    check_study_agrees(read_rows(args.csv), args)
    for seed in args.seeds:
        for name in args.runs:
            # Read before each run: another study process may have recorded it meanwhile.
            keys = {(row["study"], row["run"], row["seed"]) for row in read_rows(args.csv)}
            if (args.study, name, str(seed)) in keys:
                print(f"{name} seed {seed}: recorded in {args.csv}, skipped", flush=True)
                continue
            row = record_run(name, seed, args)
            print(f"{name} seed {seed}: mIoU {row['miou']} ({float(row['minutes']):.1f} min)", flush=True)


def mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} ({len(values)} seeds)"


def numbers(rows: list[dict[str, str]], column: str) -> list[float]:
    return [float(row[column]) for row in rows if row[column]]


def curve(row: dict[str, str], source: str) -> list[float]:
    text = row[f"pseudo_label_{source}"]
    return [float(value) for value in text.split(";")] if text else []


def label(name: str) -> str:
    """The run's label in RUNS; its bare name when RUNS no longer has it (the CSV outlives the code)."""
    return RUNS[name][1] if name in RUNS else name


def runs_of(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """Run name -> its rows in seed order; runs in the order the CSV first records them."""
    runs: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        runs.setdefault(row["run"], []).append(row)
    return {name: sorted(seeds, key=lambda row: int(row["seed"])) for name, seeds in runs.items()}


def unique(values) -> list[str]:
    return list(dict.fromkeys(values))


def table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(cells) + " |" for cells in body], ""]


def paired_differences(runs: dict[str, list[dict[str, str]]]) -> list[list[str]]:
    """Per pair of PAIRS: seed-by-seed differences over the seeds both runs have, their mean ± std, the pooled std
    sqrt((s1² + s2²) / 2) of the two runs over those seeds, and the mean difference in pooled stds."""
    body = []
    for first, second in PAIRS:
        if first not in runs or second not in runs:
            continue
        miou_first = {row["seed"]: float(row["miou"]) for row in runs[first]}
        miou_second = {row["seed"]: float(row["miou"]) for row in runs[second]}
        seeds = sorted(miou_first.keys() & miou_second.keys(), key=int)
        if not seeds:
            continue
        differences = [miou_first[seed] - miou_second[seed] for seed in seeds]
        pooled, gap = "n/a (1 seed)", "n/a (1 seed)"
        if len(seeds) > 1:
            std = math.sqrt((statistics.stdev(miou_first[seed] for seed in seeds) ** 2
                             + statistics.stdev(miou_second[seed] for seed in seeds) ** 2) / 2)
            pooled = f"{std:.2f}"
            gap = f"{statistics.mean(differences) / std:+.2f}" if std > 0 else "n/a (no spread)"
        body.append([f"{first} - {second}", ", ".join(f"{seed}: {d:+.2f}" for seed, d in zip(seeds, differences)),
                     mean_std(differences), pooled, gap])
    return body


def split_overrides(row: dict[str, str]) -> tuple[str | None, str]:
    """(the study's overrides, the run's own) of a row, the run's own being its RUNS entry, which ends them; (None,
    all of them) when they do not end so (RUNS changed since the row was recorded: the CSV outlives the code)."""
    tokens = row["overrides"].split()
    own = RUNS[row["run"]][0] if row["run"] in RUNS else None
    if own is None or len(own) > len(tokens) or tokens[len(tokens) - len(own):] != own:
        return None, row["overrides"]
    return " ".join(tokens[:len(tokens) - len(own)]), " ".join(own)


def study_section(study: str, rows: list[dict[str, str]], plots: list[str]) -> list[str]:
    runs = runs_of(rows)
    study_overrides = unique(part for part, _ in map(split_overrides, rows) if part is not None)
    seeds = sorted({int(row["seed"]) for row in rows})
    lines = [f"## Study {study}", "",
             f"Command (rerunning it trains only what the CSV lacks): `python scripts/study.py --study {study} --split "
             f"{rows[0]['split']} --seeds {' '.join(map(str, seeds))} --runs {' '.join(runs)}"
             f"{''.join(f' {part}' for part in study_overrides if part)}`.",
             f"Overrides of every run: {' / '.join(f'`{part}`' for part in study_overrides if part) or 'none'}; "
             f"each run's own are in the table below. Commits: {', '.join(unique(row['commit'] for row in rows))}. "
             f"Machines: {'; '.join(unique(row['machine'] for row in rows))}. "
             f"Recorded {min(row['date'] for row in rows)} to {max(row['date'] for row in rows)}.", ""]
    lines += ["### Runs (mIoU at the end of the budget)", ""] + table(
        ["run", "label", "own overrides", "seeds", "mIoU", "per seed", "minutes (fastest seed)"],
        [[name, label(name), split_overrides(seeds_rows[0])[1],
          str(len(seeds_rows)), mean_std(numbers(seeds_rows, "miou")),
          ", ".join(f"{row['seed']}: {float(row['miou']):.2f}" for row in seeds_rows),
          f"{min(numbers(seeds_rows, 'minutes')):.1f}"] for name, seeds_rows in runs.items()])
    differences = paired_differences(runs)
    if differences:
        lines += ["### Paired differences (mIoU, seed by seed)", "",
                  "Over the seeds both runs have; the pooled std is sqrt((s1² + s2²) / 2) of the two runs' std over "
                  "those seeds, the gap the mean difference in pooled stds.", ""]
        lines += table(["pair", "per seed", "mean ± std", "pooled std", "gap (pooled stds)"], differences)
    lines += ["### Scale robustness (mIoU with the input rescaled)", ""] + table(
        ["run", *[f"x{scale}" for scale in SCALES]],
        [[name, *[mean_std(numbers(seeds_rows, f"miou_x{scale}")) for scale in SCALES]]
         for name, seeds_rows in runs.items() if numbers(seeds_rows, "miou_x1.0")])
    gated = {name: seeds_rows for name, seeds_rows in runs.items() if numbers(seeds_rows, "multiscale_cif")}
    if gated:
        lines += ["### Multi-scale inference (scales 1.0 + 0.5 + 2.0)", ""] + table(
            ["run", "single-scale", "average", "CIF gate"],
            [[name, *[mean_std(numbers(seeds_rows, column)) for column in ("miou", "multiscale_avg", "multiscale_cif")]]
             for name, seeds_rows in gated.items()])
        lines += ["### CIF gate on the validation set (`scripts/cif_gate.py`, mean ± std over seeds)", "",
                  "Where the 1x and the v prediction disagree and one is right (contested pixels), how often the gate "
                  "leans to the right one; 50 % is a coin toss. Gate std: the gate's spread over the pixels.", ""]
        lines += table(["run", "v", "mean gate (weight of 1x)", "gate std", "contested pixels (%)",
                        "gate right where contested (%)"],
                       [[name, f"{scale:g}", *[mean_std(numbers(seeds_rows, f"gate_{scale}_{figure}"), digits)
                                               for figure, digits in zip(GATE_FIGURES, (3, 3, 2, 2))]]
                        for name, seeds_rows in gated.items() for scale in GATE_SCALES
                        if numbers(seeds_rows, f"gate_{scale}_mean")])
    curves = fig5_curves(runs)
    if curves:
        epochs = len(next(iter(curves.values())))
        lines += ["### Fig. 5: pseudo-label mIoU on the unlabeled images, per epoch (scalematch, mean over seeds)", ""]
        lines += table(["source", *[f"ep {epoch}" for epoch in range(epochs)]],
                       [[source, *[f"{value:.1f}" for value in means]] for source, means in curves.items()])
    lines += [f"![{os.path.basename(path)}]({os.path.basename(path)})" for path in plots]
    return lines + ([""] if plots else [])


def fig5_curves(runs: dict[str, list[dict[str, str]]]) -> dict[str, list[float]]:
    """Per source, the scalematch run's pseudo-label mIoU per epoch averaged over seeds (epochs every seed has)."""
    curves = {}
    for source in CURVES:
        per_seed = [curve(row, source) for row in runs.get("scalematch", [])]
        if per_seed and all(per_seed):
            epochs = min(len(values) for values in per_seed)
            curves[source] = [statistics.mean(values[epoch] for values in per_seed) for epoch in range(epochs)]
    return curves


def write_report(rows: list[dict[str, str]], args) -> None:
    studies = args.studies or unique(row["study"] for row in rows)
    missing = [study for study in studies if study not in {row["study"] for row in rows}]
    if missing:
        raise SystemExit(f"error: {args.csv} records no run of {', '.join(missing)}")
    lines = ["# ScaleMatch's claims on the synthetic benchmark", "", *([args.note, ""] if args.note else []),
             f"Built from `{args.csv}` alone (`python scripts/study.py --report-only --csv {args.csv}"
             f"{' --studies ' + ' '.join(studies) if args.studies else ''}`). Every run: `bash scripts/train.sh "
             "synthetic SPLIT 0` (`configs/synthetic.yaml`) with the overrides named, on the CPU; mIoU (%) on the "
             "validation images at the end of the budget (the last epoch, not the best), mean ± std over seeds.", ""]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    for study in studies:
        study_rows = [row for row in rows if row["study"] == study]
        lines += study_section(study, study_rows, plot(study, runs_of(study_rows), args.out))
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines).rstrip("\n") + "\n")
    print(f"wrote {args.out}")


def plot(study: str, runs: dict[str, list[dict[str, str]]], out: str) -> list[str]:
    """PNG plots of one study next to the report, when matplotlib is available; returns their paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return []
    prefix = f"{os.path.splitext(out)[0]}_{study}"  # REPORT_STUDY_miou.png, ...
    paths = [f"{prefix}_miou.png", f"{prefix}_scale_robustness.png"]
    finals = {name: numbers(seeds_rows, "miou") for name, seeds_rows in runs.items()}
    figure, axis = plt.subplots(figsize=(6, 0.4 * len(finals) + 1))
    axis.barh(range(len(finals)), [statistics.mean(f) for f in finals.values()],
              xerr=[statistics.stdev(f) if len(f) > 1 else 0 for f in finals.values()], capsize=3)
    axis.set_yticks(range(len(finals)), [f"{label(n)} ({len(f)} seeds)" for n, f in finals.items()], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("mIoU (%), mean and std over seeds")
    axis.set_title(study)
    figure.tight_layout()
    figure.savefig(paths[0], dpi=120)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for name, seeds_rows in runs.items():
        if not numbers(seeds_rows, "miou_x1.0"):
            continue
        axis.plot(SCALES, [statistics.mean(numbers(seeds_rows, f"miou_x{scale}")) for scale in SCALES], marker="o",
                  label=label(name))
    axis.set_xscale("log", base=2)
    axis.set_xticks(SCALES, [f"{scale:g}" for scale in SCALES])
    axis.set_xlabel("input scale")
    axis.set_ylabel("mIoU (%)")
    axis.set_title(study)
    axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(paths[1], dpi=120)
    plt.close(figure)
    curves = fig5_curves(runs)
    if curves:
        paths.append(f"{prefix}_pseudo_label_quality.png")
        figure, axis = plt.subplots(figsize=(5, 3.5))
        for source, means in curves.items():
            axis.plot(range(len(means)), means, marker="o", label=source)
        axis.set_xlabel("epoch")
        axis.set_ylabel("pseudo-label mIoU (%)")
        axis.set_title(f"{study}: scalematch, mean over seeds")
        axis.legend()
        figure.tight_layout()
        figure.savefig(paths[2], dpi=120)
        plt.close(figure)
    return paths


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="the regime's name (e.g. scratch600); required unless --report-only")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", default="1_16")
    parser.add_argument("--exp-dir", default=os.path.join("exp", "study"), help="run directories: EXP_DIR/STUDY/...")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--csv", default=os.path.join("docs", "study_runs.csv"), help="the record of finished runs")
    parser.add_argument("--out", default=os.path.join("docs", "study.md"), help="the report; plots go next to it")
    parser.add_argument("--report-only", action="store_true", help="write the report from the CSV, train nothing")
    parser.add_argument("--studies", nargs="+", help="report only these studies (default: every study in the CSV)")
    parser.add_argument("--note", help="a paragraph under the report's title")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if not args.report_only and args.study is None:
        parser.error("--study NAME is required to train (or give --report-only)")
    # The name becomes a directory and part of the plots' file names.
    if args.study is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.study):
        parser.error(f"--study {args.study!r}: use letters, digits, '_', '.' and '-' only")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.report_only:
        run_study(args)
    rows = read_rows(args.csv)
    if not rows:
        raise SystemExit(f"error: {args.csv} records no run yet")
    write_report(rows, args)


if __name__ == "__main__":
    main()
