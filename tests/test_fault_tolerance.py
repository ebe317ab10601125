"""Runs survive faults: SIGKILL at any moment, SIGTERM, non-finite losses, resuming a changed experiment."""
import os
import signal
import subprocess
import time

import pytest
import torch

import scalematch
from conftest import REPO, command_env, train, train_command

EXACT = ["deterministic=true", "checkpoint_interval=1", "epochs=2", "iters_per_epoch=3", "image_log_interval=0"]


def checkpoint_iteration(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["iteration"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def run_until_killed(command, latest, past_iteration):
    """Start training and SIGKILL it as soon as latest.pth is past ``past_iteration``."""
    process = subprocess.Popen(command, cwd=REPO, env=command_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while checkpoint_iteration(latest) <= past_iteration:
        assert process.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_run_killed_twice_ends_identical_to_uninterrupted(tiny_voc, tmp_path):
    train(tiny_voc, tmp_path, 0, *EXACT, "run_name=straight")
    latest = os.path.join(tmp_path, "pascal", "tiny", "killed", "latest.pth")
    command = train_command(tiny_voc, tmp_path, 0, *EXACT, "run_name=killed")
    run_until_killed(command, latest, past_iteration=0)
    first_kill = checkpoint_iteration(latest)
    run_until_killed(command, latest, past_iteration=first_kill + 1)
    assert checkpoint_iteration(latest) < 6
    resumed = subprocess.run(command, cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr

    straight = torch.load(os.path.join(tmp_path, "pascal", "tiny", "straight", "latest.pth"), weights_only=True)
    killed = torch.load(latest, weights_only=True)
    assert killed["iteration"] == straight["iteration"] == 6
    assert straight["model"].keys() == killed["model"].keys()
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, killed["model"][name]), name
    for group_a, group_b in zip(straight["optimizer"]["state"].values(), killed["optimizer"]["state"].values()):
        assert torch.equal(group_a["momentum_buffer"], group_b["momentum_buffer"])
    assert straight["best_miou"] == killed["best_miou"]


def test_sigterm_writes_a_checkpoint_before_exiting(tiny_voc, tmp_path):
    latest = os.path.join(tmp_path, "pascal", "tiny", "preempted", "latest.pth")
    command = train_command(tiny_voc, tmp_path, 0, "epochs=50", "checkpoint_interval=0", "run_name=preempted")
    process = subprocess.Popen(command, cwd=REPO, env=command_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while checkpoint_iteration(latest) < 2:  # the first epoch ended: training is under way
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143
    assert "SIGTERM: checkpoint written at iteration" in stderr
    written = int(stderr.split("iteration ")[1].split(";")[0])
    assert checkpoint_iteration(latest) == written > 2


def run_in_process(tiny_voc, exp_dir, *overrides):
    data_root, splits_dir = tiny_voc
    scalematch.main(["--config", os.path.join(REPO, "configs", "pascal.yaml"), "--cpu", "split=tiny",
                     "backbone=tv_resnet18", "pretrained=null", "crop_size=32", "batch_size=2", "workers=0",
                     "iters_per_epoch=2", "epochs=1", "amp=false", "image_log_interval=0", "cif_channels=8",
                     "cif_gate_channels=8", "checkpoint_interval=1", f"data_root={data_root}",
                     f"splits_dir={splits_dir}", f"exp_dir={exp_dir}", "run_name=nan", *overrides])


def poison_isvc_at(monkeypatch, bad_iteration):
    """Make the ISVC term NaN at one iteration, as a diverging run would."""
    real = scalematch.semi_supervised_losses
    calls = []

    def poisoned(*args, **kwargs):
        terms, extras, pictures = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == bad_iteration:
            terms["isvc"] = terms["isvc"] * float("nan")
        return terms, extras, pictures
    monkeypatch.setattr(scalematch, "semi_supervised_losses", poisoned)


def test_nonfinite_loss_stops_and_leaves_the_checkpoint(tiny_voc, tmp_path, monkeypatch):
    poison_isvc_at(monkeypatch, bad_iteration=2)
    latest = os.path.join(tmp_path, "pascal", "tiny", "nan", "latest.pth")
    with pytest.raises(scalematch.NonFiniteLoss, match=r"^iteration 2 \(epoch 0\): non-finite loss in isvc"):
        run_in_process(tiny_voc, tmp_path)
    assert checkpoint_iteration(latest) == 1


def test_nonfinite_loss_can_be_skipped_and_counted(tiny_voc, tmp_path, monkeypatch):
    poison_isvc_at(monkeypatch, bad_iteration=2)
    run_in_process(tiny_voc, tmp_path, "on_nonfinite_loss=skip")
    state = torch.load(os.path.join(tmp_path, "pascal", "tiny", "nan", "latest.pth"), weights_only=True)
    assert state["skipped_steps"] == 1 and state["iteration"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_resume_refuses_another_experiment_and_accepts_harmless_changes(tiny_voc, tmp_path):
    train(tiny_voc, tmp_path, 0, "epochs=1", "run_name=base")
    run_dir = os.path.join(tmp_path, "pascal", "tiny", "base")
    config_before = open(os.path.join(run_dir, "config.yaml")).read()
    refused = train(tiny_voc, tmp_path, 0, "epochs=1", "run_name=base", "backbone=tv_resnet34", check=False)
    assert refused.returncode == 2
    assert "refusing to resume: 'backbone' was 'tv_resnet18', now 'tv_resnet34'" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert open(os.path.join(run_dir, "config.yaml")).read() == config_before
    accepted = train(tiny_voc, tmp_path, 0, "epochs=2", "run_name=base", "log_interval=5")
    assert "changed settings: epochs 1 -> 2, log_interval 1 -> 5" in accepted.stdout + accepted.stderr
