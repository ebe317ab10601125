"""augmentation: release, the ScaleMatch release's PIL/torchvision pipeline, against the release's calls made here
directly with the same seeds; and its items in the same format as augmentation: fast."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from dataset.semi import SemiDataset, build_datasets
from dataset.transforms import (normalize_pil, release_cutmix_box, release_geometric, release_rescale,
                                release_strong_photometric)
from util.config import ConfigError, load_config
from util.sampling import SeededDataset

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


# --- (b) photometric

def _release_strong(image: Image.Image) -> Image.Image:
    """The release's strong colour steps, calling torchvision and PIL directly."""
    if random.random() < 0.8:
        image = transforms.ColorJitter(0.5, 0.5, 0.5, 0.25)(image)
    image = transforms.RandomGrayscale(p=0.2)(image)
    if random.random() < 0.5:
        sigma = np.random.uniform(0.1, 2.0)
        image = image.filter(ImageFilter.GaussianBlur(radius=sigma))
    return image


def test_strong_view_is_the_release_colour_jitter_grayscale_and_blur():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    outcomes = set()
    for seed in range(40):
        _seed(seed)
        ours = np.asarray(release_strong_photometric(image))
        _seed(seed)
        reference = np.asarray(_release_strong(image))
        assert np.array_equal(ours, reference), seed
        _seed(seed)
        jitter, blur = random.random() < 0.8, random.random() < 0.5  # the coins; the jitter's own draws are torch's
        gray = np.array_equal(ours[..., 0], ours[..., 1]) and np.array_equal(ours[..., 1], ours[..., 2])
        outcomes.add((jitter, gray, blur))
    assert len(outcomes) >= 5  # jitter, grayscale and blur each on and off


# --- (c) CutMix box

def _release_box(size: int) -> tuple[torch.Tensor, tuple | None]:
    """The release's box rule written out: the map, and (area, ratio, left, top, width, height) of its box."""
    box = torch.zeros(size, size, dtype=torch.int64)
    if random.random() > 0.5:
        return box, None
    area = np.random.uniform(0.02, 0.4) * size * size
    while True:
        ratio = np.random.uniform(0.3, 1 / 0.3)
        width, height = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
        left, top = np.random.randint(0, size), np.random.randint(0, size)
        if left + width <= size and top + height <= size:
            break
    box[top:top + height, left:left + width] = 1
    return box, (area, ratio, left, top, width, height)


def test_cutmix_box_follows_the_release_rule():
    size, draws, empty, fractions = 100, 400, 0, []
    for seed in range(draws):
        random.seed(seed)
        np.random.seed(seed)
        box = release_cutmix_box(size)
        assert box.dtype == torch.int64 and box.shape == (size, size)
        random.seed(seed)
        np.random.seed(seed)
        expected, drawn = _release_box(size)
        assert torch.equal(box, expected), seed
        if drawn is None:
            assert not box.any()
            empty += 1
            continue
        area, ratio, left, top, width, height = drawn
        assert left + width <= size and top + height <= size and int(box.sum()) == width * height > 0
        fraction = width * height / size ** 2
        # Flooring each side loses less than one pixel row and column of the drawn area.
        assert (np.sqrt(area / ratio) - 1) * (np.sqrt(area * ratio) - 1) / size ** 2 < fraction <= 0.4
        assert 0.02 <= area / size ** 2 <= 0.4 and 0.3 <= ratio <= 1 / 0.3
        fractions.append(fraction)
    assert 0.4 * draws <= empty <= 0.6 * draws
    assert min(fractions) < 0.05 and max(fractions) > 0.3


# --- the whole unlabeled item against the release's __getitem__

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


def _release_unlabeled_item(image_path: Path, mask_path: Path, size: int) -> tuple:
    """The release's train_u steps, written out with PIL, torchvision and the release's draws."""
    image = Image.open(image_path).convert("RGB")
    mask = Image.fromarray(np.array(Image.open(mask_path)))
    width, height = image.size
    long_side = random.randint(int(max(height, width) * 0.5), int(max(height, width) * 2.0))
    if height > width:
        new_size = (int(1.0 * width * long_side / height + 0.5), long_side)
    else:
        new_size = (long_side, int(1.0 * height * long_side / width + 0.5))
    image, mask = image.resize(new_size, Image.Resampling.BILINEAR), mask.resize(new_size, Image.Resampling.NEAREST)
    pad = (0, 0, max(0, size - new_size[0]), max(0, size - new_size[1]))
    image, mask = ImageOps.expand(image, border=pad, fill=0), ImageOps.expand(mask, border=pad, fill=254)
    x, y = random.randint(0, image.size[0] - size), random.randint(0, image.size[1] - size)
    image, mask = image.crop((x, y, x + size, y + size)), mask.crop((x, y, x + size, y + size))
    if random.random() < 0.5:
        image, mask = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    to_tensor = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    strong, boxes = [], []
    for _ in range(2):
        strong.append(to_tensor(_release_strong(image)))
        boxes.append(_release_box(size)[0])
    mask = torch.from_numpy(np.array(mask)).long()
    ignore = torch.zeros_like(mask)
    ignore[mask == 254] = 255
    return to_tensor(image), strong, boxes, ignore, mask


def test_unlabeled_item_is_the_release_item(tmp_path):
    samples = _voc_tree(tmp_path)
    dataset = SemiDataset(tmp_path, samples, "train_u", nclass=21, crop_size=48, strong_views=2,
                          augmentation="release")
    padded_items = 0
    for seed in range(12):
        index = seed % len(samples)
        _seed(seed)
        item = dataset[index]
        _seed(seed)
        weak, strong, boxes, ignore, mask = _release_unlabeled_item(tmp_path / samples[index][0],
                                                                    tmp_path / samples[index][1], 48)
        assert torch.equal(item["image_weak"], weak)
        assert all(torch.equal(a, b) for a, b in zip(item["image_strong"], strong, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(item["cutmix_box"], boxes, strict=True))
        assert torch.equal(item["ignore_mask"], ignore)
        # The release marks padding 254 in the mask; here the mask holds the ignore index there.
        assert torch.equal(item["mask"], torch.where(mask == 254, 255, mask))
        padded_items += bool(ignore.any())
    assert 0 < padded_items < 12


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
