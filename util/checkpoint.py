"""Checkpoints: atomic saving, safe (weights-only) loading, and finding the newest run."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


class CheckpointError(Exception):
    """A checkpoint that cannot be read, told in one line naming the file."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `state` to `path` so that a crash leaves either the old file or the new one, never a torn one.

    Keep `state` to tensors, containers, numbers and strings: load_checkpoint reads with weights_only=True.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    # The rename lives in the directory entry; syncing the directory makes it survive a power loss.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with torch.load(weights_only=True); a missing or unreadable file is a CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from error


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
