"""Write split files (splits/DATASET/SPLIT/{labeled,unlabeled}.txt and splits/DATASET/val.txt) from a dataset tree.

    python -m dataset.make_splits {pascal,cityscapes,synthetic,folder} --data-root DIR [--seed 0] [--out splits]

Deterministic from the seed. Each protocol shuffles its pool once and takes prefixes, so the labeled set of a
smaller split is contained in that of every larger one. Unlabeled lines keep their mask path when the mask exists.

A folder dataset is DIR/images/{train,val}/** and DIR/masks/{train,val}/** (any nesting), a mask being the PNG at
its image's relative path; train images without a mask are unlabeled only, and split `all` labels every masked one.

A split line cannot hold a path with whitespace, so such file names are refused (named) rather than written. Split
files that exist with other contents are kept unless --force: the published lists in splits/ are not redrawn by
mistake.
"""

import argparse
import functools
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

from dataset.errors import DatasetError
from dataset.split_format import read_lines, split_line, unwritable

PASCAL_COUNTS = (92, 183, 366, 732, 1464)
FRACTIONS = {"1_16": 16, "1_8": 8, "1_4": 4, "1_2": 2}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

SplitFiles = dict[str, list[str]]  # file path relative to splits/DATASET -> its lines


def _shuffled(items: list[str], seed: int) -> list[str]:
    order = sorted(items)
    random.Random(seed).shuffle(order)
    return order


def _protocol(split_files: SplitFiles, name: str, labeled: list[str], unlabeled: list[str]) -> None:
    if not unlabeled:
        raise DatasetError(f"split {name} would have no unlabeled images")
    split_files[f"{name}/labeled.txt"] = sorted(labeled)
    split_files[f"{name}/unlabeled.txt"] = sorted(unlabeled)


def fraction_splits(lines: list[str], seed: int, unlabeled_only: Sequence[str] = ()) -> SplitFiles:
    """1_16, 1_8, 1_4, 1_2: ceil(n / d) labeled lines drawn from lines, the rest (and unlabeled_only) unlabeled."""
    order = _shuffled(lines, seed)
    split_files: SplitFiles = {}
    for name, divisor in FRACTIONS.items():
        count = math.ceil(len(order) / divisor)
        _protocol(split_files, name, order[:count], order[count:] + list(unlabeled_only))
    return split_files


def _require_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise DatasetError(f"{path} is a file, not a folder")
    if not path.is_dir():
        raise DatasetError(f"folder not found: {path}")
    return path


def _read_ids(path: Path) -> list[str]:
    ids = [line.split()[0] for line in read_lines(path, "image set") if line.strip()]
    if not ids:
        raise DatasetError(f"image set is empty: {path}")
    return ids


def _voc_lines(root: Path, ids: list[str], mask_dirs: tuple[str, ...]) -> dict[str, str]:
    """id -> 'JPEGImages/id.jpg MASK_DIR/id.png' with the first of mask_dirs that holds the mask."""
    lines = {}
    for sample_id in ids:
        image = f"JPEGImages/{sample_id}.jpg"
        if not (root / image).is_file():
            raise DatasetError(f"image not found: {root / image}")
        mask = next((f"{folder}/{sample_id}.png" for folder in mask_dirs
                     if (root / folder / f"{sample_id}.png").is_file()), None)
        if mask is None:
            raise DatasetError(f"mask of {sample_id} not found in {' or '.join(str(root / d) for d in mask_dirs)}")
        lines[sample_id] = split_line(image, mask)
    return lines


def pascal_splits(root: Path, seed: int) -> SplitFiles:
    """Original protocol (92 ... 1464 labeled from the 1464 train images) and, with SegmentationClassAug, the
    blended 1_16 ... 1_2 of the 10582 augmented set; val from ImageSets/Segmentation/val.txt."""
    _require_dir(root / "JPEGImages")
    sets_dir = _require_dir(root / "ImageSets/Segmentation")
    has_aug = (root / "SegmentationClassAug").is_dir()
    if not has_aug:
        _require_dir(root / "SegmentationClass")
    train_ids, val_ids = _read_ids(sets_dir / "train.txt"), _read_ids(sets_dir / "val.txt")
    if has_aug and (sets_dir / "train_aug.txt").is_file():
        aug_ids = _read_ids(sets_dir / "train_aug.txt")
    elif has_aug:
        excluded = set(val_ids)
        aug_ids = sorted(path.stem for path in (root / "SegmentationClassAug").glob("*.png")
                         if path.stem not in excluded)
    else:
        aug_ids = train_ids
    # Training masks come from one source, the augmented set when present; val keeps the original annotation.
    train_dirs = ("SegmentationClassAug", "SegmentationClass") if has_aug else ("SegmentationClass",)
    train_lines = _voc_lines(root, sorted(set(train_ids) | set(aug_ids)), train_dirs)
    val_lines = _voc_lines(root, val_ids, ("SegmentationClass", "SegmentationClassAug"))

    split_files: SplitFiles = {}
    order = _shuffled(train_ids, seed)
    for count in PASCAL_COUNTS:
        if count > len(order):
            raise DatasetError(f"{sets_dir / 'train.txt'} lists {len(order)} images, fewer than {count}")
        labeled = set(order[:count])
        unlabeled = [train_lines[i] for i in aug_ids if i not in labeled]
        if not unlabeled:
            print(f"skipping pascal/{count}: without SegmentationClassAug no images are left unlabeled")
            continue
        _protocol(split_files, str(count), [train_lines[i] for i in labeled], unlabeled)
    if has_aug:
        split_files.update(fraction_splits([train_lines[i] for i in aug_ids], seed))
    else:
        print("skipping pascal 1_16 ... 1_2: they are drawn from the augmented set (SegmentationClassAug)")
    split_files["val.txt"] = [val_lines[i] for i in val_ids]
    return split_files


