"""A process's place in a run: joining the process group torchrun describes (or running alone), the collectives the
run uses, its watch on the launcher, and how it reports a failure.

A collective waits for its peers SCALEMATCH_COLLECTIVE_TIMEOUT_S seconds where that variable is set (the GPU acceptance
run sets it, so that a stalled peer fails its part instead of eating the time of the parts after it), torch's default
otherwise.

Under torchrun a worker does not print its one-line errors: ``report_failure`` records them in the error file torchrun
gives it (TORCHELASTIC_ERROR_FILE), and the launcher (util/launcher.py) prints the failure that caused the others once.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from util.compat import destroy_process_group


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def collective_timeout() -> timedelta | None:
    """How long a collective waits for its peers: SCALEMATCH_COLLECTIVE_TIMEOUT_S seconds, or None (torch's default)
    where that variable is not set."""
    if "SCALEMATCH_COLLECTIVE_TIMEOUT_S" not in os.environ:
        return None
    seconds = _env_int("SCALEMATCH_COLLECTIVE_TIMEOUT_S", 0)
    if seconds < 1:
        raise ValueError(f"environment variable SCALEMATCH_COLLECTIVE_TIMEOUT_S={seconds} must be at least 1")
    return timedelta(seconds=seconds)


def init_distributed(force_cpu: bool = False) -> tuple[int, int, int, torch.device]:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK, or run alone without them.

    Uses CUDA device LOCAL_RANK when CUDA is available and `force_cpu` is false (NGPUS=0 sets it), else the CPU.
    Returns (rank, world_size, local_rank, device).
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and not force_cpu
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # Binding NCCL to this process's GPU keeps collectives (barrier included) off other devices.
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                                timeout=collective_timeout())
    return rank, world_size, local_rank, device


def is_main() -> bool:
    """True in the process that logs, evaluates and saves (rank 0), and when running alone."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process; nothing to wait for when running alone."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over all processes and return it; unchanged when running alone."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_main(value):
    """Rank 0's `value` (any picklable object) in every process; `value` itself when running alone."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_to_main(value) -> list | None:
    """On rank 0, the list of every process's `value` (picklable, CPU tensors), indexed by rank; None elsewhere."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        destroy_process_group()


def under_torchrun() -> bool:
    """Whether this process is a worker that torchrun's agent started (and watches)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


# Set by launch() for its workers: the launcher's pid, so that a worker whose launcher died while the worker was still
# starting (imports take seconds on a loaded machine) knows it is an orphan rather than taking its new parent for it.
LAUNCHER_PID_VARIABLE = "SCALEMATCH_LAUNCHER_PID"
# What the kernel sends a worker when its launcher dies (Linux prctl PR_SET_PDEATHSIG); nothing else uses it here.
LAUNCHER_DEATH_SIGNAL = signal.SIGUSR2
PR_SET_PDEATHSIG = 1


def _ask_for_parent_death_signal(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent dies; only Linux offers it (elsewhere the
    polling thread watches alone)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


def watch_launcher(on_exit, interval_s: float = 1.0) -> None:
    """Call `on_exit()` once when the launcher that started this process has ended: torchrun starts its workers in
    sessions of their own, so a SIGKILL-ed launcher would otherwise leave them training. Call it from the main
    thread. On Linux the kernel signals the end at once (parent-death signal; the handler runs between two Python
    steps of the main thread); a thread polling the parent every `interval_s` is the fallback. A launcher that ended
    before this call (LAUNCHER_PID_VARIABLE no longer the parent) is told at once."""
    launcher = int(os.environ.get(LAUNCHER_PID_VARIABLE, os.getppid()))
    told = threading.Lock()

    def tell_once():
        if told.acquire(blocking=False):
            on_exit()

    def on_signal(signum, frame):
        if os.getppid() != launcher:  # the kernel reparents before it signals; a stray SIGUSR2 is ignored
            tell_once()

    # The handler first: the signal's default action would end the process.
    signal.signal(LAUNCHER_DEATH_SIGNAL, on_signal)
    _ask_for_parent_death_signal(LAUNCHER_DEATH_SIGNAL)

    def watch():
        while os.getppid() == launcher:
            time.sleep(interval_s)
        tell_once()
    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def report_failure(message: str, caused_by_another_process: bool = False) -> None:
    """Tell the user about a failure in one line: on stderr when running alone; under torchrun in this worker's error
    file, which the launcher reads, so that a failure every process shares is printed once, not once per process.
    A failure `caused_by_another_process` (a collective whose peer has gone) is printed only if nothing else failed."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        print(message, file=sys.stderr)
        return
    record = {"message": message, "timestamp": int(time.time()), "time": time.time(),
              "caused_by_another_process": caused_by_another_process}
    with open(error_file, "w") as file:
        json.dump(record, file)
