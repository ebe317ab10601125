"""Resume: what a checkpoint holds beyond the weights (every process's random streams and BatchNorm statistics, the
schedule position, the best mIoU), the check that a resumed run is still the same experiment, and the reconciliation
of latest.pth with best.pth after a kill between their writes."""
from __future__ import annotations

import os

from torch import nn

from util.checkpoint import CheckpointError, load_checkpoint, load_model_state
from util.config import keys_added_since, resumable_keys
from util.dist import gather_to_main
from util.sampling import rng_state, set_rng_state

PROGRESS_KEYS = ("epoch", "step", "iteration", "best_miou", "skipped_steps")


def fresh_progress() -> dict:
    """Where a new run starts: epoch, step within it, iteration, best mIoU and skipped (non-finite) steps."""
    return {"epoch": 0, "step": 0, "iteration": 0, "best_miou": 0.0, "skipped_steps": 0}


def flatten(cfg: dict, prefix: str = "") -> dict:
    """Nested sections as dotted keys: {'loss_weights.strong': 0.25, ...}."""
    flat = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_config(saved: dict, cfg: dict, path: str, logger) -> None:
    """Refuse, in one line naming every such key, a resume whose settings change the experiment, including a key
    added since the run started whose default would change how it trains."""
    older = {key: value for key, value in keys_added_since(saved).items() if cfg[key] != value}
    if older:
        raise CheckpointError(f"{path}: refusing to resume: it started before "
                              + ", ".join(f"'{key}' existed and trained as {key}={value!r}"
                                          for key, value in older.items())
                              + "; add " + " ".join(f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                                                    for key, value in older.items()) + " to resume it")
    before, now = flatten(saved), flatten(cfg)
    changed = [key for key in now if key in before and before[key] != now[key]]
    resumable = resumable_keys()
    refused = [key for key in changed if key.split(".")[0] not in resumable]
    if refused:
        raise CheckpointError(f"{path}: refusing to resume: "
                              + ", ".join(f"'{key}' was {before[key]!r}, now {now[key]!r}" for key in refused)
                              + "; that is another experiment, so give it another run_name (or undo the change)")
    unrecorded = [key for key in now if key not in before]
    if changed:
        logger.warning(f"resuming {path} with changed settings: "
                       + ", ".join(f"{key} {before[key]!r} -> {now[key]!r}" for key in sorted(changed)))
    if unrecorded:
        logger.warning(f"resuming {path}, whose config predates {', '.join(unrecorded)}: taken as unchanged")


def process_state(net: nn.Module) -> dict:
    """What differs between the processes of a run: their random streams (each rank draws its own dropout masks and
    scales) and their BatchNorm running statistics (the same everywhere only under SyncBatchNorm, not on CPU)."""
    buffer_names = {name for name, _ in net.named_buffers()}
    return {"rng": rng_state(),
            "buffers": {name: value.cpu() for name, value in net.state_dict().items() if name in buffer_names}}


def checkpoint_state(net, optimizer, scaler, cfg: dict, progress: dict, miou=None) -> dict | None:
    """The checkpoint of this moment on rank 0, None elsewhere; every process must call it.

    Each rank's own state is gathered into the one file rather than written to a file per rank: one atomic rename
    then commits every rank's state at the same iteration, where a kill between per-rank writes would leave a mix."""
    processes = gather_to_main(process_state(net))
    if processes is None:
        return None
    return {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "config": cfg, "processes": processes, "miou": miou, **progress}


def recorded_best_miou(best_path: str) -> float:
    """The mIoU that best.pth was saved with, 0 without one. A new best is written to best.pth before latest.pth
    records it, so a run killed between the two writes still knows (and keeps) its best."""
    if not os.path.exists(best_path):
        return 0.0
    return load_checkpoint(best_path)["miou"]


def resume(path: str, net, optimizer, scaler, cfg: dict, iters_per_epoch: int, rank: int, world_size: int,
           logger) -> dict:
    """Restore a run from ``path`` (this rank's own random states and statistics); returns where to continue
    (epoch, step within it, iteration, best mIoU, skipped steps)."""
    # On the CPU: random states must stay CPU tensors; load_state_dict moves weights and optimizer state to the device.
    state = load_checkpoint(path, map_location="cpu")
    check_resume_config(state["config"], cfg, path, logger)
    # Checkpoints written before each rank's state was saved hold rank 0's random states alone.
    processes = state["processes"] if "processes" in state else [{"rng": state["rng"]}] * world_size
    if len(processes) != world_size:
        raise CheckpointError(f"{path}: refusing to resume: it was trained by {len(processes)} process(es), now "
                              f"{world_size}; rerun it with NGPUS {len(processes)} (the batch is per process)")
    own = processes[rank]
    load_model_state(net, {**state["model"], **own.get("buffers", {})}, path)
    optimizer.load_state_dict(state["optimizer"])
    # An empty scaler state was saved with the scaler off (on the CPU); an enabled scaler then starts afresh.
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(own["rng"])
    progress = {key: state[key] for key in PROGRESS_KEYS}
    if progress["step"] >= iters_per_epoch:
        progress["epoch"] += 1
        progress["step"] = 0
    logger.info(f"resumed from {path}: epoch {progress['epoch']} step {progress['step']}, "
                f"iteration {progress['iteration']}")
    return progress


def reconcile_best(progress: dict, best_on_disk: float, latest: str, best: str, resuming: bool, logger) -> None:
    """Take the best mIoU from best.pth (rank 0's reading, ``best_on_disk``): latest.pth may predate it, or outlive
    it, after a kill between their writes."""
    if resuming and best_on_disk != progress["best_miou"]:
        held = f"holds {best_on_disk:.2f}" if os.path.exists(best) else "does not exist"
        logger.warning(f"{latest} recorded best mIoU {progress['best_miou']:.2f}, but {best} {held}: the best so far "
                       "is taken from it")
    progress["best_miou"] = best_on_disk
    if resuming:
        logger.info(f"best mIoU so far {best_on_disk:.2f}")
