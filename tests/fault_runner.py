"""Run the trainer with a signal sent from inside it at a chosen moment of the run: a test that polls a checkpoint
file and signals from outside races the run, and lands wherever the run happens to be.

    python tests/fault_runner.py SIGNAL MOMENT TARGET -- SCALEMATCH_ARGUMENTS ...
    python -m util.launcher 2 tests/fault_runner.py SIGNAL MOMENT TARGET -- SCALEMATCH_ARGUMENTS ...   # under torchrun

SIGNAL  a signal name: SIGKILL, SIGTERM, SIGINT, SIGSTOP, ...
MOMENT  step:N  right after this process's N-th optimizer step (one a training iteration), before that iteration's
                checkpoint is written;
        save:N  half-way through this process's N-th torch.save (a checkpoint write), after its first records.
TARGET  self (this process), launcher (its parent: torchrun's launcher), workers (the launcher's children: every
        worker of this node, this one last), everything (the launcher, then every worker).

Only the first process of each node (LOCAL_RANK 0, or the only process) sends it. The process then runs on as the
trainer does (scalematch.cli) and exits with its code.
"""
import glob
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

import scalematch  # noqa: E402

# The writes of a checkpoint's torch.save after which a save:N signal is sent: past its first records.
WRITES_BEFORE_THE_SIGNAL = 3


def children(pid: int) -> list[int]:
    return [int(child) for task in glob.glob(f"/proc/{pid}/task/*/children") for child in open(task).read().split()]


def receivers(target: str) -> list[int]:
    """The processes TARGET names, in the order they are signalled (this process last, which SIGKILL ends)."""
    me, launcher = os.getpid(), os.getppid()
    workers = [pid for pid in children(launcher) if pid != me] + [me]
    return {"self": [me], "launcher": [launcher], "workers": workers, "everything": [launcher, *workers]}[target]


class SignalOnWrite:
    """A file that sends the signal at its WRITES_BEFORE_THE_SIGNAL-th write: inside torch.save, as a signal that
    arrives while a checkpoint is being written."""

    def __init__(self, file, send):
        self.file, self.send, self.writes = file, send, 0

    def write(self, data):
        self.writes += 1
        if self.writes == WRITES_BEFORE_THE_SIGNAL:
            self.send()
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def arm(signal_name: str, moment: str, target: str) -> None:
    kind, _, count = moment.partition(":")
    if kind not in ("step", "save") or not count.isdigit() or int(count) < 1:
        sys.exit(f"usage: MOMENT is step:N or save:N with N >= 1, got {moment!r}")
    if target not in ("self", "launcher", "workers", "everything"):
        sys.exit(f"usage: TARGET is self, launcher, workers or everything, got {target!r}")
    signum, at = signal.Signals[signal_name], int(count)

    def send():
        for pid in receivers(target):
            os.kill(pid, signum)

    if signum == signal.SIGINT:
        # As in a terminal's foreground process; a test suite run in the background starts with SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    if kind == "step":
        steps = []

        def after_step(optimizer, args, kwargs):
            steps.append(1)
            if len(steps) == at:
                send()
        register_optimizer_step_post_hook(after_step)
        return
    real_save, saves = torch.save, []

    def save(obj, file, *args, **kwargs):
        saves.append(1)
        real_save(obj, SignalOnWrite(file, send) if len(saves) == at else file, *args, **kwargs)
    torch.save = save


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[4] != "--":
        sys.exit("usage: python tests/fault_runner.py SIGNAL MOMENT TARGET -- SCALEMATCH_ARGUMENTS ...")
    arm(*sys.argv[1:4])
    sys.exit(scalematch.cli(sys.argv[5:]))
