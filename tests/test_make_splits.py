import math
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
        make_splits.main(["cityscapes", "--data-root", str(tmp_path)])


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
