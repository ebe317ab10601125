"""Runs that cannot mix and fail in one line: run names, the run lock, stale temporaries, torchrun's launcher
(SIGTERM, SIGKILL, failures printed once), the supervised baseline under DDP and a batch of one image."""
import errno
import glob
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from functools import partial

import pytest
import torch
from tensorboard.compat.tensorflow_stub.io.gfile import LocalFileSystem

import scalematch
from conftest import (HELD_PROCESSES, REPO, command_env, fault_command, run, train, train_in_process,
                      write_tiny_voc)
from test_fault_tolerance import checkpoint_iteration
from util.config import ConfigError, check_batch_size, without_idle_cif
from util.events import RunEvents
from util.logging import setup_logger
from util.run_dir import run_directory


def config(**changes):
    cfg = {"dataset": "pascal", "split": "1_16", "exp_dir": "exp", "run_name": None, "seed": 0, "lr": 0.001,
           "workers": 4, "log_interval": 20, "loss_weights": {"strong": 0.25}}
    return {**cfg, **changes}


def test_runs_differing_past_a_long_command_line_get_their_own_directories():
    """Before, the name was the overrides cut to 120 characters: runs differing only in a later key (here seed)
    shared one directory and the second 'resumed' the first."""
    long = [f"data_root=/data/{'x' * 60}", f"splits_dir=/splits/{'y' * 60}", "lr=0.001"]
    first = run_directory(config(seed=0), long + ["seed=0"])
    second = run_directory(config(seed=1), long + ["seed=1"])
    assert first != second
    assert first == run_directory(config(seed=0), long + ["seed=0"])
    assert os.path.basename(first).startswith("data_root=_data_xxx")


def test_the_run_name_hashes_the_resolved_experiment_not_the_command():
    default = run_directory(config(), [])
    assert os.path.basename(default).startswith("default-")
    # A changed config file or nested key is another experiment, though the command line is the same.
    assert run_directory(config(lr=0.002), []) != default
    assert run_directory(config(loss_weights={"strong": 0.5}), []) != default
    # Settings that only watch the run find the same one.
    assert run_directory(config(workers=0, log_interval=1), ["workers=0", "log_interval=1"]) == default
    assert run_directory(config(run_name="mine"), []) == os.path.join("exp", "pascal", "1_16", "mine")


