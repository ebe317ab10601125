"""scripts/study.py records each finished run as one CSV row and builds its report from the CSV alone; no training
here: where a test reaches the training step, its override (not_a_key=1) makes train.sh fail at once."""
import argparse
import contextlib
import importlib.util
import io
import os
import sys

import pytest
import torch

from conftest import REPO, run

sys.path.insert(0, os.path.join(REPO, "scripts"))
import study  # noqa: E402



def row(name, seed, miou, run_study="s1", overrides="epochs=2", **figures):
    """A CSV row as study.py records it; figures not given stay empty (as for a run without a CIF gate)."""
    own = " ".join(study.RUNS[name][0])
    return {"study": run_study, "run": name, "seed": str(seed), "split": "1_16",
            "overrides": f"{overrides} {own}".strip(), "commit": "abc1234", "date": "2026-12-02T17:41Z",
            "machine": "2 CPUs, x86_64, torch 2.14.1", "minutes": "2.50", "miou": f"{miou:.2f}",
            "miou_x0.5": "20.00", "miou_x1.0": f"{miou:.2f}", "miou_x2.0": "10.00", **figures}


def tables(report, run_study, heading):
    """First cell -> the other cells, for the table under ``### heading`` of ``## Study run_study``."""
    section = report.split(f"## Study {run_study}\n")[1].split("\n## ")[0]
    part = section.split(f"### {heading}")[1].split("\n### ")[0]
    lines = [line for line in part.splitlines() if line.startswith("|")][2:]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {cells_of_row[0]: cells_of_row[1:] for cells_of_row in cells}


def write_study_csv(csv_path):
    """Rows of two studies: s1 with three runs (scalematch with its gate and pseudo-label figures), s2 with one."""
    for seed, miou in enumerate([30.0, 31.0, 29.0]):
        study.append_row(str(csv_path), row("supervised", seed, miou))
    for seed, miou in enumerate([32.0, 31.0, 33.0]):
        study.append_row(str(csv_path), row("fixmatch", seed, miou))
    gate = {"multiscale_avg": "30.00", "gate_0.5_contested": "12.00", "gate_0.5_right": "61.00"}
    # Seed 1 first: the report lists seeds in seed order, not in the CSV's.
    study.append_row(str(csv_path), row("scalematch", 1, 33.0, multiscale_cif="34.00", **gate, **{
        "gate_0.5_mean": "0.7000", "gate_0.5_std": "0.1000", "pseudo_label_1x": "12.00;22.00",
        "pseudo_label_cif": "13.00;23.00"}))
    study.append_row(str(csv_path), row("scalematch", 0, 35.0, multiscale_cif="36.00", **gate, **{
        "gate_0.5_mean": "0.6000", "gate_0.5_std": "0.2000", "pseudo_label_1x": "10.00;20.00;30.00"}))
    study.append_row(str(csv_path), row("fixmatch", 0, 40.0, run_study="s2", overrides="epochs=9"))


