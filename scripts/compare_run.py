"""Hold a run (finished or still training) against the release log it should follow: its loss terms and mask ratio
per iteration and its mIoU per epoch against the log's, at equal fractions of training, in a table and on one PNG.

    python scripts/compare_run.py RUN_DIR --release-log LOG [LOG ...] [--tolerance 3] [--png PATH | --no-png]

The run's train.log names the terms as this codebase does (supervised, strong, isvc, fp, mask_ratio, total); they are
read as the release's (x, u_s, u_scale, w_fp, mask ratio, total). Both logs write running means since the epoch
began. The log's own noise: the scatter of the log's values about a straight line fitted to them (the residual
standard deviation, so a trend is not counted as noise), for the loss terms over one epoch of the log (its ~9
logged points; at least 0.001, the log's rounding), for mIoU over its 5 evaluations nearest in fraction. A term
parts from the log where |run - log| > tolerance x noise: for the loss terms, the run's mean over an epoch-long
window of the log against the mean of the log's curve interpolated at the same fractions; for mIoU, each
validation against the log's mIoU interpolated at its fraction.

Exit status: 0 done (parting is reported, not an error), 2 a log that cannot be read or no overlap yet.
"""
import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from util.release_log import (TERMS, ReleaseLogError, ReleaseRun, join_run, read_release_log,  # noqa: E402
                              release_curve)
from util.train_log import RunLog, TrainLogError, read_train_log, train_log_path  # noqa: E402

LABELS = {"total": "Total", "x": "x", "u_s": "u_s", "u_scale": "u_scale", "w_fp": "w_fp", "mask_ratio": "mask ratio"}
NOISE_FLOOR = 0.001  # the release logs losses with 3 decimals
MIOU_WINDOW = 5


@dataclass
class Cell:
    run: float
    log: float
    noise: float
    parts: bool


@dataclass
class LossRow:
    window: int  # epoch of the log whose share of training this row covers
    start: float
    end: float
    cells: dict  # term -> Cell


@dataclass
class MiouRow:
    epoch: int
    fraction: float
    cell: Cell


def _noise(points: list[tuple[float, float]], floor: float) -> float:
    """The scatter of (fraction, value) points about their straight-line fit (a trend is not noise), at least floor."""
    count = len(points)
    if count < 3:
        return floor
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
    residual = sum((y - mean_y - slope * (x - mean_x)) ** 2 for x, y in points)
    return max(math.sqrt(residual / (count - 2)), floor)


def loss_rows(run: RunLog, release: ReleaseRun, tolerance: float) -> list[LossRow]:
    """One row per epoch-long window of the log's training that the run has logged steps in: the run's mean there
    against the mean of the log's curve interpolated at the same fractions."""
    epochs = release.epochs
    curves = {term: release_curve(release, term) for term in TERMS}
    run_points: dict[int, dict[str, list[tuple[float, float]]]] = {}
    for record in run.losses:
        window = min(int(record.fraction * epochs - 1e-9), epochs - 1)
        for term, value in record.terms.items():
            if term in curves and math.isfinite(value):
                run_points.setdefault(window, {}).setdefault(term, []).append((record.fraction, value))
    rows = []
    for window in sorted(run_points):
        start, end = window / epochs, (window + 1) / epochs
        cells = {}
        for term, points in run_points[window].items():
            logged = [(x, y) for x, y in curves[term] if start < x <= end]
            if not logged:
                continue
            run_mean = statistics.fmean(value for _, value in points)
            log_mean = statistics.fmean(_interpolate(curves[term], fraction) for fraction, _ in points)
            noise = _noise(logged, NOISE_FLOOR)
            cells[term] = Cell(run_mean, log_mean, noise, abs(run_mean - log_mean) > tolerance * noise)
        if cells:
            rows.append(LossRow(window, start, end, cells))
    return rows


