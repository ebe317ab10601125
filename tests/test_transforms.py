import colorsys
import math
import torch
import torch.nn.functional as F

from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from dataset.transforms import (IMAGENET_MEAN, colour_jitter, cutmix_box, gaussian_blur, geometric, hue_rotation,
                                normalize, pad_to, random_hflip, random_rescaled_crop, strong_photometric,
                                to_unit_float)

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


def _whole_image_rescaled_crop(image, labels, crop_size, scale_range, label_fill):
    """The reference: resize the whole image, pad, crop (the same draws as random_rescaled_crop, in its order)."""
    height, width = image.shape[-2:]
    long_side = max(height, width)
    new_long = int(torch.randint(int(long_side * scale_range[0]), int(long_side * scale_range[1]) + 1, ()))
    size = [round(height * new_long / long_side), round(width * new_long / long_side)]
    image = tvf.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    labels = tvf.resize(labels, size, interpolation=InterpolationMode.NEAREST_EXACT)
    image, labels = pad_to(image, labels, crop_size, label_fill)
    top = int(torch.randint(0, image.shape[-2] - crop_size + 1, ()))
    left = int(torch.randint(0, image.shape[-1] - crop_size + 1, ()))
    return image[:, top:top + crop_size, left:left + crop_size], labels[:, top:top + crop_size, left:left + crop_size]


