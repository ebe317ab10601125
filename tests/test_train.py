"""End to end on CPU through the user-facing commands: training and its resume, torchrun, eval.py.

Runs whose assertions are about the run, not about a process, train and evaluate in this process (scalematch.cli,
eval.main): scripts/train.sh's own path to them is run end to end by test_train_script_pascal.py,
test_compare_run.py and the reference runs of conftest.py.
"""
import contextlib
import glob
import io
import os
import re

import pytest
import torch
from PIL import Image

import eval as eval_cli
from conftest import run, train_in_process
from dataset.semi import build_val_dataset
from test_multinode import run_dir_of
from util import evaluation
from util.results import load_results


def trained_here(tiny_voc, exp_dir, *overrides) -> str:
    """What train_in_process's run printed on stdout and stderr; it must exit 0, as train.sh's run had to."""
    printed = io.StringIO()
    # The run's logger writes to the sys.stdout of the moment it is set up: this one.
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = train_in_process(tiny_voc, exp_dir, *overrides)
    assert code == 0, printed.getvalue()
    return printed.getvalue()


@pytest.fixture(scope="module")
def trained_run(tiny_voc, tmp_path_factory):
    """One semi-supervised epoch, then the same run continued to 2 epochs by rerunning it (what each printed)."""
    exp_dir = tmp_path_factory.mktemp("exp")
    first = trained_here(tiny_voc, exp_dir, "epochs=1", "run_name=semi")
    second = trained_here(tiny_voc, exp_dir, "epochs=2", "run_name=semi")
    return exp_dir, os.path.join(exp_dir, "pascal", "tiny", "semi"), first, second


