"""Process setup for single-process and torchrun (multi-process) training, and the launcher scripts/train.sh runs.

    python -m util.dist NPROC scalematch.py --config configs/pascal.yaml ...   # torchrun, NPROC workers per node

One node by default (torchrun --standalone). Across nodes, the same command runs on every node with the usual
variables set (rendezvous_args): NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, or RDZV_ENDPOINT (and RDZV_ID).

A collective waits for its peers SCALEMATCH_COLLECTIVE_TIMEOUT_S seconds where that variable is set (the GPU acceptance
run sets it, so that a stalled peer fails its part instead of eating the time of the parts after it), torch's default
otherwise.

Under torchrun a worker does not print its one-line errors: ``report_failure`` records them in the error file torchrun
gives it (TORCHELASTIC_ERROR_FILE), and the launcher prints the failure that caused the others once.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from util.compat import destroy_process_group, processes_could_not_meet


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


def watch_launcher(on_exit, interval_s: float = 1.0) -> None:
    """Call `on_exit()` once if the process that started this one ends: torchrun starts its workers in sessions of
    their own and offers no parent-death signal, so a SIGKILL-ed launcher would otherwise leave them training."""
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(interval_s)
        on_exit()
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


def _exit_status(exitcode: int) -> int:
    """A process's exit code as a shell reports it: 128 + the signal for one killed by a signal."""
    return 128 - exitcode if exitcode < 0 else exitcode


def _root_cause(failures: dict) -> tuple[str, int]:
    """The one line that explains a failed torchrun job, and its exit status: the earliest failure that a worker
    reported itself, else the earliest one caused by another process, else how the first worker to end ended.
    A worker that reported its failure and was then stopped by the launcher's SIGTERM before it could exit counts
    after one that exited with its own code, which is the job's."""
    reported = [(failure.error_file_data.get("caused_by_another_process", False), failure.exitcode < 0,
                 failure.error_file_data["time"], failure.error_file_data["message"], failure.exitcode)
                for failure in failures.values() if "time" in failure.error_file_data]
    if reported:
        *_, message, exitcode = min(reported)
        return message, _exit_status(exitcode)
    rank, failure = min(failures.items(), key=lambda item: item[1].timestamp)
    ending = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with {failure.exitcode}"
    return f"error: process {rank} {ending} (its output above says why)", _exit_status(failure.exitcode)


class LaunchError(Exception):
    """A multi-node setting that cannot work, told in one line naming the variable."""


def _positive(environ: dict, name: str, default: str | None = None, minimum: int = 1) -> int:
    text = environ.get(name, default)
    if text is None:
        raise LaunchError(f"{name} is not set")
    if not text.strip().isdigit() or int(text) < minimum:
        raise LaunchError(f"{name}={text!r} must be a whole number of at least {minimum}")
    return int(text)


class Rendezvous(NamedTuple):
    args: list[str]  # torchrun's options
    endpoint: str | None  # HOST:PORT where the nodes meet; None on one node
    line: str | None  # what this node is and where it meets the others; None on one node


def rendezvous_args(environ: dict) -> Rendezvous:
    """torchrun's options for where this node meets the others, from the variables of `environ`:

    * nothing set (or NNODES=1 alone): one node, ``--standalone``;
    * NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT (default 29500): a static rendezvous hosted by the node with
      NODE_RANK 0 at MASTER_ADDR:MASTER_PORT (global ranks follow the node ranks);
    * NNODES and RDZV_ENDPOINT (host:port; RDZV_ID names the job, default ``scalematch``): the c10d rendezvous,
      for schedulers that give no node rank.
    """
    nnodes = _positive(environ, "NNODES", "1")
    endpoint, master = environ.get("RDZV_ENDPOINT"), environ.get("MASTER_ADDR")
    if nnodes == 1 and not endpoint and not master:
        return Rendezvous(["--standalone"], None, None)
    if endpoint:
        if ":" not in endpoint:
            raise LaunchError(f"RDZV_ENDPOINT={endpoint!r} must be HOST:PORT")
        rdzv_id = environ.get("RDZV_ID", "scalematch")
        return Rendezvous([f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                           f"--rdzv-id={rdzv_id}"], endpoint,
                          f"{nnodes} node(s): meeting at {endpoint} (c10d rendezvous, id {rdzv_id})")
    if not master:
        raise LaunchError(f"NNODES={nnodes} needs MASTER_ADDR (the address of the node with NODE_RANK=0) or "
                          "RDZV_ENDPOINT")
    node_rank = _positive(environ, "NODE_RANK", "0" if nnodes == 1 else None, minimum=0)
    if node_rank >= nnodes:
        raise LaunchError(f"NODE_RANK={node_rank} must be below NNODES={nnodes}")
    port = _positive(environ, "MASTER_PORT", "29500")
    return Rendezvous([f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master}",
                       f"--master-port={port}"], f"{master}:{port}",
                      f"node {node_rank} of {nnodes}: meeting at {master}:{port}")


def launch(nproc: int, command: list[str]) -> int:
    """Run `command` (a script and its arguments) on `nproc` processes of this node with torchrun, meeting the other
    nodes as rendezvous_args says; return the exit code the job ends with: 0, the root failure's code after printing
    its one line (2 for a bad multi-node setting), or 128 + the signal that stopped the launcher (the workers having
    received it too: SIGTERM makes them checkpoint first)."""
    try:
        rendezvous = rendezvous_args(os.environ)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # torchrun's own log lines (the OMP_NUM_THREADS notice, shutdown chatter, the ChildFailedError table) would bury
    # the one line below; LOGLEVEL=INFO brings them back (some of its loggers read LOGLEVEL when they are created).
    level = os.environ.setdefault("LOGLEVEL", "CRITICAL")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import get_args_parser, run

    for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run"):
        logging.getLogger(name).setLevel(level)
    args = get_args_parser().parse_args([*rendezvous.args, f"--nproc-per-node={nproc}", *command])
    if rendezvous.line:
        # torchrun's own logs are off: without this line a node waiting for the others would look hung.
        print(f"{rendezvous.line}, {nproc} process(es) here", file=sys.stderr)
    try:
        run(args)
    except ChildFailedError as failed:
        # Workers that exit 143 on their own were stopped by SIGTERM and checkpointed (rank 0 has said where); the
        # agent's SIGTERM to the others can find them past their handler, shutting down.
        exit_codes = {failure.exitcode for failure in failed.failures.values()}
        if 128 + signal.SIGTERM in exit_codes and exit_codes <= {128 + signal.SIGTERM, -signal.SIGTERM}:
            return 128 + signal.SIGTERM
        message, status = _root_cause(failed.failures)
        print(message, file=sys.stderr)
        return status
    except (RuntimeError, RendezvousError) as failed:
        if not isinstance(failed, RendezvousError) and not processes_could_not_meet(failed):
            raise
        # The nodes never met (a port in use, a master that does not answer): no worker ran.
        reason = str(failed).strip().splitlines()[0] if str(failed).strip() else type(failed).__name__
        print(f"error: the processes could not meet at {rendezvous.endpoint or 'this node'} ({reason})",
              file=sys.stderr)
        return 2
    except SignalException as stopped:
        # After SIGTERM, rank 0 has said where it checkpointed.
        if stopped.sigval != signal.SIGTERM:
            print(f"stopped by {stopped.sigval.name}: the last checkpoint is left as it was; rerun the same command "
                  "to resume", file=sys.stderr)
        return 128 + stopped.sigval
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m util.dist NPROC SCRIPT [ARGS ...]")
    sys.exit(launch(int(sys.argv[1]), sys.argv[2:]))
