"""augmentation: release, the ScaleMatch release's PIL/torchvision pipeline, against items of the release's own
dataset/semi.py and dataset/transform.py under the same seeds; and its items in the same format as augmentation: fast.

tests/data/release_augmentation_reference.pt holds the generated source images and masks and the release's items
(commit 445cde83): per seed s (Python's, NumPy's and torch's generators seeded with s, as util.sampling.SeededDataset
does), SemiDataset("train_u" / "train_l")[s % 3] of the release. Regenerate it with

    python scripts/release_augmentation_reference.py RELEASE_DIR --write tests/data/release_augmentation_reference.pt
"""
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.semi import SemiDataset, build_datasets
from dataset.transforms import (IMAGENET_MEAN, IMAGENET_STD, normalize_pil, release_cutmix_box, release_geometric,
                                release_rescale)
from util.config import ConfigError, load_config
from util.sampling import SeededDataset

RELEASE_REFERENCE = Path(__file__).parent / "data" / "release_augmentation_reference.pt"
LEVEL = 20  # image value of label l is (l + 1) * LEVEL, so padding (0) is never a label colour


def _seed(seed: int) -> None:
    """The generators util.sampling.SeededDataset seeds."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _block_sample(width: int, height: int, block: int = 8, classes: int = 10, seed: int = 0
                  ) -> tuple[Image.Image, Image.Image]:
    """Random labels in block x block squares, and a gray image whose value spells the label out."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, classes, (height // block, width // block))
    labels = blocks.repeat(block, 0).repeat(block, 1).astype(np.uint8)
    pixels = ((labels.astype(np.int64) + 1) * LEVEL).astype(np.uint8)
    return Image.fromarray(np.stack([pixels] * 3, axis=-1)), Image.fromarray(labels)


def _interior(channel: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood has one value: away from the blended label edges."""
    padded = np.pad(channel, 1, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    return windows.max(axis=(2, 3)) == windows.min(axis=(2, 3))


# --- (a) geometry

@pytest.mark.parametrize("width, height", [(64, 40), (40, 64)])
def test_rescale_draws_the_long_side_from_the_release_range(width, height):
    image, labels = _block_sample(width, height)
    sizes = set()
    for seed in range(30):
        random.seed(seed)
        out_image, (out_labels,) = release_rescale(image, [labels], (0.5, 2.0))
        random.seed(seed)
        new_long = random.randint(32, 128)  # int(64 * 0.5), int(64 * 2.0), both ends included
        new_short = int(40 * new_long / 64 + 0.5)
        expected = (new_long, new_short) if width > height else (new_short, new_long)
        assert out_image.size == out_labels.size == expected
        sizes.add(new_long)
    assert min(sizes) < 50 and max(sizes) > 110


def test_geometry_pads_with_zero_and_the_fills_and_keeps_labels_aligned():
    image, labels = _block_sample(80, 48)
    checked = padded_draws = 0
    for seed in range(40):
        _seed(seed)
        zeros = Image.new("L", image.size, 0)
        out_image, (out_labels, padding) = release_geometric(image, [labels, zeros], 64, (0.5, 2.0), [255, 255])
        assert out_image.size == out_labels.size == padding.size == (64, 64)
        pixels, mask, padded = np.asarray(out_image), np.asarray(out_labels), np.asarray(padding) == 255
        # Padding is exactly where the image is 0 and the label map its fill: the pad sits at one place in all.
        assert np.array_equal(padded, pixels.sum(-1) == 0) and np.array_equal(padded, mask == 255)
        padded_draws += bool(padded.any())
        # Bilinear image, nearest labels: away from class edges every labelled pixel's colour is its label's.
        interior = _interior(pixels[..., 0]) & ~padded
        decoded = np.round(pixels[..., 0] / LEVEL).astype(np.int64) - 1
        assert np.array_equal(decoded[interior], mask[interior])
        checked += int(interior.sum())
    assert padded_draws > 5 and checked > 40 * 64 * 64 // 4


def test_crop_and_flip_without_rescale_keep_every_pixel_on_its_label():
    image, labels = _block_sample(80, 48)
    flipped = 0
    for seed in range(20):
        _seed(seed)
        out_image, (out_labels,) = release_geometric(image, [labels], 64, (1.0, 1.0), [255])
        pixels, mask = np.asarray(out_image)[..., 0], np.asarray(out_labels)
        padded = mask == 255
        assert padded[48:].all() and not padded[:48].any()
        assert (pixels[padded] == 0).all()
        assert np.array_equal(pixels[~padded], (mask[~padded].astype(np.int64) + 1) * LEVEL)
        _seed(seed)
        random.randint(80, 80)  # the rescale's long side
        left, top = random.randint(0, 80 - 64), random.randint(0, 0)
        window = np.asarray(labels)[top:top + 48, left:left + 64]
        flip = random.random() < 0.5
        flipped += flip
        assert np.array_equal(mask[:48], window[:, ::-1] if flip else window)
    assert 0 < flipped < 20


# --- (b) the release's own pipeline, pinned: labeled and unlabeled items under fixed seeds

@pytest.fixture(scope="module")
def release_reference():
    return torch.load(RELEASE_REFERENCE, weights_only=True)


def _write_sources(root: Path, reference: dict) -> list[tuple[str, str]]:
    """The fixture's source images and masks as the PNG files the release read."""
    samples = []
    for sample in reference["samples"]:
        for key, path_key in (("image", "image_path"), ("mask", "mask_path")):
            (root / sample[path_key]).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample[key].numpy()).save(root / sample[path_key])
        samples.append((sample["image_path"], sample["mask_path"]))
    return samples