def stopped(process):
    """Wait until ``process`` has stopped itself (SIGSTOP from inside the run): it is then held at a known step."""
    deadline = time.time() + 300
    while open(f"/proc/{process.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)


def two_process_run(tiny_voc, exp_dir, fault, *overrides):
    """A 2-process run (2 iterations an epoch) with ``fault`` sent by rank 0 from inside; (result, latest.pth)."""
    result = run(fault_command(tiny_voc, exp_dir, 2, fault, "epochs=50", "checkpoint_interval=0",
                               "image_log_interval=0", "run_name=ddp", *overrides), check=False)
    return result, os.path.join(exp_dir, "pascal", "tiny", "ddp", "latest.pth")


def running_with(marker):
    """Process ids, zombies aside, whose command line holds ``marker``."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            state = open(stat).read().rsplit(")", 1)[1].split()[0]
            command = open(stat.replace("stat", "cmdline"), "rb").read().decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if marker in command and state != "Z":
            pids.append(int(stat.split("/")[2]))
    return pids


def held_at_step_3(exp_dir, tiny_voc):
    """A run held (SIGSTOP from inside) after step 3, its lock taken: (its process, exp_dir). Its test ends it, else
    the session does."""
    process = subprocess.Popen(
        fault_command(tiny_voc, exp_dir, 0, ("SIGSTOP", "step:3", "self"), "epochs=50", "image_log_interval=0",
                      "run_name=locked"), cwd=REPO, env=command_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    HELD_PROCESSES.append(process)
    stopped(process)
    return process, exp_dir


def launcher_killed(exp_dir, tiny_voc):
    result, latest = two_process_run(tiny_voc, exp_dir, ("SIGKILL", "step:3", "launcher"))
    return result, latest, running_with(str(exp_dir))  # at once: whatever outlived the run is running now


def one_process_failing(exp_dir, tiny_voc):
    data_root, splits_dir = write_tiny_voc(exp_dir / "data")
    broken = os.path.join(data_root, "JPEGImages", "img_001.jpg")
    with open(broken, "wb") as image:
        image.write(b"not a jpeg")  # a failure of whichever process reads it
    return train((data_root, splits_dir), exp_dir / "exp", 2, "epochs=1", check=False), broken


def interrupted(exp_dir, tiny_voc, moment):
    result = run(fault_command(tiny_voc, exp_dir, 0, ("SIGINT", moment, "self"), "epochs=50",
                               "checkpoint_interval=1", "image_log_interval=0", "run_name=interrupted"), check=False)
    return result, os.path.join(exp_dir, "pascal", "tiny", "interrupted", "latest.pth")


def supervised(exp_dir, tiny_voc):
    train(tiny_voc, exp_dir, 2, "epochs=1", "train_mode=supervised", "run_name=supervised")
    return os.path.join(exp_dir, "pascal", "tiny", "supervised")


SIGTERM_TEST = "test_sigterm_under_torchrun_checkpoints_and_exits_143_in_one_line"
CTRL_C_TEST = "test_ctrl_c_stops_in_one_line_and_leaves_the_checkpoint"
SESSION_RUNS = {
    "test_a_second_launch_is_refused_and_a_killed_runs_lock_and_temporaries_are_taken_over": held_at_step_3,
    **{f"{SIGTERM_TEST}[{receivers}]": lambda exp_dir, tiny_voc, receivers=receivers: two_process_run(
        tiny_voc, exp_dir, ("SIGTERM", "step:3", receivers), "workers=1") for receivers in ("launcher", "workers")},
    "test_a_killed_torchrun_launcher_leaves_no_worker_training": launcher_killed,
    **{f"{CTRL_C_TEST}[{moment}]": partial(interrupted, moment=moment) for moment in ("step:2", "save:2")},
    "test_a_start_up_error_under_torchrun_is_printed_once": lambda exp_dir, tiny_voc: train(tiny_voc, exp_dir, 2,
                                                                                            "lrr=0.1", check=False),
    "test_a_failure_of_one_process_is_printed_once_without_its_peers_tracebacks": one_process_failing,
    "test_supervised_only_trains_under_torchrun_without_a_cif": supervised}


def test_a_second_launch_is_refused_and_a_killed_runs_lock_and_temporaries_are_taken_over(tiny_voc, session_run,
                                                                                         capsys):
    """Before, two launches of one command both trained, overwriting each other's checkpoints and train.log. The
    first launch is another process, held (SIGSTOP) after step 3 with the lock; the second is this one."""
    first, exp_dir = session_run
    run_dir = os.path.join(exp_dir, "pascal", "tiny", "locked")
    try:
        assert checkpoint_iteration(os.path.join(run_dir, "latest.pth")) == 2  # the end of epoch 0
        log_before = open(os.path.join(run_dir, "train.log")).read()
        capsys.readouterr()
        assert train_in_process(tiny_voc, exp_dir, "epochs=50", "image_log_interval=0", "run_name=locked") == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: {run_dir} is in use by process {first.pid} on {socket.gethostname()} (see its run.lock): wait "
            "for that run to end, or give this one another run_name"]
        assert open(os.path.join(run_dir, "train.log")).read() == log_before
    finally:
        first.kill()
        first.wait()
    # A save killed mid-write leaves its temporary behind; the next start removes it.
    stale = os.path.join(run_dir, f".latest.pth.{first.pid}.tmp")
    open(stale, "wb").write(b"x" * 1000)
    assert train_in_process(tiny_voc, exp_dir, "epochs=1", "run_name=locked") == 0
    log = open(os.path.join(run_dir, "train.log")).read()
    owner = f"process {first.pid} on {socket.gethostname()}"
    assert f"took over {run_dir}/run.lock from {owner}, which no longer runs" in log
    assert f"removed .latest.pth.{first.pid}.tmp, left by a save that was killed" in log
    assert not os.path.exists(stale)


@pytest.mark.parametrize("receivers", ["launcher", "workers"])
def test_sigterm_under_torchrun_checkpoints_and_exits_143_in_one_line(session_run, receivers):
    """Before: exit 1 and a SignalException traceback. The agent signals each worker's process group, data loader
    workers included: they must leave the stop to their process (before, they died and failed its step). A
    scheduler may signal the workers themselves instead of the launcher. Sent after step 3, the first of epoch 1:
    the workers, signalled at once, stop after step 4; the launcher passes it on when its monitor next looks."""
    result, latest = session_run
    assert result.returncode == 143
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("SIGTERM: checkpoint written at iteration ")
    assert result.stderr.count("checkpoint written") == 1
    written = int(last.split("iteration ")[1].split(";")[0])
    assert checkpoint_iteration(latest) == written
    assert written == 4 if receivers == "workers" else written >= 4


def test_a_killed_torchrun_launcher_leaves_no_worker_training(session_run):
    """torchrun starts its workers in sessions of their own: before, a SIGKILL of the launcher left them training
    and writing. Now they notice, checkpoint and stop."""
    result, latest, left_running = session_run
    assert result.returncode == -signal.SIGKILL  # run() returns once the workers, which hold its pipes, have ended
    assert left_running == []  # looked at as soon as run() returned
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("the torchrun launcher ended: checkpoint written at iteration ")
    assert checkpoint_iteration(latest) == int(last.split("iteration ")[1].split(";")[0]) >= 4


@pytest.mark.parametrize("moment", ["step:2", "save:2"])
def test_ctrl_c_stops_in_one_line_and_leaves_the_checkpoint(session_run, moment):
    """Before: a KeyboardInterrupt traceback. Sent after step 2, or inside the second checkpoint write (the first
    is iteration 1's), where torch.save turned it into a RuntimeError and a traceback (exit 1)."""
    result, latest = session_run
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("interrupted: the last checkpoint is left as it was; rerun the "
                                                      "same command to resume")
    assert checkpoint_iteration(latest) == 1
    assert not [name for name in os.listdir(os.path.dirname(latest)) if name.endswith(".tmp")]


class Finalized:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)


def a_weakref_callback_meets_the_ctrl_c():
    """As logging's _removeHandlerRef does when a handler is collected."""
    referent = type("Referent", (), {})()
    reference = weakref.ref(referent, lambda ref: signal.raise_signal(signal.SIGINT))
    del referent  # collected at once, while its weak reference lives: the callback runs
    return reference


FINALIZERS = {"__del__": lambda: Finalized(),  # collected at once, its __del__ meets the Ctrl-C
              "weakref callback": a_weakref_callback_meets_the_ctrl_c}


@pytest.mark.parametrize("finalizer", list(FINALIZERS))
def test_a_ctrl_c_inside_a_finalizer_stops_the_run_at_the_next_step(tiny_voc, tmp_path, monkeypatch, capsys,
                                                                    finalizer):
    """Python prints and drops an exception raised inside __del__ or a weakref callback: before, a Ctrl-C that
    arrived while a loader iterator's __del__ joined its workers, or while logging's callback removed a collected
    handler, was lost or printed as a traceback, and the run trained on (exit 0). Here it arrives inside one during
    step 2; that step must not run, and nothing but the one line is printed."""
    real, steps = scalematch.train_step, []

    def step(run, batch, epoch):
        steps.append(run.progress["iteration"])
        if len(steps) == 2:
            FINALIZERS[finalizer]()
        return real(run, batch, epoch)

    monkeypatch.setattr(scalematch, "train_step", step)
    # What Python would print as "Exception ignored in ...", a traceback (pytest makes it a warning).
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda report: unraisable.append(report.exc_type))
    # Ctrl-C's default action, as in a terminal, even where the suite was started in the background (ignored there).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = train_in_process(tiny_voc, tmp_path, "epochs=2", "checkpoint_interval=1", "image_log_interval=0",
                                "run_name=finalizer")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handler is gone with it
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err and "Exception ignored" not in err and unraisable == []
    assert err.strip().splitlines()[-1] == ("interrupted: the last checkpoint is left as it was; rerun the same "
                                            "command to resume")
    assert steps == [0, 1]
    assert checkpoint_iteration(tmp_path / "pascal" / "tiny" / "finalizer" / "latest.pth") == 1