def _cityscapes_lines(root: Path, subset: str) -> list[str]:
    _require_dir(root / "leftImg8bit" / subset)
    masks = sorted(_require_dir(root / "gtFine" / subset).glob("*/*_gtFine_labelTrainIds.png"))
    if not masks:
        raise DatasetError(f"no *_gtFine_labelTrainIds.png under {root / 'gtFine' / subset}; create them with "
                           f"`python -m dataset.cityscapes --root {root}` (as cityscapesscripts' "
                           "createTrainIdLabelImgs does)")
    lines = []
    for mask in masks:
        mask_rel = mask.relative_to(root).as_posix()
        image_rel = mask_rel.replace("gtFine/", "leftImg8bit/", 1).replace("_gtFine_labelTrainIds", "_leftImg8bit")
        if not (root / image_rel).is_file():
            raise DatasetError(f"image not found: {root / image_rel} (for {mask})")
        lines.append(split_line(image_rel, mask_rel))
    return lines


def cityscapes_splits(root: Path, seed: int) -> SplitFiles:
    """1_16 ... 1_2 of the 2975 gtFine/train images; val from gtFine/val."""
    split_files = fraction_splits(_cityscapes_lines(root, "train"), seed)
    split_files["val.txt"] = _cityscapes_lines(root, "val")
    return split_files


def synthetic_lines(ids: list[str]) -> list[str]:
    """Split lines of the synthetic dataset (VOC layout) for the given file stems."""
    return [split_line(f"JPEGImages/{sample_id}.jpg", f"SegmentationClass/{sample_id}.png") for sample_id in ids]


def synthetic_splits(root: Path, seed: int) -> SplitFiles:
    """1_16 ... 1_2 of the generated train images, val = the generated val images."""
    sets_dir = root / "ImageSets/Segmentation"
    split_files = fraction_splits(synthetic_lines(_read_ids(sets_dir / "train.txt")), seed)
    split_files["val.txt"] = synthetic_lines(_read_ids(sets_dir / "val.txt"))
    return split_files


