import math
import os
import re
import shutil
from pathlib import Path

import pytest

from dataset import make_splits, synthetic
from dataset.errors import DatasetError
from dataset.semi import read_split

REPO = Path(__file__).resolve().parent.parent


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _fake_pascal(root: Path, num_train: int = 1464, num_extra: int = 100, num_val: int = 30, aug: bool = True):
    """Empty files in the VOC layout: train + extra augmented ids, val ids with original masks."""
    train = [f"2007_{i:06d}" for i in range(num_train)]
    extra = [f"2008_{i:06d}" for i in range(num_extra)]
    val = [f"2009_{i:06d}" for i in range(num_val)]
    sets_dir = root / "ImageSets/Segmentation"
    sets_dir.mkdir(parents=True)
    (sets_dir / "train.txt").write_text("\n".join(train) + "\n")
    (sets_dir / "val.txt").write_text("\n".join(val) + "\n")
    for sample_id in train + extra + val:
        _touch(root / f"JPEGImages/{sample_id}.jpg")
    for sample_id in train + val:
        _touch(root / f"SegmentationClass/{sample_id}.png")
    if aug:
        for sample_id in train + extra + val:
            _touch(root / f"SegmentationClassAug/{sample_id}.png")
    return train, extra, val


def _ids(lines: list[str]) -> list[str]:
    return [Path(line.split()[0]).stem for line in lines]


def test_pascal_splits_with_augmented_set(tmp_path):
    train, extra, val = _fake_pascal(tmp_path)
    files = make_splits.pascal_splits(tmp_path, seed=0)
    aug = set(train) | set(extra)
    previous: set[str] = set()
    for count in make_splits.PASCAL_COUNTS:
        labeled, unlabeled = _ids(files[f"{count}/labeled.txt"]), _ids(files[f"{count}/unlabeled.txt"])
        assert len(labeled) == count and set(labeled) <= set(train)
        assert set(unlabeled) == aug - set(labeled)
        assert previous <= set(labeled)  # nested: a smaller split's labeled images stay labeled
        previous = set(labeled)
    for name, divisor in make_splits.FRACTIONS.items():
        labeled, unlabeled = _ids(files[f"{name}/labeled.txt"]), _ids(files[f"{name}/unlabeled.txt"])
        assert len(labeled) == math.ceil(len(aug) / divisor) and set(labeled) | set(unlabeled) == aug
        assert not set(labeled) & set(unlabeled)
    assert files["val.txt"] == [f"JPEGImages/{i}.jpg SegmentationClass/{i}.png" for i in val]
    assert files["92/labeled.txt"][0].split()[1].startswith("SegmentationClassAug/")

    assert make_splits.pascal_splits(tmp_path, seed=0) == files
    assert make_splits.pascal_splits(tmp_path, seed=1)["92/labeled.txt"] != files["92/labeled.txt"]


def test_pascal_splits_prefer_train_aug_list(tmp_path):
    train, extra, _ = _fake_pascal(tmp_path, num_extra=40)
    (tmp_path / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(train + extra[:10]) + "\n")
    files = make_splits.pascal_splits(tmp_path, seed=0)
    assert len(files["1_16/labeled.txt"]) + len(files["1_16/unlabeled.txt"]) == len(train) + 10


def test_pascal_splits_without_augmented_set(tmp_path, capsys):
    train, extra, _ = _fake_pascal(tmp_path, num_extra=0, aug=False)
    files = make_splits.pascal_splits(tmp_path, seed=0)
    assert set(_ids(files["732/unlabeled.txt"])) == set(train) - set(_ids(files["732/labeled.txt"]))
    assert "1464/labeled.txt" not in files and "1_16/labeled.txt" not in files
    assert "skipping pascal/1464" in capsys.readouterr().out


def test_written_pascal_splits_read_back_through_read_split(tmp_path):
    _fake_pascal(tmp_path / "voc", num_extra=10)
    make_splits.main(["pascal", "--data-root", str(tmp_path / "voc"), "--out", str(tmp_path / "splits")])
    samples = read_split(tmp_path / "splits/pascal/183/labeled.txt", require_mask=True)
    assert len(samples) == 183
    assert all((tmp_path / "voc" / image).is_file() and (tmp_path / "voc" / mask).is_file() for image, mask in samples)


