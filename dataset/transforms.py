"""Training augmentation in the UniMatch recipe, two ways (config key `augmentation`).

fast: on tensors, geometry on uint8, colour on float32 in [0, 1]. Geometric transforms take an image (3, H, W) and
a stack of label maps (K, H, W) and move them together: the image is resized bilinearly, the label maps with nearest
neighbour, so every pixel keeps its label.

release (the release_* functions): the ScaleMatch release's pipeline on PIL images, with its PIL and torchvision
calls and its random draws from Python's, NumPy's and torch's generators in its order. Label maps are PIL images
moved with the image (nearest neighbour) in the same way.
"""

import math
import random

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms
from torchvision.transforms import v2
from torchvision.transforms.functional import to_tensor
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's grayscale weights (ITU-R BT.601); _TO_GRAY puts a pixel's luma in all 3 channels.
LUMA = torch.tensor([0.2989, 0.587, 0.114])
_TO_GRAY = LUMA.expand(3, 3).clone()


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high], from torch's generator (seeded per DataLoader worker)."""
    return int(torch.randint(low, high + 1, ()))


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _rescaled_window(start: int, length: int, size: int, new_size: int) -> tuple[int, int, int, int]:
    """Which source pixels [low, high) to resize to how many pixels, and where the wanted ``length`` pixels from
    ``start`` of the whole ``size -> new_size`` resize then begin; the margin covers the antialiasing filter."""
    factor = size / new_size
    margin = math.ceil(factor) + 1
    low = max(0, math.floor(start * factor) - margin)
    high = min(size, math.ceil((start + length) * factor) + margin)
    resized = max(length, round((high - low) / factor))
    offset = min(max(0, round(start - low / factor)), resized - length)
    return low, high, resized, offset