def miou_rows(run: RunLog, release: ReleaseRun, tolerance: float) -> list[MiouRow]:
    """One row per validation of the run, against the log's mIoU interpolated at the same fraction of training."""
    curve = sorted(((e.epoch + 1) / release.epochs, e.miou) for e in release.evals if e.miou is not None)
    if len(curve) < 2:
        return []
    rows = []
    for record in run.evals:
        fraction = run.eval_fraction(record)
        if fraction is None or record.miou is None or fraction < curve[0][0]:
            continue
        log_value = _interpolate(curve, fraction)
        nearest = sorted(curve, key=lambda point: abs(point[0] - fraction))[:MIOU_WINDOW]
        noise = _noise(nearest, 0.01)
        rows.append(MiouRow(record.epoch, fraction, Cell(record.miou, log_value, noise,
                                                         abs(record.miou - log_value) > tolerance * noise)))
    return rows


def _interpolate(curve: list[tuple[float, float]], x: float) -> float:
    if x >= curve[-1][0]:
        return curve[-1][1]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[0][1]


def _cell(cell: Cell | None, digits: int) -> str:
    if cell is None:
        return "-"
    return f"{cell.run:.{digits}f} / {cell.log:.{digits}f}±{cell.noise:.{digits}f}{' !' if cell.parts else ''}"


def report(run: RunLog, release: ReleaseRun, losses: list[LossRow], mious: list[MiouRow], tolerance: float) -> str:
    done = run.losses[-1].fraction if run.losses else 0.0
    best = release.best()
    lines = [f"run {run.path}: step {run.losses[-1].iteration if run.losses else 0} of {run.total_iters} "
             f"(fraction {done:.3f}), {len(run.evals)} validation(s)",
             f"log: {', '.join(p.name for p in release.parts)}, {release.epochs} epochs"
             + (f", best mIoU {best.miou:.2f} at epoch {best.epoch}" if best else ""),
             f"cells: run / log ± the log's noise; ! where they part by more than {tolerance:g} x noise", "",
             "| log epoch | fraction | " + " | ".join(LABELS[t] for t in TERMS) + " |",
             "|" + " --- |" * (len(TERMS) + 2)]
    for row in losses:
        lines.append(f"| {row.window} | {row.start:.3f}-{row.end:.3f} | "
                     + " | ".join(_cell(row.cells.get(term), 3) for term in TERMS) + " |")
    if mious:
        lines += ["", "| run epoch | fraction | mIoU run / log±noise |", "| --- | --- | --- |"]
        lines += [f"| {row.epoch} | {row.fraction:.3f} | {_cell(row.cell, 2)} |" for row in mious]
    lines += [""] + verdict(losses, mious, tolerance)
    return "\n".join(lines)


def verdict(losses: list[LossRow], mious: list[MiouRow], tolerance: float) -> list[str]:
    """Where the run parts from the log, term by term, or that it follows it."""
    found = []
    for term in TERMS:
        parted = [row for row in losses if term in row.cells and row.cells[term].parts]
        if parted:
            first = parted[0].cells[term]
            found.append(f"{LABELS[term]} parts from the log in {len(parted)} of "
                         f"{sum(term in row.cells for row in losses)} windows, first at fraction "
                         f"{parted[0].start:.3f} (log epoch {parted[0].window}): run {first.run:.3f} vs log "
                         f"{first.log:.3f} ± {first.noise:.3f}")
    parted = [row for row in mious if row.cell.parts]
    if parted:
        first = parted[0]
        found.append(f"mIoU parts from the log at {len(parted)} of {len(mious)} validations, first at run epoch "
                     f"{first.epoch} (fraction {first.fraction:.3f}): run {first.cell.run:.2f} vs log "
                     f"{first.cell.log:.2f} ± {first.cell.noise:.2f}")
    if found:
        return found
    span = max([row.end for row in losses] + [row.fraction for row in mious], default=0.0)
    return [f"the run follows the log within {tolerance:g} x its noise up to fraction {span:.3f} of training"]


