"""A generated segmentation task for backbone pretraining, disjoint from the synthetic segmentation benchmark.

It stands in for ImageNet on the CPU: 25 classes, each a (shape, texture) pair from shapes and textures the benchmark
never uses (hexagon, star, crescent, half-disc, bar; rings, spiral, sunburst, speckle, ramp), drawn at many sizes by
the benchmark's renderer over its kind of background with its distractor blobs. A backbone learns what objects and
textures look like across scales, but never sees a benchmark class, image or label: the benchmark renders from its
own generator streams, and none of its shapes or textures is used here.

Generation is deterministic: sample i draws from a generator seeded by (seed, 7, i); the benchmark uses split codes
0 and 1, so no benchmark image is ever rendered here.
"""

import math

import numpy as np

from dataset import synthetic

MIN_SIZE, MAX_SIZE = synthetic.MIN_SIZE, synthetic.MAX_SIZE  # object diameters in pixels, as the benchmark
_TASK_CODE = 7  # generator stream of this task, apart from the benchmark's train (0) and val (1) streams


def _hexagon(u, v):
    return np.maximum(np.abs(v) * math.sqrt(3) / 2 + np.abs(u) / 2, np.abs(u)) <= 0.9


def _star(u, v):
    theta = np.arctan2(v, u)
    radius = 0.55 + 0.4 * np.abs(np.cos(2.5 * theta))
    return u * u + v * v <= radius * radius


def _crescent(u, v):
    return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.6)


def _half_disc(u, v):
    return (u * u + v * v <= 1.0) & (v >= 0.0)


def _bar(u, v):
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.3)


def _rings(u, v, k, phase):
    return 0.5 + 0.5 * np.sin(2 * math.pi * (k * np.sqrt(u * u + v * v) + phase))


def _spiral(u, v, k, phase):
    return 0.5 + 0.5 * np.sin(np.arctan2(v, u) * 2 + 2 * math.pi * (k * np.sqrt(u * u + v * v) + phase))


def _sunburst(u, v, k, phase):
    return (np.sin(np.arctan2(v, u) * round(3 * k) + 2 * math.pi * phase) > 0).astype(np.float32)


def _speckle(u, v, k, phase):
    cells_u, cells_v = np.floor(2 * k * u + 97.0 * phase), np.floor(2 * k * v)
    return (np.mod(np.sin(cells_u * 12.9898 + cells_v * 78.233) * 43758.5453, 1.0) > 0.5).astype(np.float32)


def _ramp(u, v, k, phase):
    return np.clip(0.5 + 0.5 * u, 0.0, 1.0)


SHAPES = {"hexagon": _hexagon, "star": _star, "crescent": _crescent, "half_disc": _half_disc, "bar": _bar}
TEXTURES = {"rings": _rings, "spiral": _spiral, "sunburst": _sunburst, "speckle": _speckle, "ramp": _ramp}


CLASSES = [None] + [(shape, texture) for shape in SHAPES for texture in TEXTURES]  # index = class id


def _object(rng: np.random.Generator, size: float) -> dict:
    """Placement and appearance of one object of a random pretraining class, in the benchmark renderer's terms."""
    label = int(rng.integers(1, len(CLASSES)))
    shape_name, texture_name = CLASSES[label]
    radius = size / 2
    margin_x, margin_y = min(0.6 * radius, synthetic.WIDTH / 2), min(0.6 * radius, synthetic.HEIGHT / 2)
    item = {
        "label": label, "radius": radius,
        "cx": rng.uniform(margin_x, synthetic.WIDTH - margin_x), "cy": rng.uniform(margin_y, synthetic.HEIGHT - margin_y),
        "angle": rng.uniform(0, 2 * math.pi), "aspect": math.exp(rng.uniform(-0.25, 0.25)),
        "shape": SHAPES[shape_name], "texture": TEXTURES[texture_name],
        "k": rng.uniform(1.5, 2.5), "phase": rng.uniform(),
    }
    item["colours"] = synthetic._colour_pair(rng, rng.uniform())
    return item


def render(seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample at the benchmark's image size: uint8 (H, W, 3) image and uint8 (H, W) class ids (CLASSES)."""
    rng = np.random.default_rng([seed, _TASK_CODE, index])
    num_objects, num_distractors = int(rng.integers(2, 6)), int(rng.integers(1, 4))
    log_lo, log_hi = math.log(MIN_SIZE), math.log(MAX_SIZE)
    strata = (np.arange(num_objects) + rng.uniform(size=num_objects)) / num_objects
    items = [_object(rng, size) for size in np.exp(log_lo + (log_hi - log_lo) * strata)]
    distractor_sizes = np.exp(rng.uniform(log_lo, math.log(0.4 * MAX_SIZE), size=num_distractors))
    items += [synthetic._draw_item(rng, size, 0) for size in distractor_sizes]
    canvas = synthetic._background(rng)
    mask = np.zeros((synthetic.HEIGHT, synthetic.WIDTH), dtype=np.uint8)
    for item in sorted(items, key=lambda item: -item["radius"]):
        synthetic._paint(canvas, mask, item)
    canvas += rng.normal(0, 6, size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mask


def generate(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """count samples: uint8 images (N, H, W, 3) and class ids (N, H, W)."""
    samples = [render(seed, index) for index in range(count)]
    return np.stack([sample[0] for sample in samples]), np.stack([sample[1] for sample in samples])