def test_a_start_up_error_under_torchrun_is_printed_once(session_run):
    """Before: once per process, then torchrun's ChildFailedError traceback and table."""
    result = session_run
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: command line: unknown key 'lrr' (did you mean 'lr'?)"]


def test_a_failure_of_one_process_is_printed_once_without_its_peers_tracebacks(session_run):
    """The other process's collective fails when the first ends; the launcher prints the cause, not that. The data
    is tiny_voc's layout with one labeled image that cannot be decoded."""
    result, broken = session_run
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: cannot read image {broken}: not an image PIL can read"


def test_supervised_only_trains_under_torchrun_without_a_cif(session_run):
    """Before: the CIF was built but unused, and DDP refused the second iteration."""
    run_dir = session_run
    state = torch.load(os.path.join(run_dir, "latest.pth"), weights_only=True)
    assert state["iteration"] == 2
    assert not any(name.startswith("cif.") for name in state["model"])
    assert state["config"]["cif"] is False and state["config"]["fusion"] == "none"
    assert "cif: false, since with train_mode supervised nothing would train it" in open(
        os.path.join(run_dir, "train.log")).read()


def test_without_a_rescaled_view_the_cif_is_left_out():
    cfg = {"train_mode": "semi", "cif": True, "isvc": False, "fusion": "none"}
    assert without_idle_cif(cfg) == ({**cfg, "cif": False}, "cif: false, since with isvc off and fusion "
                                                "none (no rescaled view) nothing would train it")
    trained = {"train_mode": "semi", "cif": True, "isvc": False, "fusion": "cif"}
    assert without_idle_cif(trained) == (trained, None)