def test_random_rescaled_crop_equals_resizing_the_whole_image_up_to_half_a_pixel():
    # Channel 0 rises by one level per source column, channel 1 per source row: a position read-out.
    height, width = 120, 200
    columns = torch.arange(width).expand(height, width)
    rows = torch.arange(height)[:, None].expand(height, width)
    image = torch.stack([columns, rows, (columns + rows) // 2]).to(torch.uint8)
    labels = torch.stack([(columns // 10 + rows // 10) % 7, torch.zeros_like(rows)]).to(torch.uint8)
    for draw in range(40):
        torch.manual_seed(draw)
        out_image, out_labels = random_rescaled_crop(image, labels, 96, (0.5, 2.0), [255, 255])
        torch.manual_seed(draw)
        ref_image, ref_labels = _whole_image_rescaled_crop(image, labels, 96, (0.5, 2.0), [255, 255])
        assert out_image.shape == (3, 96, 96) and out_labels.shape == (2, 96, 96)
        padding = ref_labels[1] == 255
        assert torch.equal(out_labels[1] == 255, padding)  # the same window, the same padding
        inner = ~padding
        inner[:2] = inner[-2:] = inner[:, :2] = inner[:, -2:] = False  # image borders: clamped filters differ
        # Half an output pixel is at most one source pixel (factor >= 0.5), i.e. one level, plus rounding.
        difference = (out_image.int() - ref_image.int()).abs()[:2]
        assert difference[:, inner].max() <= 2, draw
        # Each label is the reference's at the same pixel or at a neighbour: class edges move by at most a pixel.
        neighbours = F.unfold(ref_labels[0][None, None].float(), 3, padding=1)[0].view(9, 96, 96)
        assert (neighbours == out_labels[0].float()).any(0)[inner].all(), draw


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


def test_strong_photometric_draws_afresh_keeps_shape_and_range():
    torch.manual_seed(0)
    image = to_unit_float(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    views = [strong_photometric(image) for _ in range(8)]
    assert all(view.shape == image.shape and view.dtype == torch.float32 for view in views)
    assert all(view.min() >= 0 and view.max() <= 1 for view in views)
    assert sum(not torch.equal(view, image) for view in views) >= 4
    assert len({view.mean().item() for view in views}) > 4


def test_normalize_uses_imagenet_statistics():
    mean_colour = torch.tensor([round(m * 255) for m in IMAGENET_MEAN], dtype=torch.uint8)
    image = mean_colour[:, None, None].expand(3, 4, 4).clone()
    out = normalize(image)
    assert out.dtype == torch.float32 and out.abs().max() < 0.01
    assert torch.equal(normalize(to_unit_float(image)), out)
    assert normalize(torch.full((3, 2, 2), 255, dtype=torch.uint8))[0, 0, 0] > 2.2


def test_gaussian_blur_matches_torchvision_with_the_same_kernel():
    torch.manual_seed(0)
    image = torch.rand(3, 21, 30)
    for sigma in (0.3, 1.0, 2.0):
        size = 2 * math.ceil(3 * sigma) + 1
        expected = tvf.gaussian_blur(image, [size, size], [sigma, sigma])
        assert torch.allclose(gaussian_blur(image, sigma), expected, atol=1e-5), sigma


def _apply(matrix, bias, image):
    return torch.einsum("ij,jhw->ihw", matrix, image) + bias[:, None, None]


def test_colour_jitter_with_one_adjustment_is_torchvisions():
    torch.manual_seed(0)
    image = 0.3 + 0.4 * torch.rand(3, 16, 16)  # mid-range: the factors below never clamp
    mean = image.mean(dim=(1, 2))
    cases = {"brightness": (dict(brightness=0.3, contrast=0, saturation=0, hue=0), tvf.adjust_brightness),
             "contrast": (dict(brightness=0, contrast=0.3, saturation=0, hue=0), tvf.adjust_contrast),
             "saturation": (dict(brightness=0, contrast=0, saturation=0.3, hue=0), tvf.adjust_saturation)}
    for name, (strengths, adjust) in cases.items():
        for seed in range(5):
            torch.manual_seed(seed)
            matrix, bias = colour_jitter(mean, **strengths)
            # Recover the drawn factor from the map, then ask torchvision for the same adjustment.
            factor = float(matrix[0, 0]) if name != "saturation" else float(matrix[1, 1] - matrix[0, 1])
            assert abs(factor - 1) <= 0.3 + 1e-6
            assert torch.allclose(_apply(matrix, bias, image), adjust(image, factor), atol=1e-5), (name, seed)


def test_colour_jitter_composes_in_random_order_with_contrast_on_the_image_so_far():
    image = 0.35 + 0.3 * torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    orders = set()
    for seed in range(12):
        torch.manual_seed(seed)
        matrix, bias = colour_jitter(image.mean(dim=(1, 2)), brightness=0.1, contrast=0.1, saturation=0.1, hue=0)
        torch.manual_seed(seed)
        order = torch.randperm(4).tolist()
        factors = {step: 0.9 + 0.2 * float(torch.rand(())) for step in order}
        orders.add(tuple(order))
        expected = image
        for step in order:  # brightness, contrast, saturation as torchvision does them one after another
            adjust = [tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation, lambda x, f: x][step]
            expected = adjust(expected, factors[step])
        assert torch.allclose(_apply(matrix, bias, image), expected, atol=1e-5), seed
    assert len(orders) > 3


def test_hue_rotation_turns_colours_and_keeps_grays():
    red, green, blue = torch.eye(3)
    assert torch.allclose(hue_rotation(1 / 3) @ red, green, atol=1e-6)
    assert torch.allclose(hue_rotation(1 / 3) @ green, blue, atol=1e-6)
    assert torch.allclose(hue_rotation(-1 / 3) @ red, blue, atol=1e-6)
    gray = torch.tensor([0.4, 0.4, 0.4])
    assert torch.allclose(hue_rotation(0.17) @ gray, gray, atol=1e-6)
    # The HSV hue moves by the turns applied, to within 2 % of a turn (7 degrees), as torchvision's HSV shift does.
    for colour in ([0.7, 0.35, 0.2], [0.2, 0.5, 0.6], [0.55, 0.3, 0.65], [0.4, 0.6, 0.3]):
        hue_before = colorsys.rgb_to_hsv(*colour)[0]
        for turns in (-0.25, -0.1, 0.03, 0.1, 0.25):
            rotated = (hue_rotation(turns) @ torch.tensor(colour)).clamp(0, 1).tolist()
            moved = (colorsys.rgb_to_hsv(*rotated)[0] - hue_before - turns + 0.5) % 1 - 0.5
            assert abs(moved) < 0.02, (colour, turns, moved)
