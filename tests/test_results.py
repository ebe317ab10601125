"""util/results.py: a run's results.json, rewritten whole after each epoch and continued by a resumed run."""
import errno
import json
import os

import pytest

from util.results import RESULTS_NAME, RunResults, load_results

CFG = {"dataset": "synthetic", "split": "1_16"}


def test_the_figures_of_a_run_and_a_resumed_run(tmp_path):
    results = RunResults(str(tmp_path), CFG, ["a", "b"], total_iters=8)
    results.add_training(6.0, 4)
    results.add_pseudo_label_miou(0, {"1x": 20.0, "cif": 22.0})
    results.add_evaluation(0, 4, 30.0, [50.0, 10.0])
    saved = load_results(str(tmp_path))
    assert (saved["final_miou"], saved["best_miou"], saved["best_epoch"]) == (30.0, 30.0, 0)
    assert saved["final_iou"] == [50.0, 10.0] and saved["seconds_per_iteration"] == 1.5
    assert saved["finished"] is False and saved["class_names"] == ["a", "b"]

    resumed = RunResults(str(tmp_path), CFG, ["a", "b"], total_iters=8)
    resumed.add_training(2.0, 4)
    resumed.add_pseudo_label_miou(1, {"1x": 25.0})
    resumed.add_evaluation(1, 8, 28.0, [48.0, 8.0])
    resumed.add_evaluation(1, 8, 27.0, [47.0, 7.0])  # an epoch evaluated again: the last one counts
    resumed.finish()
    saved = load_results(str(tmp_path))
    assert [entry["miou"] for entry in saved["evaluations"]] == [30.0, 27.0]
    assert (saved["final_miou"], saved["best_miou"], saved["best_epoch"]) == (27.0, 30.0, 0)
    assert saved["pseudo_label_miou"] == {"1x": {"0": 20.0, "1": 25.0}, "cif": {"0": 22.0}}
    assert saved["seconds_per_iteration"] == 1.0 and saved["trained_iterations"] == 8 and saved["finished"]


def test_no_results_yet_and_a_damaged_file(tmp_path, capsys):
    assert load_results(str(tmp_path)) is None
    (tmp_path / RESULTS_NAME).write_text("{ not json")
    with pytest.raises(ValueError, match=rf"^{tmp_path / RESULTS_NAME}: cannot read it"):
        load_results(str(tmp_path))
    RunResults(str(tmp_path), CFG, ["a"], 1).add_evaluation(0, 1, 5.0, [5.0])
    assert "it starts afresh" in capsys.readouterr().err
    assert json.loads((tmp_path / RESULTS_NAME).read_text())["final_miou"] == 5.0


def test_a_full_disk_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    results = RunResults(str(tmp_path), CFG, ["a"], 1)
    results.add_evaluation(0, 1, 5.0, [5.0])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    results.add_evaluation(1, 2, 6.0, [6.0])
    results.finish()
    assert capsys.readouterr().err.count("warning: ") == 1
    assert load_results(str(tmp_path))["final_miou"] == 5.0  # the last complete file is kept