def test_report_from_the_csv_alone(tmp_path, capsys):
    """The report study.py's main writes from the CSV alone (in this process: what it computes, not how it exits)."""
    csv_path, out = tmp_path / "runs.csv", tmp_path / "report.md"
    write_study_csv(csv_path)
    study.main(["--report-only", "--csv", str(csv_path), "--out", str(out), "--note", "Runs of commit abc."])
    stdout = capsys.readouterr().out
    report = out.read_text()
    assert report.splitlines()[2] == "Runs of commit abc."
    assert report.index("## Study s1") < report.index("## Study s2")  # the CSV's order
    assert "Overrides of every run: `epochs=2`" in report and "Commits: abc1234." in report

    runs = tables(report, "s1", "Runs")
    assert runs["supervised"] == ["Supervised only", "train_mode=supervised", "3", "30.00 ± 1.00 (3 seeds)",
                                  "0: 30.00, 1: 31.00, 2: 29.00", "2.5"]
    assert runs["fixmatch"][3:5] == ["32.00 ± 1.00 (3 seeds)", "0: 32.00, 1: 31.00, 2: 33.00"]
    assert runs["scalematch"][1:5] == ["", "2", "34.00 ± 1.41 (2 seeds)", "0: 35.00, 1: 33.00"]
    # One run alone: its own overrides (from RUNS) still told apart from the study's.
    assert "Overrides of every run: `epochs=9`" in report
    assert tables(report, "s2", "Runs")["fixmatch"][1:4] == ["isvc=false fsvc=false cif=false", "1", "40.00 (1 seed)"]

    # fixmatch - supervised: 2, 0, 4 (mean 2, std 2); both stds 1, pooled 1, gap 2.
    # Over seeds 0 and 1 only: fixmatch 32, 31 (std 0.707), scalematch 35, 33 (std 1.414), supervised 30, 31
    # (std 0.707); pooled sqrt((2 + 0.5) / 2) = 1.118; scalematch - fixmatch 3, 2: gap 2.5 / 1.118 = 2.24;
    # scalematch - supervised 5, 2: gap 3.5 / 1.118 = 3.13.
    pairs = tables(report, "s1", "Paired differences")
    assert pairs["fixmatch - supervised"] == ["0: +2.00, 1: +0.00, 2: +4.00", "2.00 ± 2.00 (3 seeds)", "1.00", "+2.00"]
    assert pairs["scalematch - fixmatch"] == ["0: +3.00, 1: +2.00", "2.50 ± 0.71 (2 seeds)", "1.12", "+2.24"]
    assert pairs["scalematch - supervised"] == ["0: +5.00, 1: +2.00", "3.50 ± 2.12 (2 seeds)", "1.12", "+3.13"]
    assert "Paired differences" not in report.split("## Study s2")[1]  # one run: no pair

    assert tables(report, "s1", "Scale robustness")["fixmatch"] == [
        "20.00 ± 0.00 (3 seeds)", "32.00 ± 1.00 (3 seeds)", "10.00 ± 0.00 (3 seeds)"]
    assert tables(report, "s1", "Multi-scale")["scalematch"] == [
        "34.00 ± 1.41 (2 seeds)", "30.00 ± 0.00 (2 seeds)", "35.00 ± 1.41 (2 seeds)"]
    assert "fixmatch" not in tables(report, "s1", "Multi-scale")  # no gate: no multi-scale figures
    gate_rows = [line for line in report.split("### CIF gate")[1].split("\n### ")[0].splitlines()
                 if line.startswith("| scalematch | 0.5 |")]
    assert [cell.strip() for cell in gate_rows[0].strip("|").split("|")][2:] == [
        "0.650 ± 0.071 (2 seeds)", "0.150 ± 0.071 (2 seeds)", "12.00 ± 0.00 (2 seeds)", "61.00 ± 0.00 (2 seeds)"]
    # Fig. 5: the epochs both seeds have; 'cif' is missing in seed 0 and 'average' everywhere: left out.
    assert tables(report, "s1", "Fig. 5") == {"1x": ["11.0", "21.0"]}
    if importlib.util.find_spec("matplotlib") is None:
        # The documented fallback; the plots themselves are test_plots_beside_the_report's.
        assert "matplotlib not installed: no plots" in stdout and "![" not in report

    only_s2 = tmp_path / "s2.md"
    study.main(["--report-only", "--csv", str(csv_path), "--out", str(only_s2), "--studies", "s2"])
    assert "## Study s2" in only_s2.read_text() and "## Study s1" not in only_s2.read_text()