def plot(path: Path, run: RunLog, release: ReleaseRun, losses: list[LossRow], mious: list[MiouRow]) -> str:
    """Write the PNG; returns the line to print (the PNG, or why it is skipped)."""
    try:
        import matplotlib
    except ImportError:
        return "PNG skipped: matplotlib is not installed (pip install matplotlib); the table above has the figures"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 4, figsize=(18, 8))
    for axis, term in zip(axes.flat, TERMS):
        log_points = [(release.fraction(r), r.terms[term]) for r in release.losses
                      if term in r.terms and release.fraction(r) is not None]
        if log_points:
            axis.plot(*zip(*log_points), color="0.6", linewidth=0.8, label="log")
        run_points = [(r.fraction, r.terms[term]) for r in run.losses if term in r.terms]
        if run_points:
            axis.plot(*zip(*run_points), color="tab:blue", linewidth=0.8, label="run")
        rows = [row for row in losses if term in row.cells]
        for row in rows:
            cell = row.cells[term]
            axis.fill_between([row.start, row.end], cell.log - cell.noise, cell.log + cell.noise, color="0.85")
            if cell.parts:
                axis.plot([(row.start + row.end) / 2], [cell.run], "o", color="tab:red", markersize=4)
        axis.set_title(LABELS[term])
        axis.set_xlabel("fraction of training")
    axis = axes.flat[len(TERMS)]
    curve = [((e.epoch + 1) / release.epochs, e.miou) for e in release.evals if e.miou is not None]
    if curve:
        axis.plot(*zip(*curve), color="0.6", label="log")
    if mious:
        axis.plot([r.fraction for r in mious], [r.cell.run for r in mious], "o-", color="tab:blue", label="run")
        parted = [r for r in mious if r.cell.parts]
        if parted:
            axis.plot([r.fraction for r in parted], [r.cell.run for r in parted], "o", color="tab:red")
    axis.set_title("mIoU (%)")
    axis.set_xlabel("fraction of training")
    axis.legend()
    for unused in list(axes.flat)[len(TERMS) + 1:]:
        unused.axis("off")
    figure.suptitle(f"{run.path} against {', '.join(p.name for p in release.parts)} (red: parts beyond the noise)")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return f"PNG: {path}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the run directory (or its train.log)")
    parser.add_argument("--release-log", nargs="+", required=True, metavar="LOG",
                        help="the release log(s) of the run to follow; the parts of a resumed run in any order")
    # 3: a mean of a few run points against the log's interpolated curve scatters by ~0.8 x noise; 2 would flag
    # about one window-term in a hundred on a run that follows the log.
    parser.add_argument("--tolerance", type=float, default=3.0, help="parting threshold in units of the log's noise")
    parser.add_argument("--png", help="where to write the plot (default: RUN_DIR/release_comparison.png)")
    parser.add_argument("--no-png", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if not args.tolerance > 0:
        print(f"error: --tolerance must be > 0, got {args.tolerance}", file=sys.stderr)
        return 2
    try:
        run = read_train_log(args.run)
        release = join_run([read_release_log(path) for path in args.release_log])
    except (TrainLogError, ReleaseLogError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not release.losses or release.parts[0].log_step() is None:
        print(f"error: {release.parts[0].path}: too few Iters lines to place them in training", file=sys.stderr)
        return 2
    losses = loss_rows(run, release, args.tolerance)
    mious = miou_rows(run, release, args.tolerance)
    if not losses and not mious:
        print(f"error: {run.path}: nothing to compare yet (no loss line or validation inside the log's span)",
              file=sys.stderr)
        return 2
    print(report(run, release, losses, mious, args.tolerance))
    if not args.no_png:
        png = Path(args.png) if args.png else train_log_path(args.run).parent / "release_comparison.png"
        print(plot(png, run, release, losses, mious))
    return 0


if __name__ == "__main__":
    sys.exit(main())
