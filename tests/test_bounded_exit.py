"""Every failure ends the process in bounded time: a data error met by loader workers (each kind, in each loader,
in training, in its evaluation and in eval.py, alone and under torchrun), and the other places a run could block.

The matrix of loader x kind of data error runs in this process (the kind decides only the message, the loader the
way out), under an alarm. Where the process boundary is what is tested (a process's interpreter exit, torchrun,
signals, a killed launcher) a run is a subprocess with a hard timeout; those runs are session runs (conftest), which
start with the session and run while the in-process tests do. Either way a hang fails its test, it never hangs the
suite."""
import contextlib
import glob
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import scalematch
import util.evaluation
from conftest import (REPO, command_env, one_thread, run_script, train_command, train_in_process,
                      write_tiny_voc)
from model import build_model
from test_fault_tolerance import checkpoint_iteration
from util.bounded_exit import Teardown, kill_lingering_children
from util.config import validate
from util.logging import LOGGER_NAME
from util.sampling import ResumableSampler

# A tiny run ends in well under a minute here; a hang is forever. The bound is generous for a loaded machine.
RUN_TIMEOUT_S = 240
SEED = 1  # a seed whose partner order meets a sample before the unlabeled order does, alone and on 2
NCLASS = 21
VAL_NAMES = [f"val_{i:03d}" for i in range(4)]


def child_pids(pid: int) -> list[int]:
    """The pids of the children of process `pid`."""
    return [int(child) for task in glob.glob(f"/proc/{pid}/task/*/children") for child in open(task).read().split()]