def random_rescaled_crop(image: torch.Tensor, labels: torch.Tensor, crop_size: int, scale_range: tuple[float, float],
                         label_fill: int | list[int] = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize so that the long side becomes its length times a factor drawn from scale_range (aspect ratio kept),
    pad right and bottom to crop_size (image 0, labels label_fill) and take a crop_size window at a uniform position.

    Only the source pixels under the window are resized (up to 16x fewer pixels at Cityscapes' 801 crop and
    factor 2); the result equals resizing the whole image, then cropping, up to half a pixel of position.
    """
    height, width = image.shape[-2:]
    long_side = max(height, width)
    new_long = _randint(max(1, int(long_side * scale_range[0])), max(1, int(long_side * scale_range[1])))
    new_height = max(1, round(height * new_long / long_side))
    new_width = max(1, round(width * new_long / long_side))
    top = _randint(0, max(new_height, crop_size) - crop_size)
    left = _randint(0, max(new_width, crop_size) - crop_size)
    visible_height, visible_width = min(crop_size, new_height - top), min(crop_size, new_width - left)
    rows = _rescaled_window(top, visible_height, height, new_height)
    cols = _rescaled_window(left, visible_width, width, new_width)
    image = image[:, rows[0]:rows[1], cols[0]:cols[1]]
    labels = labels[:, rows[0]:rows[1], cols[0]:cols[1]]
    size = [rows[2], cols[2]]
    image = F.resize(image, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    # NEAREST_EXACT samples pixel centres, as the bilinear image resize does, so labels stay on their pixels.
    labels = F.resize(labels, size, interpolation=v2.InterpolationMode.NEAREST_EXACT)
    window = (rows[3], cols[3], visible_height, visible_width)
    return pad_to(F.crop(image, *window), F.crop(labels, *window), crop_size, label_fill)


def pad_to(image: torch.Tensor, labels: torch.Tensor, size: int, label_fill: int | list[int] = 255
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad right and bottom up to size x size: the image with 0, the label maps with label_fill (one per map or
    one for all)."""
    height, width = image.shape[-2:]
    padding = [0, 0, max(0, size - width), max(0, size - height)]
    if padding[2] == 0 and padding[3] == 0:
        return image, labels
    return F.pad(image, padding, fill=0), F.pad(labels, padding, fill=label_fill)


def random_hflip(image: torch.Tensor, labels: torch.Tensor, p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    if float(torch.rand(())) < p:
        return F.horizontal_flip(image), F.horizontal_flip(labels)
    return image, labels


def geometric(image: torch.Tensor, labels: torch.Tensor, crop_size: int, scale_range: tuple[float, float],
              label_fill: int | list[int] = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale, pad, crop and flip an image with its label maps: the UniMatch training geometry."""
    return random_hflip(*random_rescaled_crop(image, labels, crop_size, scale_range, label_fill))


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a float (3, H, W) image, truncated at 3 sigma, with reflect padding: rows, then columns,
    each a weighted sum of shifted copies (on the CPU 10x faster than a depth-wise conv2d at 801 x 801)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    weights = (kernel / kernel.sum()).tolist()
    height, width = image.shape[-2:]
    padded = torch.nn.functional.pad(image.unsqueeze(0), (radius,) * 4, mode="reflect")[0]
    return _shifted_sum(_shifted_sum(padded, weights, 2, width), weights, 1, height)


def _shifted_sum(pixels: torch.Tensor, weights: list[float], dim: int, length: int) -> torch.Tensor:
    """sum_i weights[i] * pixels[..., i:i + length, ...] along dim."""
    total = pixels.narrow(dim, 0, length) * weights[0]
    for offset, weight in enumerate(weights[1:], start=1):
        total.add_(pixels.narrow(dim, offset, length), alpha=weight)
    return total


def hue_rotation(hue: float) -> torch.Tensor:
    """3x3 rotation of RGB about the gray axis by ``hue`` turns: positive hue turns red towards green and green
    towards blue (1/3 maps red to green exactly, as an HSV hue shift does); grays are unchanged."""
    angle = 2 * math.pi * hue
    axis = torch.full((3,), 1 / math.sqrt(3))
    cross = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return math.cos(angle) * torch.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * torch.outer(axis, axis)


def colour_jitter(mean_rgb: torch.Tensor, brightness: float = 0.5, contrast: float = 0.5, saturation: float = 0.5,
                  hue: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ColorJitter as one affine colour map ``x -> matrix @ x + bias``: the four adjustments in random
    order with factors drawn as there. Contrast blends towards the mean gray of the image as it is at that point,
    computed from the image's mean colour ``mean_rgb`` (exact, since every step is affine).

    Two differences, for speed: hue is a rotation about the gray axis (no HSV round trip) and values are clamped
    once at the end instead of after every step."""
    matrix, bias = torch.eye(3), torch.zeros(3)
    for adjustment in torch.randperm(4).tolist():
        shift = torch.zeros(3)
        if adjustment == 0:
            step = _uniform(1 - brightness, 1 + brightness) * torch.eye(3)
        elif adjustment == 1:
            factor = _uniform(1 - contrast, 1 + contrast)
            mean_gray = LUMA @ (matrix @ mean_rgb + bias)
            step, shift = factor * torch.eye(3), (1 - factor) * mean_gray.expand(3)
        elif adjustment == 2:
            factor = _uniform(1 - saturation, 1 + saturation)
            step = factor * torch.eye(3) + (1 - factor) * _TO_GRAY
        else:
            step = hue_rotation(_uniform(-hue, hue))
        matrix, bias = step @ matrix, step @ bias + shift
    return matrix, bias


def strong_photometric(image: torch.Tensor) -> torch.Tensor:
    """Colour jitter (p=0.8), grayscale (p=0.2) and Gaussian blur with sigma in [0.1, 2.0] (p=0.5), each drawn
    afresh per call, on a float (3, H, W) image in [0, 1]. Jitter and grayscale are one affine map over the pixels."""
    matrix, bias = torch.eye(3), torch.zeros(3)
    jitter, grayscale = float(torch.rand(())) < 0.8, float(torch.rand(())) < 0.2
    if jitter:
        matrix, bias = colour_jitter(image.mean(dim=(1, 2)))
    if grayscale:
        matrix, bias = _TO_GRAY @ matrix, _TO_GRAY @ bias
    if jitter or grayscale:
        image = torch.addmm(bias[:, None], matrix, image.reshape(3, -1)).reshape(image.shape).clamp_(0, 1)
    if float(torch.rand(())) < 0.5:
        image = gaussian_blur(image, _uniform(0.1, 2.0))
    return image


def cutmix_box(size: int, p: float = 0.5, area_range: tuple[float, float] = (0.02, 0.4),
               aspect_range: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """int64 (size, size) map, 1 inside a random box with probability p (all 0 otherwise).

    The box covers a fraction of the square drawn from area_range, has height/width drawn from aspect_range and
    lies fully inside the square.
    """
    box = torch.zeros(size, size, dtype=torch.int64)
    if float(torch.rand(())) >= p:
        return box
    area = _uniform(*area_range) * size * size
    while True:
        aspect = _uniform(*aspect_range)
        box_height = max(1, round(math.sqrt(area * aspect)))
        box_width = max(1, round(math.sqrt(area / aspect)))
        if box_height <= size and box_width <= size:
            break
    top, left = _randint(0, size - box_height), _randint(0, size - box_width)
    box[top:top + box_height, left:left + box_width] = 1
    return box


def to_unit_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 in [0, 1]; a float32 image is returned as it is."""
    return F.to_dtype(image, torch.float32, scale=True)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W), or float32 already in [0, 1] -> contiguous float32 standardised with the ImageNet
    statistics."""
    return F.normalize(to_unit_float(image), IMAGENET_MEAN, IMAGENET_STD).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# release: the ScaleMatch release's pipeline on PIL images

# Stateless modules: each call draws its order and factors (ColorJitter) or its coin (RandomGrayscale) from torch.
RELEASE_COLOUR_JITTER = transforms.ColorJitter(0.5, 0.5, 0.5, 0.25)
RELEASE_GRAYSCALE = transforms.RandomGrayscale(p=0.2)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """uint8 (3, H, W) tensor -> RGB image, uint8 (H, W) tensor -> L image."""
    array = pixels.permute(1, 2, 0).numpy() if pixels.ndim == 3 else pixels.numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def release_rescale(image: Image.Image, labels: list[Image.Image], scale_range: tuple[float, float]
                    ) -> tuple[Image.Image, list[Image.Image]]:
    """Resize the whole image (bilinear) and its label maps (nearest) so that the long side becomes an integer drawn
    uniformly from [int(long * lo), int(long * hi)]; the short side keeps the aspect ratio, rounded half up."""
    width, height = image.size
    long_side = max(width, height)
    # max(1, ...) only matters for images a few pixels wide, which the release would fail to resize.
    new_long = max(1, random.randint(int(long_side * scale_range[0]), int(long_side * scale_range[1])))
    new_short = max(1, int(min(width, height) * new_long / long_side + 0.5))
    size = (new_short, new_long) if height > width else (new_long, new_short)
    return (image.resize(size, Image.Resampling.BILINEAR),
            [label.resize(size, Image.Resampling.NEAREST) for label in labels])


def release_crop(image: Image.Image, labels: list[Image.Image], crop_size: int, label_fills: list[int]
                 ) -> tuple[Image.Image, list[Image.Image]]:
    """Pad right and bottom up to crop_size (the image with 0, each label map with its fill), then crop a crop_size
    square whose left, then top, edge is drawn uniformly."""
    width, height = image.size
    border = (0, 0, max(0, crop_size - width), max(0, crop_size - height))
    if border[2] or border[3]:
        image = ImageOps.expand(image, border=border, fill=0)
        labels = [ImageOps.expand(label, border=border, fill=fill) for label, fill in zip(labels, label_fills)]
    left = random.randint(0, image.size[0] - crop_size)
    top = random.randint(0, image.size[1] - crop_size)
    box = (left, top, left + crop_size, top + crop_size)
    return image.crop(box), [label.crop(box) for label in labels]


def release_hflip(image: Image.Image, labels: list[Image.Image], p: float = 0.5
                  ) -> tuple[Image.Image, list[Image.Image]]:
    if random.random() < p:
        flip = Image.Transpose.FLIP_LEFT_RIGHT
        return image.transpose(flip), [label.transpose(flip) for label in labels]
    return image, labels


def release_geometric(image: Image.Image, labels: list[Image.Image], crop_size: int, scale_range: tuple[float, float],
                      label_fills: list[int]) -> tuple[Image.Image, list[Image.Image]]:
    """Rescale the whole image, pad, crop and flip it with its label maps: the release's training geometry."""
    image, labels = release_rescale(image, labels, scale_range)
    return release_hflip(*release_crop(image, labels, crop_size, label_fills))


def release_strong_photometric(image: Image.Image) -> Image.Image:
    """ColorJitter(0.5, 0.5, 0.5, 0.25) with p=0.8, RandomGrayscale(p=0.2), then PIL's Gaussian blur with radius
    sigma drawn from [0.1, 2.0] with p=0.5, on an RGB image, drawn afresh per call."""
    if random.random() < 0.8:
        image = RELEASE_COLOUR_JITTER(image)
    image = RELEASE_GRAYSCALE(image)
    if random.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0)))
    return image


def release_cutmix_box(size: int, p: float = 0.5, area_range: tuple[float, float] = (0.02, 0.4),
                       aspect_range: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """int64 (size, size) map, 1 inside a random box with probability p (all 0 otherwise), by the release's rule.

    The area is a fraction of the square drawn from area_range, height/width is drawn from aspect_range and the sides
    are floored to whole pixels; aspect and top-left corner (uniform over the square) are redrawn until the box fits.
    """
    box = torch.zeros(size, size, dtype=torch.int64)
    if random.random() > p:
        return box
    area = np.random.uniform(*area_range) * size * size
    while True:
        aspect = np.random.uniform(*aspect_range)
        box_width, box_height = int(np.sqrt(area / aspect)), int(np.sqrt(area * aspect))
        left, top = np.random.randint(0, size), np.random.randint(0, size)
        if left + box_width <= size and top + box_height <= size:
            break
    box[top:top + box_height, left:left + box_width] = 1
    return box


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) image back to (H, W, 3) uint8 RGB, for pictures."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = ((image.detach().float().cpu() * std + mean) * 255).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(1, 2, 0).numpy()


def normalize_pil(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 (3, H, W) standardised with the ImageNet statistics; through ToTensor's division by 255,
    bit-identical to the release."""
    return normalize(to_tensor(image))


def label_tensor(labels: Image.Image) -> torch.Tensor:
    """L image -> int64 (H, W) tensor."""
    return torch.from_numpy(np.asarray(labels, dtype=np.int64))