@pytest.mark.parametrize("overrides", [["train_mode=supervised"], ["strong_views=1"]])
def test_a_batch_of_one_image_per_pass_is_refused_at_start_up(tiny_voc, tmp_path, overrides, capsys):
    """Before: a raw BatchNorm ValueError at the first step (ASPP's image pooling sees one value per channel)."""
    assert train_in_process(tiny_voc, tmp_path, "batch_size=1", *overrides) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: batch_size 1 on one process: a training pass would hold one image, and BatchNorm (ASPP's image "
        "pooling) needs two; set batch_size=2 (as many images per BatchNorm as the release's 1 x 2 GPUs) or train "
        "on 2 or more GPUs"]
    assert not os.path.exists(os.path.join(tmp_path, "pascal"))


def test_a_batch_of_one_trains_where_every_pass_holds_two_images(tiny_voc, tmp_path):
    """Two strong views make the strong pass two images, and labeled plus unlabeled make the main pass two."""
    assert train_in_process(tiny_voc, tmp_path, "batch_size=1", "strong_views=2", "epochs=1", "iters_per_epoch=1",
                            "run_name=one_image") == 0
    state = torch.load(os.path.join(tmp_path, "pascal", "tiny", "one_image", "latest.pth"), weights_only=True)
    assert state["iteration"] == 1