def processes_mentioning(marker: str) -> list[int]:
    """Pids of the processes whose command line holds `marker` (a run's own folder): its workers included."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                command = file.read()
            with open(f"/proc/{entry}/stat") as file:
                state = file.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in command and state != "Z":
            found.append(int(entry))
    return found


def end_all(process, marker):
    """SIGKILL `process` and every process whose command line holds `marker`."""
    for pid in [process.pid] + processes_mentioning(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def ended_within(process, marker, timeout_s: float = RUN_TIMEOUT_S) -> str:
    """`process`'s stderr once it and every process of its run (command lines holding `marker`) have ended, within
    `timeout_s`; past it, kill them all and fail: a hang fails the test, never hangs the suite."""
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        end_all(process, marker)
        pytest.fail(f"the run did not end within {timeout_s} s")
    deadline = time.monotonic() + 10
    while processes_mentioning(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = processes_mentioning(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the run outlived it: {left}"
    return stderr


def run_bounded(command: list[str], marker: str) -> subprocess.CompletedProcess:
    """Run `command` (its processes' command lines holding `marker`) as ended_within lets it."""
    process = subprocess.Popen(command, cwd=REPO, env=command_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    stderr = ended_within(process, marker)
    return subprocess.CompletedProcess(command, process.returncode, None, stderr)


@contextlib.contextmanager
def as_a_run_alone(timeout_s: int = RUN_TIMEOUT_S):
    """Run the block (in the main thread) as the run of a process of its own: on one torch thread, as command_env
    gives the subprocess runs (intra-op threads waiting on each other on a loaded machine cost several times the
    time), and failing its test past `timeout_s`, as a subprocess's timeout does: an in-process run that hangs never
    hangs the suite (pytest's Failed, raised by the alarm, is caught by no handler of a run's errors)."""
    def expire(signum, frame):
        pytest.fail(f"the run did not end within {timeout_s} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(timeout_s)
    try:
        with one_thread():
            yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def watching_workers(monkeypatch, owner, name: str) -> tuple[list, list, tuple]:
    """(started, kept, logger_before): filled from now on, every process this process starts (loader workers are
    multiprocessing processes) and the error that `owner.name` raises, kept with its traceback; and the project
    logger's (handlers, propagate) before the run. While it is kept, the failed run's
    loaders and iterators stay referenced, so garbage collection cannot end their workers: only the Teardown can, as
    at interpreter exit, where collection ends none (the hang before: the exit joined them forever)."""
    started, kept = [], []
    start, function = multiprocessing.process.BaseProcess.start, getattr(owner, name)

    def recording_start(process):
        start(process)
        started.append(process)

    def keeping_the_error(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except BaseException as error:
            kept.append(error)
            raise

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", recording_start)
    monkeypatch.setattr(owner, name, keeping_the_error)
    logger = logging.getLogger(LOGGER_NAME)
    return started, kept, (list(logger.handlers), logger.propagate)


def check_nothing_outlives(started: list, kept: list, logger_before: tuple):
    """Nothing of a run that failed (watching_workers) is left, its failure still referenced: no process it started
    is alive, and the project logger is as it found it (train.log's file closed)."""
    assert kept, "the run did not fail where its loaders are"
    assert started, "the run started no loader workers: there is nothing to end"
    alive = [process.pid for process in started if process.is_alive()]
    assert not alive, f"loader workers outlived the run: {alive}"
    logger = logging.getLogger(LOGGER_NAME)
    assert (logger.handlers, logger.propagate) == logger_before, "the run left its log handlers (train.log's file)"


def eval_in_process(monkeypatch, *arguments: str) -> int:
    """The exit code of `python eval.py ARGUMENTS`, its __main__ block run in this process (no interpreter and torch
    start), as_a_run_alone; its output goes to this process's (capfd: its loader workers' too)."""
    with as_a_run_alone():
        return run_script(monkeypatch, "eval.py", *arguments)


def tiny_dataset(base):
    """(data_root, splits_dir) of tiny_voc's layout whose val images are files of their own (val_000 ...)."""
    data_root, splits_dir = write_tiny_voc(base)
    for index, name in enumerate(VAL_NAMES):
        source = f"img_{8 + index:03d}"
        shutil.copy(os.path.join(data_root, "JPEGImages", f"{source}.jpg"),
                    os.path.join(data_root, "JPEGImages", f"{name}.jpg"))
        shutil.copy(os.path.join(data_root, "SegmentationClass", f"{source}.png"),
                    os.path.join(data_root, "SegmentationClass", f"{name}.png"))
    with open(os.path.join(splits_dir, "pascal", "val.txt"), "w") as file:
        file.writelines(f"JPEGImages/{name}.jpg SegmentationClass/{name}.png\n" for name in VAL_NAMES)
    return data_root, splits_dir


def spoil(data_root: str, names: list[str], kind: str) -> set[str]:
    """Spoil the samples `names` with one kind of data error; returns the lines (without 'error: ') that may tell
    it, one per spoiled sample: whichever a loader meets first."""
    lines = set()
    for name in names:
        image = os.path.join(data_root, "JPEGImages", f"{name}.jpg")
        mask = os.path.join(data_root, "SegmentationClass", f"{name}.png")
        if kind == "image_unreadable":
            open(image, "wb").close()
            lines.add(f"cannot read image {image}: not an image PIL can read")
        elif kind == "mask_unreadable":
            with open(mask, "wb") as file:
                file.write(b"not a png")
            lines.add(f"cannot read mask {mask}: not an image PIL can read")
        elif kind == "mask_wrong_size":
            Image.fromarray(np.zeros((20, 24), dtype=np.uint8), mode="L").save(mask)
            lines.add(f"mask {mask} is (20, 24) but image {image} is (40, 48)")
        else:
            Image.fromarray(np.full((40, 48), 30, dtype=np.uint8), mode="L").save(mask)
            lines.add(f"mask {mask} has value 30: classes are 0 ... {NCLASS - 1} (nclass {NCLASS}) and 255 is ignored")
    return lines


def first_batch(seed_offset: int, rank: int, world_size: int) -> list[int]:
    """The unlabeled indices of the first batch (batch_size 2) that the loader seeded seed + `seed_offset` gives
    process `rank`."""
    return [index for index, _ in ResumableSampler(8, SEED + seed_offset, rank, world_size)][:2]


def partner_only_sample(world_size: int) -> str:
    """An unlabeled sample in some process's first partner batch and in no process's first unlabeled batch: the
    partner loader (seed + 3) meets it before the unlabeled loader (seed + 2) could."""
    unlabeled = {index for rank in range(world_size) for index in first_batch(2, rank, world_size)}
    partner = [index for rank in range(world_size) for index in first_batch(3, rank, world_size)]
    index = next(index for index in partner if index not in unlabeled)
    return f"img_{4 + index:03d}"


def names_read_by(loader: str, world_size: int) -> list[str]:
    if loader == "labeled":
        return [f"img_{i:03d}" for i in range(4)]
    if loader == "unlabeled":
        return [f"img_{i:03d}" for i in range(4, 12)]
    if loader == "partner":
        return [partner_only_sample(world_size)]
    return VAL_NAMES


KINDS = ["image_unreadable", "mask_unreadable", "mask_wrong_size", "mask_out_of_range"]
TRAINING_LOADERS = ["labeled", "unlabeled", "partner", "evaluation"]
# Each spoiled sample is met in the first iteration, the evaluation right after it: one iteration is all a run needs.
SPOILED_RUN = ["workers=2", "epochs=1", "iters_per_epoch=1", "image_log_interval=0", f"seed={SEED}"]


def order_of(loader: str) -> list[str]:
    """The partner test needs a partner loader with an order of its own, so that it, not the unlabeled loader, meets
    the spoiled sample first (with the release's order the partner is the unlabeled image itself)."""
    return ["data_order=independent", "cutmix_partner=other_image"] if loader == "partner" else []


def check_failed_in_one_line(returncode: int, stderr: str, lines: set[str]):
    assert returncode == 2, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].removeprefix("error: ") in lines, stderr[-3000:]
    assert "Traceback" not in stderr


def write_checkpoint_with_workers(base) -> tuple[str, str]:
    """(checkpoint, data_root): a tiny model's checkpoint whose config evaluates with 2 loader workers, and its clean
    dataset, under `base`. Its tensors are zeros, the network built on the meta device: no draw from the global
    random generator, which a session run (another thread) must leave to the tests that seed it."""
    data_root, splits_dir = tiny_dataset(base)
    cfg = validate({"backbone": "tv_resnet10", "head_channels": 32, "pretrained": None, "cif": False, "crop_size": 32,
                    "workers": 2, "amp": False, "dataset": "pascal", "nclass": NCLASS, "split": "tiny",
                    "data_root": data_root, "splits_dir": splits_dir}, source="test")
    with torch.device("meta"):
        shapes = build_model(cfg).state_dict()
    state = {name: torch.zeros(tensor.shape, dtype=tensor.dtype) for name, tensor in shapes.items()}
    path = base / "best.pth"
    torch.save({"model": state, "config": cfg, "epoch": 0, "best_miou": 0.0}, path)
    return str(path), data_root


@pytest.fixture(scope="module")
def checkpoint_with_workers(tmp_path_factory):
    return write_checkpoint_with_workers(tmp_path_factory.mktemp("eval_data"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loader", TRAINING_LOADERS)
def test_a_data_error_met_by_loader_workers_ends_the_run(tmp_path, monkeypatch, capfd, loader, kind):
    """The run (in this process) ends with its one-line error and exit code 2, and every loader worker it started has
    ended, though the failure's traceback still references their loaders: its Teardown ended them, as it must before
    interpreter exit. Before, the process then stayed alive forever, joining a worker that ignores SIGTERM; the
    exit itself is test_a_data_error_met_by_loader_workers_ends_the_process's."""
    data = tiny_dataset(tmp_path / "data")
    lines = spoil(data[0], names_read_by(loader, 1), kind)
    watch = watching_workers(monkeypatch, scalematch, "main")
    with as_a_run_alone():
        code = train_in_process(data, tmp_path / "exp", *SPOILED_RUN, *order_of(loader))
    # capfd, not capsys: a traceback that a loader worker (a fork of this process) prints must be seen too.
    check_failed_in_one_line(code, capfd.readouterr().err, lines)
    check_nothing_outlives(*watch)


@pytest.mark.parametrize("kind", KINDS)
def test_a_data_error_met_by_eval_workers_ends_eval(checkpoint_with_workers, tmp_path, monkeypatch, capfd, kind):
    """eval.py (its __main__ block, in this process) ends with the one-line error and exit code 2, every loader worker
    ended though its traceback is kept; as processes of their own: test_a_data_error_met_by_eval_workers_ends_eval_
    under_the_launcher."""
    checkpoint, clean_root = checkpoint_with_workers
    data_root = str(tmp_path / "VOC")
    shutil.copytree(clean_root, data_root)
    lines = spoil(data_root, VAL_NAMES, kind)
    watch = watching_workers(monkeypatch, util.evaluation, "evaluate")
    code = eval_in_process(monkeypatch, "--checkpoint", checkpoint, "--cpu", "--data-root", data_root)
    check_failed_in_one_line(code, capfd.readouterr().err, lines)
    check_nothing_outlives(*watch)


def test_a_fifo_in_place_of_a_prediction_ends_predict_dir_in_one_line(checkpoint_with_workers, tmp_path, monkeypatch,
                                                                      capfd):
    """A FIFO, which an open for writing could wait on (as_a_run_alone bounds it): refused in words (before: 'File or
    stream is not seekable')."""
    checkpoint, data_root = checkpoint_with_workers
    save_dir = tmp_path / "predictions"
    save_dir.mkdir()
    os.mkfifo(save_dir / "val_000.png")
    code = eval_in_process(monkeypatch, "--checkpoint", checkpoint, "--cpu", "--predict-dir",
                           os.path.join(data_root, "JPEGImages"), "--save-dir", str(save_dir))
    assert code == 2
    assert capfd.readouterr().err.strip().splitlines()[-1] == (f"error: cannot write {save_dir / 'val_000.png'}: a "
                                                                "FIFO or device is in its place, not a file")


def test_a_fifo_in_place_of_train_log_leaves_the_log_on_the_console(tmp_path):
    """Before, opening train.log waited forever for a reader of the FIFO."""
    os.mkfifo(tmp_path / "train.log")
    result = run_bounded([sys.executable, "-c", f"from util.logging import setup_logger; "
                          f"setup_logger({str(tmp_path)!r}, 0).info('first')"], str(tmp_path))
    assert result.returncode == 0
    assert result.stderr == (f"warning: {tmp_path / 'train.log'}: a FIFO that nothing reads is in its place; the log "
                             "goes on on the console only\n")


class EndlessDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return index


def ignoring_sigterm(worker_id):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def live_children() -> list[int]:
    return [child.pid for child in multiprocessing.active_children()]


def test_teardown_shuts_down_persistent_workers_that_ignore_sigterm_on_an_error():
    """The situation of a failing run: an iterator, still referenced by the error's traceback, whose workers
    ignore SIGTERM; interpreter exit would join them forever."""
    loader = DataLoader(EndlessDataset(), batch_size=2, num_workers=2, persistent_workers=True,
                        worker_init_fn=ignoring_sigterm)
    closed = []

    class Writer:
        def close(self):
            closed.append(True)

    with pytest.raises(ValueError):
        with Teardown() as teardown:
            teardown.loaders(loader)
            teardown.closing(Writer())
            next(iter(loader))
            assert len(live_children()) == 2
            raise ValueError("a data error")
    assert live_children() == [] and closed == [True]


def test_teardown_shuts_down_the_iterators_it_hands_out_on_ctrl_c():
    loader = DataLoader(EndlessDataset(), batch_size=2, num_workers=2)
    with pytest.raises(KeyboardInterrupt):
        with Teardown() as teardown:
            batches = teardown.iterate(loader)
            next(batches)
            raise KeyboardInterrupt
    assert live_children() == []


def sleep_ignoring_sigterm():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(3600)


def test_a_child_still_alive_at_exit_is_killed_after_the_grace():
    child = multiprocessing.get_context("fork").Process(target=sleep_ignoring_sigterm, daemon=True)
    child.start()
    started = time.monotonic()
    assert kill_lingering_children(grace_s=0.5) == [child.pid]
    took = time.monotonic() - started
    # SIGKILLed, though a loaded machine may take longer than the call's own join to end the process.
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert took < 0.5 + 5


# The subprocess runs, each (function, its arguments): function(base folder, *arguments) runs it in an empty folder
# and returns what its test checks. They are session runs (SESSION_RUNS below).

def train_on_spoiled_data(base, loader: str, kind: str, ngpus: int) -> tuple[int, str, set[str]]:
    """Train with 2 workers per loader (NGPUS 0: one process; 2: torchrun) on data whose samples `loader` reads are
    spoiled by `kind`: (exit code, stderr, the lines that may tell the error)."""
    data = tiny_dataset(base / "data")
    lines = spoil(data[0], names_read_by(loader, max(ngpus, 1)), kind)
    exp_dir = base / "exp"
    result = run_bounded(train_command(data, exp_dir, ngpus, *SPOILED_RUN, *order_of(loader)), str(exp_dir))
    return result.returncode, result.stderr, lines


def eval_on_spoiled_data_under_the_launcher(base, kind: str) -> tuple[int, str, set[str]]:
    """eval.py on 2 torchrun processes, its val images spoiled by `kind`: as train_on_spoiled_data."""
    checkpoint, data_root = write_checkpoint_with_workers(base)
    lines = spoil(data_root, VAL_NAMES, kind)
    command = [sys.executable, "-m", "util.launcher", "2", "eval.py", "--checkpoint", checkpoint, "--cpu",
               "--data-root", data_root]
    result = run_bounded(command, data_root)
    return result.returncode, result.stderr, lines


# Runs the command after it with SIGINT's default action, as Ctrl-C finds a run started in a terminal, even where the
# suite was started in the background (which ignores SIGINT, and an exec keeps that). A preexec_fn is unsafe in the
# presence of the threads that run these runs.
WITH_DEFAULT_SIGINT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                       "os.execvp(sys.argv[1], sys.argv[1:])"]


def start_training(data, exp_dir, ngpus: int) -> subprocess.Popen:
    """A long run with loader workers, returned once its first checkpoint shows it training."""
    command = train_command(data, exp_dir, ngpus, "workers=2", "epochs=50", "checkpoint_interval=1",
                            "image_log_interval=0", "run_name=long")
    process = subprocess.Popen(WITH_DEFAULT_SIGINT + command, cwd=REPO, env=command_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    latest = os.path.join(exp_dir, "pascal", "tiny", "long", "latest.pth")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while checkpoint_iteration(latest) < 1:
        if process.poll() is not None or time.monotonic() > deadline:
            end_all(process, str(exp_dir))
            pytest.fail(f"the run did not start training: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    return process


def signal_training(base, signum: int) -> tuple[int, str]:
    """Send `signum` to a training process alone, its workers busy loading: (its exit code, its stderr) once it and
    every process of its run have ended."""
    data = tiny_dataset(base / "data")
    process = start_training(data, base / "exp", 0)
    process.send_signal(signum)
    stderr = ended_within(process, str(base / "exp"))
    return process.returncode, stderr


def kill_a_peer(base) -> tuple[int, int]:
    """SIGKILL one of the 2 processes of a torchrun run: (how many processes it had, the run's exit code) once the
    launcher, the peer and every loader worker have ended."""
    data = tiny_dataset(base / "data")
    process = start_training(data, base / "exp", 2)
    workers = child_pids(process.pid)
    if len(workers) == 2:
        os.kill(workers[1], signal.SIGKILL)
    else:
        end_all(process, str(base / "exp"))
    ended_within(process, str(base / "exp"))
    return len(workers), process.returncode


def wait_for(path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.path.exists(path)


# How soon a torchrun worker must know that its launcher has ended, the CPU saturated: well above the few
# milliseconds the parent-death signal takes, well below "never".
LAUNCHER_NOTICE_BOUND_S = 10


def kill_the_launcher(base, killed: str) -> bool:
    """Kill the launcher of tests/launcher_watch_worker.py `killed` (while the worker starts: before it watches; or
    while it computes), the CPU saturated from then on: whether the worker noticed within LAUNCHER_NOTICE_BOUND_S.
    The worker waits for the file `go` before it watches, so the kill lands where `killed` says whatever the load."""
    go, notice = base / "go", base / "notice"
    launcher, busy, worker = None, [], None
    try:
        launcher = subprocess.Popen([sys.executable, "-m", "util.launcher", "1", "tests/launcher_watch_worker.py",
                                     str(go), str(notice)], cwd=REPO, env=command_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        if not wait_for(f"{notice}.pid", RUN_TIMEOUT_S):
            pytest.fail("the worker did not start")
        worker = int(open(f"{notice}.pid").read())
        # Saturated only now: the imports before are slower under it, nothing else.
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(2 * len(os.sched_getaffinity(0)))]
        if killed == "while the worker computes":
            go.touch()
            if not wait_for(f"{notice}.watching", RUN_TIMEOUT_S):
                pytest.fail("the worker did not start watching")
        launcher.kill()
        launcher.wait()
        go.touch()
        return wait_for(notice, LAUNCHER_NOTICE_BOUND_S)
    finally:
        for process in busy + ([launcher] if launcher is not None else []):
            process.kill()
            process.wait()
        if worker is not None:
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass


# Under torchrun each loader: the failing process used to hang at exit and its peer to wait in a collective for it.
TORCHRUN_RUNS = [(train_on_spoiled_data, loader, kind, 2) for loader, kind in [
    ("labeled", "image_unreadable"), ("unlabeled", "mask_out_of_range"), ("partner", "mask_wrong_size"),
    ("evaluation", "mask_unreadable")]]
# A process of its own, one run per way out of it: an error in a training loader (the loaders share their way out:
# the run's Teardown ends their persistent workers), and in the evaluation (evaluate's Teardown ends its workers, the
# run's those of training). The kind decides only the message: each is checked in this process above.
PROCESS_RUNS = [(train_on_spoiled_data, "labeled", "mask_unreadable", 0),
                (train_on_spoiled_data, "evaluation", "mask_out_of_range", 0)]
EVAL_UNDER_THE_LAUNCHER_RUN = (eval_on_spoiled_data_under_the_launcher, "mask_wrong_size")
SIGNAL_RUNS = [(signal_training, signal.SIGINT), (signal_training, signal.SIGTERM)]
PEER_RUN = (kill_a_peer,)
LAUNCHER_RUNS = [(kill_the_launcher, "while the worker starts"), (kill_the_launcher, "while the worker computes")]


def run_id(run: tuple) -> str:
    return "-".join(map(str, run[1:3])) if run[0] is train_on_spoiled_data else str(run[1])


def session_runs_of(test: str, runs: list, ids=run_id) -> dict:
    """SESSION_RUNS entries of a test parametrized by `runs` (its `run` parameter, with `ids`)."""
    return {f"{test}[{ids(run)}]": lambda base, tiny_voc, run=run: run[0](base, *run[1:]) for run in runs}


SESSION_RUNS = {
    **session_runs_of("test_a_peer_killed_mid_run_ends_the_torchrun_run", [PEER_RUN], ids=lambda run: "2 processes"),
    **session_runs_of("test_a_data_error_met_by_loader_workers_ends_a_torchrun_run", TORCHRUN_RUNS),
    **session_runs_of("test_a_data_error_met_by_eval_workers_ends_eval_under_the_launcher",
                      [EVAL_UNDER_THE_LAUNCHER_RUN]),
    **session_runs_of("test_a_killed_launcher_is_noticed_with_the_cpu_saturated", LAUNCHER_RUNS),
    **session_runs_of("test_a_signal_while_loader_workers_are_busy_ends_the_run", SIGNAL_RUNS,
                      ids=lambda run: run[1].name),
    **session_runs_of("test_a_data_error_met_by_loader_workers_ends_the_process", PROCESS_RUNS)}


@pytest.mark.parametrize("run", PROCESS_RUNS, ids=run_id)
def test_a_data_error_met_by_loader_workers_ends_the_process(session_run, run):
    """As a process of its own (scripts/train.sh, NGPUS 0): the one-line error, and the process and its workers end,
    within the timeout. Before: the process stayed alive forever at interpreter exit, joining a worker that ignores
    SIGTERM."""
    check_failed_in_one_line(*session_run)


@pytest.mark.parametrize("run", TORCHRUN_RUNS, ids=run_id)
def test_a_data_error_met_by_loader_workers_ends_a_torchrun_run(session_run, run):
    """Before: the failing process hung at exit and its peer waited in a collective for it."""
    check_failed_in_one_line(*session_run)


# Under torchrun one kind stands for all: the way out is the same.
@pytest.mark.parametrize("run", [EVAL_UNDER_THE_LAUNCHER_RUN], ids=run_id)
def test_a_data_error_met_by_eval_workers_ends_eval_under_the_launcher(session_run, run):
    """eval.py's processes, and their loader workers, end at interpreter exit; the launcher tells the error once."""
    check_failed_in_one_line(*session_run)


@pytest.mark.parametrize("run, code", [(SIGNAL_RUNS[0], 130), (SIGNAL_RUNS[1], 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_loader_workers_are_busy_ends_the_run(session_run, run, code):
    """Ctrl-C or SIGTERM to the training process alone (its workers busy loading): it stops with its code, and its
    workers with it, shut down by the Teardown rather than by garbage collection."""
    returncode, stderr = session_run
    assert returncode == code and "Traceback" not in stderr


@pytest.mark.parametrize("run", [PEER_RUN], ids=["2 processes"])
def test_a_peer_killed_mid_run_ends_the_torchrun_run(session_run, run):
    """A process of a torchrun run killed with SIGKILL: its peer, waiting in a collective, learns it at once (gloo
    closes the connection), and the launcher, its peer and every loader worker end."""
    processes, returncode = session_run
    assert processes == 2
    assert returncode != 0


@pytest.mark.parametrize("run", LAUNCHER_RUNS, ids=run_id)
def test_a_killed_launcher_is_noticed_with_the_cpu_saturated(session_run, run):
    """Before, the watch took the worker's parent when it started for its launcher: a launcher killed while its
    workers were still importing (seconds, under load) was never noticed, and they trained on unwatched."""
    assert session_run, f"no notice {LAUNCHER_NOTICE_BOUND_S} s after the kill"
