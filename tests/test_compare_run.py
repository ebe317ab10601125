"""scripts/compare_run.py: a run's train.log against a release log, on a fabricated log and synthetic runs that
follow it, part from it, or are still training; and end to end on a real (tiny) run started with a config file."""
import math
import pprint
import shutil
import sys
from pathlib import Path

import yaml

from conftest import REPO, TINY, run

sys.path.insert(0, str(Path(REPO) / "scripts"))
from compare_run import main  # noqa: E402

from util.train_log import read_train_log  # noqa: E402

EPOCHS, STEP, LOG_ITERS = 4, 5, 20  # release: logs every 5 of ~43.5 iterations an epoch; run: 20 iterations an epoch
RELEASE_NAMES = {"total": "Total loss", "x": "Loss x", "u_s": "Loss u_s", "u_scale": "Loss u_scale",
                 "w_fp": "Loss w_fp_scale", "mask_ratio": "Mask ratio"}
RUN_NAMES = {"x": "supervised", "u_s": "strong", "u_scale": "isvc", "w_fp": "fp", "mask_ratio": "mask_ratio",
             "total": "total"}


def curve(term: str, fraction: float, wiggle: int = 0, amplitude: float = 0.004) -> float:
    """The fabricated training curve of one term, with a small deterministic wiggle (the log's noise)."""
    base = {"x": 0.5, "u_s": 0.1, "u_scale": 0.08, "w_fp": 0.03, "mask_ratio": 0.0}[term] if term != "total" else 0
    noise = amplitude * math.sin(7 * wiggle + len(term))
    if term == "mask_ratio":
        return 0.6 + 0.3 * fraction + noise
    if term == "total":
        return (curve("x", fraction) + 0.25 * curve("u_s", fraction) + 0.25 * curve("u_scale", fraction)
                + 0.5 * curve("w_fp", fraction)) / 2 + noise
    return base * (1.2 - fraction) + noise


def write_release_log(path: Path) -> None:
    settings = {"dataset": "pascal", "epochs": EPOCHS, "ngpus": 4, "lr": 0.001,
                "labeled_id_path": "splits/pascal/92/labeled.txt",
                "unlabeled_id_path": "splits/pascal/92/unlabeled.txt"}
    lines = ["[2024-07-20 10:00:00,000][    INFO] " + pprint.pformat(settings), ""]
    per_epoch = 8 * STEP + 3.5
    for epoch in range(EPOCHS):
        lines.append(f"[2024-07-20 10:{epoch:02d}:00,000][    INFO] ===========> Epoch: {epoch}, LR: 0.00100, "
                     "Previous best: 0.00, ETA: 0.00M")
        for k in range(9):
            fraction = (epoch + (k * STEP + 1) / per_epoch) / EPOCHS
            fields = ", ".join(f"{RELEASE_NAMES[t]}: {curve(t, fraction, k):.3f}" for t in RELEASE_NAMES)
            lines.append(f"[2024-07-20 10:{epoch:02d}:{k + 1:02d},000][    INFO] Iters: {k * STEP}, iter time: 0.600, "
                         + fields)
        lines.append(f"[2024-07-20 10:{epoch:02d}:30,000][    INFO] ***** Evaluation ***** >>>> Class [0 background] "
                     "IoU: 90.00")
        lines.append(f"[2024-07-20 10:{epoch:02d}:30,000][    INFO] ***** Evaluation original ***** >>>> MeanIoU: "
                     f"{60 + 4 * epoch + 0.3 * (-1) ** epoch:.2f}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def write_run_log(path: Path, parted_from: float | None = None, until: float = 1.0, cut_last: bool = False,
                  miou_drop: float = 0.0) -> None:
    """This codebase's train.log of a run that follows the fabricated curves; from fraction `parted_from` on its
    strong-view loss is doubled and its mIoU lower by `miou_drop`."""
    total = EPOCHS * LOG_ITERS
    lines = ["2026-12-06 09:00:00 INFO run x | 1 process(es) on cpu | ...",
             f"2026-12-06 09:00:01 INFO model resnet101 DeepLabV3+ + CIF (59.6M parameters), amp None, "
             f"{LOG_ITERS} iterations x {EPOCHS} epochs"]
    for iteration in range(1, int(until * total) + 1):
        epoch, fraction = (iteration - 1) // LOG_ITERS, iteration / total
        values = {t: curve(t, fraction, iteration, amplitude=0.001) for t in RUN_NAMES}
        if parted_from is not None and fraction > parted_from:
            values["u_s"] *= 2
        lines.append(f"2026-12-06 09:{iteration // 60:02d}:{iteration % 60:02d} INFO epoch {epoch} iter "
                     f"{iteration}/{total} lr 1.00e-03 "
                     + " ".join(f"{RUN_NAMES[t]} {values[t]:.4f}" for t in ("x", "u_s", "u_scale", "w_fp",
                                                                             "mask_ratio", "total")))
        if iteration % LOG_ITERS == 0:
            miou = 60 + 4 * epoch - (miou_drop if parted_from is not None and fraction > parted_from else 0)
            lines += [f"2026-12-06 09:30:00 INFO epoch {epoch} validation (original)", "class         IoU (%)",
                      "background      90.00", "dining table    40.00", "tv/monitor        n/a",
                      f"mIoU            {miou:.2f}", f"best mIoU so far {miou:.2f}"]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text[:-25] if cut_last else text)


