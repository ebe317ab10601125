"""RUN_DIR/results.json: a run's figures as data (each validation's mIoU and per-class IoU, the best, the pseudo-label
mIoU per epoch, training time), rewritten atomically after every epoch, so that scripts read results, not log text.
A resumed run continues the file it finds."""
from __future__ import annotations

import json
import os
import sys

from util.checkpoint import CheckpointError, write_atomically

RESULTS_NAME = "results.json"


class RunResults:
    """Rank 0's record of a run. A write that fails (a full disk) is told once in one line, as for train.log; the
    checkpoints stay the run's record."""

    def __init__(self, run_dir: str, cfg: dict, class_names: list[str], total_iters: int):
        self.path = os.path.join(run_dir, RESULTS_NAME)
        self.failed = False
        self.data = {"dataset": cfg["dataset"], "split": cfg["split"], "class_names": list(class_names),
                     "total_iterations": total_iters, "evaluations": [], "pseudo_label_miou": {},
                     "train_seconds": 0.0, "trained_iterations": 0, "finished": False}
        try:
            previous = load_results(run_dir)
        except ValueError as error:
            print(f"warning: {error}; it starts afresh", file=sys.stderr)
            previous = None
        if previous is not None:
            self.data.update({key: previous[key] for key in ("evaluations", "pseudo_label_miou", "train_seconds",
                                                             "trained_iterations") if key in previous})

    def add_training(self, seconds: float, iterations: int) -> None:
        self.data["train_seconds"] += seconds
        self.data["trained_iterations"] += iterations
        self._write()

    def add_pseudo_label_miou(self, epoch: int, mious: dict[str, float]) -> None:
        for source, miou in mious.items():
            self.data["pseudo_label_miou"].setdefault(source, {})[str(epoch)] = miou
        self._write()

    def add_evaluation(self, epoch: int, iteration: int, miou: float, iou: list[float]) -> None:
        # A resumed run may evaluate an epoch again: the last evaluation of an epoch counts.
        kept = [entry for entry in self.data["evaluations"] if entry["epoch"] != epoch]
        self.data["evaluations"] = kept + [{"epoch": epoch, "iteration": iteration, "miou": miou, "iou": iou}]
        self._write()

    def finish(self) -> None:
        self.data["finished"] = True
        self._write()

    def _write(self) -> None:
        evaluations = self.data["evaluations"]
        if evaluations:
            best = max(evaluations, key=lambda entry: entry["miou"])
            self.data.update(final_miou=evaluations[-1]["miou"], final_iou=evaluations[-1]["iou"],
                             best_miou=best["miou"], best_epoch=best["epoch"])
        trained = self.data["trained_iterations"]
        self.data["seconds_per_iteration"] = self.data["train_seconds"] / trained if trained else None
        if self.failed:
            return
        try:
            write_atomically(self.path, lambda temporary: temporary.write_text(json.dumps(self.data, indent=1)))
        except CheckpointError as error:
            print(f"warning: {error}; the run goes on without its results.json", file=sys.stderr)
            self.failed = True


def load_results(run_dir: str) -> dict | None:
    """The results.json of ``run_dir``, None where the run has none (yet)."""
    path = os.path.join(run_dir, RESULTS_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            results = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: not a results file (its top level is a {type(results).__name__})")
    return results
