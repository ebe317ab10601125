"""Run directories: where a run lives (exp/DATASET/SPLIT/NAME), the lock that keeps a second launch out, the clean-up
of a run that failed to start or a save that was killed, and finding the newest run."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
from pathlib import Path

from util.checkpoint import TEMPORARY
from util.config import operational_keys

LOCK_NAME = "run.lock"


class RunDirectoryError(Exception):
    """A run directory that cannot be used (another live run holds it, or it cannot be written), in one line."""


def run_directory(cfg: dict, overrides: list[str]) -> str:
    """exp/DATASET/SPLIT/<run name>. The default name is the command's overrides, cut to stay readable, then a hash
    of the whole resolved experiment: rerunning a command finds (and resumes) its run, and two experiments that differ
    in any setting, however long their command lines, never share one."""
    name = cfg["run_name"]
    if name is None:
        operational = operational_keys()
        kept = [o for o in overrides if o.split("=", 1)[0].strip() not in ("split", *operational)]
        readable = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(kept))[:80] or "default"
        experiment = {key: value for key, value in cfg.items() if key not in operational}
        digest = hashlib.sha256(json.dumps(experiment, sort_keys=True).encode()).hexdigest()[:12]
        name = f"{readable}-{digest}"
    return os.path.join(cfg["exp_dir"], cfg["dataset"], cfg["split"], name)


def find_latest_run(exp_dir: str | os.PathLike) -> Path | None:
    """The run directory anywhere under `exp_dir` (runs live in exp/DATASET/SPLIT/NAME) whose best.pth or
    latest.pth was written last, or None."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        return None
    checkpoints = [file for name in ("best.pth", "latest.pth") for file in exp_dir.glob(f"**/{name}") if file.is_file()]
    if not checkpoints:
        return None
    return max(checkpoints, key=lambda file: (file.stat().st_mtime_ns, str(file))).parent


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def lock_run_directory(run_dir: str | os.PathLike) -> tuple[int | None, str | None]:
    """Create `run_dir` if needed and lock it for as long as this process lives, so that a second launch of the same
    run is refused instead of overwriting its checkpoints. Returns the lock's file descriptor (closing it releases the
    lock) and a line for the log, or None: who held the lock before, or why the directory could not be locked.

    RUN_DIR/run.lock holds the owner's pid and host. It is a POSIX record lock (lockf): the kernel drops it when its
    owner dies, however it dies (so a killed run's lock is taken over at once), forked data loader workers do not
    inherit it, and NFS shares it between hosts.
    """
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        os.makedirs(run_dir, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise RunDirectoryError(f"{error.filename or path}: cannot create the run directory or its lock "
                                f"({error.strerror})") from None
    owner = os.pread(descriptor, 256, 0).decode(errors="replace").split()
    holder = f"process {owner[0]} on {owner[1]}" if len(owner) == 2 else "another process"
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EAGAIN):
            os.close(descriptor)
            raise RunDirectoryError(f"{run_dir} is in use by {holder} (see its {LOCK_NAME}): wait for that run to "
                                    "end, or give this one another run_name") from None
        # A filesystem without locks (some cluster mounts) must not stop training; the log says what is lost.
        os.close(descriptor)
        return None, (f"{path}: cannot lock the run directory ({error.strerror}), so a second launch of this run "
                      "would not be refused")
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as error:
        os.close(descriptor)
        raise RunDirectoryError(f"{path}: cannot write the run lock ({error.strerror})") from None
    taken_over = f"took over {path} from {holder}, which no longer runs" if len(owner) == 2 else None
    return descriptor, taken_over


def directories_to_create(run_dir: str | os.PathLike) -> list[str]:
    """`run_dir` and those of its parents that do not exist yet, deepest first."""
    missing, path = [], os.path.abspath(run_dir)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


# What a run writes before its first checkpoint.
START_UP_FILES = re.compile(r"^(run\.lock|train\.log|config\.yaml|events\.out\.tfevents\..*)$")


def remove_unstarted_run(run_dir: str | os.PathLike, created: list[str]) -> None:
    """Remove the directories of `created` (directories_to_create's list, taken before the run made them) again, after
    a start-up failure: a run directory that holds nothing but start-up files, then each parent left empty."""
    if not created or not os.path.isdir(run_dir):
        return
    if any(not START_UP_FILES.match(name) for name in os.listdir(run_dir)):
        return
    with contextlib.suppress(OSError):
        for name in os.listdir(run_dir):
            os.unlink(os.path.join(run_dir, name))
        for directory in created:
            os.rmdir(directory)


def release_run_directory(descriptor: int | None) -> None:
    """Give up the lock lock_run_directory took, emptying run.lock first: the next run then knows that this one ended
    cleanly rather than died."""
    if descriptor is None:
        return
    with contextlib.suppress(OSError):
        os.ftruncate(descriptor, 0)
    os.close(descriptor)


def remove_stale_temporaries(run_dir: str | os.PathLike, locked: bool = False) -> list[str]:
    """Delete the temporary files that save_checkpoint leaves behind when it is killed mid-write (.NAME.PID.tmp)
    and return their names. Holding the run's lock (`locked`), every one is stale, since only the lock's owner
    saves; without it, those whose pid no longer runs on this host (a pid names no process on another node)."""
    removed = []
    for entry in sorted(os.scandir(run_dir), key=lambda entry: entry.name):
        match = TEMPORARY.match(entry.name)
        if match and entry.is_file(follow_symlinks=False) and (locked or not _process_alive(int(match["pid"]))):
            try:
                os.unlink(entry.path)
            except OSError as error:
                raise RunDirectoryError(f"{entry.path}: cannot remove this stale temporary "
                                        f"({error.strerror})") from None
            removed.append(entry.name)
    return removed