def _unnormalized(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


def test_reference_covers_padding_boxes_grayscale_and_both_orientations(release_reference):
    assert release_reference["commit"].startswith("445cde83")
    unlabeled = release_reference["train_u"]
    padded = [bool((item["ignore_mask"] == 255).any()) for item in unlabeled]
    assert any(padded) and not all(padded)
    boxes = [bool(box.any()) for item in unlabeled for box in item["cutmix_box"]]
    assert any(boxes) and not all(boxes)
    strong = [_unnormalized(view) for item in unlabeled for view in item["image_strong"]]
    gray = [bool((view[0] - view[1]).abs().max() < 1e-5 and (view[1] - view[2]).abs().max() < 1e-5) for view in strong]
    assert any(gray) and not all(gray)
    shapes = {tuple(sample["image"].shape[:2]) for sample in release_reference["samples"]}
    assert any(height > width for height, width in shapes) and any(height < width for height, width in shapes)


def test_unlabeled_items_are_the_release_items(tmp_path, release_reference):
    dataset = SemiDataset(tmp_path, _write_sources(tmp_path, release_reference), "train_u", nclass=21,
                          crop_size=release_reference["crop_size"], strong_views=2, augmentation="release")
    for release in release_reference["train_u"]:
        _seed(release["seed"])
        item = dataset[release["index"]]
        what = f"seed {release['seed']}"
        assert torch.equal(item["image_weak"], release["image_weak"]), what
        assert all(torch.equal(a, b) for a, b in zip(item["image_strong"], release["image_strong"], strict=True)), what
        assert all(torch.equal(a, b.long()) for a, b in zip(item["cutmix_box"], release["cutmix_box"], strict=True)), \
            what
        assert torch.equal(item["ignore_mask"], release["ignore_mask"].long()), what
        # The release marks padding 254 in the mask; here the mask holds the ignore index there.
        assert torch.equal(item["mask"], torch.where(release["mask"] == 254, 255, release["mask"].long())), what


def test_labeled_items_are_the_release_items(tmp_path, release_reference):
    dataset = SemiDataset(tmp_path, _write_sources(tmp_path, release_reference), "train_l", nclass=21,
                          crop_size=release_reference["crop_size"], augmentation="release")
    for release in release_reference["train_l"]:
        _seed(release["seed"])
        item = dataset[release["index"]]
        assert torch.equal(item["image"], release["image"]), release["seed"]
        assert torch.equal(item["mask"], release["mask"].long()), release["seed"]


# --- (c) CutMix box

def test_cutmix_box_is_one_rectangle_of_bounded_area_half_the_time():
    size, draws, empty, fractions = 100, 400, 0, []
    for seed in range(draws):
        random.seed(seed)
        np.random.seed(seed)
        box = release_cutmix_box(size)
        assert box.dtype == torch.int64 and box.shape == (size, size)
        if not box.any():
            empty += 1
            continue
        rows, columns = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        height, width = int(rows[-1] - rows[0] + 1), int(columns[-1] - columns[0] + 1)
        # One filled rectangle, inside the square.
        assert int(box.sum()) == width * height and len(rows) == height and len(columns) == width
        fraction = width * height / size ** 2
        assert 0 < fraction <= 0.4
        fractions.append(fraction)
    assert 0.4 * draws <= empty <= 0.6 * draws
    assert min(fractions) < 0.05 and max(fractions) > 0.3


# --- a padded unlabeled item

HEIGHT, WIDTH = 40, 56


def _voc_tree(root: Path, count: int = 3) -> list[tuple[str, str]]:
    """count random images with masks (labels 0..20, a 255 border) in the VOC layout."""
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    samples = []
    for index in range(count):
        name = f"2007_{index:06d}"
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(root / f"JPEGImages/{name}.jpg")
        indices = rng.integers(0, 21, (HEIGHT, WIDTH)).astype(np.uint8)
        indices[0] = 255
        Image.fromarray(indices).save(root / f"SegmentationClass/{name}.png")
        samples.append((f"JPEGImages/{name}.jpg", f"SegmentationClass/{name}.png"))
    return samples

def test_unlabeled_ignore_mask_is_255_exactly_on_padding(tmp_path):
    samples = _voc_tree(tmp_path)
    # Halving a 56-wide image leaves it 28 x 20, smaller than the crop, so every item is padded.
    dataset = SemiDataset(tmp_path, samples, "train_u", nclass=21, crop_size=32, scale_range=(0.5, 0.5),
                          augmentation="release")
    zero = normalize_pil(Image.new("RGB", (1, 1)))[:, 0, 0]
    for seed in range(6):
        _seed(seed)
        item = dataset[seed % 3]
        ignore = item["ignore_mask"]
        left = 4 if ignore[0, 0] == 255 else 0  # the content sits top left, or top right after a flip
        content = torch.zeros(32, 32, dtype=torch.bool)
        content[:20, left:left + 28] = True
        assert torch.equal(ignore == 0, content) and set(ignore.unique().tolist()) == {0, 255}
        assert (item["mask"][~content] == 255).all() and (item["mask"][1:20][content[1:20]] < 21).all()
        assert (item["image_weak"][:, ~content] == zero[:, None]).all()


# --- (d) the same format as fast

def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, list):
        return [_signature(element) for element in value]
    return type(value)


