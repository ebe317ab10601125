"""scripts/study.py aggregates finished runs into its report (mean and std over seeds); no training here."""
import json
import sys

from conftest import run


def fake_run(exp_dir, name, seed, final, scales, curves=None, multiscale=None, gate=None):
    """A finished study run: its time marker and its cached evaluation, as study.py leaves them."""
    run_dir = exp_dir / "synthetic" / "1_16" / f"{name}_seed{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "study_minutes.txt").write_text("2.50")
    entry = {"final": final, "minutes": 2.5, "curves": curves or {}, "scales": scales}
    if multiscale:
        entry["multiscale_cif"], entry["multiscale_avg"] = multiscale
    if gate:
        entry["gate"] = gate
    (run_dir / "study_eval.json").write_text(json.dumps(entry))


def rows(report: str, heading: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for the table under ``## heading``."""
    section = report.split(f"## {heading}")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")][2:]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {row[0]: row[1:] for row in cells}


def test_report_averages_seeds_and_skips_unfinished_runs(tmp_path):
    exp_dir = tmp_path / "exp"
    curves = {"1x": [10.0, 20.0], "average": [11.0, 19.0], "cif": [12.0, 21.0]}
    fake_run(exp_dir, "fixmatch", 0, 20.0, [18.0, 20.0, 16.0])
    fake_run(exp_dir, "fixmatch", 1, 24.0, [22.0, 24.0, 18.0])
    gate = {"0.5": {"mean_gate": 0.5, "contested": 12.0, "right": 61.0}}
    fake_run(exp_dir, "scalematch", 0, 30.0, [28.0, 30.0, 26.0], curves, (31.0, 29.0), gate)
    out = tmp_path / "report.md"
    run([sys.executable, "scripts/study.py", "--report-only", "--exp-dir", str(exp_dir), "--seeds", "0", "1",
         "--runs", "fixmatch", "scalematch", "supervised", "--out", str(out), "--note", "Runs of commit abc."])
    report = out.read_text()
    assert report.splitlines()[2] == "Runs of commit abc."
    table4 = rows(report, "Table 4")
    assert table4["FixMatch baseline"][0] == "22.00 ± 2.83 (2 seeds)"
    assert table4["+ ISVC + FSVC + CIF (ScaleMatch)"][0] == "30.00 (1 seed)"
    assert "Supervised only" not in table4  # never trained: left out, not reported as zero
    assert rows(report, "Fig. 1a")["FixMatch baseline"] == ["20.00 ± 2.83 (2 seeds)", "22.00 ± 2.83 (2 seeds)",
                                                             "17.00 ± 1.41 (2 seeds)"]
    assert rows(report, "Multi-scale")["+ ISVC + FSVC + CIF (ScaleMatch)"] == [
        "30.00 (1 seed)", "29.00 (1 seed)", "31.00 (1 seed)"]
    assert rows(report, "Fig. 5")["cif"] == ["12.0", "21.0"]
    assert rows(report, "CIF gate")["+ ISVC + FSVC + CIF (ScaleMatch)"] == [
        "0.5", "0.50 (1 seed)", "12.00 (1 seed)", "61.00 (1 seed)"]