def test_missing_folders_are_named(tmp_path):
    _fake_pascal(tmp_path, num_train=4, num_extra=0, num_val=1)
    (tmp_path / "JPEGImages/2007_000002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"image not found: .*2007_000002\.jpg"):
        make_splits.pascal_splits(tmp_path, seed=0)
    with pytest.raises(DatasetError, match=r"folder not found: .*nowhere.JPEGImages"):
        make_splits.pascal_splits(tmp_path / "nowhere", seed=0)
    with pytest.raises(SystemExit, match=r"error: folder not found: .*leftImg8bit.train"):
        make_splits.main(["cityscapes", "--data-root", str(tmp_path), "--out", str(tmp_path / "splits")])
    assert not (tmp_path / "splits").exists()


def _fake_cityscapes(root: Path, subset: str, cities: dict[str, int]) -> None:
    for city, count in cities.items():
        for index in range(count):
            stem = f"{city}_{index:06d}_000019"
            _touch(root / f"leftImg8bit/{subset}/{city}/{stem}_leftImg8bit.png")
            _touch(root / f"gtFine/{subset}/{city}/{stem}_gtFine_labelTrainIds.png")
            _touch(root / f"gtFine/{subset}/{city}/{stem}_gtFine_labelIds.png")


def test_cityscapes_splits(tmp_path):
    _fake_cityscapes(tmp_path, "train", {"aachen": 30, "bremen": 20})
    _fake_cityscapes(tmp_path, "val", {"lindau": 5})
    files = make_splits.cityscapes_splits(tmp_path, seed=0)
    assert [len(files[f"{name}/labeled.txt"]) for name in make_splits.FRACTIONS] == [4, 7, 13, 25]
    line = files["1_2/labeled.txt"][0]
    image, mask = line.split()
    assert image.startswith("leftImg8bit/train/") and image.endswith("_leftImg8bit.png")
    assert mask == image.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit", "_gtFine_labelTrainIds")
    assert files["val.txt"][0] == ("leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png "
                                   "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png")
    assert len(files["val.txt"]) == 5


def test_cityscapes_without_train_ids_says_how_to_make_them(tmp_path):
    _fake_cityscapes(tmp_path, "train", {"aachen": 2})
    for path in tmp_path.rglob("*labelTrainIds.png"):
        path.unlink()
    with pytest.raises(DatasetError, match=r"no \*_gtFine_labelTrainIds\.png under .*createTrainIdLabelImgs"):
        make_splits.cityscapes_splits(tmp_path, seed=0)


def test_committed_synthetic_splits_match_the_generator(tmp_path):
    sets_dir = tmp_path / "data/ImageSets/Segmentation"
    sets_dir.mkdir(parents=True)
    for split, count in (("train", synthetic.NUM_TRAIN), ("val", synthetic.NUM_VAL)):
        (sets_dir / f"{split}.txt").write_text("".join(f"{i}\n" for i in synthetic.sample_ids(split, count)))
    make_splits.main(["synthetic", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "splits")])
    written = sorted(path.relative_to(tmp_path / "splits") for path in (tmp_path / "splits").rglob("*.txt"))
    committed = sorted(path.relative_to(REPO / "splits") for path in (REPO / "splits/synthetic").rglob("*.txt"))
    assert written == committed and len(written) == 9
    for rel_path in written:
        assert (tmp_path / "splits" / rel_path).read_text() == (REPO / "splits" / rel_path).read_text()
    unlabeled = read_split(REPO / "splits/synthetic/1_16/unlabeled.txt", require_mask=True)
    assert len(unlabeled) == synthetic.NUM_TRAIN - math.ceil(synthetic.NUM_TRAIN / 16)


def _fake_folder(root: Path, train: list[str], val: list[str] = ("v0",)) -> None:
    """Empty files in the folder layout: images/{train,val}/NAME.jpg with masks/{train,val}/NAME.png."""
    for subset, names in (("train", train), ("val", val)):
        for name in names:
            _touch(root / f"images/{subset}/{name}.jpg")
            _touch(root / f"masks/{subset}/{name}.png")


