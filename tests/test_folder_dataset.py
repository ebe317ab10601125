"""`dataset: folder`: users' own images and masks, from make_splits through build_datasets to batches."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import REPO
from dataset import make_splits
from dataset.classes import class_names, class_palette
from dataset.errors import DatasetError
from dataset.semi import build_datasets, dataset_summary, read_split
from util.config import load_config

NCLASS = 3
SIZE = (24, 32)


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*SIZE, 3), dtype=np.uint8)).save(path)


def _mask(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    indices = np.random.default_rng(seed).integers(0, NCLASS, SIZE).astype(np.uint8)
    indices[0] = 255
    Image.fromarray(indices).save(path)  # a plain grayscale PNG of class indices


def _folder_tree(root: Path, masked: int = 8, unmasked: int = 3, val: int = 2) -> None:
    """images/{train,val} (train nested in two sites, .jpg and .png), masks at the same relative paths."""
    for index in range(masked + unmasked):
        site = f"site_{index % 2}"
        suffix = ".png" if index % 3 == 0 else ".jpg"
        _image(root / f"images/train/{site}/t{index:02d}{suffix}", index)
        if index < masked:
            _mask(root / f"masks/train/{site}/t{index:02d}.png", index)
    for index in range(val):
        _image(root / f"images/val/v{index}.jpg", 100 + index)
        _mask(root / f"masks/val/v{index}.png", 100 + index)
    (root / "images/train/notes.txt").write_text("not an image")


def _config(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(f"dataset: folder\ndata_root: {tmp_path / 'data'}\nsplits_dir: {tmp_path / 'splits'}\n"
                    f"nclass: {NCLASS}\nclass_names: [background, crack, rust]\n"
                    f"palette: [0, 0, 0, 255, 0, 0, 0, 0, 255]\ncrop_size: 16\nstrong_views: 2\n{text}")
    return path


def test_make_splits_folder(tmp_path):
    _folder_tree(tmp_path)
    files = make_splits.folder_splits(tmp_path, seed=0)
    assert set(files) == {f"{name}/{kind}.txt" for name in [*make_splits.FRACTIONS, "all"]
                          for kind in ("labeled", "unlabeled")} | {"val.txt"}
    masked = {f"images/train/site_{i % 2}/t{i:02d}{'.png' if i % 3 == 0 else '.jpg'} "
              f"masks/train/site_{i % 2}/t{i:02d}.png" for i in range(8)}
    unmasked = {"images/train/site_1/t09.png", "images/train/site_0/t10.jpg", "images/train/site_0/t08.jpg"}
    assert set(files["all/labeled.txt"]) == masked and set(files["all/unlabeled.txt"]) == unmasked
    for name, divisor in make_splits.FRACTIONS.items():
        labeled, unlabeled = set(files[f"{name}/labeled.txt"]), set(files[f"{name}/unlabeled.txt"])
        assert len(labeled) == -(-8 // divisor) and labeled <= masked
        assert unlabeled == (masked - labeled) | unmasked
    assert files["val.txt"] == ["images/val/v0.jpg masks/val/v0.png", "images/val/v1.jpg masks/val/v1.png"]
    assert make_splits.folder_splits(tmp_path, seed=0) == files
    assert make_splits.folder_splits(tmp_path, seed=3)["1_2/labeled.txt"] != files["1_2/labeled.txt"]


def test_make_splits_folder_names_what_is_missing(tmp_path):
    _folder_tree(tmp_path)
    (tmp_path / "masks/val/v1.png").unlink()
    with pytest.raises(DatasetError, match=r"^1 val image\(s\) have no mask in .*masks/val: images/val/v1\.jpg$"):
        make_splits.folder_splits(tmp_path, seed=0)
    with pytest.raises(SystemExit, match=r"error: folder not found: .*pictures/train"):
        make_splits.main(["folder", "--data-root", str(tmp_path), "--images", "pictures", "--out",
                          str(tmp_path / "splits")])
    assert not (tmp_path / "splits").exists()


def test_folder_dataset_end_to_end(tmp_path):
    _folder_tree(tmp_path / "data")
    make_splits.main(["folder", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "splits")])
    cfg = load_config(_config(tmp_path), ["split=all", "truncate_labeled=false"])  # as configs/folder_example.yaml
    labeled, unlabeled, val = build_datasets(cfg, cfg["splits_dir"])
    assert dataset_summary(cfg, labeled, unlabeled, val) == (
        f"folder split all at {tmp_path / 'data'}: 8 labeled (repeated to 8), 3 unlabeled, 2 val samples, 3 classes")
    batch = next(iter(DataLoader(labeled, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16)
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 255}
    weak = next(iter(DataLoader(unlabeled, batch_size=3)))
    assert weak["image_weak"].shape == (3, 3, 16, 16) and len(weak["image_strong"]) == 2
    assert (weak["mask"] == 255).all()  # unlabeled images need no masks
    item = val[1]
    expected = np.array(Image.open(tmp_path / "data/masks/val/v1.png"))
    assert item["id"] == "images/val/v1.jpg" and np.array_equal(item["mask"].numpy(), expected)
    assert class_names(cfg) == ["background", "crack", "rust"]
    assert class_palette(cfg)[:9] == [0, 0, 0, 255, 0, 0, 0, 0, 255] and len(class_palette(cfg)) == 768


def test_folder_dataset_fraction_split_reads_back(tmp_path):
    _folder_tree(tmp_path / "data")
    make_splits.main(["folder", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "splits")])
    samples = read_split(tmp_path / "splits/folder/1_4/unlabeled.txt")
    assert sum(mask is None for _, mask in samples) == 3 and len(samples) == 11 - 2
    labeled, unlabeled, _ = build_datasets(load_config(_config(tmp_path), ["split=1_4"]), tmp_path / "splits")
    assert labeled.listed == 2 and len(labeled) == len(unlabeled) == 9
    assert torch.isfinite(unlabeled[0]["image_weak"]).all()


@pytest.mark.parametrize("text, message", [
    ("class_names: null", r"^dataset folder needs class_names in the config, one name per class$"),
    ("class_names: [a, b]", r"^class_names lists 2 names but nclass is 3$"),
    ("palette: [0, 0, 0]", r"^palette has 3 values but needs 3 \(r, g, b\) per class: 9 for nclass 3$"),
])
def test_folder_config_errors(tmp_path, text, message):
    cfg = load_config(_config(tmp_path), [text.replace(": ", "=")])
    with pytest.raises(DatasetError, match=message):
        class_names(cfg)
        class_palette(cfg)


def test_class_names_are_checked_at_start_up(tmp_path):
    _folder_tree(tmp_path / "data")
    cfg = load_config(_config(tmp_path), ["class_names=[a,b]", "split=all"])
    with pytest.raises(DatasetError, match="class_names lists 2 names but nclass is 3"):
        build_datasets(cfg, cfg["splits_dir"])


def test_builtin_datasets_keep_their_names_and_palettes():
    cfg = {"dataset": "cityscapes", "nclass": 19, "class_names": None, "palette": None}
    assert class_names(cfg)[0] == "road" and class_palette(cfg)[:3] == [128, 64, 128]
    with pytest.raises(DatasetError, match="nclass 21 does not match the 19 classes of cityscapes"):
        class_names(cfg | {"nclass": 21})


def test_example_config_is_valid():
    cfg = load_config(Path(REPO) / "configs/folder_example.yaml")
    assert cfg["dataset"] == "folder" and len(class_names(cfg)) == cfg["nclass"]
    assert class_palette(cfg)[:3 * cfg["nclass"]] == cfg["palette"]
