"""Every kind of bad input stops with one readable line naming the file (and line or value) at fault."""
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from conftest import write_voc_tree
from dataset.errors import DatasetError
from dataset.semi import SemiDataset, build_datasets

NAMES = [f"img_{i:03d}" for i in range(6)]
SIZE = (16, 20)


def _line(name: str) -> str:
    return f"JPEGImages/{name}.jpg SegmentationClass/{name}.png"


@pytest.fixture
def tree(tmp_path):
    """(cfg, root, splits dir) of a 6-image Pascal-layout dataset: split 's' labels 2, unlabels 2, validates 2."""
    root, splits = tmp_path / "VOC", tmp_path / "splits"
    write_voc_tree(str(root), NAMES, size=SIZE)
    _write(splits / "pascal/s/labeled.txt", [_line(n) for n in NAMES[:2]])
    _write(splits / "pascal/s/unlabeled.txt", [f"JPEGImages/{n}.jpg" for n in NAMES[2:4]])
    _write(splits / "pascal/val.txt", [_line(n) for n in NAMES[4:]])
    cfg = {"dataset": "pascal", "data_root": str(root), "nclass": 21, "split": "s", "crop_size": 16,
           "scale_range": [0.5, 2.0], "strong_views": 1, "augmentation": "release"}
    return cfg, root, splits


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def _error(cfg: dict, splits: Path) -> str:
    with pytest.raises(DatasetError) as caught:
        build_datasets(cfg, splits)
    message = str(caught.value)
    assert "\n" not in message
    return message


def _item_error(dataset, index: int = 0, workers: int = 0) -> str:
    """The message of the DatasetError that loading item `index` raises, through a DataLoader with `workers`."""
    batches = iter(DataLoader(dataset, batch_size=None, sampler=[index], num_workers=workers))
    try:
        next(batches)
    except DatasetError as error:
        caught = error
    else:
        pytest.fail(f"item {index} loaded without a DatasetError")
    assert (caught.worker_traceback is not None) == (workers > 0)
    # The traceback's frames hold the loader and its worker; dropping them stops the worker now, not at exit.
    caught.__traceback__ = None
    del batches
    message = str(caught)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_clean_tree_builds(tree):
    cfg, _, splits = tree
    labeled, unlabeled, val = build_datasets(cfg, splits)
    assert (labeled.listed, len(unlabeled), len(val)) == (2, 2, 2)
    assert val[0]["mask"].shape == SIZE


def test_missing_data_root(tree):
    cfg, root, splits = tree
    assert _error(cfg | {"data_root": str(root / "nowhere")}, splits) == (
        f"data_root not found: {root / 'nowhere'} (set data_root in the config, or data_root=DIR on the command line)")


def test_missing_split_file(tree):
    cfg, _, splits = tree
    (splits / "pascal/s/unlabeled.txt").unlink()
    assert _error(cfg, splits).startswith(f"split file not found: {splits / 'pascal/s/unlabeled.txt'}; ")


def test_empty_split_file(tree):
    cfg, _, splits = tree
    _write(splits / "pascal/val.txt", ["", "  "])
    assert _error(cfg, splits) == f"split file is empty: {splits / 'pascal/val.txt'}"


def test_malformed_lines_name_file_and_line(tree):
    cfg, _, splits = tree
    labeled = splits / "pascal/s/labeled.txt"
    _write(labeled, [_line(NAMES[0]), f"{_line(NAMES[1])} extra"])
    assert _error(cfg, splits).startswith(f"{labeled}:2: expected 'image_path [mask_path]', got 3 fields")
    _write(labeled, [_line(NAMES[0]), f"JPEGImages/{NAMES[1]}.jpg"])
    assert _error(cfg, splits).startswith(f"{labeled}:2: no mask path")


def test_missing_files_are_counted_in_one_error(tree):
    cfg, root, splits = tree
    unlabeled = splits / "pascal/s/unlabeled.txt"
    absent = [f"JPEGImages/gone_{i}.jpg" for i in range(7)]
    _write(unlabeled, [f"JPEGImages/{NAMES[2]}.jpg", *absent])
    message = _error(cfg, splits)
    assert message == (f"{unlabeled}: 7 listed file(s) missing under data_root {root}: "
                       f"{', '.join(absent[:5])}, ... (2 more)")


def test_missing_masks_are_counted_with_the_images(tree):
    cfg, root, splits = tree
    (root / f"SegmentationClass/{NAMES[5]}.png").unlink()
    _write(splits / "pascal/val.txt", [_line(NAMES[4]), _line(NAMES[5]), _line("absent")])
    message = _error(cfg, splits)
    assert message.startswith(f"{splits / 'pascal/val.txt'}: 3 listed file(s) missing under data_root {root}: "
                              f"SegmentationClass/{NAMES[5]}.png, JPEGImages/absent.jpg, SegmentationClass/absent.png")
    assert message.endswith("belong in SegmentationClassAug/, see README 'Data'")