def _main_error(*argv: str) -> str:
    with pytest.raises(SystemExit) as caught:
        make_splits.main(list(argv))
    message = str(caught.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_folder_names_with_spaces_are_refused_by_name_and_nothing_is_written(tmp_path):
    # Written as they were, these lines read back as three or four fields, which read_split rejects.
    _fake_folder(tmp_path / "data", ["a", "my photo", "b", "tab\tname"])
    message = _main_error("folder", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "splits"))
    assert "4 file name(s)" in message and "whitespace" in message and "rename them" in message
    assert "'images/train/my photo.jpg', 'masks/train/my photo.png'" in message
    assert not (tmp_path / "splits").exists()


def test_every_builder_refuses_a_name_a_split_line_cannot_hold(tmp_path):
    train, _, _ = _fake_pascal(tmp_path, num_train=4, num_extra=0, num_val=1)
    _touch(tmp_path / "SegmentationClassAug/extra one.png")
    _touch(tmp_path / "JPEGImages/extra one.jpg")
    with pytest.raises(DatasetError, match=r"^'JPEGImages/extra one\.jpg' has whitespace in its path, which a split "
                                           r"line 'image_path mask_path' cannot hold; rename it$"):
        make_splits.pascal_splits(tmp_path, seed=0)


def test_a_file_name_that_is_not_utf8_is_refused(tmp_path):
    name = os.fsdecode(b"caf\xe9")  # a Latin-1 name on a UTF-8 file system: not writable as UTF-8 text
    _fake_folder(tmp_path, ["a", "b", name])
    with pytest.raises(DatasetError, match="not UTF-8"):
        make_splits.folder_splits(tmp_path, seed=0)


def test_names_with_punctuation_read_back_identically(tmp_path):
    names = ["O'Brien", "a,b", "x#1", "ü-ß", "(c)"]
    _fake_folder(tmp_path / "data", names)
    make_splits.main(["folder", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "splits")])
    samples = read_split(tmp_path / "splits/folder/1_2/labeled.txt", require_mask=True)
    samples += read_split(tmp_path / "splits/folder/1_2/unlabeled.txt", require_mask=True)
    assert sorted(samples) == sorted((f"images/train/{n}.jpg", f"masks/train/{n}.png") for n in names)


def test_symlinked_folders_are_followed_and_loops_end(tmp_path):
    _fake_folder(tmp_path / "data", ["a", "b"])
    _fake_folder(tmp_path / "elsewhere", ["c", "d"])
    os.symlink(tmp_path / "elsewhere/images/train", tmp_path / "data/images/train/site")
    os.symlink(tmp_path / "elsewhere/masks/train", tmp_path / "data/masks/train/site")
    os.symlink(".", tmp_path / "data/images/train/loop")
    files = make_splits.folder_splits(tmp_path / "data", seed=0)
    assert sorted(_ids(files["1_2/labeled.txt"] + files["1_2/unlabeled.txt"])) == ["a", "b", "c", "d"]


def test_a_broken_or_looping_image_symlink_is_named(tmp_path):
    _fake_folder(tmp_path, ["a", "b"])
    os.symlink("nowhere.jpg", tmp_path / "images/train/gone.jpg")
    os.symlink("self.jpg", tmp_path / "images/train/self.jpg")
    with pytest.raises(DatasetError, match=r"^2 image\(s\) under .*train are broken or looping symlinks: "
                                           r".*gone\.jpg, .*self\.jpg$"):
        make_splits.folder_splits(tmp_path, seed=0)


