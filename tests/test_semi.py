import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dataset.semi import DatasetError, SemiDataset, build_datasets, dataset_summary, read_mask, read_split
from util.logging import LOGGER_NAME

HEIGHT, WIDTH = 40, 56


def _write_mask(path: Path, indices: np.ndarray) -> None:
    """A palette PNG whose colours differ from its indices (index i is drawn as (255 - i, 3i mod 256, 7))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.fromarray(indices.astype(np.uint8))
    mask.putpalette([channel for i in range(256) for channel in (255 - i, 3 * i % 256, 7)])
    assert mask.mode == "P"
    mask.save(path)


def _voc_tree(root: Path, count: int = 3, mask_dir: str = "SegmentationClass") -> list[tuple[str, str]]:
    """count random images with masks in the VOC layout; labels 0..20 plus a 255 ignore border."""
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    samples = []
    for index in range(count):
        name = f"2007_{index:06d}"
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(root / f"JPEGImages/{name}.jpg")
        indices = rng.integers(0, 21, (HEIGHT, WIDTH))
        indices[0] = 255
        _write_mask(root / mask_dir / f"{name}.png", indices)
        samples.append((f"JPEGImages/{name}.jpg", f"SegmentationClass/{name}.png"))
    return samples


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_palette_mask_is_read_as_indices(tmp_path):
    indices = np.random.default_rng(1).integers(0, 21, (HEIGHT, WIDTH))
    indices[:3] = 255
    _write_mask(tmp_path / "m.png", indices)
    assert np.array_equal(read_mask(tmp_path / "m.png").numpy(), indices)


def test_rgb_mask_is_rejected_naming_the_file(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(DatasetError, match=r"mode RGB.*colour\.png"):
        read_mask(tmp_path / "colour.png")


def test_read_split_parses_pairs_and_lone_images(tmp_path):
    path = _write_lines(tmp_path / "u.txt", ["a.jpg a.png", "", "b.jpg", "  c.jpg   c.png  "])
    assert read_split(path) == [("a.jpg", "a.png"), ("b.jpg", None), ("c.jpg", "c.png")]


def test_read_split_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DatasetError, match=r"split file not found: .*missing\.txt"):
        read_split(tmp_path / "missing.txt")
    with pytest.raises(DatasetError, match=r"split file is empty: .*empty\.txt"):
        read_split(_write_lines(tmp_path / "empty.txt", ["", "   "]))
    bad = _write_lines(tmp_path / "bad.txt", ["a.jpg a.png", "b.jpg b.png", "c.jpg c.png extra"])
    with pytest.raises(DatasetError, match=r"bad\.txt:3: expected 'image_path \[mask_path\]', got 3 fields"):
        read_split(bad)
    lone = _write_lines(tmp_path / "lone.txt", ["a.jpg a.png", "b.jpg"])
    with pytest.raises(DatasetError, match=r"lone\.txt:2: no mask path"):
        read_split(lone, require_mask=True)


def test_train_l_item(tmp_path):
    samples = _voc_tree(tmp_path)
    dataset = SemiDataset(tmp_path, samples, "train_l", nclass=21, crop_size=32)
    item = dataset[0]
    assert set(item) == {"image", "mask"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.int64
    assert set(item["mask"].unique().tolist()) <= set(range(21)) | {255}


@pytest.mark.parametrize("strong_views", [1, 2])
def test_train_u_item(tmp_path, strong_views):
    torch.manual_seed(0)
    samples = _voc_tree(tmp_path)
    # Halving a 56-wide image leaves it smaller than the crop, so every item is padded.
    dataset = SemiDataset(tmp_path, samples, "train_u", nclass=21, crop_size=32, scale_range=(0.5, 0.5),
                          strong_views=strong_views)
    item = dataset[1]
    assert set(item) == {"image_weak", "image_strong", "cutmix_box", "ignore_mask", "mask"}
    assert item["image_weak"].shape == (3, 32, 32) and item["image_weak"].dtype == torch.float32
    assert len(item["image_strong"]) == strong_views and len(item["cutmix_box"]) == strong_views
    for strong, box in zip(item["image_strong"], item["cutmix_box"]):
        assert strong.shape == (3, 32, 32) and strong.dtype == torch.float32
        assert box.shape == (32, 32) and box.dtype == torch.int64 and set(box.unique().tolist()) <= {0, 1}
    ignore = item["ignore_mask"]
    assert ignore.dtype == torch.int64 and set(ignore.unique().tolist()) == {0, 255}
    # The 28 x 20 rescaled image fills the top corner (left, or right after a flip); the rest is padding.
    left = 4 if ignore[0, 0] == 255 else 0
    content = torch.zeros(32, 32, dtype=torch.bool)
    content[:20, left:left + 28] = True
    assert torch.equal(ignore == 0, content)
    assert item["mask"].dtype == torch.int64 and (item["mask"][~content] == 255).all()
    assert (item["mask"][1:20][content[1:20]] < 21).all()


def test_train_u_strong_views_draw_their_own_colours_and_boxes(tmp_path):
    torch.manual_seed(0)
    dataset = SemiDataset(tmp_path, _voc_tree(tmp_path), "train_u", nclass=21, crop_size=32)
    items = [dataset[0] for _ in range(6)]
    assert any(not torch.equal(*item["image_strong"]) for item in items)
    assert any(not torch.equal(*item["cutmix_box"]) for item in items)


def test_train_u_without_mask_on_disk_gives_ignore_everywhere(tmp_path):
    samples = _voc_tree(tmp_path, count=1)
    unlisted = SemiDataset(tmp_path, [(samples[0][0], None)], "train_u", nclass=21, crop_size=32)
    missing = SemiDataset(tmp_path, [(samples[0][0], "SegmentationClass/absent.png")], "train_u", nclass=21,
                          crop_size=32)
    for dataset in (unlisted, missing):
        assert (dataset[0]["mask"] == 255).all()


def test_val_item_is_the_full_image(tmp_path):
    samples = _voc_tree(tmp_path)
    item = SemiDataset(tmp_path, samples, "val", nclass=21, crop_size=32)[2]
    assert set(item) == {"image", "mask", "id"}
    assert item["image"].shape == (3, HEIGHT, WIDTH) and item["image"].dtype == torch.float32
    expected = np.array(Image.open(tmp_path / samples[2][1]))
    assert item["mask"].dtype == torch.int64 and np.array_equal(item["mask"].numpy(), expected)
    assert item["id"] == samples[2][0]


def test_labeled_list_is_repeated_or_cut_to_nsample_as_the_release_does(tmp_path):
    samples = _voc_tree(tmp_path)
    repeated = SemiDataset(tmp_path, samples, "train_l", nclass=21, crop_size=32, nsample=8)
    assert len(repeated) == 8 and [s[0] for s in repeated.samples] == [s[0] for s in samples * 3][:8]
    cut = SemiDataset(tmp_path, samples, "train_l", nclass=21, crop_size=32, nsample=2)
    assert [s[0] for s in cut.samples] == [s[0] for s in samples[:2]] and cut.listed == 3


def test_segmentation_class_aug_is_accepted_for_segmentation_class_paths(tmp_path):
    samples = _voc_tree(tmp_path, count=1, mask_dir="SegmentationClassAug")
    item = SemiDataset(tmp_path, samples, "val", nclass=21, crop_size=32)[0]
    expected = np.array(Image.open(tmp_path / samples[0][1].replace("SegmentationClass", "SegmentationClassAug")))
    assert np.array_equal(item["mask"].numpy(), expected)


def test_missing_files_are_named_with_their_source(tmp_path):
    samples = _voc_tree(tmp_path, count=1)
    with pytest.raises(DatasetError, match=r"^lab\.txt: 1 listed file\(s\) missing under data_root .*: "
                                           r"JPEGImages/nope\.jpg; no listed image exists: is data_root right\?$"):
        SemiDataset(tmp_path, [("JPEGImages/nope.jpg", samples[0][1])], "train_l", nclass=21, crop_size=32,
                    source="lab.txt")
    with pytest.raises(DatasetError, match=r"^split: no mask listed for JPEGImages/2007_000000\.jpg; train_l "
                                           r"samples need their mask$"):
        SemiDataset(tmp_path, [(samples[0][0], None)], "train_l", nclass=21, crop_size=32)


def _cfg(root: Path, **overrides) -> dict:
    cfg = {"dataset": "pascal", "data_root": str(root), "split": "92", "crop_size": 32, "scale_range": [0.5, 2.0],
           "strong_views": 2, "nclass": 21, "augmentation": "release", "truncate_labeled": True,
           "train_mode": "semi"}
    return cfg | overrides


def test_build_datasets_reads_the_split_files(tmp_path):
    root, splits = tmp_path / "voc", tmp_path / "splits"
    samples = [f"{image} {mask}" for image, mask in _voc_tree(root, count=5)]
    _write_lines(splits / "pascal/92/labeled.txt", samples[:1])
    _write_lines(splits / "pascal/92/unlabeled.txt", [line.split()[0] for line in samples[1:4]])
    _write_lines(splits / "pascal/val.txt", samples[4:])
    labeled, unlabeled, val = build_datasets(_cfg(root), splits)
    assert (labeled.mode, unlabeled.mode, val.mode) == ("train_l", "train_u", "val")
    assert len(labeled) == 3 and labeled.listed == 1 and len(unlabeled) == 3 and len(val) == 1
    assert dataset_summary(_cfg(root), labeled, unlabeled, val) == (
        f"pascal split 92 at {root}: 1 labeled (repeated to 3), 3 unlabeled, 1 val samples, 21 classes")
    batch = next(iter(DataLoader(unlabeled, batch_size=2)))
    assert batch["image_weak"].shape == (2, 3, 32, 32) and len(batch["image_strong"]) == 2
    assert batch["cutmix_box"][1].shape == (2, 32, 32) and (batch["mask"] == 255).all()


@pytest.mark.parametrize("truncate, train_mode, expected", [(True, "semi", 2), (False, "semi", 3),
                                                             (True, "supervised", 3)])
def test_a_labeled_list_longer_than_the_unlabeled_is_cut_in_semi_mode_unless_asked_not_to(tmp_path, caplog, truncate,
                                                                                          train_mode, expected):
    root, splits = tmp_path / "voc", tmp_path / "splits"
    samples = [f"{image} {mask}" for image, mask in _voc_tree(root, count=6)]
    _write_lines(splits / "pascal/92/labeled.txt", samples[:3])
    _write_lines(splits / "pascal/92/unlabeled.txt", [line.split()[0] for line in samples[3:5]])
    _write_lines(splits / "pascal/val.txt", samples[5:])
    cfg = _cfg(root, truncate_labeled=truncate, train_mode=train_mode)
    # The handler on the project logger itself, alone: a run set up earlier in this process stops its propagation.
    logger, propagate = logging.getLogger(LOGGER_NAME), logging.getLogger(LOGGER_NAME).propagate
    logger.propagate = False
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
            labeled, unlabeled, val = build_datasets(cfg, splits)
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate
    assert [s[0] for s in labeled.samples] == [line.split()[0] for line in samples[:expected]]
    resized = "cut to 2" if expected == 2 else "repeated to 3"
    assert dataset_summary(cfg, labeled, unlabeled, val) == (
        f"pascal split 92 at {root}: 3 labeled ({resized}), 2 unlabeled, 1 val samples, 21 classes")
    warned = [record.getMessage() for record in caplog.records if "never used" in record.getMessage()]
    assert warned == ([f"1 of the 3 labeled images of {splits / 'pascal/92/labeled.txt'} are never used: the list is "
                       "cut to the 2 unlabeled images, as the release does (truncate_labeled=false keeps them)"]
                      if expected == 2 else [])


def test_build_datasets_missing_split_tells_how_to_make_it(tmp_path):
    with pytest.raises(DatasetError, match=r"split file not found: .*pascal/92/labeled\.txt; copy the published "
                                           r"split files there or run `python -m dataset\.make_splits pascal"):
        build_datasets(_cfg(tmp_path), tmp_path / "splits")


def test_build_datasets_rejects_wrong_nclass(tmp_path):
    with pytest.raises(DatasetError, match="nclass 19 does not match the 21 classes of pascal"):
        build_datasets(_cfg(tmp_path, nclass=19), tmp_path / "splits")
