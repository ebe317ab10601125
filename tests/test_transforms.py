import math
import torch
import torch.nn.functional as F

from dataset.transforms import (IMAGENET_MEAN, cutmix_box, geometric, normalize, pad_to, random_hflip,
                                random_rescale, strong_photometric)

LEVEL = 20  # image value of label l is (l + 1) * LEVEL, so padding (0) is never a label colour


def _block_sample(height: int, width: int, block: int = 8, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Random labels in block x block squares, and an image whose every channel spells the label out."""
    blocks = torch.randint(0, classes, (height // block, width // block))
    labels = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1).to(torch.uint8)
    image = ((labels.to(torch.int64) + 1) * LEVEL).to(torch.uint8).expand(3, -1, -1).clone()
    return image, labels


def _interior(channel: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood has one value: away from the blended label edges."""
    padded = F.pad(channel[None, None].float(), (1, 1, 1, 1), mode="replicate")
    return (F.max_pool2d(padded, 3, 1) == -F.max_pool2d(-padded, 3, 1))[0, 0]


def test_geometry_keeps_image_and_labels_aligned():
    torch.manual_seed(0)
    image, labels = _block_sample(48, 80)
    checked = padded_draws = 0
    for _ in range(60):
        out_image, out_labels = geometric(image, labels[None], crop_size=64, scale_range=(0.5, 2.0))
        assert out_image.shape == (3, 64, 64) and out_labels.shape == (1, 64, 64)
        mask = out_labels[0]
        padding = mask == 255
        # Padding is exactly where the image is 0: the pad sits at the same place in both.
        assert torch.equal(padding, out_image.sum(0) == 0)
        padded_draws += bool(padding.any())
        interior = _interior(out_image[0]) & ~padding
        decoded = torch.round(out_image[0].float() / LEVEL).long() - 1
        assert torch.equal(decoded[interior], mask[interior].long())
        checked += int(interior.sum())
    assert padded_draws > 5
    assert checked > 60 * 64 * 64 // 4


def test_random_rescale_scales_long_side_and_keeps_label_values():
    torch.manual_seed(0)
    image, labels = _block_sample(64, 96)
    long_sides = []
    for _ in range(200):
        out_image, out_labels = random_rescale(image, labels[None], (0.5, 2.0))
        height, width = out_image.shape[-2:]
        assert out_labels.shape[-2:] == (height, width)
        assert abs(width / height - 96 / 64) < 0.05
        assert set(out_labels.unique().tolist()) <= set(labels.unique().tolist())
        long_sides.append(width)
    assert 48 <= min(long_sides) < 60 and 180 < max(long_sides) <= 192


def test_pad_to_fills_image_with_zero_and_each_label_map_with_its_fill():
    image = torch.full((3, 10, 12), 9, dtype=torch.uint8)
    labels = torch.ones(2, 10, 12, dtype=torch.uint8)
    out_image, out_labels = pad_to(image, labels, 16, label_fill=[7, 255])
    assert out_image.shape == (3, 16, 16) and out_labels.shape == (2, 16, 16)
    assert torch.equal(out_image[:, :10, :12], image)
    assert (out_image[:, 10:] == 0).all() and (out_image[:, :, 12:] == 0).all()
    assert (out_labels[0, 10:] == 7).all() and (out_labels[1, :, 12:] == 255).all()
    assert (out_labels[:, :10, :12] == 1).all()


def test_hflip_flips_image_and_labels_together():
    image, labels = _block_sample(16, 24)
    out_image, out_labels = random_hflip(image, labels[None], p=1.0)
    assert torch.equal(out_image, image.flip(-1)) and torch.equal(out_labels[0], labels.flip(-1))
    assert random_hflip(image, labels[None], p=0.0)[0] is image


def test_cutmix_box_statistics():
    torch.manual_seed(0)
    size, draws = 100, 2000
    areas, aspects = [], []
    for _ in range(draws):
        box = cutmix_box(size)
        assert box.dtype == torch.int64 and box.shape == (size, size)
        assert set(box.unique().tolist()) <= {0, 1}
        if not box.any():
            continue
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(box.sum()) == height * width  # one filled rectangle
        areas.append(height * width / size**2)
        aspects.append(height / width)
    assert 0.45 < len(areas) / draws < 0.55
    # Rounding box sides to whole pixels moves area and aspect a little past their ranges.
    assert 0.018 <= min(areas) < 0.04 and 0.36 < max(areas) <= 0.42
    assert 0.27 <= min(aspects) < 0.4 and 2.5 < max(aspects) <= 3.7


def test_strong_photometric_draws_afresh_and_keeps_shape():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    views = [strong_photometric(image) for _ in range(8)]
    assert all(view.shape == image.shape and view.dtype == torch.uint8 for view in views)
    assert sum(not torch.equal(view, image) for view in views) >= 4
    assert len({view.float().mean().item() for view in views}) > 4


def test_normalize_uses_imagenet_statistics():
    mean_colour = torch.tensor([round(m * 255) for m in IMAGENET_MEAN], dtype=torch.uint8)
    image = mean_colour[:, None, None].expand(3, 4, 4).clone()
    out = normalize(image)
    assert out.dtype == torch.float32 and out.abs().max() < 0.01
    assert normalize(torch.full((3, 2, 2), 255, dtype=torch.uint8))[0, 0, 0] > 2.2


def test_gaussian_blur_matches_torchvision_with_the_same_kernel():
    from torchvision.transforms.v2 import functional as tvf

    from dataset.transforms import gaussian_blur
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 21, 30), dtype=torch.uint8)
    for sigma in (0.3, 1.0, 2.0):
        size = 2 * math.ceil(3 * sigma) + 1
        expected = tvf.gaussian_blur(image, [size, size], [sigma, sigma])
        assert (gaussian_blur(image, sigma).int() - expected.int()).abs().max() <= 1, sigma
