import errno
import io
import os
import pickle

import pytest
import torch
from torch import nn

from util import checkpoint
from util.checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint, write_atomically


def training_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    config = {"dataset": "synthetic", "lr": 2e-3, "scale_range": [0.5, 2.0], "pretrained": None, "amp": True,
              "loss_weights": {"strong": 0.5, "fp": 0.5}}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "best_miou": 41.5,
            "config": config}


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_with_weights_only(tmp_path):
    state = training_state()
    save_checkpoint(state, tmp_path / "run" / "latest.pth")
    loaded = load_checkpoint(tmp_path / "run" / "latest.pth")
    assert_same(state, loaded)
    assert loaded["optimizer"]["state"][0]["momentum_buffer"].shape == state["model"]["0.weight"].shape
    assert os.listdir(tmp_path / "run") == ["latest.pth"]


def test_crash_during_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    save_checkpoint({"epoch": 1, "weight": torch.ones(3)}, path)
    real_save = torch.save

    def save_half_then_die(obj, file):
        real_save(obj, file)
        file.truncate(file.tell() // 2)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_die)
    kept = "the previous one is left as it was"
    with pytest.raises(CheckpointError, match=f"^{path}: cannot write it \\(disk full\\); {kept}$"):
        save_checkpoint({"epoch": 2, "weight": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["weight"], torch.ones(3))
    assert os.listdir(tmp_path) == ["latest.pth"]


class FullDisk(io.FileIO):
    """A file on a disk that fills up after 1000 bytes."""

    def write(self, data):
        if self.tell() + len(data) > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_disk_full_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """As a full disk makes torch.save fail: its zip writer raises a RuntimeError while handling the OSError."""
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: FullDisk(path, "wb"), raising=False)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint({"weight": torch.zeros(10_000)}, tmp_path / "best.pth")
    assert str(caught.value) == (f"{tmp_path / 'best.pth'}: cannot write it (No space left on device); nothing was "
                                 "written")
    assert isinstance(caught.value.__context__.__context__, OSError)  # the RuntimeError above it is torch's
    assert os.listdir(tmp_path) == []


def test_read_only_directory_is_one_line_naming_the_file(tmp_path, monkeypatch):
    save_checkpoint({"epoch": 1}, tmp_path / "latest.pth")
    real_open = open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)) and "w" in (args[0] if args else kwargs.get("mode", "r")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint({"epoch": 2}, tmp_path / "latest.pth")
    monkeypatch.undo()
    assert str(caught.value) == (f"{tmp_path / 'latest.pth'}: cannot write it (Read-only file system); the previous "
                                 "one is left as it was")
    assert load_checkpoint(tmp_path / "latest.pth") == {"epoch": 1}


def test_write_atomically_takes_any_writer(tmp_path):
    write_atomically(tmp_path / "config.yaml", lambda temporary: temporary.write_text("a: 1\n"))
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_interrupt_during_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(obj, file):
        file.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 1}, tmp_path / "best.pth")
    assert os.listdir(tmp_path) == []


class CtrlCDuringWrite(io.FileIO):
    """A file whose third write is where a Ctrl-C lands."""

    def write(self, data):
        self.writes = getattr(self, "writes", 0) + 1
        if self.writes == 3:
            raise KeyboardInterrupt
        return super().write(data)


def test_ctrl_c_inside_torch_save_is_a_ctrl_c(tmp_path, monkeypatch):
    """torch.save's zip writer, closed while the KeyboardInterrupt unwinds, raises a RuntimeError ('unexpected pos')
    of its own: before, that RuntimeError reached the trainer, which ended in a traceback instead of exit 130 (the
    Ctrl-C test failed so when the signal landed in a checkpoint save)."""
    save_checkpoint({"epoch": 1}, tmp_path / "latest.pth")
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: CtrlCDuringWrite(path, "wb"), raising=False)
    with pytest.raises(KeyboardInterrupt) as caught:
        save_checkpoint({"weight": torch.zeros(10_000)}, tmp_path / "latest.pth")
    assert caught.value.__suppress_context__
    assert os.listdir(tmp_path) == ["latest.pth"] and load_checkpoint(tmp_path / "latest.pth") == {"epoch": 1}


def test_save_replaces_an_existing_checkpoint(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path / "latest.pth")
    save_checkpoint({"epoch": 2}, tmp_path / "latest.pth")
    assert load_checkpoint(tmp_path / "latest.pth") == {"epoch": 2}


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"absent\.pth: no such checkpoint file$"):
        load_checkpoint(tmp_path / "absent.pth")


@pytest.mark.parametrize("damage, reason", [
    ("empty", "the file is empty"),
    ("text", "not a file written by torch.save"),
    ("truncated", "the file is cut short: its zip archive has no end, as after an interrupted copy or a full disk"),
    ("pickle", "a plain pickle or a pre-1.6 torch.save file, not the zip container torch.save writes")])
def test_corrupt_checkpoint_is_a_one_line_error_that_says_what_is_wrong(tmp_path, damage, reason):
    # Before: torch's own reasons, e.g. "(101)" for a text file or "()" for an empty one.
    path = tmp_path / "best.pth"
    save_checkpoint(training_state(), path)
    data = path.read_bytes()
    damaged = {"empty": b"", "text": b"not a checkpoint at all", "truncated": data[: len(data) // 2],
               "pickle": pickle.dumps({"model": {}})}[damage]
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert str(caught.value) == f"{path}: not a readable checkpoint ({reason})"


def test_a_file_holding_something_else_than_a_dict_is_refused(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match=r"weights\.pth: not a checkpoint \(it holds a Tensor, not a dict"):
        load_checkpoint(path)


class Arbitrary:
    pass


def test_arbitrary_objects_are_refused_on_load(tmp_path):
    path = tmp_path / "evil.pth"
    save_checkpoint({"payload": Arbitrary()}, path)
    with pytest.raises(CheckpointError, match=r"readable checkpoint \(it holds Python objects other than tensors"):
        load_checkpoint(path)


def test_load_model_state_loads_a_fitting_state_dict():
    torch.manual_seed(0)
    source, target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.Sequential(nn.Conv2d(3, 4, 3),
                                                                                          nn.BatchNorm2d(4))
    load_model_state(target, source.state_dict(), "ckpt.pth")
    assert_same(target.state_dict(), source.state_dict())


@pytest.mark.parametrize("change, expected", [
    (lambda state: state.pop("0.bias"), "1 missing (0.bias)"),
    (lambda state: state.update({"2.weight": torch.ones(1)}), "1 unexpected (2.weight)"),
    (lambda state: state.update({"1.weight": torch.ones(5)}), "1 mis-shaped (1.weight (5,) vs (4,))"),
    (lambda state: state.clear(), "7 missing (0.weight, 0.bias, 1.weight, ...)"),
])
def test_load_model_state_names_what_does_not_fit_in_one_line(change, expected):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    state = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
    change(state)
    with pytest.raises(CheckpointError) as caught:
        load_model_state(model, state, "run/latest.pth")
    message = str(caught.value)
    assert message.startswith("run/latest.pth: its tensors do not fit the network of its config: ")
    assert expected in message and "\n" not in message
    assert_same(model.state_dict(), before)  # nothing was loaded
