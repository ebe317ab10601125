"""python -m dataset.cityscapes: labelIds -> labelTrainIds without cityscapesScripts."""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset import cityscapes, make_splits
from dataset.semi import read_mask

# labelId -> trainId of the 19 evaluated classes (cityscapesScripts labels.py); every other id is 255.
OFFICIAL = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
            27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _label_ids(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).save(path)


def _tree(root: Path) -> list[Path]:
    """Two train cities and one val city; each labelIds mask holds every id 0 ... 35 and 255 at least once."""
    every_id = np.concatenate([np.arange(36), [255] * 4]).reshape(5, 8)
    paths = []
    for subset, city, index in (("train", "aachen", 0), ("train", "bremen", 1), ("val", "lindau", 2)):
        stem = f"{city}_{index:06d}_000019"
        path = Path(root / f"gtFine/{subset}/{city}/{stem}_gtFine_labelIds.png")
        _label_ids(path, np.roll(every_id, index))
        image = root / f"leftImg8bit/{subset}/{city}/{stem}_leftImg8bit.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((5, 8, 3), dtype=np.uint8)).save(image)
        paths.append(path)
    return paths


def test_lookup_table_is_the_official_one():
    label_ids = np.arange(256, dtype=np.uint8)
    expected = np.array([OFFICIAL.get(i, 255) for i in range(256)], dtype=np.uint8)
    assert np.array_equal(cityscapes.train_ids(label_ids), expected)


def test_converts_every_file_and_is_idempotent(tmp_path):
    sources = _tree(tmp_path)
    assert cityscapes.convert_tree(tmp_path) == (3, 0)
    for source in sources:
        target = source.with_name(source.name.replace("_labelIds", "_labelTrainIds"))
        label_ids, train_ids = np.array(Image.open(source)), read_mask(target).numpy()
        assert Image.open(target).mode == "L" and train_ids.shape == label_ids.shape
        for label_id in np.unique(label_ids):
            assert (train_ids[label_ids == label_id] == OFFICIAL.get(int(label_id), 255)).all()
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]

    written = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in tmp_path.rglob("*labelTrainIds.png")}
    assert cityscapes.convert_tree(tmp_path) == (0, 3)
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns)
            for path in tmp_path.rglob("*labelTrainIds.png")} == written

    # An interrupted run is finished by the next one.
    next(iter(written)).unlink()
    assert cityscapes.convert_tree(tmp_path, workers=2) == (1, 2)


def test_converted_tree_makes_splits(tmp_path):
    _tree(tmp_path)
    cityscapes.main(["--root", str(tmp_path), "--workers", "1"])
    files = make_splits.cityscapes_splits(tmp_path, seed=0)
    assert len(files["val.txt"]) == 1 and len(files["1_2/labeled.txt"]) + len(files["1_2/unlabeled.txt"]) == 2


def test_cli_names_a_missing_folder(tmp_path, capsys):
    _tree(tmp_path)
    cityscapes.main(["--root", str(tmp_path), "--workers", "1"])
    assert "wrote 3 *_gtFine_labelTrainIds.png, kept 0 already there" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: folder not found: .*nowhere/gtFine/train"):
        cityscapes.main(["--root", str(tmp_path / "nowhere")])
    empty = tmp_path / "empty"
    for subset in ("train", "val"):
        os.makedirs(empty / "gtFine" / subset)
    with pytest.raises(SystemExit, match=r"^error: no \*_gtFine_labelIds\.png under "):
        cityscapes.main(["--root", str(empty)])