def test_batch_size_one_is_accepted_where_syncbatchnorm_pools_the_gpus():
    cfg = {"batch_size": 1, "strong_views": 1, "train_mode": "semi"}
    check_batch_size(cfg, 2, "cuda")
    with pytest.raises(ConfigError, match="^batch_size 1 on 2 CPU processes, whose BatchNorm is not "):
        check_batch_size(cfg, 2, "cpu")


def test_a_full_disk_under_train_log_is_one_warning_and_the_console_log_goes_on(tmp_path, capsys):
    """Before: logging printed a traceback for every record it could not write."""
    logger = setup_logger(tmp_path, 0)
    logger.info("first")
    log_file = next(handler for handler in logger.handlers if isinstance(handler, logging.FileHandler))

    def full(text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    log_file.stream.write = full
    logger.info("second")
    logger.info("third")
    captured = capsys.readouterr()
    assert captured.err == (f"warning: {tmp_path / 'train.log'}: cannot write the log (No space left on device); it "
                            "goes on on the console only\n")
    assert captured.out.count("INFO ") == 3
    assert (tmp_path / "train.log").read_text().endswith("INFO first\n")
    setup_logger(None, 0)


def test_a_full_disk_under_the_tensorboard_events_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """Before: TensorBoard's writer thread printed its OSError as a traceback, and the next write ended the run
    in another one, without a path."""
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    events = RunEvents(str(tmp_path))
    events.add_scalar("train/loss", 2.0, 0)
    events.writer.flush()
    monkeypatch.setattr(LocalFileSystem, "_write", full)
    events.add_scalar("train/loss", 1.0, 1)
    deadline = time.time() + 30
    while not events.failed:  # the writer thread fails, on its own
        assert time.time() < deadline
        time.sleep(0.05)
    events.add_scalar("train/loss", 0.5, 2)
    events.add_scalar("train/loss", 0.5, 2)
    events.close()
    assert capsys.readouterr().err == (f"warning: {tmp_path}: cannot write the TensorBoard events (No space left on "
                                       "device); the run goes on without them\n")
    # A disk already full when the run starts: SummaryWriter writes its first record at once.
    starting = RunEvents(str(tmp_path / "later"))
    starting.add_scalar("train/loss", 1.0, 1)
    starting.close()
    assert capsys.readouterr().err == (f"warning: {tmp_path / 'later'}: cannot write the TensorBoard events (No space "
                                       "left on device); the run goes on without them\n")


def test_a_start_up_failure_leaves_no_run_directory_but_keeps_a_run_that_had_started(tiny_voc, tmp_path, capsys):
    """Before: a run that could not start (here: a split file naming nothing) left exp/.../NAME with run.lock and
    train.log, to be mistaken for a run."""
    data_root, splits_dir = tiny_voc
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    assert train_in_process(tiny_voc, exp_dir, "epochs=1", "run_name=broken", f"data_root={tmp_path / 'nowhere'}") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    assert os.listdir(exp_dir) == []
    assert train_in_process(tiny_voc, exp_dir, "epochs=1", "run_name=kept") == 0
    run_dir = exp_dir / "pascal" / "tiny" / "kept"
    # The same run, now unable to start, keeps its checkpoints, log and directory.
    assert train_in_process(tiny_voc, exp_dir, "epochs=1", "run_name=kept", f"data_root={tmp_path / 'nowhere'}") == 2
    assert {"latest.pth", "best.pth", "train.log", "config.yaml"} <= set(os.listdir(run_dir))


def test_an_exp_dir_naming_a_file_is_one_line(tiny_voc, tmp_path, capsys):
    """Before: a NotADirectoryError traceback."""
    exp_file = tmp_path / "exp"
    exp_file.write_text("not a folder")
    assert train_in_process(tiny_voc, exp_file, "epochs=1", "run_name=x") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {exp_file}/pascal: cannot create the run directory or its lock (Not a directory)"]
