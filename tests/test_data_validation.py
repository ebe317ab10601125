"""Every kind of bad input stops with one readable line naming the file (and line or value) at fault."""
import errno
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from conftest import write_voc_tree
from dataset import cityscapes
from dataset.errors import DatasetError
from dataset.semi import SemiDataset, build_datasets, build_val_dataset, read_image, read_mask

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
           "scale_range": [0.5, 2.0], "strong_views": 1, "augmentation": "release", "truncate_labeled": True,
           "train_mode": "semi"}
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
    assert _item_error(labeled, workers=1).startswith(f"cannot read image {image}: the file is truncated (PIL: image "
                                                      "file is truncated (")


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


def test_utf16_split_file_is_one_line(tree):
    cfg, _, splits = tree
    val = splits / "pascal/val.txt"
    val.write_bytes(val.read_text().encode("utf-16"))  # what Notepad's "Unicode" writes
    assert _error(cfg, splits) == f"split file {val} is UTF-16 text; save it as UTF-8"


def test_split_file_with_a_byte_that_is_not_utf8_names_its_line(tree):
    cfg, _, splits = tree
    labeled = splits / "pascal/s/labeled.txt"
    labeled.write_bytes(labeled.read_bytes() + "JPEGImages/café.jpg\n".encode("latin-1"))
    assert _error(cfg, splits) == f"{labeled}:3: not UTF-8 text (byte 0xe9); save the split file as UTF-8"


def test_split_file_with_a_utf8_byte_order_mark_reads_every_line(tree):
    cfg, _, splits = tree
    val = splits / "pascal/val.txt"
    val.write_bytes(b"\xef\xbb\xbf" + val.read_bytes().replace(b"\n", b"\r\n"))
    _, _, val_set = build_datasets(cfg, splits)
    assert [image_id for image_id, _, _ in val_set.samples] == [f"JPEGImages/{n}.jpg" for n in NAMES[4:]]


def test_binary_split_file_is_one_line(tree):
    cfg, root, splits = tree
    labeled = splits / "pascal/s/labeled.txt"
    labeled.write_bytes(b"JPEGImages/a.jpg\x00\x00 x\n")
    assert _error(cfg, splits) == f"split file {labeled} is not a text file (it holds NUL bytes)"


def test_split_file_that_is_a_folder_is_one_line(tree):
    cfg, _, splits = tree
    val = splits / "pascal/val.txt"
    val.unlink()
    val.mkdir()
    assert _error(cfg, splits) == f"split file {val} is a folder, not a file"


def test_a_line_with_a_space_in_a_path_says_paths_cannot_hold_spaces(tree):
    cfg, _, splits = tree
    labeled = splits / "pascal/s/labeled.txt"
    _write(labeled, ["JPEGImages/my photo.jpg SegmentationClass/my photo.png"])
    assert _error(cfg, splits).startswith(f"{labeled}:1: expected 'image_path [mask_path]', got 4 fields (paths "
                                          "cannot hold spaces)")


@pytest.mark.parametrize("dataset", ["pascal", "synthetic"])
def test_data_root_naming_a_file_is_one_line(tree, dataset):
    cfg, root, splits = tree
    a_file = root / f"JPEGImages/{NAMES[0]}.jpg"
    cfg = cfg | {"dataset": dataset, "data_root": str(a_file), "nclass": 21 if dataset == "pascal" else 6}
    assert _error(cfg, splits) == (f"data_root {a_file} is a file, not a folder (set data_root in the config, or "
                                   "data_root=DIR on the command line)")


def test_synthetic_data_root_under_a_file_is_one_line(tree):
    cfg, root, splits = tree
    inside_a_file = root / f"JPEGImages/{NAMES[0]}.jpg/synthetic"
    message = _error(cfg | {"dataset": "synthetic", "nclass": 6, "data_root": str(inside_a_file)}, splits)
    assert message.startswith(f"cannot generate the synthetic dataset in data_root {inside_a_file}: ")


def test_splits_dir_naming_a_file_is_one_line(tree):
    cfg, root, _ = tree
    a_file = root / f"JPEGImages/{NAMES[0]}.jpg"
    assert _error(cfg, a_file) == f"splits_dir {a_file} is a file, not a folder"


