"""A process ends in bounded time, whichever way it leaves: Teardown shuts down the DataLoader workers (and closes
the writers) it owns on every way out of its `with` block (an error, Ctrl-C, a stop), so no exit waits on garbage
collection; and whatever child process is still alive at interpreter exit is killed after a short grace.

Without the explicit shutdown a run's persistent loader workers outlive its error: at interpreter exit DataLoader's
own shutdown is a no-op, and multiprocessing joins its daemonic children after a SIGTERM that a worker ignoring
SIGTERM (scalematch.py leaves SIGTERM to its training process) never obeys, so the join waits forever.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import time

# How long a child process still alive at interpreter exit may take to end before it is killed.
CHILD_GRACE_S = 2.0


def shut_down_workers(iterator) -> None:
    """End the worker processes of a DataLoader iterator now; nothing for one without workers or None. Idle workers
    end at once; one stuck in a read is joined for 5 s, then terminated and joined for 5 s more (DataLoader's own
    shutdown)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class Teardown:
    """Owns DataLoaders, the iterators taken from them and objects with a close(): leaving the `with` block, however
    it is left, closes the objects (newest first) and shuts down every owned loader's workers; registers the
    last-resort kill of lingering child processes at interpreter exit."""

    def __init__(self):
        self._loaders = []
        self._iterators = []
        self._closers = []

    def loaders(self, *loaders):
        """Own `loaders` (persistent workers included: their iterator lives in the loader); returns them."""
        self._loaders.extend(loaders)
        return loaders

    def iterate(self, loader):
        """An iterator over `loader` whose workers are shut down with this Teardown's."""
        iterator = iter(loader)
        self._iterators.append(iterator)
        return iterator

    def closing(self, closable):
        """Own `closable` (None is allowed: nothing to close); returns it."""
        if closable is not None:
            self._closers.append(closable.close)
        return closable

    def calling(self, close) -> None:
        """Call `close()` when the owned objects are closed, in the same order (newest first)."""
        self._closers.append(close)

    def close(self) -> None:
        """Close the owned objects and shut down the owned workers; each failure is raised after the rest is done."""
        failure = None
        pending = list(reversed(self._closers))
        pending += [lambda iterator=iterator: shut_down_workers(iterator) for iterator in self._iterators]
        pending += [lambda loader=loader: shut_down_workers(getattr(loader, "_iterator", None))
                    for loader in self._loaders]
        self._closers, self._iterators, self._loaders = [], [], []
        for action in pending:
            try:
                action()
            except BaseException as error:  # Ctrl-C in the middle must not leave the other workers running
                failure = failure or error
        if failure is not None:
            raise failure

    def __enter__(self) -> Teardown:
        kill_lingering_children_at_exit()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def kill_lingering_children(grace_s: float = CHILD_GRACE_S) -> list[int]:
    """Wait at most `grace_s` for the multiprocessing children of this process to end, then SIGKILL those still
    alive (a worker stuck in a read, or one ignoring SIGTERM that nothing shut down); returns their pids."""
    deadline = time.monotonic() + grace_s
    for child in multiprocessing.active_children():
        child.join(max(0.0, deadline - time.monotonic()))
    killed = []
    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        child.join(grace_s)
        killed.append(child.pid)
    return killed


_registered = False


def kill_lingering_children_at_exit() -> None:
    """Register kill_lingering_children to run at interpreter exit, once. Registered after multiprocessing's own
    exit handler, it runs before it, so that handler's join finds no child that could make it wait forever."""
    global _registered
    if not _registered:
        atexit.register(kill_lingering_children)
        _registered = True
