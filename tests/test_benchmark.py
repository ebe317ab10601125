"""scripts/benchmark.py runs end to end at --quick sizes and prints its tables (no timing is asserted); its GPU-only
memory table from given measurements."""
import contextlib
import io
import os
import random
import re
import sys

import pytest
import torch

from conftest import REPO, run

sys.path.insert(0, os.path.join(REPO, "scripts"))
import benchmark  # noqa: E402


# The script, given sections it does not have, in a real interpreter: started with the session (conftest).
SESSION_RUNS = {"test_bad_sections_are_refused_in_one_line": lambda folder, tiny_voc: run(
    [sys.executable, "scripts/benchmark.py", "--sections", "1,7"], check=False)}


@pytest.fixture(scope="module")
def report():
    """What ``python scripts/benchmark.py --quick --threads 1`` prints: its main run in this process (an interpreter's
    start spared). The torch threads it sets and the random generators it seeds are restored after."""
    threads, python_random = torch.get_num_threads(), random.getstate()
    out = io.StringIO()
    try:
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(out):
            benchmark.main(["--quick", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
        random.setstate(python_random)
    return out.getvalue()


def sections(text: str) -> dict[int, str]:
    parts = re.split(r"^## (\d)\. ", text, flags=re.MULTILINE)
    return {int(number): body for number, body in zip(parts[1::2], parts[2::2])}


def table_rows(body: str) -> list[list[str]]:
    """Cells of the body rows of the first Markdown table in ``body``."""
    lines = [line for line in body.splitlines() if line.startswith("|")]
    assert len(lines) >= 3 and set(lines[1].replace("|", "").split()) == {"---"}, body
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_every_section_prints_a_table(report):
    assert report.startswith("# scalematch benchmarks")
    assert "`python scripts/benchmark.py --quick --threads 1`" in report
    found = sections(report)
    assert sorted(found) == [1, 2, 3, 4, 5, 6]
    for number, body in found.items():
        rows = table_rows(body)
        assert rows and all(len(row) == len(rows[0]) for row in rows), (number, rows)


def test_step_table_reports_every_setting_and_the_pixel_prediction(report):
    rows = {row[0]: row for row in table_rows(sections(report)[1])}
    assert {"supervised", "FixMatch", "ScaleMatch v=0.5", "ScaleMatch v=2"} <= set(rows)
    # FLOPs are counted, not timed: the v = 2 branch processes 16x the pixels of the v = 0.5 branch.
    assert float(rows["ScaleMatch v=2"][7]) > float(rows["ScaleMatch v=0.5"][7]) > float(rows["FixMatch"][7])
    # Pixel model: FixMatch does 10/3 + 2 d trained passes (d: the decoder's FLOP share), v adds 2 v^2.
    share = float(re.search(r"perturbed decoder 2 x ([0-9.]+)", sections(report)[1]).group(1))
    fixmatch = 10 / 3 + 2 * share
    assert float(rows["ScaleMatch v=2"][5]) == pytest.approx((fixmatch + 8) / fixmatch, abs=0.01)


def test_multi_resolution_input_saves_more_activations_than_isvc(report):
    rows = {row[0]: row for row in table_rows(sections(report)[2])}
    group = rows["0.5 + 2"]
    isvc_saved, mri_saved, largest_saved = (float(cell) for cell in group[2:5])
    assert isvc_saved == largest_saved
    assert mri_saved > isvc_saved > float(rows["baseline (FixMatch)"][2])


def test_bad_sections_are_refused_in_one_line(session_run):
    """Through a real interpreter: the exit status a shell sees."""
    result = session_run
    assert result.returncode == 2
    assert "--sections '1,7': expected numbers from 1 to 6" in result.stderr


def test_peak_per_gpu_adds_what_a_process_holds_to_the_peak_of_its_step():
    setup = benchmark.Setup(device=torch.device("cpu"), backbone="resnet101", crop=513, batch=2, steps=1, warmup=1,
                            quick=False, nclass=21)
    gib = benchmark.GIB
    # (saved activations, step peak above what is held, held between steps, reserved), as measure_memory returns.
    text = benchmark.gpu_peak_table(setup, (0, 2 * gib, gib, 4 * gib),
                                    {0.5: (0, 3 * gib, gib, 5 * gib), 2.0: (0, 12 * gib, gib, 14 * gib)})
    rows = {row[0]: row[1:] for row in table_rows(text)}
    assert rows == {"FixMatch (baseline)": ["1.00", "2.00", "3.00", "4.00"],
                    "ScaleMatch v=0.5": ["1.00", "3.00", "4.00", "5.00"],
                    "ScaleMatch v=2": ["1.00", "12.00", "13.00", "14.00"]}
    assert "Target: at most 12 GiB per GPU at every v (the paper reports 15.5 GB): largest 13.00 GiB **not met**." \
        in text
    out_of_memory = benchmark.gpu_peak_table(setup, (0, 2 * gib, gib, 4 * gib), {2.0: None})
    assert "| ScaleMatch v=2 | OOM | OOM | OOM | OOM |" in out_of_memory
    assert "largest n/a (out of memory)" in out_of_memory