def _image_files(images_dir: Path) -> list[Path]:
    """The image files under images_dir, sorted, through symlinked folders too (each real folder once, so a
    symlink loop ends); an image name that is a broken or looping symlink is an error, not a silent skip."""
    files, broken, visited = [], [], set()
    for folder, subfolders, names in os.walk(images_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders.clear()
            continue
        visited.add(real)
        subfolders.sort()  # the listing order of the file system would decide which of two paths to a folder wins
        for name in names:
            path = Path(folder, name)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                (files if path.is_file() else broken).append(path)
    if broken:
        raise DatasetError(f"{len(broken)} image(s) under {images_dir} are broken or looping symlinks: "
                           f"{', '.join(map(str, sorted(broken)[:5]))}{', ...' if len(broken) > 5 else ''}")
    return sorted(files)


def _folder_pairs(root: Path, images: str, masks: str, subset: str) -> tuple[list[str], list[str]]:
    """Split lines of the images of images/subset: (those with a mask in masks/subset, those without)."""
    images_dir = _require_dir(root / images / subset)
    masked, unmasked, refused = [], [], []
    for path in _image_files(images_dir):
        image_rel = path.relative_to(root).as_posix()
        mask = (root / masks / subset / path.relative_to(images_dir)).with_suffix(".png")
        if mask.is_symlink() and not mask.is_file():
            raise DatasetError(f"mask {mask} is a broken or looping symlink")
        mask_rel = mask.relative_to(root).as_posix() if mask.is_file() else None
        # Every such name is listed at once: renaming them one error at a time would take as many runs.
        refused += [repr(rel) for rel in (image_rel, mask_rel) if rel is not None and unwritable(rel)]
        if not refused:
            (masked if mask_rel else unmasked).append(split_line(image_rel, mask_rel))
    if refused:
        raise DatasetError(f"{len(refused)} file name(s) under {root} have whitespace (or are not UTF-8), which a "
                           f"split line 'image_path mask_path' cannot hold; rename them: {', '.join(refused[:5])}"
                           f"{', ...' if len(refused) > 5 else ''}")
    if not masked:
        raise DatasetError(f"no image of {images_dir} has its mask (same relative path, .png) in "
                           f"{root / masks / subset}")
    return masked, unmasked


def folder_splits(root: Path, seed: int, images: str = "images", masks: str = "masks") -> SplitFiles:
    """1_16 ... 1_2 of the masked train images plus `all` (every masked image labeled) when some train images
    have no mask; those are unlabeled in every split. Every val image needs its mask."""
    masked, unmasked = _folder_pairs(root, images, masks, "train")
    split_files = fraction_splits(masked, seed, unlabeled_only=unmasked)
    if unmasked:
        _protocol(split_files, "all", masked, unmasked)
    val, val_unmasked = _folder_pairs(root, images, masks, "val")
    if val_unmasked:
        raise DatasetError(f"{len(val_unmasked)} val image(s) have no mask in {root / masks / 'val'}: "
                           f"{', '.join(val_unmasked[:5])}{', ...' if len(val_unmasked) > 5 else ''}")
    split_files["val.txt"] = val
    return split_files


BUILDERS = {"pascal": pascal_splits, "cityscapes": cityscapes_splits, "synthetic": synthetic_splits,
            "folder": folder_splits}


def _text(lines: list[str]) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode("utf-8")


def _differs(path: Path, text: bytes) -> bool:
    """Whether a file exists at path with other bytes than text; one that cannot be read counts as different."""
    if path.is_dir():
        raise DatasetError(f"{path} is a folder, not a split file")
    try:
        return path.is_file() and path.read_bytes() != text
    except OSError:
        return True


def write_splits(split_files: SplitFiles, out_dir: Path, force: bool = False) -> None:
    """Write every split file under out_dir, each renamed into place whole. Without ``force``, existing files with
    other contents are refused before anything is written, so the published lists cannot be replaced by mistake."""
    changed = [] if force else [out_dir / rel_path for rel_path, lines in split_files.items()
                                if _differs(out_dir / rel_path, _text(lines))]
    if changed:
        raise DatasetError(f"{len(changed)} split file(s) exist with other contents, e.g. {changed[0]}; write to "
                           "another --out, or pass --force to replace them")
    for rel_path, lines in split_files.items():
        path = out_dir / rel_path
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            blocker = next(folder for folder in path.parents if folder.exists())
            reason = f"{blocker} is a file" if not blocker.is_dir() else error.strerror or str(error)
            raise DatasetError(f"cannot create folder {path.parent}: {reason}") from error
        try:
            partial.write_bytes(_text(lines))
            os.replace(partial, path)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise DatasetError(f"cannot write {path}: {error.strerror or error}") from error


def _folder_name(value: str, option: str) -> str:
    """--images / --masks: a folder name under the data root, since split paths are relative to it."""
    if Path(value).is_absolute() or ".." in Path(value).parts:
        raise DatasetError(f"{option} {value}: give a folder name under --data-root, not a path out of it")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write semi-supervised split files from a dataset tree.")
    parser.add_argument("dataset", choices=sorted(BUILDERS))
    parser.add_argument("--data-root", required=True, help="dataset root the split paths are relative to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="splits", help="splits folder; files go to OUT/DATASET/")
    parser.add_argument("--force", action="store_true", help="replace split files that exist with other contents")
    parser.add_argument("--images", default="images", help="folder: the images folder under DIR (default images)")
    parser.add_argument("--masks", default="masks", help="folder: the masks folder under DIR (default masks)")
    args = parser.parse_args(argv)
    root = Path(args.data_root).expanduser()
    builder = BUILDERS[args.dataset]
    out_dir = Path(args.out).expanduser() / args.dataset
    try:
        if args.dataset == "folder":
            builder = functools.partial(folder_splits, images=_folder_name(args.images, "--images"),
                                        masks=_folder_name(args.masks, "--masks"))
        split_files = builder(_require_dir(root), args.seed)
        write_splits(split_files, out_dir, args.force)
    except DatasetError as error:
        raise SystemExit(f"error: {error}")
    for rel_path, lines in split_files.items():
        print(f"{out_dir / rel_path}: {len(lines)} lines")


if __name__ == "__main__":
    main()
