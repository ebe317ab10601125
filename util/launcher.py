"""The torchrun launcher scripts/train.sh runs: one line for a failed job, whatever its number of processes.

    python -m util.launcher NPROC scalematch.py --config configs/pascal.yaml ...   # torchrun, NPROC workers per node

One node by default (torchrun --standalone). Across nodes, the same command runs on every node with the usual
variables set (rendezvous_args): NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, or RDZV_ENDPOINT (and RDZV_ID).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import NamedTuple


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
    # torch is imported only now, past the settings' checks: a setting that cannot work is told without its seconds.
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import get_args_parser, run

    from util.compat import processes_could_not_meet
    from util.dist import LAUNCHER_PID_VARIABLE

    for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run"):
        logging.getLogger(name).setLevel(level)
    args = get_args_parser().parse_args([*rendezvous.args, f"--nproc-per-node={nproc}", *command])
    os.environ[LAUNCHER_PID_VARIABLE] = str(os.getpid())
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
        sys.exit("usage: python -m util.launcher NPROC SCRIPT [ARGS ...]")
    sys.exit(launch(int(sys.argv[1]), sys.argv[2:]))
