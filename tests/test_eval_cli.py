"""eval.py as a hostile user drives it: which checkpoint it picks and says, arguments it refuses, inputs that must
stop in one line, and no empty output folder left by a failed start."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval as eval_cli
from conftest import REPO, run_script
from dataset.errors import DatasetError
from model import build_model
from util.checkpoint import CheckpointError
from util.config import validate

TINY_MODEL = {"backbone": "tv_resnet10", "head_channels": 32, "pretrained": None, "cif": False, "crop_size": 32,
              "workers": 0, "amp": False, "dataset": "pascal", "nclass": 21, "split": "tiny"}



def under_torchrun(folder, tiny_voc):
    """eval.py under torchrun on two processes, given a checkpoint that does not exist: (that path,
    CompletedProcess)."""
    missing = folder / "missing.pth"
    command = [sys.executable, "-m", "util.launcher", "2", "eval.py", "--checkpoint", str(missing), "--cpu"]
    return missing, subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                                   env=dict(os.environ, OMP_NUM_THREADS="1"))


SESSION_RUNS = {"test_an_error_under_torchrun_is_printed_once": under_torchrun}


@pytest.fixture(scope="module")
def tiny_state(tiny_voc):
    """A checkpoint dict of a tiny Pascal model whose data is tiny_voc; tests save copies of it with changes."""
    data_root, splits_dir = tiny_voc
    cfg = validate(dict(TINY_MODEL, data_root=data_root, splits_dir=splits_dir), source="test")
    torch.manual_seed(0)
    return {"model": build_model(cfg).state_dict(), "config": cfg, "epoch": 3, "best_miou": 0.0}


def save(path, state, **changes):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**state, **changes}, path)
    return str(path)


def run_main_block(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``python eval.py ARGS`` (its __main__ block, which turns the one-line errors into exit status 2) in this
    process, to spare an interpreter and torch start: (exit status, stderr). A real interpreter's is
    test_an_error_under_torchrun_is_printed_once's."""
    status = run_script(monkeypatch, "eval.py", *args)
    return status, capsys.readouterr().err


def checkpoint_line(capsys) -> str:
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoint "))


def test_a_run_whose_best_is_recorded_but_missing_is_refused(tiny_state, tmp_path):
    run = tmp_path / "exp/pascal/tiny/default"
    save(run / "latest.pth", tiny_state, best_miou=41.5)
    with pytest.raises(CheckpointError) as caught:
        eval_cli.main(["--exp-dir", str(tmp_path / "exp"), "--cpu"])
    assert str(caught.value) == (f"{run}: latest.pth records best mIoU 41.50 but best.pth is missing; pass "
                                 f"--checkpoint {run / 'latest.pth'} to evaluate the last saved epoch instead")


def test_an_explicit_checkpoint_is_honoured_even_when_best_is_missing(tiny_state, tmp_path, capsys):
    latest = save(tmp_path / "exp/pascal/tiny/default/latest.pth", tiny_state, best_miou=41.5)
    eval_cli.main(["--checkpoint", latest, "--cpu"])
    assert checkpoint_line(capsys) == f"checkpoint {latest} (epoch 3), 4 val images, mode original"


def test_the_default_pick_says_which_file_and_why(tiny_state, tmp_path, capsys):
    run = tmp_path / "exp/pascal/tiny/default"
    save(run / "latest.pth", tiny_state)
    eval_cli.main(["--exp-dir", str(tmp_path / "exp"), "--cpu"])
    assert checkpoint_line(capsys) == (f"checkpoint {run / 'latest.pth'} (epoch 3), the newest run under "
                                       f"{tmp_path / 'exp'}/ has no best.pth: no validation has recorded a best yet, "
                                       "4 val images, mode original")
    save(run / "best.pth", tiny_state, best_miou=12.0)
    eval_cli.main(["--exp-dir", str(tmp_path / "exp"), "--cpu"])
    assert checkpoint_line(capsys) == (f"checkpoint {run / 'best.pth'} (epoch 3), the best epoch of the newest run "
                                       f"under {tmp_path / 'exp'}/, 4 val images, mode original")


def test_no_run_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match=f"^no run with a checkpoint under {tmp_path}/; pass --checkpoint$"):
        eval_cli.main(["--exp-dir", str(tmp_path), "--cpu"])


def test_a_checkpoint_without_epoch_evaluates(tiny_state, tmp_path, capsys):
    checkpoint = save(tmp_path / "no_epoch.pth", {key: value for key, value in tiny_state.items() if key != "epoch"})
    eval_cli.main(["--checkpoint", checkpoint, "--cpu"])  # it stopped with KeyError: 'epoch'
    assert checkpoint_line(capsys) == f"checkpoint {checkpoint}, 4 val images, mode original"