def test_the_run_log_reader_maps_this_codebases_names_to_the_releases(tmp_path):
    write_run_log(tmp_path / "run" / "train.log", until=0.5)
    log = read_train_log(tmp_path / "run")
    assert (log.iters_per_epoch, log.epochs, log.total_iters) == (LOG_ITERS, EPOCHS, 80)
    assert len(log.losses) == 40
    assert set(log.losses[0].terms) == {"x", "u_s", "u_scale", "w_fp", "mask_ratio", "total"}
    assert [e.epoch for e in log.evals] == [0, 1] and log.evals[1].miou == 64.0
    assert log.evals[0].iou == {"background": 90.0, "dining table": 40.0, "tv/monitor": None}
    write_run_log(tmp_path / "run" / "train.log", until=0.3, cut_last=True)
    assert len(read_train_log(tmp_path / "run").losses) == 23  # the 24th line is cut short: still being written


def test_a_resumed_run_keeps_the_redone_steps(tmp_path):
    path = tmp_path / "train.log"
    write_run_log(path, until=0.5)
    first = path.read_text().splitlines()
    redone = [line.replace(" total ", " total 9") for line in first if " iter 25/" in line or " iter 26/" in line]
    path.write_text("\n".join(first + ["2026-12-06 10:00:00 INFO resumed from latest.pth: epoch 1 step 4"]
                              + redone) + "\n")
    log = read_train_log(path)
    assert [r.iteration for r in log.losses][-3:] == [24, 25, 26]
    assert log.losses[-1].terms["total"] > 9 and [e.epoch for e in log.evals] == [0]


def test_a_run_that_follows_the_log(tmp_path, capsys):
    write_release_log(tmp_path / "release.log")
    write_run_log(tmp_path / "run" / "train.log")
    assert main([str(tmp_path / "run"), "--release-log", str(tmp_path / "release.log")]) == 0
    out = capsys.readouterr().out
    assert "| log epoch | fraction | Total | x | u_s | u_scale | w_fp | mask ratio |" in out
    assert not [line for line in out.splitlines() if line.startswith("| ") and "!" in line]
    assert "the run follows the log within 3 x its noise up to fraction 1.000 of training" in out
    assert_png_line(out, tmp_path / "run" / "release_comparison.png")


