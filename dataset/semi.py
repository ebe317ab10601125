"""Split files -> labeled, unlabeled and validation datasets for semi-supervised segmentation.

A split file lists one sample per line, `image_rel_path mask_rel_path`, relative to the data root (the community
format of UniMatch's published splits). Unlabeled lines may omit the mask.
"""

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dataset import synthetic
from dataset.classes import CLASS_NAMES
from dataset.errors import DatasetError
from dataset.transforms import cutmix_box, geometric, normalize, strong_photometric

__all__ = ["DatasetError", "read_split", "read_image", "read_mask", "SemiDataset", "build_datasets"]

MODES = ("train_l", "train_u", "val")


def read_split(path: str | Path, require_mask: bool = False) -> list[tuple[str, str | None]]:
    """(image, mask or None) pairs of a split file; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"split file not found: {path}")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise DatasetError(f"{path}:{number}: expected 'image_path [mask_path]', got {len(fields)} fields: "
                               f"{line!r}")
        if require_mask and len(fields) == 1:
            raise DatasetError(f"{path}:{number}: no mask path; labeled and val splits need 'image_path mask_path'")
        samples.append((fields[0], fields[1] if len(fields) == 2 else None))
    if not samples:
        raise DatasetError(f"split file is empty: {path}")
    return samples


def read_image(path: Path) -> torch.Tensor:
    """uint8 (3, H, W) RGB tensor."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def read_mask(path: Path) -> torch.Tensor:
    """uint8 (H, W) class indices; a palette PNG gives its indices, never its colours."""
    with Image.open(path) as mask:
        if mask.mode not in ("P", "L"):
            raise DatasetError(f"mask must be a palette or grayscale image of class indices, got mode {mask.mode}: "
                               f"{path}")
        return torch.from_numpy(np.array(mask))


def _resolve_mask(root: Path, rel_path: str) -> Path | None:
    """The mask file of a split entry, or None if it is not on disk.

    UniMatch's Pascal splits name SegmentationClass/ for the augmented masks, which many setups keep in
    SegmentationClassAug/, so that folder is tried as well.
    """
    path = root / rel_path
    if path.is_file():
        return path
    parts = Path(rel_path).parts
    if parts and parts[0] == "SegmentationClass":
        aug_path = root.joinpath("SegmentationClassAug", *parts[1:])
        if aug_path.is_file():
            return aug_path
    return None


class SemiDataset(Dataset):
    """One of the three datasets of a semi-supervised run; mode picks what an item holds.

    train_l: {'image', 'mask'} after the training geometry.
    train_u: {'image_weak', 'image_strong', 'cutmix_box', 'ignore_mask', 'mask'}: one geometry, then strong_views
             strongly coloured copies, each with its own CutMix box; ignore_mask is 255 on padding; mask is the
             ground truth when on disk (all ignore_index otherwise), only for measuring pseudo-label quality.
    val:     {'image', 'mask', 'id'} at full resolution.
    """

    def __init__(self, root: str | Path, samples: list[tuple[str, str | None]], mode: str, crop_size: int,
                 scale_range: tuple[float, float] = (0.5, 2.0), strong_views: int = 2, nsample: int | None = None,
                 ignore_index: int = 255):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.root = Path(root).expanduser()
        self.mode = mode
        self.crop_size = crop_size
        self.scale_range = tuple(scale_range)
        self.strong_views = strong_views
        self.ignore_index = ignore_index
        self.samples = [self._resolve(image, mask) for image, mask in samples]
        # Repeat the (small) labeled set to the unlabeled set's length so one epoch walks both once.
        if nsample is not None and nsample > len(self.samples):
            self.samples = (self.samples * math.ceil(nsample / len(self.samples)))[:nsample]

    def _resolve(self, image_rel: str, mask_rel: str | None) -> tuple[str, Path, Path | None]:
        image_path = self.root / image_rel
        if not image_path.is_file():
            raise DatasetError(f"image not found: {image_path} (data_root {self.root})")
        mask_path = None if mask_rel is None else _resolve_mask(self.root, mask_rel)
        if mask_path is None and self.mode != "train_u":
            missing = (f"no mask listed for {image_rel}" if mask_rel is None
                       else f"mask not found: {self.root / mask_rel}")
            raise DatasetError(f"{missing} (data_root {self.root}); {self.mode} samples need their mask")
        return image_rel, image_path, mask_path

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        image_id, image_path, mask_path = self.samples[index]
        image = read_image(image_path)
        if mask_path is None:
            mask = torch.full(image.shape[1:], self.ignore_index, dtype=torch.uint8)
        else:
            mask = read_mask(mask_path)
            if mask.shape != image.shape[1:]:
                raise DatasetError(f"mask {mask_path} is {tuple(mask.shape)} but image {image_path} is "
                                   f"{tuple(image.shape[1:])}")

        if self.mode == "val":
            return {"image": normalize(image), "mask": mask.long(), "id": image_id}

        if self.mode == "train_l":
            image, labels = geometric(image, mask[None], self.crop_size, self.scale_range, self.ignore_index)
            return {"image": normalize(image), "mask": labels[0].long()}

        # The second map starts at 0 everywhere and receives 255 only where padding is added.
        labels = torch.stack([mask, torch.zeros_like(mask)])
        image, labels = geometric(image, labels, self.crop_size, self.scale_range, [self.ignore_index, 255])
        return {
            "image_weak": normalize(image),
            "image_strong": [normalize(strong_photometric(image)) for _ in range(self.strong_views)],
            "cutmix_box": [cutmix_box(self.crop_size) for _ in range(self.strong_views)],
            "ignore_mask": labels[1].long(),
            "mask": labels[0].long(),
        }


def _split_file(splits_dir: Path, cfg: dict, *parts: str) -> Path:
    path = splits_dir.joinpath(cfg["dataset"], *parts)
    if not path.is_file():
        raise DatasetError(f"split file not found: {path}; copy the published split files there or run "
                           f"`python -m dataset.make_splits {cfg['dataset']} --data-root {cfg['data_root']}`")
    return path


def build_datasets(cfg: dict, splits_dir: str | Path = "splits") -> tuple[SemiDataset, SemiDataset, SemiDataset]:
    """(labeled, unlabeled, val) datasets of cfg's dataset and split; the synthetic data is generated on first use."""
    expected = len(CLASS_NAMES[cfg["dataset"]])
    if cfg["nclass"] != expected:
        raise DatasetError(f"nclass {cfg['nclass']} does not match the {expected} classes of {cfg['dataset']}")
    root = Path(cfg["data_root"]).expanduser()
    if cfg["dataset"] == "synthetic":
        synthetic.ensure_generated(root)
    splits_dir = Path(splits_dir)
    labeled = read_split(_split_file(splits_dir, cfg, cfg["split"], "labeled.txt"), require_mask=True)
    unlabeled = read_split(_split_file(splits_dir, cfg, cfg["split"], "unlabeled.txt"))
    val = read_split(_split_file(splits_dir, cfg, "val.txt"), require_mask=True)

    crop_size, scale_range, strong_views = cfg["crop_size"], tuple(cfg["scale_range"]), cfg["strong_views"]
    labeled_ds = SemiDataset(root, labeled, "train_l", crop_size, scale_range, strong_views, nsample=len(unlabeled))
    unlabeled_ds = SemiDataset(root, unlabeled, "train_u", crop_size, scale_range, strong_views)
    val_ds = SemiDataset(root, val, "val", crop_size)
    return labeled_ds, unlabeled_ds, val_ds
