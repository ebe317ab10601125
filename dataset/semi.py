"""Split files -> labeled, unlabeled and validation datasets for semi-supervised segmentation.

A split file lists one sample per line, `image_rel_path mask_rel_path`, relative to the data root (the community
format of UniMatch's published splits). Unlabeled lines may omit the mask.

Bad data stops a run before training with one line naming the file: build_datasets checks the data root, the split
files and that every listed file exists (without opening any); reading a sample checks that image and mask decode,
have the same size and that the mask holds only classes 0 ... nclass-1 and the ignore index.
"""

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dataset import synthetic
from dataset.classes import class_names
from dataset.errors import DatasetError
from dataset.split_format import read_lines
from dataset.transforms import (cutmix_box, geometric, label_tensor, normalize, normalize_pil, release_cutmix_box,
                                release_geometric, release_strong_photometric, strong_photometric, to_pil,
                                to_unit_float)
from util.config import SCHEMA
from util.logging import LOGGER_NAME

__all__ = ["DatasetError", "read_split", "read_image", "read_mask", "load_sample", "SemiDataset", "build_datasets",
           "build_val_dataset", "dataset_summary"]

MODES = ("train_l", "train_u", "val")
AUGMENTATIONS = SCHEMA["augmentation"].choices
EXAMPLES_SHOWN = 5  # paths named in an error about many files
# What PIL raises on a file it cannot decode: not an image, truncated, corrupt chunks, absurd size.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _examples(items: list[str]) -> str:
    shown = ", ".join(items[:EXAMPLES_SHOWN])
    return shown + (f", ... ({len(items) - EXAMPLES_SHOWN} more)" if len(items) > EXAMPLES_SHOWN else "")


