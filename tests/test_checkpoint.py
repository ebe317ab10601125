import os

import pytest
import torch
from torch import nn

from util.checkpoint import CheckpointError, find_latest_run, load_checkpoint, load_model_state, save_checkpoint


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
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2, "weight": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["weight"], torch.ones(3))
    assert os.listdir(tmp_path) == ["latest.pth"]


def test_interrupt_during_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(obj, file):
        file.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 1}, tmp_path / "best.pth")
    assert os.listdir(tmp_path) == []


def test_save_replaces_an_existing_checkpoint(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path / "latest.pth")
    save_checkpoint({"epoch": 2}, tmp_path / "latest.pth")
    assert load_checkpoint(tmp_path / "latest.pth") == {"epoch": 2}


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"absent\.pth: no such checkpoint file$"):
        load_checkpoint(tmp_path / "absent.pth")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, damage):
    path = tmp_path / "best.pth"
    save_checkpoint(training_state(), path)
    data = path.read_bytes()
    path.write_bytes(b"not a checkpoint at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a readable checkpoint (") and "\n" not in message


class Arbitrary:
    pass


def test_arbitrary_objects_are_refused_on_load(tmp_path):
    path = tmp_path / "evil.pth"
    save_checkpoint({"payload": Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def touch_checkpoint(run_dir, name, mtime):
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))


def test_find_latest_run_by_checkpoint_time(tmp_path):
    exp = tmp_path / "exp"
    touch_checkpoint(exp / "old", "best.pth", 1_000)
    touch_checkpoint(exp / "new", "latest.pth", 3_000)
    touch_checkpoint(exp / "middle", "best.pth", 2_000)
    (exp / "no_checkpoint").mkdir()
    os.utime(exp / "no_checkpoint", (9_000, 9_000))
    assert find_latest_run(exp) == exp / "new"
    touch_checkpoint(exp / "old", "latest.pth", 4_000)
    assert find_latest_run(exp) == exp / "old"


def test_find_latest_run_without_runs(tmp_path):
    assert find_latest_run(tmp_path / "absent") is None
    (tmp_path / "exp" / "empty_run").mkdir(parents=True)
    assert find_latest_run(tmp_path / "exp") is None


def test_find_latest_run_in_dataset_split_layout(tmp_path):
    older = tmp_path / "exp" / "pascal" / "1_16" / "default"
    newer = tmp_path / "exp" / "synthetic" / "1_8" / "lr=0.01"
    for run, stamp in ((older, 1_000_000_000), (newer, 2_000_000_000)):
        run.mkdir(parents=True)
        (run / "latest.pth").write_bytes(b"x")
        os.utime(run / "latest.pth", (stamp, stamp))
    assert find_latest_run(tmp_path / "exp") == newer


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