def test_training_writes_run_directory(trained_run):
    _, run_dir, first, _ = trained_run
    for name in ("config.yaml", "train.log", "latest.pth", "best.pth"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    log = open(os.path.join(run_dir, "train.log")).read()
    assert "mIoU" in log and "aeroplane" in log
    assert "4 labeled (repeated to 8), 8 unlabeled, 4 val samples, 21 classes" in log


def test_results_json_holds_every_validation_of_the_run_and_its_resume(trained_run):
    _, run_dir, _, _ = trained_run
    results = load_results(run_dir)
    best = torch.load(os.path.join(run_dir, "best.pth"), map_location="cpu", weights_only=True)
    assert [entry["epoch"] for entry in results["evaluations"]] == [0, 1]
    assert results["best_miou"] == best["miou"] and results["finished"]
    assert results["trained_iterations"] == 4 and results["seconds_per_iteration"] > 0
    assert len(results["final_iou"]) == 21 and set(results["pseudo_label_miou"]) == {"1x", "average", "cif"}


def test_rerun_resumes_from_latest(trained_run):
    _, run_dir, _, second = trained_run
    assert "resumed from" in second
    state = torch.load(os.path.join(run_dir, "latest.pth"), map_location="cpu", weights_only=True)
    assert state["epoch"] == 1
    assert state["iteration"] == 4
    assert state["config"]["epochs"] == 2
    assert set(state) >= {"model", "optimizer", "scaler", "best_miou"}


def test_poly_lr_after_a_step_uses_that_steps_zero_based_index(trained_run):
    """As the release: after step i (0-based) the rate becomes lr * (1 - i / total) ** p, so the first step leaves
    the base rate and the last one does not reach zero."""
    _, run_dir, _, _ = trained_run
    state = torch.load(os.path.join(run_dir, "latest.pth"), map_location="cpu", weights_only=True)
    cfg = state["config"]
    logged = re.findall(r"iter (\d+)/(\d+) lr (\S+)", open(os.path.join(run_dir, "train.log")).read())
    # The first run's 2 steps of 2, then the rerun's steps 3 and 4 of 4.
    assert [(int(i), int(total)) for i, total, _ in logged] == [(1, 2), (2, 2), (3, 4), (4, 4)]
    assert logged[0][2] == f"{cfg['lr']:.2e}"  # after the first step: still the base rate
    for index, total, lr in logged:
        expected = cfg["lr"] * (1 - (int(index) - 1) / int(total)) ** cfg["poly_power"]
        assert float(lr) == pytest.approx(expected, rel=1e-2), (index, total, lr)
    # The optimizer's groups hold the rate of the step after the last: index 3 of 4, times each group's scale.
    expected = cfg["lr"] * (1 - 3 / 4) ** cfg["poly_power"]
    groups = state["optimizer"]["param_groups"]
    assert [group["lr"] for group in groups] == pytest.approx([expected, expected * cfg["lr_multi"]], rel=1e-9)


def test_eval_on_checkpoint_saves_palette_predictions(trained_run, tmp_path, capsys):
    _, run_dir, _, _ = trained_run
    eval_cli.main(["--checkpoint", os.path.join(run_dir, "best.pth"), "--mode", "sliding_window",
                   "--save-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "background" in printed
    saved = sorted(os.listdir(tmp_path))
    assert saved == [f"img_{i:03d}.png" for i in range(8, 12)]
    picture = Image.open(tmp_path / saved[0])
    assert picture.mode == "P" and picture.size == (48, 40)


def test_eval_without_checkpoint_takes_newest_run(trained_run, capsys):
    exp_dir, run_dir, _, _ = trained_run
    eval_cli.main(["--exp-dir", str(exp_dir)])
    printed = capsys.readouterr().out
    assert os.path.join(run_dir, "best.pth") in printed
    assert "mIoU" in printed


def printed_miou(capsys, argv):
    """The mIoU the last line of eval.py's table prints, run in this process."""
    eval_cli.main(argv)
    return float(capsys.readouterr().out.split("mIoU")[-1].split()[0])


def test_eval_scales_prints_one_miou_per_factor(trained_run, capsys):
    _, run_dir, _, _ = trained_run
    checkpoint = os.path.join(run_dir, "latest.pth")
    eval_cli.main(["--checkpoint", checkpoint, "--scales", "0.5", "1.0", "2.0"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith(("0.50", "1.00", "2.00"))]
    assert [row[0] for row in rows] == ["0.50", "1.00", "2.00"]
    assert float(rows[1][1]) == printed_miou(capsys, ["--checkpoint", checkpoint])  # 1 x is the plain evaluation


def test_supervised_mode_trains(tiny_voc, tmp_path):
    assert train_in_process(tiny_voc, tmp_path, "epochs=1", "train_mode=supervised") == 0
    assert glob.glob(os.path.join(tmp_path, "pascal", "tiny", "*", "best.pth"))


def test_two_process_torchrun_gloo(two_process_reference_run):
    """train.sh with NGPUS=2 on CPU trains under torchrun with gloo and saves the bare model: the session's
    two-process reference run (conftest.py) is that run, so it is checked rather than trained a second time."""
    state = two_process_reference_run
    assert state["iteration"] == 4  # its whole schedule: 2 iterations x 2 epochs
    assert "2 process(es)" in (run_dir_of(state) / "train.log").read_text()
    assert not any(key.startswith("module.") for key in state["model"])


def test_bad_override_is_one_line_error(tiny_voc, tmp_path, capsys):
    assert train_in_process(tiny_voc, tmp_path, "lrr=0.1") == 2
    assert capsys.readouterr().err == "error: command line: unknown key 'lrr' (did you mean 'lr'?)\n"
    assert not os.path.exists(os.path.join(tmp_path, "pascal"))


def test_train_sh_rejects_unknown_dataset():
    result = run(["bash", "scripts/train.sh", "nosuchset", "1_16", "0"], check=False)
    assert result.returncode == 2 and "configs/nosuchset.yaml" in result.stderr


def test_eval_multiscale_cif_and_average_on_a_trained_checkpoint(trained_run, capsys):
    """Each option's printed mIoU is that of the predictor it names, built here from the model's own methods (the
    averaging itself is checked against known answers in test_evaluate.py)."""
    _, run_dir, _, _ = trained_run
    checkpoint = os.path.join(run_dir, "latest.pth")
    model, cfg, _ = eval_cli.load_trained_model(checkpoint, torch.device("cpu"))
    val_set = build_val_dataset(cfg, cfg["splits_dir"])

    def through_the_cif(scales):
        return lambda images: model.predict_multiscale_cif(images, scales)

    for flags, predict, mode in [
            (["--multiscale-cif"], through_the_cif((0.5, 2.0)), "original"),
            (["--multiscale-avg"], evaluation.averaged_predictor(model.predict, [1.0, 0.5, 2.0], flip=False), "original"),
            (["--multiscale-cif", "--cif-scales", "0.5", "--flip", "--mode", "sliding_window"],
             evaluation.averaged_predictor(through_the_cif((0.5,)), [1.0], flip=True), "sliding_window")]:
        expected = evaluation.evaluate(predict, val_set, cfg, torch.device("cpu"), mode=mode).miou()
        assert printed_miou(capsys, ["--checkpoint", checkpoint, *flags]) == round(expected, 2), flags