@pytest.mark.parametrize("changes, message", [
    ({"config": "pascal"}, r"its 'config' is a str, not a mapping of config keys$"),
    ({"config": None}, r"its 'config' is a NoneType, not a mapping of config keys$"),
    ({"model": None}, r"its 'model' is not a mapping of tensor names to tensors$"),
    ({"model": {"conv.weight": 1.0}}, r"its 'model' is not a mapping of tensor names to tensors$"),
])
def test_checkpoints_with_mangled_keys_are_one_line(tiny_state, tmp_path, changes, message):
    checkpoint = save(tmp_path / "odd.pth", tiny_state, **changes)
    with pytest.raises(CheckpointError, match=f"^{checkpoint}: {message}"):
        eval_cli.main(["--checkpoint", checkpoint, "--cpu"])


def test_a_folder_as_checkpoint_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match=f"^{tmp_path} is a folder; pass a checkpoint file in it"):
        eval_cli.main(["--checkpoint", str(tmp_path), "--cpu"])


def test_the_data_root_error_names_the_option_eval_takes(tiny_state, tmp_path):
    checkpoint = save(tmp_path / "moved.pth", tiny_state, config=dict(tiny_state["config"],
                                                                       data_root=str(tmp_path / "moved")))
    with pytest.raises(DatasetError) as caught:
        eval_cli.main(["--checkpoint", checkpoint, "--cpu"])
    assert str(caught.value) == f"data_root not found: {tmp_path / 'moved'} (pass --data-root DIR)"


def test_evaluation_needs_only_the_val_split(tiny_state, tiny_voc, tmp_path, capsys):
    data_root, splits_dir = tiny_voc
    splits = tmp_path / "splits"
    (splits / "pascal").mkdir(parents=True)
    shutil.copy(os.path.join(splits_dir, "pascal", "val.txt"), splits / "pascal" / "val.txt")
    checkpoint = save(tmp_path / "val_only.pth", tiny_state, config=dict(tiny_state["config"],
                                                                          splits_dir=str(splits)))
    eval_cli.main(["--checkpoint", checkpoint, "--cpu"])
    assert "4 val images" in checkpoint_line(capsys)


def test_moved_split_files_are_named_by_the_option_eval_takes(tiny_state, tiny_voc, tmp_path, capsys):
    """Before, eval.py read val.txt from the checkpoint's splits_dir alone and its error said to copy the files back."""
    moved = tmp_path / "moved"
    checkpoint = save(tmp_path / "moved.pth", tiny_state, config=dict(tiny_state["config"], splits_dir=str(moved)))
    with pytest.raises(DatasetError) as caught:
        eval_cli.main(["--checkpoint", checkpoint, "--cpu"])
    assert str(caught.value).startswith(f"split file not found: {moved / 'pascal' / 'val.txt'}; pass --splits-dir DIR "
                                        "if the split files moved, or copy")
    eval_cli.main(["--checkpoint", checkpoint, "--cpu", "--splits-dir", tiny_voc[1]])
    assert "4 val images" in checkpoint_line(capsys)


@pytest.mark.parametrize("argv, message", [
    (["--scales", "0", "-1"], "--scales takes positive factors, got 0 -1"),
    (["--scales", "1", "nan", "inf"], "--scales takes positive factors, got nan inf"),
    (["--multiscale-avg", "--cif-scales", "0.5", "-2"], "--cif-scales takes positive factors, got -2"),
    (["--cif-scales", "0.5"], "--cif-scales needs --multiscale-cif or --multiscale-avg"),
    (["--scales", "1", "--save-dir", "out"], "--scales measures single-scale mIoU per factor; it cannot be combined "
                                             "with --save-dir"),
    (["--scales", "1", "--flip", "--multiscale-cif"], "--scales measures single-scale mIoU per factor; it cannot be "
                                                      "combined with --flip or --multiscale-cif"),
    (["--checkpoint", "a.pth", "--exp-dir", "runs"], "--exp-dir picks a run when no --checkpoint is given"),
    (["--multiscale-cif", "--multiscale-avg"], "choose one of --multiscale-cif and --multiscale-avg"),
    (["--predict-dir", "photos", "--save-dir", "out", "--data-root", "data"], "--data-root is for evaluation"),
    (["--predict-dir", "photos", "--save-dir", "out", "--splits-dir", "splits"], "--splits-dir is for evaluation"),
])
def test_arguments_that_would_be_ignored_or_are_nonsense_are_refused(tmp_path, argv, message):
    with pytest.raises(SystemExit) as caught:
        eval_cli.parse_args(argv)
    assert str(caught.value.code).startswith(f"error: {message}")
    assert not (tmp_path / "out").exists()


