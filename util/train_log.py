"""Reading this codebase's run_dir/train.log, also while the run still writes it: the loss lines and the validation
tables, with the loss terms under the release logs' names (util/release_log.TERMS) so the two compare directly.

A loss line: `DATE TIME INFO epoch E iter I/TOTAL lr LR name value name value ...` (I counts steps since the start,
values are running means since the epoch began, as the release's). A validation: `DATE TIME INFO epoch E validation
(MODE)`, a header row, one `class  IoU` row per class, an `mIoU` row and `best mIoU so far`. A resumed run appends
to the same file and redoes the steps after its last checkpoint: the later lines stand.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# This codebase's term names -> the release's; the release's own names are accepted as they are.
TERM_NAMES = {"total": "total", "supervised": "x", "strong": "u_s", "isvc": "u_scale", "fp": "w_fp",
              "mask_ratio": "mask_ratio", "x": "x", "u_s": "u_s", "u_scale": "u_scale", "w_fp": "w_fp"}

_STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+ (?:\[rank \d+\] )?"
_LOSS = re.compile(_STAMP + r"epoch (\d+) iter (\d+)/(\d+) lr (\S+) (.*?)\s*$")
_VALIDATION = re.compile(_STAMP + r"epoch (\d+) validation \((\w+)\)\s*$")
_SHAPE = re.compile(_STAMP + r"model .*, (\d+) iterations x (\d+) epochs\s*$")
# A name, its value, and the words the mean rows carry after it ("over the 6 classes present").
_ROW = re.compile(r"^(.*?\S)\s+(n/a|-?\d+(?:\.\d+)?)(?:\s{2,}\S.*)?\s*$")
_NUMBER = re.compile(r"^-?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf)$")


class TrainLogError(Exception):
    """A train.log that cannot be read, told in one line naming the file."""


@dataclass
class RunLoss:
    epoch: int
    iteration: int  # steps done since the start of training
    total_iters: int
    terms: dict[str, float]

    @property
    def fraction(self) -> float:
        return self.iteration / self.total_iters


@dataclass
class RunEval:
    epoch: int
    miou: float | None
    iou: dict[str, float | None]  # class name -> IoU (%), None where it reads n/a
    mode: str


@dataclass
class RunLog:
    path: str
    losses: list[RunLoss] = field(default_factory=list)
    evals: list[RunEval] = field(default_factory=list)
    iters_per_epoch: int | None = None  # from the start-up line 'model ..., N iterations x E epochs'
    epochs: int | None = None

    @property
    def total_iters(self) -> int | None:
        if self.losses:
            return self.losses[-1].total_iters
        return self.iters_per_epoch * self.epochs if self.iters_per_epoch and self.epochs else None

    def eval_fraction(self, record: RunEval) -> float | None:
        """Fraction of training done when epoch `record.epoch` was evaluated (None: the shape is not logged)."""
        if self.iters_per_epoch and self.total_iters:
            return min(1.0, (record.epoch + 1) * self.iters_per_epoch / self.total_iters)
        return None


def train_log_path(run: str | Path) -> Path:
    """run_dir/train.log for a run directory, or the file itself."""
    path = Path(run)
    return path / "train.log" if path.is_dir() else path


def read_train_log(run: str | Path) -> RunLog:
    """Parse a run's train.log (a run directory or the file). A line cut short by a run still writing is left out."""
    path = train_log_path(run)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise TrainLogError(f"{path}: cannot read the run's log ({error.strerror or error})") from None
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # still being written
    losses: dict[int, RunLoss] = {}
    evals: dict[int, RunEval] = {}
    shape = (None, None)
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if match := _SHAPE.match(line):
            shape = (int(match.group(1)), int(match.group(2)))
        elif match := _LOSS.match(line):
            record = _loss(match)
            if record is None:
                continue
            if losses and record.iteration <= max(losses):
                # A resumed run redoes the steps after its last checkpoint: what the interrupted attempt logged
                # from there on no longer stands.
                losses = {i: r for i, r in losses.items() if i < record.iteration}
                evals = {e: r for e, r in evals.items() if e < record.epoch}
            losses[record.iteration] = record
        elif match := _VALIDATION.match(line):
            record = RunEval(int(match.group(1)), None, {}, match.group(2))
            while index < len(lines) and not re.match(_STAMP, lines[index]):
                row = _ROW.match(lines[index])
                index += 1
                # The release's mean over all classes is printed beside the present-class mIoU the log compares.
                if row is None or row.group(1) in ("class", "mIoU (all)"):
                    continue
                if row.group(1).startswith("best mIoU so far"):
                    break
                value = None if row.group(2) == "n/a" else float(row.group(2))
                if row.group(1) == "mIoU":
                    record.miou = value
                else:
                    record.iou[row.group(1)] = value
            if record.miou is not None:
                evals[record.epoch] = record
    if not losses and not evals:
        raise TrainLogError(f"{path}: no loss line ('epoch E iter I/TOTAL lr ...') and no validation yet")
    return RunLog(str(path), [losses[i] for i in sorted(losses)], [evals[epoch] for epoch in sorted(evals)], *shape)


def _loss(match: re.Match) -> RunLoss | None:
    words = match.group(5).split()
    if len(words) % 2:
        return None
    terms = {}
    for name, value in zip(words[::2], words[1::2]):
        if not _NUMBER.match(value.lower()):
            return None
        terms[TERM_NAMES.get(name, name)] = float(value)
    total = int(match.group(3))
    if total <= 0:
        return None
    return RunLoss(int(match.group(1)), int(match.group(2)), total, terms)
