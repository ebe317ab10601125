import contextlib
import os
import re
import runpy
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# torch on one thread in the suite (a module computing alone may ask for two: two_threads_if_idle), as command_env gives
# every subprocess: the in-process runs share the CPUs with subprocess runs going on meanwhile, where a second intra-op
# thread only contends (several times the time).
torch.set_num_threads(1)


@contextlib.contextmanager
def one_thread():
    """torch on one thread in the block (a test that needs it whatever ran before), as before after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def idle_cpus(interval_s: float = 0.25) -> float:
    """How many of this process's CPUs were idle over the next interval_s (from /proc/stat), this process asleep."""
    def idle_and_total():
        cpus, times = {f"cpu{index}" for index in os.sched_getaffinity(0)}, {}
        with open("/proc/stat") as stat:
            for line in stat:
                name, *fields = line.split()
                if name in cpus:
                    values = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
                    times[name] = (values[3] + values[4], sum(values))
        return times

    before = idle_and_total()
    time.sleep(interval_s)
    after = idle_and_total()
    return sum((after[cpu][0] - before[cpu][0]) / max(after[cpu][1] - before[cpu][1], 1) for cpu in after)


@pytest.fixture(scope="module")
def two_threads_if_idle():
    """torch on two threads in a module that asks for it (pytestmark usefixtures), one whose tests compute with nothing
    of theirs beside them, if two CPUs are idle as it starts: the second thread then has a CPU of its own (test_backbone
    10.7 s instead of 18.0 on 2 idle cores), where on CPUs that other jobs keep busy it would wait for a descheduled
    peer (test_trainer 6 times the time). One thread after."""
    torch.set_num_threads(2 if idle_cpus() >= 1.8 else 1)
    yield
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (scripts/gpu_check.sh runs them)")


def reads_a_session_run(item) -> bool:
    return item.name in getattr(item.module, "SESSION_RUNS", {})


def pytest_collection_modifyitems(config, items):
    # The tests that read a session run go last: the in-process tests run while their runs go on.
    items.sort(key=reads_a_session_run)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                                   "bash scripts/gpu_check.sh runs it on one")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def write_voc_tree(root, names, size=(40, 48), nclass=21, seed=0):
    """A tiny Pascal-layout dataset: JPEG images and palette PNG masks (with some 255 ignore pixels)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
    os.makedirs(os.path.join(root, "SegmentationClass"), exist_ok=True)
    palette = [value for index in range(256) for value in ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)]
    for name in names:
        mask = np.zeros(size, dtype=np.uint8)
        for _ in range(3):
            top, left = rng.integers(0, size[0] - 8), rng.integers(0, size[1] - 8)
            mask[top:top + rng.integers(4, 20), left:left + rng.integers(4, 20)] = rng.integers(1, nclass)
        mask[0, :4] = 255
        image = (rng.integers(0, 40, (*size, 3)) + mask[..., None].astype(np.int64) * 9).clip(0, 255)
        Image.fromarray(image.astype(np.uint8)).save(os.path.join(root, "JPEGImages", f"{name}.jpg"))
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette)
        png.save(os.path.join(root, "SegmentationClass", f"{name}.png"))


def write_tiny_voc(base):
    """(data_root, splits_dir) of a 12-image Pascal-layout dataset under `base` with split 'tiny' and a val set."""
    root, splits = base / "VOC", base / "splits"
    names = [f"img_{i:03d}" for i in range(12)]
    write_voc_tree(str(root), names)
    line = "JPEGImages/{0}.jpg SegmentationClass/{0}.png\n".format
    (splits / "pascal" / "tiny").mkdir(parents=True)
    (splits / "pascal" / "tiny" / "labeled.txt").write_text("".join(line(n) for n in names[:4]))
    (splits / "pascal" / "tiny" / "unlabeled.txt").write_text("".join(line(n) for n in names[4:]))
    (splits / "pascal" / "val.txt").write_text("".join(line(n) for n in names[8:]))
    return str(root), str(splits)


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory):
    return write_tiny_voc(tmp_path_factory.mktemp("tiny_voc"))


# A tiny CPU setting for end-to-end runs of scripts/train.sh.
TINY = ["backbone=tv_resnet10", "head_channels=32", "pretrained=null", "crop_size=32", "batch_size=2",
        "iters_per_epoch=2", "workers=0", "amp=false", "log_interval=1", "image_log_interval=1", "cif_channels=8",
        "cif_gate_channels=8"]


def command_env():
    return dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
                OMP_NUM_THREADS="1")


def run(command, check=True):
    result = subprocess.run(command, cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_script(monkeypatch, script: str, *arguments) -> int:
    """The exit status of ``python SCRIPT ARGUMENTS``, its __main__ block run in this process (no interpreter and
    torch start); its output goes to this process's (capsys, or capfd for what its loader workers write)."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, arguments)])
    try:
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    except SystemExit as stop:
        return stop.code
    return 0


def concurrently(calls: dict) -> dict:
    """{key: Future of call()} for zero-argument callables that each wait on a subprocess, started at once in threads,
    at most one per CPU running: a matrix of independent runs takes the wall time of its share, not of the sum. Each
    test reads its own entry's .result(), which raises that call's error (a hang is bounded by the call's timeout)."""
    pool = ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)))
    futures = {key: pool.submit(call) for key, call in calls.items()}
    pool.shutdown(wait=False)
    return futures


