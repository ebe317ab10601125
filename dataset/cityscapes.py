"""Cityscapes train-id masks: gtFine/{train,val}/*/*_gtFine_labelIds.png -> *_gtFine_labelTrainIds.png.

    python -m dataset.cityscapes --root DIR [--workers N]

Writes what cityscapesScripts' createTrainIdLabelImgs writes (the 19 evaluated classes as 0 ... 18, every other
label 255), so it need not be installed. Each file is written beside its target and renamed into place, so an
interrupted run leaves no partial mask; existing train-id masks are kept, so running it again is safe and quick.
"""

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataset.errors import DatasetError
from dataset.semi import read_mask

SUBSETS = ("train", "val")
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
IGNORE_INDEX = 255

# The official labelId -> trainId table of the 19 evaluated classes (cityscapesScripts' labels.py).
LABEL_TO_TRAIN_ID = {
    7: 0,    # road
    8: 1,    # sidewalk
    11: 2,   # building
    12: 3,   # wall
    13: 4,   # fence
    17: 5,   # pole
    19: 6,   # traffic light
    20: 7,   # traffic sign
    21: 8,   # vegetation
    22: 9,   # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}


def _lookup_table() -> np.ndarray:
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN_ID.items():
        table[label_id] = train_id
    return table


TRAIN_ID_OF = _lookup_table()  # uint8 label id -> train id


def train_ids(label_ids: np.ndarray) -> np.ndarray:
    """uint8 train-id mask of a uint8 label-id mask."""
    return TRAIN_ID_OF[label_ids]


def train_ids_path(label_ids_path: Path) -> Path:
    return label_ids_path.with_name(label_ids_path.name[:-len(LABEL_IDS_SUFFIX)] + TRAIN_IDS_SUFFIX)


def convert_file(label_ids_path: Path) -> bool:
    """Write the train-id mask of one label-id mask unless it exists; True if it was written."""
    target = train_ids_path(label_ids_path)
    if target.exists():
        return False
    mask = Image.fromarray(train_ids(read_mask(label_ids_path).numpy()))
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        mask.save(partial, format="PNG")
        os.replace(partial, target)
    except OSError as error:  # disk full, a read-only tree: one line, as for bad input
        raise DatasetError(f"cannot write {target}: {error.strerror or error}") from error
    finally:
        partial.unlink(missing_ok=True)
    return True


def label_id_files(root: Path) -> list[Path]:
    """Every *_gtFine_labelIds.png of gtFine/train and gtFine/val under root."""
    files = []
    for subset in SUBSETS:
        folder = root / "gtFine" / subset
        if not folder.is_dir():
            raise DatasetError(f"folder not found: {folder} (root must hold gtFine/train and gtFine/val)")
        files += sorted(folder.glob(f"*/*{LABEL_IDS_SUFFIX}"))
    if not files:
        raise DatasetError(f"no *{LABEL_IDS_SUFFIX} under {root / 'gtFine'}/{{train,val}}/CITY/")
    return files


def convert_tree(root: str | Path, workers: int = 1, progress: bool = False) -> tuple[int, int]:
    """Convert every label-id mask under root; (written, already there)."""
    files = label_id_files(Path(root).expanduser())
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            written = list(tqdm(pool.map(convert_file, files, chunksize=16), total=len(files), disable=not progress,
                                desc="labelTrainIds"))
    else:
        written = [convert_file(path) for path in tqdm(files, disable=not progress, desc="labelTrainIds")]
    return sum(written), len(written) - sum(written)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write Cityscapes *_gtFine_labelTrainIds.png from *_labelIds.png.")
    parser.add_argument("--root", required=True, help="Cityscapes root holding gtFine/")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes")
    args = parser.parse_args(argv)
    try:
        written, kept = convert_tree(args.root, max(1, args.workers), progress=True)
    except DatasetError as error:
        raise SystemExit(f"error: {error}")
    print(f"wrote {written} *{TRAIN_IDS_SUFFIX}, kept {kept} already there")


if __name__ == "__main__":
    main()