@pytest.mark.parametrize("mode", ["train_l", "train_u"])
def test_release_and_fast_items_have_the_same_keys_shapes_and_dtypes(tmp_path, mode):
    samples = _voc_tree(tmp_path)
    items = {}
    for augmentation in ("release", "fast"):
        dataset = SemiDataset(tmp_path, samples, mode, nclass=21, crop_size=32, strong_views=2,
                              augmentation=augmentation)
        _seed(0)
        items[augmentation] = {key: _signature(value) for key, value in dataset[1].items()}
    assert items["release"] == items["fast"]
    labeled = SemiDataset(tmp_path, samples, "train_l", nclass=21, crop_size=32, augmentation="release")
    _seed(1)
    mask = labeled[0]["mask"]
    assert set(mask.unique().tolist()) <= set(range(21)) | {255}


def test_unknown_augmentation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="augmentation must be one of"):
        SemiDataset(tmp_path, _voc_tree(tmp_path), "train_l", nclass=21, crop_size=32, augmentation="pil")


def test_config_key_reaches_build_datasets(tmp_path):
    root, splits = tmp_path / "voc", tmp_path / "splits"
    lines = [f"{image} {mask}" for image, mask in _voc_tree(root, count=3)]
    for name, chosen in (("pascal/s/labeled.txt", lines[:1]), ("pascal/s/unlabeled.txt", lines[1:2]),
                         ("pascal/val.txt", lines[2:])):
        (splits / name).parent.mkdir(parents=True, exist_ok=True)
        (splits / name).write_text("\n".join(chosen) + "\n")
    config = tmp_path / "cfg.yaml"
    config.write_text(f"dataset: pascal\ndata_root: {root}\nnclass: 21\nsplit: s\ncrop_size: 32\n")
    assert load_config(config)["augmentation"] == "release"
    with pytest.raises(ConfigError, match="augmentation"):
        load_config(config, ["augmentation=pil"])
    for augmentation in ("release", "fast"):
        labeled, unlabeled, val = build_datasets(load_config(config, [f"augmentation={augmentation}"]), splits)
        assert labeled.augmentation == unlabeled.augmentation == augmentation


# --- (e) determinism under SeededDataset

def test_seeded_loads_are_identical(tmp_path):
    dataset = SeededDataset(SemiDataset(tmp_path, _voc_tree(tmp_path), "train_u", nclass=21, crop_size=32,
                                        strong_views=2, augmentation="release"))
    first, second, other = dataset[(1, 123)], dataset[(1, 123)], dataset[(1, 124)]

    def flat(item: dict) -> list[torch.Tensor]:
        return [tensor for value in item.values() for tensor in (value if isinstance(value, list) else [value])]

    assert all(torch.equal(a, b) for a, b in zip(flat(first), flat(second), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(flat(first), flat(other), strict=True))
