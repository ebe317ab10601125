"""Training augmentation in the UniMatch recipe, on uint8 tensors.

Geometric transforms take an image (3, H, W) and a stack of label maps (K, H, W) and move them together: the image
is resized bilinearly, the label maps with nearest neighbour, so every pixel keeps its label.
"""

import math

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_STRONG_COLOUR = v2.Compose([
    v2.RandomApply([v2.ColorJitter(0.5, 0.5, 0.5, 0.25)], p=0.8),
    v2.RandomGrayscale(p=0.2),
])


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high], from torch's generator (seeded per DataLoader worker)."""
    return int(torch.randint(low, high + 1, ()))


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def random_rescale(image: torch.Tensor, labels: torch.Tensor, scale_range: tuple[float, float]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize so that the long side becomes its length times a factor drawn from scale_range; keeps the aspect ratio."""
    height, width = image.shape[-2:]
    long_side = max(height, width)
    new_long = _randint(max(1, int(long_side * scale_range[0])), max(1, int(long_side * scale_range[1])))
    new_height = max(1, round(height * new_long / long_side))
    new_width = max(1, round(width * new_long / long_side))
    image = F.resize(image, [new_height, new_width], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    # NEAREST_EXACT samples pixel centres, as the bilinear image resize does, so labels stay on their pixels.
    labels = F.resize(labels, [new_height, new_width], interpolation=v2.InterpolationMode.NEAREST_EXACT)
    return image, labels


def pad_to(image: torch.Tensor, labels: torch.Tensor, size: int, label_fill: int | list[int] = 255
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad right and bottom up to size x size: the image with 0, the label maps with label_fill (one per map or
    one for all)."""
    height, width = image.shape[-2:]
    padding = [0, 0, max(0, size - width), max(0, size - height)]
    if padding[2] == 0 and padding[3] == 0:
        return image, labels
    return F.pad(image, padding, fill=0), F.pad(labels, padding, fill=label_fill)


def random_crop(image: torch.Tensor, labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A size x size window at a uniform position; the inputs must be at least that large."""
    height, width = image.shape[-2:]
    top, left = _randint(0, height - size), _randint(0, width - size)
    return F.crop(image, top, left, size, size), F.crop(labels, top, left, size, size)


def random_hflip(image: torch.Tensor, labels: torch.Tensor, p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    if float(torch.rand(())) < p:
        return F.horizontal_flip(image), F.horizontal_flip(labels)
    return image, labels


def geometric(image: torch.Tensor, labels: torch.Tensor, crop_size: int, scale_range: tuple[float, float],
              label_fill: int | list[int] = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale, pad, crop and flip an image with its label maps: the UniMatch training geometry."""
    image, labels = random_rescale(image, labels, scale_range)
    image, labels = pad_to(image, labels, crop_size, label_fill)
    image, labels = random_crop(image, labels, crop_size)
    return random_hflip(image, labels)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a uint8 (3, H, W) image, truncated at 3 sigma, as two 1-D passes with reflect padding
    (a fixed 13x13 kernel made the blur the slowest step of the pipeline)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).expand(3, 1, -1)
    pixels = image.unsqueeze(0).float()
    pixels = torch.nn.functional.pad(pixels, (radius, radius, 0, 0), mode="reflect")
    pixels = torch.nn.functional.conv2d(pixels, kernel.unsqueeze(2), groups=3)
    pixels = torch.nn.functional.pad(pixels, (0, 0, radius, radius), mode="reflect")
    pixels = torch.nn.functional.conv2d(pixels, kernel.unsqueeze(3), groups=3)
    return pixels[0].round_().clamp_(0, 255).to(torch.uint8)


def strong_photometric(image: torch.Tensor) -> torch.Tensor:
    """Colour jitter (p=0.8), grayscale (p=0.2) and Gaussian blur with sigma in [0.1, 2.0] (p=0.5), each drawn
    afresh per call."""
    image = _STRONG_COLOUR(image)
    if torch.rand(()) < 0.5:
        image = gaussian_blur(image, float(torch.empty(()).uniform_(0.1, 2.0)))
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


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 scaled to [0, 1] and standardised with the ImageNet statistics."""
    return F.normalize(F.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