def test_a_failed_start_leaves_no_empty_save_dir(tiny_state, tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    save_dir = tmp_path / "new/predictions"
    with pytest.raises(CheckpointError):
        eval_cli.main(["--checkpoint", str(broken), "--save-dir", str(save_dir), "--cpu"])
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(CheckpointError):
        eval_cli.main(["--checkpoint", str(broken), "--save-dir", str(kept), "--cpu"])
    assert kept.is_dir()  # a folder that was there before is not the run's to remove


def test_a_first_unreadable_image_leaves_no_empty_save_dir(tiny_state, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"not a jpeg")
    checkpoint = save(tmp_path / "c.pth", tiny_state)
    with pytest.raises(DatasetError, match="a.jpg: not an image PIL can read"):
        eval_cli.main(["--checkpoint", checkpoint, "--predict-dir", str(photos), "--save-dir",
                       str(tmp_path / "out"), "--cpu"])
    assert not (tmp_path / "out").exists()


def test_predictions_written_before_a_failure_are_kept(tiny_state, tiny_voc, tmp_path):
    data_root, splits_dir = tiny_voc
    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    (data / "JPEGImages/img_010.jpg").write_bytes(b"garbage")
    checkpoint = save(tmp_path / "c.pth", tiny_state, config=dict(tiny_state["config"], data_root=str(data)))
    save_dir = tmp_path / "out"
    with pytest.raises(DatasetError, match="img_010.jpg: not an image PIL can read"):
        eval_cli.main(["--checkpoint", checkpoint, "--save-dir", str(save_dir), "--cpu"])
    assert sorted(os.listdir(save_dir)) == ["img_008.png", "img_009.png"]


@pytest.mark.parametrize("make_save_dir, message", [
    (lambda tmp: tmp.joinpath("file").write_text("x") and tmp / "file", "is a file, not a folder"),
    (lambda tmp: tmp.joinpath("file").write_text("x") and tmp / "file/sub", "cannot create it: Not a directory"),
])
def test_an_unusable_save_dir_is_one_line(tiny_state, tmp_path, make_save_dir, message):
    checkpoint = save(tmp_path / "c.pth", tiny_state)
    save_dir = make_save_dir(tmp_path)
    with pytest.raises(eval_cli.OutputError, match=f"^--save-dir {save_dir}.*{message}"):
        eval_cli.main(["--checkpoint", checkpoint, "--save-dir", str(save_dir), "--cpu"])


def test_an_output_that_cannot_be_written_is_one_line_from_the_command(tiny_state, tmp_path, monkeypatch, capsys):
    checkpoint = save(tmp_path / "c.pth", tiny_state)
    save_dir = tmp_path / "out"
    (save_dir / "img_009.png").mkdir(parents=True)  # in the way of the second prediction
    status, stderr = run_main_block(monkeypatch, capsys, "--checkpoint", checkpoint, "--save-dir", save_dir, "--cpu")
    assert status == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"error: cannot write {save_dir / 'img_009.png'}: Is a directory"
    assert (save_dir / "img_008.png").is_file()


@pytest.mark.parametrize("make_folder, option, message", [
    (lambda tmp: tmp.joinpath("photo.jpg").write_bytes(b"x") and tmp / "photo.jpg", "--predict-dir",
     "is a file, not a folder"),
    (lambda tmp: tmp / "no_masks", "--mask-dir", "no such folder"),
])
def test_predict_folders_that_are_not_folders_are_one_line(tiny_state, tmp_path, make_folder, option, message):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"")
    checkpoint = save(tmp_path / "c.pth", tiny_state)
    folder = make_folder(tmp_path)
    argv = ["--checkpoint", checkpoint, "--save-dir", str(tmp_path / "out"), "--cpu"]
    argv += ["--predict-dir", str(folder)] if option == "--predict-dir" else ["--predict-dir", str(photos),
                                                                             "--mask-dir", str(folder)]
    with pytest.raises(DatasetError, match=f"^{option} {folder}.*{message}"):
        eval_cli.main(argv)
    assert not (tmp_path / "out").exists()


def test_a_broken_image_symlink_in_the_predict_dir_is_named(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"")
    (photos / "gone.jpg").symlink_to("nowhere.jpg")
    (photos / "loop.jpg").symlink_to("loop.jpg")
    with pytest.raises(DatasetError, match=r"^--predict-dir .*photos: 2 image\(s\) are broken or looping symlinks: "
                                           r".*gone\.jpg, .*loop\.jpg$"):
        eval_cli.list_images(str(photos))


def test_an_error_under_torchrun_is_printed_once(session_run):
    """Before: once per process, then the launcher's own line. Real interpreters: the exit status a shell sees."""
    missing, result = session_run
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {missing}: no such checkpoint file"]


def test_the_process_group_is_left_on_a_failure_too(tmp_path, monkeypatch):
    """As the trainer's (test_trainer.py): a failure after the join leaves the process group, here a missing
    checkpoint."""
    left = []
    monkeypatch.setattr(eval_cli, "init_distributed", lambda force_cpu: (0, 2, 0, torch.device("cpu")))
    monkeypatch.setattr(eval_cli, "cleanup", lambda: left.append(True))
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        eval_cli.main(["--checkpoint", str(tmp_path / "absent.pth"), "--cpu"])
    assert left == [True]
