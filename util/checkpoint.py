"""Checkpoints and run directories: atomic saving, safe (weights-only) loading, the run lock, finding the newest run."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pickle
import re
import socket
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

LOCK_NAME = "run.lock"
# save_checkpoint's temporaries: .NAME.PID.tmp beside NAME.
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


class CheckpointError(Exception):
    """A checkpoint that cannot be read or written, told in one line naming the file."""


class RunDirectoryError(Exception):
    """A run directory that cannot be used (another live run holds it, or it cannot be written), in one line."""


def _fsync(path: str | os.PathLike) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Let `write(temporary)` write the whole file at a temporary path beside `path`, then rename it over `path`, so
    that a crash leaves either the old file or the new one, never a torn one. A failed write (disk full, a read-only
    directory) is a CheckpointError naming `path` that says the previous file is left as it was."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
        # The rename lives in the directory entry; syncing the directory makes it survive a power loss.
        _fsync(path.parent)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        interrupt = _in_chain(error, KeyboardInterrupt)
        if interrupt is not None:
            # A Ctrl-C inside torch.save surfaces as its zip writer's RuntimeError; the caller must see the Ctrl-C.
            raise interrupt from None
        cause = _in_chain(error, OSError) if isinstance(error, (OSError, RuntimeError)) else None
        if cause is None:
            raise
        kept = "the previous one is left as it was" if existed else "nothing was written"
        raise CheckpointError(f"{path}: cannot write it ({cause.strerror or cause}); {kept}") from None


def _in_chain(error: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The exception of type `kind` that `error` is or arose from: torch.save reports a full disk, or a Ctrl-C, as a
    RuntimeError of its zip writer raised while handling the file's OSError or the KeyboardInterrupt."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `state` to `path` atomically (write_atomically).

    Keep `state` to tensors, containers, numbers and strings: load_checkpoint reads with weights_only=True.
    """
    def write(temporary: Path) -> None:
        # Through a Python file, so that a failed write leaves its OSError in the exception chain (torch's own file
        # writer reports a bare RuntimeError).
        with open(temporary, "wb") as file:
            torch.save(state, file)
    write_atomically(path, write)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with torch.load(weights_only=True); a missing or unreadable file is a CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():
            # A plain pickle draws a warning about its protocol before the one-line error below says what it is.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({_unreadable_reason(path, error)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(state).__name__}, not a dict of states)")
    return state


def _unreadable_reason(path: str | os.PathLike, error: Exception) -> str:
    """Why torch.load failed, in words: its own messages range from a bare key ('101') to a page of advice."""
    with open(path, "rb") as file:
        head = file.read(4)
    if not head:
        return "the file is empty"
    if head == b"PK\x03\x04":  # torch.save's zip container
        if "central directory" in str(error):
            return "the file is cut short: its zip archive has no end, as after an interrupted copy or a full disk"
        if isinstance(error, pickle.UnpicklingError):
            return "it holds Python objects other than tensors, numbers, strings and containers, which are not loaded"
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"a damaged torch.save archive: {detail}"
    if head[:1] == b"\x80":  # a pickle's protocol opcode
        return "a plain pickle or a pre-1.6 torch.save file, not the zip container torch.save writes"
    return "not a file written by torch.save"


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``model.load_state_dict(state_dict)``, strictly; tensors missing, unexpected or of another shape are one
    CheckpointError naming the first few (e.g. a checkpoint written for another config or an older network)."""
    target = model.state_dict()
    missing = [name for name in target if name not in state_dict]
    unexpected = [name for name in state_dict if name not in target]
    misshaped = [f"{name} {tuple(state_dict[name].shape)} vs {tuple(tensor.shape)}" for name, tensor in target.items()
                 if name in state_dict and state_dict[name].shape != tensor.shape]
    problems = [f"{len(names)} {kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                for kind, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if names]
    if problems:
        raise CheckpointError(f"{path}: its tensors do not fit the network of its config: {'; '.join(problems)}")
    model.load_state_dict(state_dict)


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