def read_split(path: str | Path, require_mask: bool = False) -> list[tuple[str, str | None]]:
    """(image, mask or None) pairs of a UTF-8 split file; blank lines are skipped, an image listed twice is an
    error."""
    path = Path(path)
    samples = []
    first_line: dict[str, int] = {}  # normalised image path -> line number
    duplicates = []
    for number, line in enumerate(read_lines(path, "split file"), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise DatasetError(f"{path}:{number}: expected 'image_path [mask_path]', got {len(fields)} fields "
                               f"(paths cannot hold spaces): {line!r}")
        if require_mask and len(fields) == 1:
            raise DatasetError(f"{path}:{number}: no mask path; labeled and val splits need 'image_path mask_path'")
        key = os.path.normpath(fields[0])
        if key in first_line:
            duplicates.append(f"{fields[0]} (lines {first_line[key]} and {number})")
        else:
            first_line[key] = number
        samples.append((fields[0], fields[1] if len(fields) == 2 else None))
    if not samples:
        raise DatasetError(f"split file is empty: {path}")
    if duplicates:
        raise DatasetError(f"{path}: {len(duplicates)} image(s) listed more than once: {_examples(duplicates)}")
    return samples


def _unreadable(kind: str, path: Path, error: Exception) -> DatasetError:
    """A decoding error in words: PIL's own message stays in parentheses, it is often terse ('Truncated File Read')."""
    pil_message = (str(error).splitlines() or [type(error).__name__])[0]
    if isinstance(error, UnidentifiedImageError):
        reason = "not an image PIL can read"
    elif isinstance(error, Image.DecompressionBombError):
        reason = (f"its header claims more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels: a damaged file, or an image "
                  "too large to load")
    elif isinstance(error, OSError) and error.strerror:
        reason = error.strerror  # the file system's: Permission denied, Is a directory, ...
    elif "truncated" in pil_message.lower():
        reason = f"the file is truncated (PIL: {pil_message})"
    else:
        reason = f"the file is damaged, or a variant PIL cannot decode (PIL: {pil_message})"
    return DatasetError(f"cannot read {kind} {path}: {reason}")


def read_image(path: Path) -> torch.Tensor:
    """uint8 (3, H, W) RGB tensor: a channel-last view of the decoded pixels, so that training copies only its crop."""
    try:
        with Image.open(path) as image:
            image.load()  # PIL decodes lazily: decoding errors must surface inside the try
            rgb = np.array(image if image.mode == "RGB" else image.convert("RGB"))
    except _DECODE_ERRORS as error:
        raise _unreadable("image", path, error) from error
    return torch.from_numpy(rgb).permute(2, 0, 1)


def read_mask(path: Path) -> torch.Tensor:
    """uint8 (H, W) class indices; a palette PNG gives its indices, never its colours."""
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("P", "L"):
                raise DatasetError(f"mask must be an 8-bit palette or grayscale image of class indices (mode P or L), "
                                   f"got mode {mask.mode}: {path}")
            mask.load()
            indices = np.array(mask)
    except _DECODE_ERRORS as error:
        raise _unreadable("mask", path, error) from error
    return torch.from_numpy(indices)


def load_sample(image_path: Path, mask_path: Path | None, nclass: int,
                ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image and mask (None without one) of a sample, checked: same size, mask values in 0 ... nclass-1 or ignore."""
    image = read_image(image_path)
    if mask_path is None:
        return image, None
    mask = read_mask(mask_path)
    if mask.shape != image.shape[1:]:
        raise DatasetError(f"mask {mask_path} is {tuple(mask.shape)} but image {image_path} is "
                           f"{tuple(image.shape[1:])}")
    if int(mask.max()) >= nclass:
        values = mask[(mask >= nclass) & (mask != ignore_index)].unique().tolist()
        if values:
            shown = ", ".join(str(value) for value in values[:EXAMPLES_SHOWN])
            raise DatasetError(f"mask {mask_path} has value {shown}: classes are 0 ... {nclass - 1} "
                               f"(nclass {nclass}) and {ignore_index} is ignored")
    return image, mask


def _resolve_mask(root: Path, rel_path: str) -> Path | None:
    """The mask file of a split entry, or None if it is not on disk.

    UniMatch's Pascal splits name SegmentationClass/ for the augmented masks, which many setups keep in
    SegmentationClassAug/, so that folder is tried as well.
    """
    path = root / rel_path
    if os.path.isfile(path):
        return path
    parts = Path(rel_path).parts
    if parts and parts[0] == "SegmentationClass":
        aug_path = root.joinpath("SegmentationClassAug", *parts[1:])
        if os.path.isfile(aug_path):
            return aug_path
    return None


def _absent(root: Path, rel_path: str) -> str:
    """``rel_path`` as listed in an error about missing files, with why a path that is there is no file."""
    path = root / rel_path
    if path.is_dir():
        return f"{rel_path} (a folder)"
    if path.is_symlink():
        return f"{rel_path} (a broken or looping symlink)"
    return rel_path


def _missing_files_error(root: Path, source: str, listed: int, missing: list[str], images_missing: int,
                         masks_missing: list[str]) -> DatasetError:
    hint = ""
    if images_missing == listed:
        hint = "; no listed image exists: is data_root right?"
    elif (any(Path(mask).parts[0] == "SegmentationClass" for mask in masks_missing)
          and not (root / "SegmentationClassAug").is_dir()):
        hint = "; the augmented Pascal masks (SBD) belong in SegmentationClassAug/, see README 'Data'"
    return DatasetError(f"{source}: {len(missing)} listed file(s) missing under data_root {root}: "
                        f"{_examples(missing)}{hint}")


class SemiDataset(Dataset):
    """One of the three datasets of a semi-supervised run; mode picks what an item holds.

    train_l: {'image', 'mask'} after the training geometry.
    train_u: {'image_weak', 'image_strong', 'cutmix_box', 'ignore_mask', 'mask'}: one geometry, then strong_views
             strongly coloured copies, each with its own CutMix box; ignore_mask is 255 on padding; mask is the
             ground truth when on disk (all ignore_index otherwise), only for measuring pseudo-label quality.
    val:     {'image', 'mask', 'id'} at full resolution.

    augmentation picks the training pipeline of dataset.transforms: fast (on tensors, the default here) or release
    (the release's, on PIL images; build_datasets passes the config's, release by default). Both give the same keys,
    shapes and dtypes.

    Every listed image (and, outside train_u, mask) must exist; `source` names the samples' split file in errors.
    `listed` is the number of samples before the labeled list is repeated, or cut, to nsample.
    """

    def __init__(self, root: str | Path, samples: list[tuple[str, str | None]], mode: str, nclass: int,
                 crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0), strong_views: int = 2,
                 nsample: int | None = None, ignore_index: int = 255, source: str = "split",
                 augmentation: str = "fast"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
        self.root = Path(root).expanduser()
        self.mode = mode
        self.nclass = nclass
        self.crop_size = crop_size
        self.scale_range = tuple(scale_range)
        self.strong_views = strong_views
        self.ignore_index = ignore_index
        self.augmentation = augmentation
        self.samples = self._resolve(samples, source)
        self.listed = len(self.samples)
        # Repeat (or cut) the labeled list to the unlabeled length, as the release does, so one epoch walks both once.
        if nsample is not None:
            self.samples = (self.samples * math.ceil(nsample / len(self.samples)))[:nsample]

    def _resolve(self, samples: list[tuple[str, str | None]], source: str) -> list[tuple[str, Path, Path | None]]:
        """(id, image path, mask path or None) of every sample; one error lists every missing file."""
        resolved, missing, masks_missing, images_missing = [], [], [], 0
        for image_rel, mask_rel in samples:
            image_path = self.root / image_rel
            if not os.path.isfile(image_path):
                missing.append(_absent(self.root, image_rel))
                images_missing += 1
            if mask_rel is None and self.mode != "train_u":
                raise DatasetError(f"{source}: no mask listed for {image_rel}; {self.mode} samples need their mask")
            mask_path = None if mask_rel is None else _resolve_mask(self.root, mask_rel)
            if mask_path is None and mask_rel is not None and self.mode != "train_u":
                missing.append(_absent(self.root, mask_rel))
                masks_missing.append(mask_rel)
            resolved.append((image_rel, image_path, mask_path))
        if missing:
            raise _missing_files_error(self.root, source, len(samples), missing, images_missing, masks_missing)
        return resolved

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        image_id, image_path, mask_path = self.samples[index]
        image, mask = load_sample(image_path, mask_path, self.nclass, self.ignore_index)
        if mask is None:
            mask = torch.full(image.shape[1:], self.ignore_index, dtype=torch.uint8)

        if self.mode == "val":
            return {"image": normalize(image), "mask": mask.long(), "id": image_id}

        if self.augmentation == "release":
            return self._release_item(to_pil(image), to_pil(mask))

        if self.mode == "train_l":
            image, labels = geometric(image, mask[None], self.crop_size, self.scale_range, self.ignore_index)
            return {"image": normalize(image), "mask": labels[0].long()}

        # The second map starts at 0 everywhere and receives 255 only where padding is added.
        labels = torch.stack([mask, torch.zeros_like(mask)])
        image, labels = geometric(image, labels, self.crop_size, self.scale_range, [self.ignore_index, 255])
        pixels = to_unit_float(image)
        return {
            "image_weak": normalize(pixels),
            "image_strong": [normalize(strong_photometric(pixels)) for _ in range(self.strong_views)],
            "cutmix_box": [cutmix_box(self.crop_size) for _ in range(self.strong_views)],
            "ignore_mask": labels[1].long(),
            "mask": labels[0].long(),
        }

    def _release_item(self, image: Image.Image, mask: Image.Image) -> dict:
        """A train_l or train_u item through the release's PIL pipeline."""
        if self.mode == "train_l":
            image, (mask,) = release_geometric(image, [mask], self.crop_size, self.scale_range, [self.ignore_index])
            return {"image": normalize_pil(image), "mask": label_tensor(mask)}

        # As in the fast path, a second map receives 255 only where padding is added (the release pads its mask
        # with 254 instead, which a class 254 would collide with).
        labels = [mask, Image.new("L", image.size, 0)]
        image, (mask, padding) = release_geometric(image, labels, self.crop_size, self.scale_range,
                                                   [self.ignore_index, 255])
        strong, boxes = [], []
        for _ in range(self.strong_views):  # each view's colours, then its box: the release's order of draws
            strong.append(normalize_pil(release_strong_photometric(image)))
            boxes.append(release_cutmix_box(self.crop_size))
        return {"image_weak": normalize_pil(image), "image_strong": strong, "cutmix_box": boxes,
                "ignore_mask": label_tensor(padding), "mask": label_tensor(mask)}


def _split_file(splits_dir: Path, cfg: dict, *parts: str, hint: str | None = None) -> Path:
    """SPLITS_DIR/DATASET/PARTS, checked to exist; `hint` says how to point at a moved folder of split files."""
    if splits_dir.exists() and not splits_dir.is_dir():
        raise DatasetError(f"splits_dir {splits_dir} is a file, not a folder" + (f" ({hint})" if hint else ""))
    path = splits_dir.joinpath(cfg["dataset"], *parts)
    if not path.exists():
        advice = (f"copy the published split files there or run `python -m dataset.make_splits {cfg['dataset']} "
                  f"--data-root {cfg['data_root']}`")
        raise DatasetError(f"split file not found: {path}; {hint + ', or ' if hint else ''}{advice}")
    return path


def _warn_overlap(labeled: list[tuple[str, str | None]], val: list[tuple[str, str | None]], labeled_path: Path,
                  val_path: Path) -> None:
    val_images = {os.path.normpath(image) for image, _ in val}
    shared = [image for image, _ in labeled if os.path.normpath(image) in val_images]
    if shared:
        logging.getLogger(LOGGER_NAME).warning(
            f"{len(shared)} of {len(labeled)} labeled images of {labeled_path} are also in {val_path}, so validation "
            f"scores will be optimistic: {_examples(shared)}")


# How to point at the data in training's key=value overrides; eval.py passes its own (--data-root).
DATA_ROOT_HINT = "set data_root in the config, or data_root=DIR on the command line"


def _checked_data_root(cfg: dict, hint: str) -> Path:
    """cfg's data root, checked to be a folder (after class names against nclass); the synthetic data is generated
    there on first use."""
    class_names(cfg)
    if cfg["nclass"] > 255:
        raise DatasetError(f"nclass {cfg['nclass']} is more than 255: masks are 8-bit and 255 is the ignore index")
    root = Path(cfg["data_root"]).expanduser()
    if root.exists() and not root.is_dir():
        raise DatasetError(f"data_root {root} is a file, not a folder ({hint})")
    if cfg["dataset"] == "synthetic":
        try:
            synthetic.ensure_generated(root)
        except OSError as error:
            raise DatasetError(f"cannot generate the synthetic dataset in data_root {root}: {error} "
                               f"({hint})") from error
    elif not root.is_dir():
        raise DatasetError(f"data_root not found: {root} ({hint})")
    return root


def build_val_dataset(cfg: dict, splits_dir: str | Path = "splits", data_root_hint: str = DATA_ROOT_HINT,
                      splits_dir_hint: str | None = None) -> SemiDataset:
    """The validation dataset of cfg's dataset alone: reads only val.txt and checks only the files it lists, so
    evaluation needs none of the training split. ``data_root_hint`` says how to fix a wrong data root,
    ``splits_dir_hint`` how to point at moved split files."""
    root = _checked_data_root(cfg, data_root_hint)
    val_path = _split_file(Path(splits_dir), cfg, "val.txt", hint=splits_dir_hint)
    val = read_split(val_path, require_mask=True)
    return SemiDataset(root, val, "val", cfg["nclass"], cfg["crop_size"], source=str(val_path))


def build_datasets(cfg: dict, splits_dir: str | Path = "splits") -> tuple[SemiDataset, SemiDataset, SemiDataset]:
    """(labeled, unlabeled, val) datasets of cfg's dataset and split; the synthetic data is generated on first use.

    Checks, without opening any image: class names against nclass, the data root, the split files (present,
    UTF-8, non-empty, well-formed, no image twice) and that every listed file exists. Labeled images that are also
    val images are logged as a warning.
    """
    root = _checked_data_root(cfg, DATA_ROOT_HINT)
    splits_dir = Path(splits_dir)
    labeled_path = _split_file(splits_dir, cfg, cfg["split"], "labeled.txt")
    unlabeled_path = _split_file(splits_dir, cfg, cfg["split"], "unlabeled.txt")
    val_path = _split_file(splits_dir, cfg, "val.txt")
    labeled = read_split(labeled_path, require_mask=True)
    unlabeled = read_split(unlabeled_path)
    val = read_split(val_path, require_mask=True)
    _warn_overlap(labeled, val, labeled_path, val_path)

    nclass, crop_size = cfg["nclass"], cfg["crop_size"]
    scale_range, strong_views = tuple(cfg["scale_range"]), cfg["strong_views"]
    augmentation = cfg["augmentation"]
    # Semi-supervised training pairs the lists step by step; supervised training has nothing to pair, so it cuts none.
    cut = cfg["truncate_labeled"] and cfg["train_mode"] == "semi"
    nsample = len(unlabeled) if cut else max(len(unlabeled), len(labeled))
    if nsample < len(labeled):
        logging.getLogger(LOGGER_NAME).warning(
            f"{len(labeled) - nsample} of the {len(labeled)} labeled images of {labeled_path} are never used: the list "
            f"is cut to the {nsample} unlabeled images, as the release does (truncate_labeled=false keeps them)")
    labeled_ds = SemiDataset(root, labeled, "train_l", nclass, crop_size, scale_range, strong_views, nsample=nsample,
                             source=str(labeled_path), augmentation=augmentation)
    unlabeled_ds = SemiDataset(root, unlabeled, "train_u", nclass, crop_size, scale_range, strong_views,
                               source=str(unlabeled_path), augmentation=augmentation)
    val_ds = SemiDataset(root, val, "val", nclass, crop_size, source=str(val_path))
    return labeled_ds, unlabeled_ds, val_ds


def dataset_summary(cfg: dict, labeled: SemiDataset, unlabeled: SemiDataset, val: SemiDataset) -> str:
    """One line for the log: dataset, split, root and the sample and class counts of build_datasets' result."""
    resized = "cut" if len(labeled) < labeled.listed else "repeated"
    return (f"{cfg['dataset']} split {cfg['split']} at {labeled.root}: {labeled.listed} labeled ({resized} to "
            f"{len(labeled)}), {len(unlabeled)} unlabeled, {len(val)} val samples, {cfg['nclass']} classes")
