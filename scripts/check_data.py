"""Check a dataset and split without training: the start-up checks of build_datasets, then every labeled and val
image and mask (and with --unlabeled every unlabeled one) opened once; prints the class histogram and the summary.

    python scripts/check_data.py --config configs/pascal.yaml split=1_16 [key=value ...] [--unlabeled]

Exit code 0 when the data is clean; 2 with one `error:` line per problem otherwise.
"""
import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataset.classes import class_names  # noqa: E402
from dataset.semi import DatasetError, SemiDataset, build_datasets, dataset_summary, load_sample  # noqa: E402
from util.config import ConfigError, load_config  # noqa: E402
from util.logging import LOGGER_NAME  # noqa: E402

IGNORE_INDEX = 255
IGNORE_WARNING_SHARE = 0.5  # more ignored pixels than this hints at masks that are not class indices


class _CheckedSamples(Dataset):
    """(set name, problem or None, 256-bin pixel histogram of the mask or None) of each distinct sample."""

    def __init__(self, datasets: dict[str, SemiDataset]):
        self.items = [(name, image_path, mask_path) for name, dataset in datasets.items()
                      for _, image_path, mask_path in dataset.samples[:dataset.listed]]
        self.nclass = next(iter(datasets.values())).nclass

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, str | None, torch.Tensor | None]:
        name, image_path, mask_path = self.items[index]
        try:
            _, mask = load_sample(image_path, mask_path, self.nclass, IGNORE_INDEX)
        except DatasetError as error:
            return name, str(error), None
        histogram = None if mask is None else torch.bincount(mask.flatten().long(), minlength=256)
        return name, None, histogram


def check_samples(datasets: dict[str, SemiDataset], workers: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Open every distinct sample once: per-set pixel histograms (256 bins) and the problems found."""
    checked = _CheckedSamples(datasets)
    loader = DataLoader(checked, batch_size=None, num_workers=workers)
    histograms = {name: torch.zeros(256, dtype=torch.long) for name in datasets}
    problems = []
    for name, problem, histogram in tqdm(loader, total=len(checked), desc="checking", file=sys.stderr):
        if problem is not None:
            problems.append(problem)
        elif histogram is not None:
            histograms[name] += histogram
    return histograms, problems


def histogram_table(names: list[str], histograms: dict[str, torch.Tensor]) -> str:
    """Pixels and share of all pixels per class (and ignore) of each set."""
    sets = [name for name, counts in histograms.items() if counts.sum() > 0]
    width = max(len(name) for name in names + ["ignore (255)"])
    header = f"{'class':<{width}}" + "".join(f" {name + ' pixels':>16} {'%':>6}" for name in sets)
    rows = [header]
    for index, name in [*enumerate(names), (IGNORE_INDEX, "ignore (255)")]:
        row = f"{name:<{width}}"
        for set_name in sets:
            counts = histograms[set_name]
            row += f" {int(counts[index]):>16,} {100 * float(counts[index]) / float(counts.sum()):>6.2f}"
        rows.append(row)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a dataset and split without training.")
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/pascal.yaml")
    parser.add_argument("--unlabeled", action="store_true", help="also open every unlabeled image (slower)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. split=1_16")
    args = parser.parse_args(argv)
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger.addHandler(handler)
    try:
        cfg = load_config(args.config, args.overrides)
        names = class_names(cfg)
        labeled, unlabeled, val = build_datasets(cfg, cfg["splits_dir"])
    except (ConfigError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(handler)
    datasets = {"labeled": labeled, "val": val} | ({"unlabeled": unlabeled} if args.unlabeled else {})
    histograms, problems = check_samples(datasets, min(cfg["workers"], os.cpu_count() or 1))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"error: {len(problems)} of {sum(d.listed for d in datasets.values())} samples failed the check",
              file=sys.stderr)
        return 2
    print(histogram_table(names, histograms))
    labeled_counts = histograms["labeled"]
    absent = [name for index, name in enumerate(names) if labeled_counts[index] == 0]
    if absent:
        print(f"warning: no labeled pixel of class {', '.join(absent)}", file=sys.stderr)
    if labeled_counts[IGNORE_INDEX] > IGNORE_WARNING_SHARE * labeled_counts.sum():
        print(f"warning: most labeled pixels are {IGNORE_INDEX} (ignored); masks must hold class indices "
              f"0 ... {cfg['nclass'] - 1}", file=sys.stderr)
    print(dataset_summary(cfg, labeled, unlabeled, val))
    print("data OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
