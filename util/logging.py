"""The project logger: rank 0 talks to the console and the run's train.log, other ranks only warn."""
from __future__ import annotations

import errno
import logging
import os
import sys

LOGGER_NAME = "scalematch"


class RunLogFile(logging.FileHandler):
    """run_dir/train.log. A write that fails (a full disk) is told once on stderr, in one line, and the log goes on
    on the console, instead of a traceback for every record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            error = sys.exc_info()[1]
            print(f"warning: {self.baseFilename}: cannot write the log ({getattr(error, 'strerror', None) or error}); "
                  "it goes on on the console only", file=sys.stderr)
        self.failed = True

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def _open(self):
        # Without O_NONBLOCK, a FIFO in train.log's place that nothing reads would hold the run here forever.
        descriptor = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
        os.set_blocking(descriptor, True)
        return open(descriptor, self.mode, encoding=self.encoding, errors=self.errors)


# The handlers setup_logger installed: close_logger removes these, not those that others (pytest) attach.
_installed: list[logging.Handler] = []


def close_logger() -> None:
    """Undo setup_logger: detach and close its handlers (train.log's file among them) and let records propagate
    again, so that a run ending in a process that goes on (a notebook, the test suite) leaves no open log behind."""
    logger = logging.getLogger(LOGGER_NAME)
    while _installed:
        handler = _installed.pop()
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True


def setup_logger(run_dir: str | os.PathLike | None, rank: int) -> logging.Logger:
    """Configure and return the 'scalematch' logger; calling it again replaces the handlers it set before.

    Rank 0 logs INFO to stdout and, with a `run_dir`, appends to run_dir/train.log; other ranks log WARNING to stdout.
    """
    close_logger()
    logger = logging.getLogger(LOGGER_NAME)
    # The root logger's handlers would print every record a second time.
    logger.propagate = False
    level = logging.INFO if rank == 0 else logging.WARNING
    logger.setLevel(level)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    formatter = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if rank == 0 and run_dir is not None:
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "train.log")
        try:
            handlers.append(RunLogFile(path, mode="a"))
        except OSError as error:
            if error.errno != errno.ENXIO:
                raise
            print(f"warning: {path}: a FIFO that nothing reads is in its place; the log goes on on the console only",
                  file=sys.stderr)
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        _installed.append(handler)
    return logger