def test_listed_paths_that_are_no_files_say_what_they_are(tree):
    cfg, root, splits = tree
    (root / "JPEGImages/folder.jpg").mkdir()
    (root / "JPEGImages/loop.jpg").symlink_to("loop.jpg")
    unlabeled = splits / "pascal/s/unlabeled.txt"
    _write(unlabeled, [f"JPEGImages/{NAMES[2]}.jpg", "JPEGImages/folder.jpg", "JPEGImages/loop.jpg"])
    assert _error(cfg, splits) == (f"{unlabeled}: 2 listed file(s) missing under data_root {root}: "
                                   "JPEGImages/folder.jpg (a folder), JPEGImages/loop.jpg (a broken or looping "
                                   "symlink)")


def test_build_val_dataset_reads_only_val(tree):
    cfg, _, splits = tree
    (splits / "pascal/s/labeled.txt").unlink()
    (splits / "pascal/s/unlabeled.txt").write_text("JPEGImages/gone.jpg\n")
    val = build_val_dataset(cfg | {"split": "absent"}, splits)
    assert [image_id for image_id, _, _ in val.samples] == [f"JPEGImages/{n}.jpg" for n in NAMES[4:]]


def test_build_val_dataset_names_its_own_way_to_set_the_root(tree):
    cfg, root, splits = tree
    with pytest.raises(DatasetError) as caught:
        build_val_dataset(cfg | {"data_root": str(root / "moved")}, splits, data_root_hint="pass --data-root DIR")
    assert str(caught.value) == f"data_root not found: {root / 'moved'} (pass --data-root DIR)"


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "corrupt":  # the first third, then noise
        path.write_bytes(data[:len(data) // 3] + bytes(range(256)) * 4)
    elif how == "huge header":  # a BMP whose header claims 100000 x 100000 pixels
        path.write_bytes(b"BM" + bytes(8) + (54).to_bytes(4, "little") + (40).to_bytes(4, "little")
                         + (100000).to_bytes(4, "little", signed=True) * 2 + (1).to_bytes(2, "little")
                         + (24).to_bytes(2, "little") + bytes(24))
    elif how == "folder":
        path.unlink()
        path.mkdir()


@pytest.mark.parametrize("how, reason", [
    ("truncated", r"the file is truncated \(PIL: .+\)"),
    # The cut lands in this small JPEG's header: Pillow 13 refuses it when decoding, Pillow 10 (oldest pins) at opening.
    ("corrupt", r"((the file is truncated|the file is damaged, or a variant PIL cannot decode) \(PIL: .+\)"
                r"|not an image PIL can read)"),
    ("huge header", "its header claims more than 178,956,970 pixels: a damaged file, or an image too large to load"),
    ("folder", "Is a directory"),
])
def test_unreadable_image_reasons_are_words(tmp_path, how, reason):
    write_voc_tree(str(tmp_path), ["x"], size=SIZE)
    image = tmp_path / "JPEGImages/x.jpg"
    _damage(image, how)
    with pytest.raises(DatasetError) as caught:
        read_image(image)
    assert re.fullmatch(f"cannot read image {re.escape(str(image))}: {reason}", str(caught.value))


def test_a_16_bit_mask_says_masks_are_8_bit(tmp_path):
    mask = tmp_path / "mask.png"
    Image.fromarray(np.zeros(SIZE, dtype=np.uint16)).save(mask)
    with pytest.raises(DatasetError, match=r"^mask must be an 8-bit palette or grayscale image of class indices "
                                           r"\(mode P or L\), got mode I;16: "):
        read_mask(mask)


def test_cityscapes_conversion_that_cannot_write_is_one_line(tmp_path, monkeypatch):
    label_ids = tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    label_ids.parent.mkdir(parents=True)
    (tmp_path / "gtFine/val").mkdir()
    Image.fromarray(np.full((4, 6), 7, dtype=np.uint8)).save(label_ids)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(SystemExit) as caught:
        cityscapes.main(["--root", str(tmp_path), "--workers", "1"])
    target = label_ids.with_name("aachen_000000_000019_gtFine_labelTrainIds.png")
    assert caught.value.code == f"error: cannot write {target}: No space left on device"
    assert sorted(path.name for path in label_ids.parent.iterdir()) == [label_ids.name]
