"""Runs survive faults: SIGKILL between a step and its checkpoint or inside a checkpoint write (of one process or
of torchrun's two), SIGTERM, non-finite losses and models, a full disk, resuming a changed experiment."""
import contextlib
import errno
import glob
import os
import shutil
import signal

import pytest
import torch

import scalematch
from conftest import EXACT, REPO, fault_command, one_thread, run, train, train_in_process


def checkpoint_iteration(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["iteration"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def killed_twice(exp_dir, tiny_voc):
    """SIGKILL after step 2, then in the rerun half-way through its first checkpoint write (iteration 2's)."""
    run_dir = exp_dir / "pascal" / "tiny" / "killed"
    overrides = [*EXACT, "iters_per_epoch=3", "run_name=killed"]
    first = run(fault_command(tiny_voc, exp_dir, 0, ("SIGKILL", "step:2", "self"), *overrides), check=False)
    after_first = checkpoint_iteration(run_dir / "latest.pth")
    second = run(fault_command(tiny_voc, exp_dir, 0, ("SIGKILL", "save:1", "self"), *overrides), check=False)
    return (first.returncode, after_first, second.returncode, checkpoint_iteration(run_dir / "latest.pth"),
            glob.glob(str(run_dir / ".latest.pth.*.tmp")), exp_dir)


def two_process_killed_and_resumed(exp_dir, tiny_voc):
    """The launcher and both workers killed after rank 0's second step, then the same command rerun."""
    latest = exp_dir / "pascal" / "tiny" / "killed" / "latest.pth"
    killed = run(fault_command(tiny_voc, exp_dir, 2, ("SIGKILL", "step:2", "everything"), *EXACT, "run_name=killed"),
                 check=False)
    after_kill = checkpoint_iteration(latest)
    return killed.returncode, after_kill, train(tiny_voc, exp_dir, 2, *EXACT, "run_name=killed"), latest


def preempted(exp_dir, tiny_voc):
    result = run(fault_command(tiny_voc, exp_dir, 0, ("SIGTERM", "step:3", "self"), "epochs=50",
                               "checkpoint_interval=0", "run_name=preempted"), check=False)
    return result, exp_dir / "pascal" / "tiny" / "preempted" / "latest.pth"


def resumed_on_two_processes(exp_dir, tiny_voc):
    """A finished 1-epoch run of one process (NGPUS 0), rerun for a second epoch under torchrun on two."""
    train(tiny_voc, exp_dir, 0, "epochs=1", "run_name=base")
    return train(tiny_voc, exp_dir, 2, "epochs=2", "run_name=base", check=False), exp_dir


SESSION_RUNS = {
    "test_run_killed_twice_ends_identical_to_uninterrupted": killed_twice,
    "test_two_process_run_killed_ends_identical_to_uninterrupted": two_process_killed_and_resumed,
    "test_sigterm_writes_a_checkpoint_before_exiting": preempted,
    "test_resume_on_another_number_of_processes_is_refused": resumed_on_two_processes}


@contextlib.contextmanager
def computing_as_a_subprocess():
    """In-process EXACT runs compute bit for bit what a subprocess run computes: on one thread, as command_env's
    OMP_NUM_THREADS=1 makes it. The deterministic mode such a run turns on is turned back after."""
    benchmark = torch.backends.cudnn.benchmark
    deterministic, warn_only = (torch.are_deterministic_algorithms_enabled(),
                                torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        with one_thread():
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark


def test_run_killed_twice_ends_identical_to_uninterrupted(tiny_voc, tmp_path, session_run, capsys):
    """SIGKILL between a step and its checkpoint, then half-way through a checkpoint write: the rerun resumes from
    the checkpoint before each, removes the torn temporary, and ends bit-identical to the uninterrupted run. The
    killed runs are processes of their own; the uninterrupted run and the rerun, in this one, meanwhile."""
    with computing_as_a_subprocess():
        assert train_in_process(tiny_voc, tmp_path, *EXACT, "iters_per_epoch=3", "run_name=straight") == 0
    straight = torch.load(tmp_path / "pascal" / "tiny" / "straight" / "latest.pth", weights_only=True)
    first, after_first, second, after_second, temporaries, exp_dir = session_run
    assert first == -signal.SIGKILL and after_first == 1
    assert second == -signal.SIGKILL and after_second == 1
    assert len(temporaries) == 1
    run_dir = exp_dir / "pascal" / "tiny" / "killed"
    latest = run_dir / "latest.pth"
    capsys.readouterr()
    with computing_as_a_subprocess():
        assert train_in_process(tiny_voc, exp_dir, *EXACT, "iters_per_epoch=3", "run_name=killed") == 0
    resumed = capsys.readouterr()
    assert f"resumed from {latest}" in resumed.out + resumed.err
    assert not glob.glob(str(run_dir / ".*.tmp"))

    killed = torch.load(latest, weights_only=True)
    assert killed["iteration"] == straight["iteration"] == 6
    assert straight["model"].keys() == killed["model"].keys()
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, killed["model"][name]), name
    for group_a, group_b in zip(straight["optimizer"]["state"].values(), killed["optimizer"]["state"].values()):
        assert torch.equal(group_a["momentum_buffer"], group_b["momentum_buffer"])
    assert straight["best_miou"] == killed["best_miou"]


def differing_tensors(a, b):
    """Names of the tensors that differ between two checkpoints: model, momentum buffers, every rank's statistics
    and random states."""
    pairs = [(f"model.{name}", tensor, b["model"][name]) for name, tensor in a["model"].items()]
    pairs += [(f"momentum.{index}", state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"])
              for index, state in a["optimizer"]["state"].items()]
    for rank, (mine, theirs) in enumerate(zip(a["processes"], b["processes"])):
        pairs += [(f"rank{rank}.{name}", tensor, theirs["buffers"][name]) for name, tensor in mine["buffers"].items()]
        pairs.append((f"rank{rank}.rng", mine["rng"]["torch"], theirs["rng"]["torch"]))
    return [name for name, x, y in pairs if not torch.equal(x, y)]


def test_two_process_run_killed_ends_identical_to_uninterrupted(session_run, two_process_reference_run):
    """Each rank restores its own random states and (on CPU, where BatchNorm is per process) statistics: before, rank
    1 took rank 0's, and 191 of 227 model tensors ended different. Killed here: the launcher and both workers,
    after rank 0's second step."""
    straight = two_process_reference_run
    killed_code, after_kill, resumed, latest = session_run
    assert killed_code == -signal.SIGKILL and after_kill == 1
    assert f"resumed from {latest}" in resumed.stdout

    killed = torch.load(latest, weights_only=True)
    assert killed["iteration"] == straight["iteration"] == 4
    assert len(straight["processes"]) == 2
    assert not torch.equal(straight["processes"][0]["rng"]["torch"], straight["processes"][1]["rng"]["torch"])
    assert differing_tensors(straight, killed) == []
    assert straight["best_miou"] == killed["best_miou"]


def test_sigterm_writes_a_checkpoint_before_exiting(session_run):
    """SIGTERM after step 3 (the first of epoch 1): step 4 ends the epoch's training, its checkpoint is written,
    and the run exits before evaluating."""
    result, latest = session_run
    assert result.returncode == 143
    assert result.stderr.strip().splitlines()[-1] == ("SIGTERM: checkpoint written at iteration 4; rerun the same "
                                                      "command to resume")
    assert checkpoint_iteration(latest) == 4


def run_in_process(tiny_voc, exp_dir, *overrides):
    data_root, splits_dir = tiny_voc
    scalematch.main(["--config", os.path.join(REPO, "configs", "pascal.yaml"), "--cpu", "split=tiny",
                     "backbone=tv_resnet10", "head_channels=32", "pretrained=null", "crop_size=32", "batch_size=2",
                     "workers=0", "iters_per_epoch=2", "epochs=1", "amp=false", "image_log_interval=0",
                     "cif_channels=8", "cif_gate_channels=8", "checkpoint_interval=1", f"data_root={data_root}",
                     f"splits_dir={splits_dir}", f"exp_dir={exp_dir}", "run_name=nan", *overrides])


def poison_isvc_at(monkeypatch, bad_iteration):
    """Make the ISVC term NaN at one iteration, as a diverging run would."""
    real = scalematch.semi_supervised_terms
    calls = []

    def poisoned(*args, **kwargs):
        output = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == bad_iteration:
            output.terms["isvc"] = output.terms["isvc"] * float("nan")
        return output
    monkeypatch.setattr(scalematch, "semi_supervised_terms", poisoned)


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


@pytest.fixture(scope="module")
def one_epoch_base_run(tiny_voc, tmp_path_factory):
    """exp_dir of a finished 1-epoch run named base, as scripts/train.sh trains it; tests resume copies of it."""
    exp_dir = tmp_path_factory.mktemp("base_run")
    assert train_in_process(tiny_voc, exp_dir, "epochs=1", "run_name=base") == 0
    return exp_dir


def test_resume_refuses_another_experiment_and_accepts_harmless_changes(tiny_voc, tmp_path, capsys,
                                                                        one_epoch_base_run):
    shutil.copytree(one_epoch_base_run, tmp_path, dirs_exist_ok=True)
    run_dir = os.path.join(tmp_path, "pascal", "tiny", "base")
    config_before = open(os.path.join(run_dir, "config.yaml")).read()
    # Before: another optimizer was a KeyError traceback, another rate or method switch a warning.
    for overrides, refusal in [
            (["backbone=tv_resnet34"], "'backbone' was 'tv_resnet10', now 'tv_resnet34'"),
            (["optimizer=adamw"], "'optimizer' was 'sgd', now 'adamw'"),
            (["lr=0.002", "isvc=false", "loss_weights.strong=0.5"],
             "'lr' was 0.001, now 0.002, 'isvc' was True, now False, 'loss_weights.strong' was 0.25, now 0.5")]:
        capsys.readouterr()
        assert train_in_process(tiny_voc, tmp_path, "epochs=1", "run_name=base", *overrides) == 2
        assert last_line(capsys.readouterr().err) == (
            f"error: {run_dir}/latest.pth: refusing to resume: {refusal}; that is another experiment, so give it "
            "another run_name (or undo the change)")
    assert open(os.path.join(run_dir, "config.yaml")).read() == config_before
    assert train_in_process(tiny_voc, tmp_path, "epochs=2", "run_name=base", "log_interval=5") == 0
    assert (f"changed settings: epochs 1 -> 2, exp_dir '{one_epoch_base_run}' -> '{tmp_path}', log_interval 1 -> 5"
            in capsys.readouterr().out)


def test_resume_on_another_number_of_processes_is_refused(session_run):
    """A run trained by one process, rerun under torchrun on two."""
    refused, exp_dir = session_run
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: {exp_dir}/pascal/tiny/base/latest.pth: refusing to resume: it was trained by 1 process(es), now 2; "
        "rerun it with NGPUS 1 (the batch is per process)"]


def last_line(stderr):
    """The last line of a run's stderr, after tqdm's progress bars; there must be no traceback before it."""
    assert "Traceback" not in stderr
    return stderr.strip().splitlines()[-1]


def train_args(tiny_voc, exp_dir, *overrides):
    data_root, splits_dir = tiny_voc
    return ["--config", os.path.join(REPO, "configs", "pascal.yaml"), "--cpu", "split=tiny", "backbone=tv_resnet10",
            "head_channels=32", "pretrained=null", "crop_size=32", "batch_size=2", "workers=0", "iters_per_epoch=2",
            "epochs=1", "amp=false", "image_log_interval=0", "cif_channels=8", "cif_gate_channels=8",
            "checkpoint_interval=1", f"data_root={data_root}", f"splits_dir={splits_dir}", f"exp_dir={exp_dir}",
            "run_name=nan", *overrides]


def test_a_skipped_step_leaves_batchnorm_statistics_as_they_were(tiny_voc, tmp_path, monkeypatch):
    """Step 2's images hold inf, so its forward passes would make the running statistics NaN; skipped, the step must
    leave them as they were (before, they stayed NaN and the run still ended 'done')."""
    real = scalematch.semi_supervised_terms
    before_step_2, calls = {}, []

    def inf_images_at_step_2(model, batch, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            before_step_2.update({name: value.clone() for name, value in model.state_dict().items()
                                  if "running" in name or "num_batches" in name})
            batch = {**batch, "labeled": {**batch["labeled"], "image": batch["labeled"]["image"] * float("inf")}}
        return real(model, batch, *args, **kwargs)

    latest = os.path.join(tmp_path, "pascal", "tiny", "nan", "latest.pth")
    monkeypatch.setattr(scalematch, "semi_supervised_terms", inf_images_at_step_2)
    scalematch.main(train_args(tiny_voc, tmp_path, "on_nonfinite_loss=skip"))
    state = torch.load(latest, weights_only=True)
    assert state["skipped_steps"] == 1 and state["iteration"] == 2
    assert before_step_2 and all(torch.equal(state["model"][name], value) for name, value in before_step_2.items())


def test_a_model_gone_non_finite_stops_before_it_is_evaluated_or_saved(tiny_voc, tmp_path, monkeypatch, capsys):
    """A finite loss does not make a finite model: a run whose weights or statistics hold NaN must not end 'done'."""
    real = scalematch.semi_supervised_terms
    calls = []

    def poisoned_statistics_at_step_2(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            model.segmenter.aspp.project[1].running_mean.fill_(float("nan"))
        return real(model, *args, **kwargs)

    latest = os.path.join(tmp_path, "pascal", "tiny", "nan", "latest.pth")
    monkeypatch.setattr(scalematch, "semi_supervised_terms", poisoned_statistics_at_step_2)
    assert scalematch.cli(train_args(tiny_voc, tmp_path, "on_nonfinite_loss=skip")) == 3
    assert last_line(capsys.readouterr().err) == (
        "error: iteration 2: the model holds NaN/inf (segmenter.aspp.project.1.running_mean); the last checkpoint is "
        "left as it was")
    assert checkpoint_iteration(latest) == 1


def test_a_kill_between_the_best_and_latest_writes_loses_no_best(tiny_voc, tmp_path, monkeypatch):
    """The epoch end writes best.pth, then latest.pth: killed between the two, the rerun keeps that best (before,
    latest.pth came first, recorded a best mIoU, and best.pth was never written)."""
    real_save = scalematch.save_checkpoint

    class Killed(BaseException):
        pass

    def killed_after_the_first_epoch_end_write(state, path):
        real_save(state, path)
        if state["miou"] is not None:
            raise Killed

    run_dir = os.path.join(tmp_path, "pascal", "tiny", "nan")
    monkeypatch.setattr(scalematch, "save_checkpoint", killed_after_the_first_epoch_end_write)
    with pytest.raises(Killed):
        scalematch.main(train_args(tiny_voc, tmp_path))
    monkeypatch.undo()
    best = torch.load(os.path.join(run_dir, "best.pth"), weights_only=True)
    assert best["miou"] > 0 and best["best_miou"] == best["miou"]
    assert checkpoint_iteration(os.path.join(run_dir, "latest.pth")) == 1

    scalematch.main(train_args(tiny_voc, tmp_path))
    log = open(os.path.join(run_dir, "train.log")).read()
    assert f"best mIoU so far {best['miou']:.2f}" in log
    latest = torch.load(os.path.join(run_dir, "latest.pth"), weights_only=True)
    final_best = torch.load(os.path.join(run_dir, "best.pth"), weights_only=True)
    assert latest["best_miou"] == final_best["miou"] >= best["miou"]
    assert log.rstrip().endswith(f"done: best mIoU {final_best['miou']:.2f}, checkpoints in {run_dir}")


@pytest.fixture(scope="module")
def one_epoch_run(tiny_voc, tmp_path_factory):
    """exp_dir of a finished train_args run (1 epoch of 2 iterations); tests resume copies of it."""
    exp_dir = tmp_path_factory.mktemp("one_epoch")
    scalematch.main(train_args(tiny_voc, exp_dir))
    return exp_dir


def test_best_miou_comes_from_the_best_checkpoint_that_exists(tiny_voc, tmp_path, one_epoch_run):
    run_dir = os.path.join(tmp_path, "pascal", "tiny", "nan")
    shutil.copytree(one_epoch_run, tmp_path, dirs_exist_ok=True)
    os.remove(os.path.join(run_dir, "best.pth"))
    scalematch.main(train_args(tiny_voc, tmp_path, "epochs=2"))
    log = open(os.path.join(run_dir, "train.log")).read()
    assert f"but {run_dir}/best.pth does not exist: the best so far is taken from it" in log
    assert "best mIoU so far 0.00" in log
    assert os.path.exists(os.path.join(run_dir, "best.pth"))


def test_a_full_disk_stops_in_one_line_and_keeps_the_checkpoint(tiny_voc, tmp_path, monkeypatch, capsys):
    real_save = torch.save
    saves = []

    def full_from_the_third_save(obj, file):
        saves.append(file)
        if len(saves) > 2:  # latest.pth at iteration 1, best.pth at the epoch end, then latest.pth
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, file)

    monkeypatch.setattr(torch, "save", full_from_the_third_save)
    assert scalematch.cli(train_args(tiny_voc, tmp_path)) == 2
    latest = os.path.join(tmp_path, "pascal", "tiny", "nan", "latest.pth")
    assert last_line(capsys.readouterr().err) == (f"error: {latest}: cannot write it (No space left on device); the "
                                                  "previous one is left as it was")
    assert checkpoint_iteration(latest) == 1
    assert sorted(name for name in os.listdir(os.path.dirname(latest)) if name.endswith((".pth", ".tmp"))) == [
        "best.pth", "latest.pth"]


def test_a_read_only_run_directory_stops_in_one_line(tiny_voc, tmp_path, monkeypatch, capsys, one_epoch_run):
    shutil.copytree(one_epoch_run, tmp_path, dirs_exist_ok=True)
    run_dir = os.path.join(tmp_path, "pascal", "tiny", "nan")
    before = open(os.path.join(run_dir, "latest.pth"), "rb").read()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(run_dir) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert scalematch.cli(train_args(tiny_voc, tmp_path, "epochs=2")) == 2
    monkeypatch.undo()
    assert last_line(capsys.readouterr().err) == (f"error: {run_dir}/run.lock: cannot create the run directory or its "
                                                  "lock (Read-only file system)")
    assert open(os.path.join(run_dir, "latest.pth"), "rb").read() == before