@pytest.mark.parametrize("encode, message", [
    (lambda text: text.encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
    (lambda text: text.encode("latin-1") + b"caf\xe9\n", r"train\.txt:5: not UTF-8 text \(byte 0xe9\)"),
])
def test_an_image_set_in_another_encoding_is_one_line(tmp_path, encode, message):
    _fake_pascal(tmp_path, num_train=4, num_extra=0, num_val=1, aug=False)
    train_txt = tmp_path / "ImageSets/Segmentation/train.txt"
    train_txt.write_bytes(encode(train_txt.read_text()))
    with pytest.raises(DatasetError, match=message):
        make_splits.pascal_splits(tmp_path, seed=0)


def test_an_image_set_with_a_utf8_byte_order_mark_reads(tmp_path):
    sets_dir = tmp_path / "ImageSets/Segmentation"
    sets_dir.mkdir(parents=True)
    (sets_dir / "train.txt").write_bytes(b"\xef\xbb\xbfa\r\nb\r\n")  # as Windows Notepad saves it
    (sets_dir / "val.txt").write_text("c\n")
    files = make_splits.synthetic_splits(tmp_path, seed=0)
    assert sorted(files["1_2/labeled.txt"] + files["1_2/unlabeled.txt"]) == make_splits.synthetic_lines(["a", "b"])


def test_existing_split_files_with_other_contents_are_kept_unless_forced(tmp_path):
    _fake_folder(tmp_path / "data", ["a", "b", "c"])
    out = tmp_path / "splits"
    argv = ["folder", "--data-root", str(tmp_path / "data"), "--out", str(out)]
    make_splits.main(argv)
    make_splits.main(argv)  # the same contents again: nothing to refuse
    labeled = out / "folder/1_2/labeled.txt"
    labeled.write_text("images/train/a.jpg masks/train/a.png\n")
    written = {path: path.read_bytes() for path in out.rglob("*.txt")}
    message = _main_error(*argv, "--seed", "5")
    assert f"exist with other contents, e.g. {labeled}" in message and "--force" in message
    assert {path: path.read_bytes() for path in out.rglob("*.txt")} == written
    make_splits.main([*argv, "--force"])
    assert labeled.read_text() != "images/train/a.jpg masks/train/a.png\n"
    assert not [path for path in out.rglob("*") if path.name.endswith(".tmp")]


def test_the_published_splits_are_not_overwritten(tmp_path):
    """A copy of the repository's splits/ (a failure must not cost the published lists) as --out."""
    _fake_pascal(tmp_path / "voc", num_extra=10)
    shutil.copytree(REPO / "splits" / "pascal", tmp_path / "splits" / "pascal")
    published = {path.relative_to(REPO / "splits"): path.read_bytes()
                 for path in (REPO / "splits/pascal").rglob("*.txt")}
    message = _main_error("pascal", "--data-root", str(tmp_path / "voc"), "--out", str(tmp_path / "splits"))
    assert "exist with other contents" in message
    assert {path.relative_to(tmp_path / "splits"): path.read_bytes()
            for path in (tmp_path / "splits/pascal").rglob("*.txt")} == published


@pytest.mark.parametrize("make_out, message", [
    (lambda tmp: tmp.joinpath("file").write_text("x") and tmp / "file",
     r"cannot create folder .*file/folder/1_16: .*file is a file$"),
    (lambda tmp: tmp.joinpath("splits/folder/1_2/labeled.txt").mkdir(parents=True) or tmp / "splits",
     r"labeled\.txt is a folder, not a split file"),
])
def test_an_unwritable_out_is_one_line(tmp_path, make_out, message):
    _fake_folder(tmp_path / "data", ["a", "b"])
    out = make_out(tmp_path)
    assert re.search(message, _main_error("folder", "--data-root", str(tmp_path / "data"), "--out", str(out)))


@pytest.mark.parametrize("argv, message", [
    (["--data-root", "{tmp}/data/images/train/a.jpg"], r"a\.jpg is a file, not a folder"),
    (["--data-root", "{tmp}/data", "--images", "{tmp}/data/images"], "give a folder name under --data-root"),
    (["--data-root", "{tmp}/data", "--masks", "../masks"], "give a folder name under --data-root"),
])
def test_bad_folder_arguments_are_one_line(tmp_path, argv, message):
    _fake_folder(tmp_path / "data", ["a", "b"])
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    assert re.search(message, _main_error("folder", *argv, "--out", str(tmp_path / "splits")))