def test_all_images_missing_questions_data_root(tree):
    cfg, root, splits = tree
    empty_root = root.parent / "empty"
    empty_root.mkdir()
    assert "no listed image exists: is data_root right?" in _error(cfg | {"data_root": str(empty_root)}, splits)


def test_duplicate_ids(tree):
    cfg, _, splits = tree
    labeled = splits / "pascal/s/labeled.txt"
    _write(labeled, [_line(NAMES[0]), _line(NAMES[1]), _line(NAMES[0]).replace("JPEGImages/", "./JPEGImages/")])
    assert _error(cfg, splits) == (f"{labeled}: 1 image(s) listed more than once: "
                                   f"./JPEGImages/{NAMES[0]}.jpg (lines 1 and 3)")


def test_labeled_and_val_overlap_is_a_warning(tree, caplog, monkeypatch):
    cfg, _, splits = tree
    monkeypatch.setattr(logging.getLogger("scalematch"), "propagate", True)
    _write(splits / "pascal/val.txt", [_line(n) for n in NAMES[1:]])
    with caplog.at_level(logging.WARNING, logger="scalematch"):
        labeled, _, val = build_datasets(cfg, splits)
    assert len(val) == 5
    warnings = [record for record in caplog.records if record.name == "scalematch"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert warnings[0].getMessage() == (
        f"1 of 2 labeled images of {splits / 'pascal/s/labeled.txt'} are also in {splits / 'pascal/val.txt'}, so "
        f"validation scores will be optimistic: JPEGImages/{NAMES[1]}.jpg")


def test_no_overlap_no_warning(tree, caplog, monkeypatch):
    cfg, _, splits = tree
    monkeypatch.setattr(logging.getLogger("scalematch"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="scalematch"):
        build_datasets(cfg, splits)
    assert not [record for record in caplog.records if record.name == "scalematch"]


def test_truncated_image_from_a_worker_is_one_line(tree):
    cfg, root, splits = tree
    image = root / f"JPEGImages/{NAMES[0]}.jpg"
    image.write_bytes(image.read_bytes()[:-50])
    labeled, _, _ = build_datasets(cfg, splits)
    # Raised in a worker process and re-raised by the DataLoader: the message is still the one line.
    assert _item_error(labeled, workers=1).startswith(f"cannot read image {image}: image file is truncated (")


def test_unreadable_image(tree):
    cfg, root, splits = tree
    image = root / f"JPEGImages/{NAMES[4]}.jpg"
    image.write_bytes(b"this is not a JPEG")
    _, _, val = build_datasets(cfg, splits)
    assert _item_error(val) == f"cannot read image {image}: not an image PIL can read"


def test_unreadable_mask(tree):
    cfg, root, splits = tree
    mask = root / f"SegmentationClass/{NAMES[1]}.png"
    mask.write_bytes(b"\x89PNG garbage")
    labeled, _, _ = build_datasets(cfg, splits)
    assert _item_error(labeled, index=1, workers=1) == f"cannot read mask {mask}: not an image PIL can read"


def test_truncated_mask(tree):
    cfg, root, splits = tree
    mask = root / f"SegmentationClass/{NAMES[5]}.png"
    mask.write_bytes(mask.read_bytes()[:60])
    _, _, val = build_datasets(cfg, splits)
    assert _item_error(val, index=1).startswith(f"cannot read mask {mask}: ")


def test_mask_size_mismatch(tree):
    cfg, root, splits = tree
    mask = root / f"SegmentationClass/{NAMES[0]}.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(mask)
    labeled, _, _ = build_datasets(cfg, splits)
    assert _item_error(labeled, workers=1) == (
        f"mask {mask} is (8, 8) but image {root / f'JPEGImages/{NAMES[0]}.jpg'} is {SIZE}")


def test_mask_value_out_of_range_names_file_and_value(tree):
    cfg, root, splits = tree
    mask = root / f"SegmentationClass/{NAMES[4]}.png"
    indices = np.zeros(SIZE, dtype=np.uint8)
    indices[3, 4], indices[0, 0], indices[5, 5] = 37, 255, 20
    Image.fromarray(indices).save(mask)
    _, _, val = build_datasets(cfg, splits)
    assert _item_error(val, workers=1) == (
        f"mask {mask} has value 37: classes are 0 ... 20 (nclass 21) and 255 is ignored")
    # 37 is a class once there are 38; 255 stays ignored.
    mask_38 = SemiDataset(root, [(f"JPEGImages/{NAMES[4]}.jpg", f"SegmentationClass/{NAMES[4]}.png")], "val", 38,
                          crop_size=16)[0]["mask"]
    assert (mask_38[3, 4], mask_38[0, 0], mask_38[5, 5]) == (37, 255, 20)
