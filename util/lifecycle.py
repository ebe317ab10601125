"""A training run's lifecycle around the method: claiming its directory, the stop signals it checkpoints on, the
agreement of its processes on every branch, non-finite steps, and the exit code each ending maps to.

Exit codes: 0 done, 2 bad input or an unusable run directory or disk, 3 a non-finite loss or model, 143 stopped with
a checkpoint (SIGTERM, or the torchrun launcher gone), 130 interrupted, 1 a lost peer process.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import sys

import numpy as np
import torch
from torch import nn

from util.checkpoint import CheckpointError
from util.dist import all_reduce_sum, broadcast_from_main, cleanup, report_failure, under_torchrun, watch_launcher
from util.run_dir import (RunDirectoryError, directories_to_create, lock_run_directory, release_run_directory,
                          remove_stale_temporaries, remove_unstarted_run)


class Preempted(Exception):
    """SIGTERM arrived, or under torchrun the launcher ended; a checkpoint was written."""


class NonFiniteLoss(Exception):
    """A NaN or infinite loss with on_nonfinite_loss: stop."""


class NonFiniteModel(Exception):
    """The model's weights or running statistics hold NaN or inf: nothing more is saved."""


class StopSignal:
    """Remembers why the run should stop at the next step boundary, with a checkpoint: a SIGTERM (cluster
    pre-emption) or, under torchrun, the end of the launcher (its workers would otherwise train on unwatched).
    Ctrl-C (SIGINT) stops at once, as Python's own handler does; where Python cannot raise it (inside a __del__,
    such as a loader iterator's joining its workers, or a weakref callback, such as logging's) it would print the
    KeyboardInterrupt and drop it, and the run train on: there it is raised at the next step boundary instead
    (``check_interrupt``), and nothing is printed."""

    def __init__(self):
        self.reason = None
        self.interrupted = False
        self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._handle)}
        # A process started with Ctrl-C ignored (nohup, a background job) keeps ignoring it.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        self._previous_unraisablehook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        if under_torchrun():
            watch_launcher(lambda: self.request("the torchrun launcher ended"))

    def __enter__(self) -> StopSignal:
        return self

    def __exit__(self, *exc_info) -> None:
        """The handlers before, back (a run inside another program, such as a test, leaves it as it was)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = self._previous_unraisablehook

    def _interrupt(self, signum, frame):
        self.interrupted = True
        raise KeyboardInterrupt

    def _unraisable(self, unraisable) -> None:
        """Python's report of an exception it could not raise; a Ctrl-C's is left to check_interrupt."""
        if not (self.interrupted and issubclass(unraisable.exc_type, KeyboardInterrupt)):
            self._previous_unraisablehook(unraisable)

    def check_interrupt(self) -> None:
        """Raise the KeyboardInterrupt of a Ctrl-C that arrived where Python could not raise it."""
        if self.interrupted:
            raise KeyboardInterrupt

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def _handle(self, signum, frame):
        self.request("SIGTERM")

    @property
    def received(self) -> bool:
        return self.reason is not None

    def preempted(self, iteration: int) -> Preempted:
        return Preempted(f"{self.reason or 'another process was stopped'}: checkpoint written at iteration "
                         f"{iteration}; rerun the same command to resume")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def agree(flags: list[bool], world_size: int, device: torch.device) -> list[bool]:
    """Whether any process raised each flag, so that all processes take the same branch."""
    if world_size == 1:
        return flags
    # On the training device: NCCL reduces CUDA tensors only.
    raised = torch.tensor([float(f) for f in flags], device=device)
    return [bool(v) for v in all_reduce_sum(raised).tolist()]


def on_main(action, is_main: bool):
    """``action()`` run by rank 0 alone (writing the run directory); its result, or its one-line error, in every
    process, so that all processes go on or stop together instead of waiting for a peer that has gone."""
    outcome = None
    if is_main:
        try:
            outcome = (action(), None)
        except (CheckpointError, RunDirectoryError) as error:
            outcome = (None, error)
    result, error = broadcast_from_main(outcome)
    if error is not None:
        raise error
    return result


def ensure_finite(net: nn.Module, iteration: int, world_size: int, device: torch.device) -> None:
    """Stop before a model holding NaN or inf is evaluated or saved: the last checkpoint stays the last good one."""
    broken = [name for name, tensor in net.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if agree([bool(broken)], world_size, device)[0]:
        where = ", ".join(broken[:3]) + (", ..." if len(broken) > 3 else "") if broken else "another process's copy"
        raise NonFiniteModel(f"iteration {iteration}: the model holds NaN/inf ({where}); the last checkpoint is left "
                             "as it was")


@contextlib.contextmanager
def claimed_run_directory(run_dir: str, is_main: bool, start_up_errors: tuple):
    """Lock ``run_dir`` for the run (rank 0) and yield the lines its log should open with (who held the lock before,
    stale temporaries removed). A run that fails to start with one of ``start_up_errors`` leaves no directory behind
    where this launch made it; the lock is released however the run ends."""
    lock, created = None, []

    def claim():
        nonlocal lock, created
        created = directories_to_create(run_dir)
        lock, lock_note = lock_run_directory(run_dir)
        removed = remove_stale_temporaries(run_dir, locked=lock is not None)
        return [lock_note] + [f"removed {name}, left by a save that was killed" for name in removed]

    try:
        yield on_main(claim, is_main)
    except start_up_errors:
        release_run_directory(lock)
        lock = None
        remove_unstarted_run(run_dir, created)
        raise
    finally:
        release_run_directory(lock)


def exit_code(main, argv, bad_input: tuple) -> int:
    """Run ``main(argv)``; tell a failure in one line (under torchrun through the launcher, once for all processes)
    and return its exit code (the module docstring lists them). ``bad_input``: the one-line errors of bad input."""
    try:
        main(argv)
    except bad_input + (CheckpointError, RunDirectoryError) as error:
        report_failure(f"error: {error}")
        return 2
    except (NonFiniteLoss, NonFiniteModel) as error:
        report_failure(f"error: {error}")
        return 3
    except Preempted as stopped:
        if os.environ.get("RANK", "0") == "0":
            print(str(stopped), file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        # Under torchrun the launcher says it, once.
        if not under_torchrun():
            print("interrupted: the last checkpoint is left as it was; rerun the same command to resume",
                  file=sys.stderr)
        return 130
    except RuntimeError as error:
        # A collective whose peer has ended (NCCL: DistError; gloo: the peer closed its connection) is a consequence;
        # the launcher prints the peer's own failure instead.
        text = str(error).strip()
        peer_gone = isinstance(error, torch.distributed.DistError) or any(words in text for words in (
            "closed by peer", "reset by peer"))
        if not (peer_gone and torch.distributed.is_initialized()):
            raise
        report_failure(f"error: lost another process of the run ({text.splitlines()[0]})",
                       caused_by_another_process=True)
        return 1
    except OSError as error:
        if error.filename is None:
            raise
        report_failure(f"error: {error.filename}: {error.strerror}")
        return 2
    finally:
        leave_the_process_group()
    return 0


def leave_the_process_group() -> None:
    """Leave it on every way out, once the failure is told (its telling asks whether there is a group): left to
    the interpreter's exit, gloo could abort the process (exit 134 instead of the failure's own code). A group
    whose peer has gone may fail to close; the exit code stands."""
    try:
        cleanup()
    except RuntimeError:
        pass
