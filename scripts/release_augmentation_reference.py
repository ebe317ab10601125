"""Items of the release's own training pipeline under fixed seeds, pinned for tests/test_release_augmentation.py.

    python scripts/release_augmentation_reference.py RELEASE_DIR [--write tests/data/release_augmentation_reference.pt]

RELEASE_DIR is the release's git directory (the `fetch` tool's mirror of github:lvliang6879/ScaleMatch) or a
checkout; its files are extracted to a temporary folder and its dataset/semi.py (with dataset/transform.py) imported
from there. Three small generated images and masks (labels 0..20 with a 255 border row) are written as PNG files in
the VOC layout, and for each seed s: Python's `random`, NumPy's and torch's generators are seeded with s (what
util.sampling.SeededDataset seeds per item), then the release's SemiDataset returns its item s % count. train_u items
(crop 32): weak view, both strong views, ignore map, both CutMix boxes and the mask; train_l items: image and mask.

The fixture holds the generated sources and every item; label maps and boxes as uint8 (lossless), images as the
release's float32 tensors. It needs torch, torchvision, numpy and PIL as pinned in requirements.txt: another PIL or
torchvision may draw or round otherwise, which the test would then report.
"""
import argparse
import importlib
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "release_augmentation_reference.pt"
# Landscape, portrait, landscape: both branches of the release's resize; below the crop size in ~40 % of the draws.
SHAPES = [(28, 40), (40, 28), (28, 40)]
COUNT = len(SHAPES)
CROP_SIZE = 32
UNLABELED_SEEDS = range(8)
LABELED_SEEDS = range(3)


def extract(release_dir: str, destination: str) -> str:
    """The release's files in ``destination``; returns its commit (or "checkout")."""
    if (Path(release_dir) / "ScaleMatch.py").is_file():
        shutil.copytree(release_dir, destination, dirs_exist_ok=True)
        return "checkout"
    archive = subprocess.run(["git", f"--git-dir={release_dir}", "archive", "HEAD"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"error: {release_dir}: not a release checkout or git directory "
                         f"({archive.stderr.decode().strip()})")
    subprocess.run(["tar", "-x", "-C", destination], input=archive.stdout, check=True)
    return subprocess.run(["git", f"--git-dir={release_dir}", "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def sources() -> list[dict]:
    """Random RGB images of SHAPES and their label maps (0..20, first row 255)."""
    rng = np.random.default_rng(0)
    samples = []
    for index, (height, width) in enumerate(SHAPES):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mask = rng.integers(0, 21, (height, width)).astype(np.uint8)
        mask[0] = 255
        samples.append({"image": torch.from_numpy(image), "mask": torch.from_numpy(mask),
                        "image_path": f"JPEGImages/{index}.png", "mask_path": f"SegmentationClass/{index}.png"})
    return samples


def write_sources(root: Path, samples: list[dict]) -> Path:
    """The samples as PNG files under ``root``, and a split file listing them; returns the split file."""
    for sample in samples:
        for key, path_key in (("image", "image_path"), ("mask", "mask_path")):
            (root / sample[path_key]).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample[key].numpy()).save(root / sample[path_key])
    split = root / "split.txt"
    split.write_text("".join(f"{sample['image_path']} {sample['mask_path']}\n" for sample in samples))
    return split


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def release_items(checkout: Path, root: Path, split: Path) -> tuple[list[dict], list[dict]]:
    sys.path.insert(0, str(checkout))
    try:
        semi = importlib.import_module("dataset.semi")
    finally:
        sys.path.remove(str(checkout))
    if not Path(semi.__file__).is_relative_to(checkout):
        raise SystemExit(f"error: imported {semi.__file__}, not the release's dataset/semi.py")
    unlabeled_set = semi.SemiDataset("pascal", str(root), "train_u", CROP_SIZE, str(split))
    labeled_set = semi.SemiDataset("pascal", str(root), "train_l", CROP_SIZE, str(split))
    unlabeled = []
    for seed in UNLABELED_SEEDS:
        seed_all(seed)
        weak, strong1, strong2, ignore, box1, box2, mask = unlabeled_set[seed % COUNT]
        unlabeled.append({"seed": seed, "index": seed % COUNT, "image_weak": weak, "image_strong": [strong1, strong2],
                          "ignore_mask": ignore.to(torch.uint8), "cutmix_box": [box1.to(torch.uint8),
                                                                                box2.to(torch.uint8)],
                          "mask": mask.to(torch.uint8)})
    labeled = []
    for seed in LABELED_SEEDS:
        seed_all(seed)
        image, mask = labeled_set[seed % COUNT]
        labeled.append({"seed": seed, "index": seed % COUNT, "image": image, "mask": mask.to(torch.uint8)})
    return unlabeled, labeled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("release_dir", help="the release's git directory or a checkout of it")
    parser.add_argument("--write", type=Path, default=FIXTURE, help=f"the fixture (default: {FIXTURE})")
    args = parser.parse_args(argv)
    samples = sources()
    with tempfile.TemporaryDirectory() as folder:
        checkout, root = Path(folder) / "release", Path(folder) / "data"
        checkout.mkdir()
        commit = extract(args.release_dir, str(checkout))
        split = write_sources(root, samples)
        unlabeled, labeled = release_items(checkout, root, split)
    torch.save({"commit": commit, "crop_size": CROP_SIZE, "samples": samples, "train_u": unlabeled,
                "train_l": labeled}, args.write)
    padded = sum(bool((item["ignore_mask"] == 255).any()) for item in unlabeled)
    boxes = sum(bool(box.any()) for item in unlabeled for box in item["cutmix_box"])
    print(f"wrote {args.write} ({args.write.stat().st_size / 1024:.0f} KiB): {len(unlabeled)} train_u items "
          f"({padded} padded, {boxes} of {2 * len(unlabeled)} boxes non-empty), {len(labeled)} train_l items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