def test_plots_beside_the_report(tmp_path):
    pytest.importorskip("matplotlib", reason="scripts/study.py draws its plots with matplotlib, which "
                                             "requirements-dev.txt leaves out (training never needs it)")
    csv_path, out = tmp_path / "runs.csv", tmp_path / "report.md"
    write_study_csv(csv_path)
    run([sys.executable, "scripts/study.py", "--report-only", "--csv", str(csv_path), "--out", str(out)])
    report = out.read_text()
    for name in ("report_s1_miou.png", "report_s1_pseudo_label_quality.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "![report_s1_miou.png](report_s1_miou.png)" in report


def test_append_keeps_earlier_rows_byte_identical(tmp_path):
    csv_path = str(tmp_path / "docs" / "runs.csv")
    study.append_row(csv_path, row("supervised", 0, 30.0))
    first = open(csv_path, "rb").read()
    study.append_row(csv_path, row("fixmatch", 0, 32.0, machine='16 CPUs, "odd", torch 2'))
    second = open(csv_path, "rb").read()
    assert second.startswith(first) and second.count(b"\n") == 2 + 1  # one header, two rows
    assert second.splitlines()[0].decode() == ",".join(study.COLUMNS)
    assert [r["machine"] for r in study.read_rows(csv_path)] == ["2 CPUs, x86_64, torch 2.14.1",
                                                                 '16 CPUs, "odd", torch 2']
    with open(csv_path, "ab") as handle:
        handle.write(b"s1,scalematch")  # a write cut short
    with pytest.raises(SystemExit, match="incomplete"):
        study.read_rows(csv_path)


def test_a_recorded_run_is_not_trained_again(tmp_path, capsys):
    """In this process: had main reached the training, train.sh would have failed on not_a_key=1 (SystemExit)."""
    csv_path, exp_dir = tmp_path / "runs.csv", tmp_path / "exp"
    study.append_row(str(csv_path), row("scalematch", 0, 35.0, overrides="not_a_key=1"))
    before = csv_path.read_bytes()
    study.main(["--study", "s1", "--runs", "scalematch", "--seeds", "0", "--csv", str(csv_path), "--exp-dir",
                str(exp_dir), "--out", str(tmp_path / "report.md"), "not_a_key=1"])
    assert "scalematch seed 0: recorded" in capsys.readouterr().out
    assert csv_path.read_bytes() == before and not exp_dir.exists()


def test_a_run_recorded_by_another_study_process_meanwhile_is_skipped(tmp_path, monkeypatch):
    """Two study processes share one CSV: each checks it before every run, not only at its start."""
    csv_path = tmp_path / "runs.csv"
    trained = []

    def record_run(name, seed, args):
        trained.append(name)
        if name == "fixmatch":  # while it trained, another process recorded the next run
            study.append_row(str(csv_path), row("scalematch", 0, 35.0, overrides="epochs=2"))
        recorded = row(name, seed, 30.0, overrides="epochs=2")
        study.append_row(str(csv_path), recorded)
        return recorded
    monkeypatch.setattr(study, "record_run", record_run)
    args = argparse.Namespace(csv=str(csv_path), study="s1", seeds=[0], runs=["fixmatch", "scalematch"],
                              split="1_16", overrides=["epochs=2"])
    study.run_study(args)
    assert trained == ["fixmatch"]


def test_a_name_recorded_with_other_overrides_is_refused(tmp_path):
    """The recorded key itself through a real interpreter (exit status, one line on stderr); a new seed of another
    run of the same study through main in this process: both would mix two experiments."""
    csv_path, exp_dir = tmp_path / "runs.csv", tmp_path / "exp"
    study.append_row(str(csv_path), row("scalematch", 0, 35.0, overrides="epochs=2"))
    before = csv_path.read_bytes()
    refused = run([sys.executable, "scripts/study.py", "--study", "s1", "--runs", "scalematch", "--seeds", "0",
                   "--csv", str(csv_path), "--exp-dir", str(exp_dir), "not_a_key=1"], check=False)
    assert refused.returncode != 0 and len(refused.stderr.splitlines()) == 1
    errors = [refused.stderr]
    # SystemExit(message): an interpreter prints the message on stderr and exits with status 1.
    with pytest.raises(SystemExit) as other_seed:
        study.main(["--study", "s1", "--runs", "fixmatch", "--seeds", "1", "--csv", str(csv_path), "--exp-dir",
                    str(exp_dir), "not_a_key=1"])
    assert isinstance(other_seed.value.code, str) and len(other_seed.value.code.splitlines()) == 1
    errors.append(other_seed.value.code)
    for error in errors:
        assert error.startswith(f"error: {csv_path} records s1/scalematch seed 0 ")
        assert "'epochs=2'" in error and "'not_a_key=1'" in error
    assert csv_path.read_bytes() == before and not exp_dir.exists()


def test_a_finished_run_directory_is_recorded_without_training(tmp_path, monkeypatch):
    csv_path, exp_dir = tmp_path / "runs.csv", tmp_path / "exp"
    study.append_row(str(csv_path), row("supervised", 0, 30.0, overrides=""))
    before = csv_path.read_bytes()
    run_dir = exp_dir / "s1" / "synthetic" / "1_16" / "scalematch_seed0"
    run_dir.mkdir(parents=True)
    (run_dir / study.MARKER).write_text("3.25")
    real_command_output = study.command_output

    def no_training(command):
        assert "scripts/train.sh" not in command, "a finished run was trained again"
        return real_command_output(command)

    monkeypatch.setattr(study, "command_output", no_training)
    monkeypatch.setattr(study, "evaluate_run", lambda directory: {"miou": "40.00"} if directory == str(run_dir) else {})
    study.main(["--study", "s1", "--runs", "supervised", "scalematch", "--seeds", "0", "--csv", str(csv_path),
                "--exp-dir", str(exp_dir), "--out", str(tmp_path / "report.md")])
    after = csv_path.read_bytes()
    assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 1
    recorded = study.read_rows(str(csv_path))[-1]
    assert (recorded["run"], recorded["seed"], recorded["minutes"], recorded["miou"]) == ("scalematch", "0", "3.25",
                                                                                        "40.00")
    assert recorded["overrides"] == "" and recorded["commit"]


def test_pseudo_label_curves_come_from_results_json_in_epoch_order():
    results = {"pseudo_label_miou": {"1x": {"10": 14.0, "2": 12.0, "0": 10.0}, "cif": {"0": 11.5, "2": 15.0}}}
    assert study.pseudo_label_curves(results) == {"1x": [10.0, 12.0, 14.0], "cif": [11.5, 15.0]}


def eval_main_output(command: list[str]) -> str:
    """study.command_output of ``python eval.py ARGS``, as eval.py's main run in this process (an interpreter's
    start spared; a real interpreter's eval.py is test_eval_cli.py's): its output; an error propagates."""
    import eval as eval_cli

    assert command[:2] == [sys.executable, "eval.py"], command
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        eval_cli.main(command[2:])
    return out.getvalue()


def test_evaluate_run_reads_results_json_and_eval_json(tiny_voc, tmp_path, monkeypatch):
    """A finished run's figure columns, through eval.py's main with the arguments study.py passes, on a tiny untrained
    model. Supervised: it never trains its gate, so eval.py runs once (--scales) and the gate columns stay empty
    (test_cif_gate.py reads scripts/cif_gate.py's real --json output with study.gate_columns)."""
    import yaml

    from model import build_model
    from util.config import validate
    from util.results import RunResults

    data_root, splits_dir = tiny_voc
    cfg = validate({"dataset": "pascal", "data_root": data_root, "splits_dir": splits_dir, "split": "tiny",
                    "nclass": 21, "backbone": "tv_resnet10", "head_channels": 32, "pretrained": None, "cif_channels": 8,
                    "cif_gate_channels": 8, "crop_size": 32}, "test")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert study.trains_gate(str(tmp_path))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(dict(cfg, cif=False)))
    assert not study.trains_gate(str(tmp_path))
    cfg = dict(cfg, train_mode="supervised")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert not study.trains_gate(str(tmp_path))

    with pytest.raises(SystemExit, match="has no results.json"):
        study.evaluate_run(str(tmp_path))
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict(), "config": cfg, "epoch": 1}, tmp_path / "latest.pth")
    monkeypatch.setattr(study, "command_output", eval_main_output)
    results = RunResults(str(tmp_path), cfg, ["c"] * 21, 4)
    results.add_pseudo_label_miou(0, {"1x": 10.0, "cif": 11.0})
    results.add_evaluation(0, 2, 12.0, [12.0] * 21)
    results.add_pseudo_label_miou(1, {"1x": 13.0, "cif": 14.0})
    results.add_evaluation(1, 4, 15.5, [15.5] * 21)
    columns = study.evaluate_run(str(tmp_path))
    assert set(columns) == {"miou", "miou_x0.5", "miou_x1.0", "miou_x2.0", "pseudo_label_1x", "pseudo_label_cif"}
    assert columns["miou"] == "15.50"  # the last epoch's
    assert columns["pseudo_label_1x"] == "10.00;13.00" and columns["pseudo_label_cif"] == "11.00;14.00"
    # Each scale's column is that model's mIoU on inputs rescaled by it, as evaluated in this process.
    from dataset.semi import build_val_dataset
    from eval import load_trained_model
    from util.evaluation import evaluate
    from util.inference import rescaled_predictor

    model, cfg, _ = load_trained_model(str(tmp_path / "latest.pth"), torch.device("cpu"))
    val_set = build_val_dataset(cfg, cfg["splits_dir"])
    for scale in study.SCALES:
        predict = rescaled_predictor(model.predict, scale) if scale != 1.0 else model.predict
        assert columns[f"miou_x{scale}"] == f"{evaluate(predict, val_set, cfg, torch.device('cpu')).miou():.2f}"