def test_a_run_that_parts_from_the_log_is_told_where(tmp_path, capsys):
    write_release_log(tmp_path / "release.log")
    write_run_log(tmp_path / "run" / "train.log", parted_from=0.5, miou_drop=5.0)
    png = tmp_path / "out.png"
    assert main([str(tmp_path / "run" / "train.log"), "--release-log", str(tmp_path / "release.log"),
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "u_s parts from the log in 2 of 4 windows, first at fraction 0.500 (log epoch 2)" in out
    assert "mIoU parts from the log at 2 of 4 validations, first at run epoch 2 (fraction 0.750)" in out
    for quiet in ("x parts", "u_scale parts", "w_fp parts", "mask ratio parts"):
        assert quiet not in out
    rows = [line for line in out.splitlines() if line.startswith("| 0 |") or line.startswith("| 3 |")]
    assert "!" not in rows[0] and "!" in rows[1]
    assert_png_line(out, png)


def test_a_run_still_training_is_compared_as_far_as_it_got(tmp_path, capsys):
    write_release_log(tmp_path / "release.log")
    write_run_log(tmp_path / "run" / "train.log", until=0.3, cut_last=True)
    assert main([str(tmp_path / "run"), "--release-log", str(tmp_path / "release.log"), "--no-png"]) == 0
    out = capsys.readouterr().out
    assert "step 23 of 80 (fraction 0.287), 1 validation(s)" in out
    assert "| 1 | 0.250-0.500 |" in out and "| 2 |" not in out
    assert "up to fraction 0.500" in out and "PNG" not in out


def test_bad_input_is_one_line(tmp_path, capsys):
    write_release_log(tmp_path / "release.log")
    assert main([str(tmp_path / "nowhere"), "--release-log", str(tmp_path / "release.log")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read the run's log" in err
    (tmp_path / "empty.log").write_text("2026-12-06 09:00:00 INFO run x\n")
    assert main([str(tmp_path / "empty.log"), "--release-log", str(tmp_path / "release.log")]) == 2
    assert "no loss line" in capsys.readouterr().err


def assert_png_line(out: str, png: Path) -> None:
    """The PNG where matplotlib is installed; otherwise one line saying it is skipped (the table is printed anyway)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert out.rstrip().splitlines()[-1].startswith("PNG skipped: matplotlib is not installed")
        assert not png.exists()
    else:
        assert out.rstrip().splitlines()[-1] == f"PNG: {png}" and png.stat().st_size > 1000


def config_file_run_held_against_a_log(folder, tiny_voc):
    """The CompletedProcess of compare_run.py on the run of train.sh with a config file (its split its own)."""
    config = yaml.safe_load((Path(REPO) / "configs" / "synthetic.yaml").read_text())
    # Its split folder: the shipped 1_16, with 4 of the 80 validation images (a validation costs a twentieth).
    shipped, splits = Path(REPO) / "splits" / "synthetic", folder / "splits" / "synthetic"
    shutil.copytree(shipped / "1_16", splits / "1_16")
    (splits / "val.txt").write_text("".join((shipped / "val.txt").read_text().splitlines(keepends=True)[:4]))
    config.update(split="1_16", splits_dir=str(folder / "splits"), exp_dir=str(folder / "exp"), run_name="t",
                  epochs=1)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    run(["bash", "scripts/train.sh", str(path), "0", *TINY])
    run_dir = folder / "exp" / "synthetic" / "1_16" / "t"
    release = Path(REPO) / "tests" / "data" / "release_logs" / "resumed_1_8"
    return run([sys.executable, "scripts/compare_run.py", str(run_dir), "--release-log",
                str(release / "u2pl_1_8(1).log"), str(release / "u2pl_1_8(2).log"), "--no-png"])


SESSION_RUNS = {"test_end_to_end_a_config_file_run_held_against_a_log": config_file_run_held_against_a_log}


def test_end_to_end_a_config_file_run_held_against_a_log(session_run):
    """train.sh with a config file writes a real train.log that compare_run reads."""
    result = session_run
    assert "step 2 of 2 (fraction 1.000), 1 validation(s)" in result.stdout
    # Iterations 1 and 2 of 2 fall in the log's epochs 1 and 3 of 4; every term of this codebase's log is read.
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert len(rows) == 2 and all(line.count(" / ") == 6 for line in rows)
    assert "| 0 | 1.000 |" in result.stdout  # the run's one validation, at the end of its training
