"""Checkpoint files: atomic saving (temporary file, fsync, rename), safe (weights-only) loading, fitting a state to a
network with one-line errors."""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

# save_checkpoint's temporaries: .NAME.PID.tmp beside NAME.
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


class CheckpointError(Exception):
    """A checkpoint that cannot be read or written, told in one line naming the file."""


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
