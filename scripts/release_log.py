"""Read the authors' training logs (the release's train_logs/): a run's settings as this codebase's overrides and
train.sh command, its curves as CSV, and where its best mIoU is.

    python scripts/release_log.py LOG [LOG ...]                # the logs of one run (resumed parts are joined)
    python scripts/release_log.py LOG [LOG ...] --csv losses   # iteration, s/iter, every loss term, mask ratio
    python scripts/release_log.py LOG [LOG ...] --csv eval     # per-epoch mIoU and per-class IoU
    python scripts/release_log.py --survey RELEASE/train_logs  # one Markdown row per folder (a folder is a run)
    python scripts/release_log.py --survey RELEASE/train_logs --json  # per folder: settings here, GPUs, best

Exit status: 0 done, 2 a log that cannot be read or logs that are not one run.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from util.config import ConfigError, load_config  # noqa: E402
from util.release_log import (ReleaseLogError, ReleaseRun, eval_mode_of, eval_rows, join_run, loss_rows,  # noqa: E402
                              map_settings, override_text, read_release_log, train_command)

REPO = Path(__file__).resolve().parent.parent


def read_run(paths: list) -> ReleaseRun:
    return join_run([read_release_log(path) for path in paths])


def _epoch_span(epochs: list[int]) -> str:
    return f"{epochs[0]}-{epochs[-1]}" if epochs else "none"


def fp_loss_names(run: ReleaseRun) -> list[str]:
    """The names the logs give the feature-branch loss (`Loss w_fp` before FSVC's rename, `Loss w_fp_scale` after)."""
    names = []
    for part in run.parts:
        text = Path(part.path).read_text(encoding="utf-8", errors="replace")
        for name in ("Loss w_fp_scale", "Loss w_fp:"):
            if name in text and name.rstrip(":") not in names:
                names.append(name.rstrip(":"))
    return names


def config_check(mapping) -> str:
    """Whether this codebase's configs/DATASET.yaml takes the overrides (every key known and in range)."""
    config = REPO / "configs" / f"{mapping.dataset}.yaml"
    if not config.exists():
        return f"not checked: no configs/{mapping.dataset}.yaml"
    overrides = [override_text(key, value) for key, value in mapping.overrides.items()]
    if mapping.split is not None:
        overrides.append(f"split={mapping.split}")
    try:
        load_config(config, overrides)
    except ConfigError as error:
        return f"refused: {error}"
    return f"valid with configs/{mapping.dataset}.yaml"


def timing(run: ReleaseRun) -> str:
    figures = run.seconds_per_iteration()
    if not figures:
        return "no timed Iters lines"
    parts = [f"{name}: {seconds:.3f} s/iter x {per_epoch:.0f} iterations/epoch" for name, seconds, per_epoch in figures]
    hours = run.wall_clock_hours()
    return "; ".join(parts) + f"; {run.epochs} epochs: {hours:.1f} h of training steps"


def part_best(run: ReleaseRun, log: str) -> float:
    return max((e.miou for e in run.evals if e.log == log and e.miou is not None), default=float("nan"))


def summary(run: ReleaseRun) -> str:
    mapping = map_settings(run.settings, eval_mode_of(run))
    spans = run.epochs_by_part()
    lines = [f"run of {len(run.parts)} log(s): "
             + ", ".join(f"{p.path} (epochs {_epoch_span(spans.get(p.name, []))}"
                         + (f", resumed from the epoch {p.resumed_from} checkpoint" if p.resumed_from is not None
                            else "") + ")" for p in run.parts)]
    best = run.best()
    if best is None:
        lines.append("best mIoU: no evaluation in the logs")
    else:
        per_log = ", ".join(f"{p.name} {part_best(run, p.name):.2f}" for p in run.parts)
        lines.append(f"best mIoU {best.miou:.2f} at epoch {best.epoch}, in {best.log} (per log: {per_log})")
    lines.append(f"GPUs: {mapping.gpus}; FP loss named {' / '.join(fp_loss_names(run)) or 'nowhere'}")
    lines.append(f"timing: {timing(run)}")
    for note in run.differing_settings():
        lines.append(f"changes between parts: {note}")
    lines.append("settings as this codebase's overrides:")
    lines.append(f"  dataset={mapping.dataset}")
    lines.append(f"  split={mapping.split}")
    lines += [f"  {override_text(key, value)}" for key, value in mapping.overrides.items()]
    if mapping.unrecorded:
        lines.append("not recorded by the log (this codebase's defaults apply; the release code of the log's day is "
                     "not shipped): " + ", ".join(mapping.unrecorded))
    if mapping.unmapped:
        lines.append("no key here for: " + ", ".join(f"{key}={value}" for key, value in mapping.unmapped.items()))
    lines += [f"note: {note}" for note in mapping.notes]
    lines.append(f"config check: {config_check(mapping)}")
    lines.append(f"command: {train_command(mapping)}")
    dropped = [f"{p.name} {d}" for p in run.parts for d in p.dropped]
    if dropped:
        more = " ..." if len(dropped) > 3 else ""
        lines.append(f"left out {len(dropped)} line(s): " + "; ".join(dropped[:3]) + more)
    return "\n".join(lines)


def _scales(values) -> str:
    return "-" if values is None else "[" + ", ".join(f"{v:g}" for v in values) + "]"


SURVEY_COLUMNS = ["run folder", "logs", "split", "GPUs", "lr", "warm_up", "img_scales", "t if v>1 / v<1", "FP loss",
                  "epochs logged", "best mIoU (epoch, log)", "s/iter", "iters/epoch", "training h", "lines left out"]


def survey_row(folder: str, run: ReleaseRun) -> list[str]:
    settings, mapping = run.settings, map_settings(run.settings, eval_mode_of(run))
    best = run.best()
    figures = run.seconds_per_iteration()
    gpus = "/".join(str(p.settings.get("ngpus")) for p in run.parts)
    gpus = gpus if len(set(gpus.split("/"))) > 1 else str(mapping.gpus)
    logged = sorted({e for epochs in run.epochs_by_part().values() for e in epochs})
    hours = run.wall_clock_hours()
    return [folder, str(len(run.parts)), str(mapping.split), gpus, f"{settings.get('lr')}",
            str(settings.get("warm_up", "-")), _scales(settings.get("img_scales")),
            f"{_scales(settings.get('feat_s_scales'))} / {_scales(settings.get('feat_l_scales'))}",
            " / ".join(n.replace("Loss ", "") for n in fp_loss_names(run)),
            f"{_epoch_span(logged)} of {run.epochs}",
            "-" if best is None else f"{best.miou:.2f} ({best.epoch}, {best.log})",
            "/".join(f"{s:.3f}" for _, s, _ in figures) or "-",
            "/".join(f"{n:.0f}" for _, _, n in figures) or "-",
            "-" if hours is None else f"{hours:.1f}",
            str(sum(len(p.dropped) for p in run.parts))]


def survey_runs(root: Path) -> dict[str, ReleaseRun]:
    """The run of every folder of .log files under `root`, by the folder's path relative to it."""
    folders = sorted({path.parent for path in root.rglob("*.log")})
    if not folders:
        raise ReleaseLogError(f"{root}: no .log files under it")
    return {folder.relative_to(root).as_posix(): read_run(sorted(folder.glob("*.log"))) for folder in folders}


def survey(root: Path) -> str:
    lines = ["| " + " | ".join(SURVEY_COLUMNS) + " |", "|" + " --- |" * len(SURVEY_COLUMNS)]
    for folder, run in survey_runs(root).items():
        lines.append("| " + " | ".join(survey_row(folder, run)) + " |")
    return "\n".join(lines)


def survey_settings(root: Path) -> dict:
    """Per folder: this codebase's settings for its run, the GPUs, and where its best mIoU is."""
    settings = {}
    for folder, run in survey_runs(root).items():
        mapping, best = map_settings(run.settings, eval_mode_of(run)), run.best()
        settings[folder] = {"dataset": mapping.dataset, "split": mapping.split, "gpus": mapping.gpus,
                            "overrides": mapping.overrides, "unrecorded": mapping.unrecorded}
        if best is not None:
            settings[folder].update(best=best.miou, best_epoch=best.epoch, best_log=best.log)
    return settings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="*", help="the log(s) of one run; the parts of a resumed run in any order")
    parser.add_argument("--csv", choices=("losses", "eval"), help="print the loss curves or the evaluations as CSV")
    parser.add_argument("--survey", metavar="DIR", help="one Markdown row per folder of .log files under DIR")
    parser.add_argument("--json", action="store_true", help="with --survey: JSON instead of Markdown")
    args = parser.parse_args(argv)
    if bool(args.logs) == bool(args.survey):
        parser.error("give either LOG ... or --survey DIR")
    try:
        if args.survey:
            root = Path(args.survey)
            print(json.dumps(survey_settings(root), indent=1) if args.json else survey(root))
            return 0
        run = read_run(args.logs)
        if args.csv:
            columns, rows = (loss_rows if args.csv == "losses" else eval_rows)(run)
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(columns)
            writer.writerows(rows)
        else:
            print(summary(run))
    except ReleaseLogError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