def start_runs(request, tmp_path_factory, calls: dict) -> dict:
    """{test node name: Future} of the calls {test node name: call(folder)} of the tests of request's module that
    this session runs, started concurrently() in calls' order, each with an empty folder named after its test: a run
    whose test is deselected (-k) is not started."""
    tests = {item.name for item in request.session.items if item.module is request.module}
    return concurrently({name: partial(call, tmp_path_factory.mktemp(re.sub(r"\W", "_", name)))
                         for name, call in calls.items() if name in tests})


def train_command(tiny_voc, exp_dir, ngpus, *overrides):
    data_root, splits_dir = tiny_voc
    return ["bash", "scripts/train.sh", "pascal", "tiny", str(ngpus), *TINY, f"data_root={data_root}",
            f"splits_dir={splits_dir}", f"exp_dir={exp_dir}", *overrides]


def train(tiny_voc, exp_dir, ngpus, *overrides, check=True):
    return run(train_command(tiny_voc, exp_dir, ngpus, *overrides), check=check)


def train_in_process(tiny_voc, exp_dir, *overrides) -> int:
    """The exit code of train_command's run on one CPU process (NGPUS=0), run in this process: no interpreter and
    torch start. Its one-line errors go to this process's stderr (capsys)."""
    import scalematch

    data_root, splits_dir = tiny_voc
    return scalematch.cli(["--config", os.path.join(REPO, "configs", "pascal.yaml"), "--cpu", "split=tiny", *TINY,
                                 f"data_root={data_root}", f"splits_dir={splits_dir}", f"exp_dir={exp_dir}",
                                 *overrides])


def fault_command(tiny_voc, exp_dir, nproc, fault, *overrides):
    """train_command's run with ``fault`` (SIGNAL, MOMENT, TARGET) sent from inside it by tests/fault_runner.py, on
    one process (nproc 0: CPU, as NGPUS=0) or under torchrun."""
    data_root, splits_dir = tiny_voc
    launcher = [sys.executable] if nproc <= 1 else [sys.executable, "-m", "util.launcher", str(nproc)]
    return [*launcher, "tests/fault_runner.py", *fault, "--", "--config", "configs/pascal.yaml",
            *(["--cpu"] if nproc == 0 else []), "split=tiny", *TINY, f"data_root={data_root}",
            f"splits_dir={splits_dir}", f"exp_dir={exp_dir}", *overrides]


# Deterministic runs that checkpoint every iteration: a killed and resumed one must end bit-identical to one of these.
EXACT = ["deterministic=true", "checkpoint_interval=1", "epochs=2", "image_log_interval=0"]


def two_process_reference(exp_dir, tiny_voc):
    """latest.pth of an uninterrupted EXACT run on two torchrun processes: 2 iterations x 2 epochs."""
    train(tiny_voc, exp_dir, 2, *EXACT, "run_name=straight")
    return torch.load(exp_dir / "pascal" / "tiny" / "straight" / "latest.pth", weights_only=True)


def yield_to_the_in_process_tests():
    """Lower this thread's priority, and so that of the processes it starts (Linux keeps a nice value per thread, and
    a child takes its thread's): the in-process tests, one chain on one thread, keep a CPU of their own, the session
    runs share the other and take both once the chain is done, so that the session does not end on that chain alone
    with a CPU idle."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)


# Processes that a session run leaves for its test to end (a run held with SIGSTOP): killed at session end if alive.
HELD_PROCESSES = []


@pytest.fixture(scope="session", autouse=True)
def session_runs(request, tmp_path_factory):
    """{(module name, test or fixture name): Future of its outcome} of the runs in processes of their own whose
    outcome a test only reads, all queued as the session starts and run at most one per CPU at a time beside the
    in-process tests, so that the CPUs have work from the first test to the last: the shared
    two_process_reference_run if a selected test asks for it, then each selected test's of a module's
    SESSION_RUNS = {test node name: call(folder, tiny_voc)}, in the order of their tests (those of a module that sets
    SESSION_RUNS_START_FIRST first), which run last (pytest_collection_modifyitems). A run that fails or hangs
    raises from its Future (bounded by its timeout); none outlives the session."""
    calls = {}
    if any("two_process_reference_run" in item.fixturenames for item in request.session.items):
        calls[(__name__, "two_process_reference_run")] = two_process_reference
    # A module whose one run is long starts it first: last, it would leave the session's end on one CPU.
    for item in sorted(filter(reads_a_session_run, request.session.items),
                       key=lambda item: not getattr(item.module, "SESSION_RUNS_START_FIRST", False)):
        calls[(item.module.__name__, item.name)] = item.module.SESSION_RUNS[item.name]
    if not calls:
        yield {}
        return
    data = request.getfixturevalue("tiny_voc")
    pool = ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)), initializer=yield_to_the_in_process_tests)
    futures = {key: pool.submit(call, tmp_path_factory.mktemp(re.sub(r"\W", "_", key[1])), data)
               for key, call in calls.items()}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)
    for process in HELD_PROCESSES:
        process.kill()
        process.wait()


@pytest.fixture
def session_run(request, session_runs):
    """The outcome of this test's run of its module's SESSION_RUNS, once it has ended."""
    return session_runs[(request.module.__name__, request.node.name)].result()


@pytest.fixture(scope="session")
def two_process_reference_run(session_runs):
    """latest.pth of two_process_reference, started with the session."""
    return session_runs[(__name__, "two_process_reference_run")].result()
