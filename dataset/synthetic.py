"""The built-in multi-scale dataset: textured shapes from a few pixels to most of the image, in the VOC layout.

Each foreground class is a (shape, texture) pair. Textures are drawn in the object's own coordinates, so their period
grows with the object: a small object is finely patterned (or, below a few pixels, a blur of its colours) and a large
one coarsely, and a model has to recognise a class across scales. Class colours overlap (hues spread around a class
centre) and background distractor blobs use the same colours, so colour alone does not tell the classes apart.
Every image holds objects of log-uniformly stratified sizes over a cluttered, noisy background.

Generation is deterministic: image i of a split draws from its own generator seeded by (seed, split, i).
Run `python -m dataset.synthetic --root DIR [--seed 0]` to generate explicitly; build_datasets does it on first use.
"""

import argparse
import colorsys
import fcntl
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dataset.classes import CLASS_NAMES, palette
from dataset.errors import DatasetError

GENERATOR_VERSION = 1
DEFAULT_ROOT = Path("~/.cache/scalematch/data/synthetic").expanduser()
MARKER_NAME = "scalematch_synthetic.json"
HEIGHT, WIDTH = 128, 160
NUM_TRAIN, NUM_VAL = 600, 80
MIN_SIZE = 4.0  # object diameter in pixels
MAX_SIZE = 1.5 * min(HEIGHT, WIDTH)  # the largest objects cover most of the image
NUM_CLASSES = len(CLASS_NAMES["synthetic"])
_SPLIT_CODES = {"train": 0, "val": 1}


def sample_ids(split: str, count: int) -> list[str]:
    """The file stems of a split, in order: train_0000, train_0001, ..."""
    return [f"{split}_{index:04d}" for index in range(count)]


def _params(seed: int, num_train: int, num_val: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "num_train": num_train, "num_val": num_val,
            "height": HEIGHT, "width": WIDTH}


# Shapes in object coordinates (u, v), the object filling roughly the unit disc.
def _ellipse(u, v):
    return u * u + v * v <= 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8


def _triangle(u, v):
    return (v >= -0.5) & (math.sqrt(3.0) * np.abs(u) + v <= 1.0)


def _ring(u, v):
    radius2 = u * u + v * v
    return (radius2 >= 0.3) & (radius2 <= 1.0)


def _cross(u, v):
    return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))


# Textures in [0, 1]; k is the number of periods per object radius, so the period scales with the object.
def _stripes(u, v, k, phase):
    return 0.5 + 0.5 * np.sin(2 * math.pi * (k * u + phase))


def _checker(u, v, k, phase):
    return (np.sin(math.pi * (k * u + phase)) * np.sin(math.pi * (k * v + phase)) > 0).astype(np.float32)


def _dots(u, v, k, phase):
    du, dv = np.mod(k * u + phase, 1.0) - 0.5, np.mod(k * v + phase, 1.0) - 0.5
    return (du * du + dv * dv < 0.08).astype(np.float32)


def _waves(u, v, k, phase):
    return 0.5 + 0.5 * np.sin(2 * math.pi * (k * v + 0.25 * np.sin(2 * math.pi * (k * u + phase))))


def _grid(u, v, k, phase):
    du, dv = np.abs(np.mod(k * u + phase, 1.0) - 0.5), np.abs(np.mod(k * v + phase, 1.0) - 0.5)
    return (np.maximum(du, dv) > 0.36).astype(np.float32)


# Index = class id; the names in dataset/classes.py spell out these pairs.
_CLASSES = [None, (_ellipse, _stripes), (_square, _checker), (_triangle, _dots), (_ring, _waves), (_cross, _grid)]


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255


def _colour_pair(rng: np.random.Generator, hue: float) -> tuple[np.ndarray, np.ndarray]:
    """A bright and a dark colour of about one hue: the two inks of a texture."""
    saturation, value = rng.uniform(0.35, 0.95), rng.uniform(0.55, 1.0)
    bright = _hsv(hue, saturation, value)
    dark = _hsv(hue + rng.normal(0, 0.03), saturation, value * rng.uniform(0.15, 0.55))
    return bright, dark


def _value_noise(grid: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a (gh, gw, ...) grid at fractional grid coordinates y, x (clamped to the grid)."""
    gh, gw = grid.shape[:2]
    y, x = np.clip(y, 0, gh - 1.001), np.clip(x, 0, gw - 1.001)
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = y - y0, x - x0
    if grid.ndim == 3:
        fy, fx = fy[..., None], fx[..., None]
    top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
    bottom = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _background(rng: np.random.Generator) -> np.ndarray:
    """A two-colour gradient with low-frequency colour noise, float (H, W, 3)."""
    first = _hsv(rng.uniform(), rng.uniform(0, 0.5), rng.uniform(0.25, 0.85))
    second = _hsv(rng.uniform(), rng.uniform(0, 0.5), rng.uniform(0.25, 0.85))
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = (x * math.cos(angle) + y * math.sin(angle)) / math.hypot(HEIGHT, WIDTH) + 0.5
    canvas = first * (1 - t[..., None]) + second * t[..., None]
    noise = rng.uniform(-30, 30, size=(5, 6, 3)).astype(np.float32)
    return canvas + _value_noise(noise, y * 4 / HEIGHT, x * 5 / WIDTH)


def _blob(u, v, lobes):
    """An irregular star-like blob: the radius wobbles with the angle."""
    theta = np.arctan2(v, u)
    radius = 0.85 + sum(amplitude * np.sin(count * theta + phase) for count, amplitude, phase in lobes)
    return u * u + v * v <= radius * radius


def _draw_item(rng: np.random.Generator, size: float, label: int) -> dict:
    """Random placement, pose and appearance of an object of class label (0 = background distractor)."""
    radius = size / 2
    # Keep most of the object in view; the largest ones end up near the centre.
    margin_x, margin_y = min(0.6 * radius, WIDTH / 2), min(0.6 * radius, HEIGHT / 2)
    item = {
        "label": label, "radius": radius,
        "cx": rng.uniform(margin_x, WIDTH - margin_x), "cy": rng.uniform(margin_y, HEIGHT - margin_y),
        "angle": rng.uniform(0, 2 * math.pi), "aspect": math.exp(rng.uniform(-0.25, 0.25)),
    }
    if label:
        item["hue"] = (label - 1) / (NUM_CLASSES - 1) + rng.normal(0, 0.09)
        item["k"], item["phase"] = rng.uniform(1.5, 2.5), rng.uniform()
    else:
        item["hue"] = rng.uniform()
        item["lobes"] = [(count, rng.uniform(0, 0.2), rng.uniform(0, 2 * math.pi)) for count in (2, 3, 5)]
        # Some distractors wear a class texture, so texture without the shape is not enough.
        if rng.uniform() < 0.25:
            item["texture"] = _CLASSES[int(rng.integers(1, NUM_CLASSES))][1]
            item["k"], item["phase"] = rng.uniform(1.5, 2.5), rng.uniform()
        else:
            item["noise"] = rng.uniform(size=(10, 10)).astype(np.float32)
    item["colours"] = _colour_pair(rng, item["hue"])
    return item


def _paint(canvas: np.ndarray, mask: np.ndarray, item: dict) -> None:
    """Render an item with anti-aliased edges; pixels it covers at least half take its label."""
    radius, aspect = item["radius"], item["aspect"]
    reach = radius * 1.3
    x0, x1 = max(0, math.floor(item["cx"] - reach)), min(WIDTH, math.ceil(item["cx"] + reach))
    y0, y1 = max(0, math.floor(item["cy"] - reach)), min(HEIGHT, math.ceil(item["cy"] + reach))
    if x0 >= x1 or y0 >= y1:
        return
    # Small objects are supersampled so that their fine textures average out like a camera would.
    factor = 4 if radius < 4 else 2 if radius < 12 else 1
    ys = (np.arange(y0 * factor, y1 * factor, dtype=np.float32) + 0.5) / factor - item["cy"]
    xs = (np.arange(x0 * factor, x1 * factor, dtype=np.float32) + 0.5) / factor - item["cx"]
    dy, dx = np.meshgrid(ys, xs, indexing="ij")
    cos, sin = math.cos(item["angle"]), math.sin(item["angle"])
    u = (cos * dx + sin * dy) / (radius * aspect)
    v = (cos * dy - sin * dx) * aspect / radius
    if item["label"]:
        shape, texture = _CLASSES[item["label"]]
        inside = shape(u, v)
        pattern = texture(u, v, item["k"], item["phase"])
    else:
        inside = _blob(u, v, item["lobes"])
        if "texture" in item:
            pattern = item["texture"](u, v, item["k"], item["phase"])
        else:
            pattern = _value_noise(item["noise"], (v + 1.3) * 3.5, (u + 1.3) * 3.5)
    bright, dark = item["colours"]
    colour = bright * pattern[..., None] + dark * (1 - pattern[..., None])

    height, width = y1 - y0, x1 - x0
    inside = inside.astype(np.float32)
    coverage = inside.reshape(height, factor, width, factor).mean(axis=(1, 3))
    summed = (colour * inside[..., None]).reshape(height, factor, width, factor, 3).sum(axis=(1, 3))
    mean_colour = summed / np.maximum(coverage * factor * factor, 1e-6)[..., None]
    region = canvas[y0:y1, x0:x1]
    region += (mean_colour - region) * coverage[..., None]
    mask[y0:y1, x0:x1][coverage >= 0.5] = item["label"]


def render(seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample: uint8 (H, W, 3) image and uint8 (H, W) class indices."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    num_objects, num_distractors = int(rng.integers(2, 6)), int(rng.integers(2, 5))
    # One size per stratum of the log-size range, so every image mixes small and large objects.
    log_lo, log_hi = math.log(MIN_SIZE), math.log(MAX_SIZE)
    strata = (np.arange(num_objects) + rng.uniform(size=num_objects)) / num_objects
    sizes = np.exp(log_lo + (log_hi - log_lo) * strata)
    items = [_draw_item(rng, size, int(rng.integers(1, NUM_CLASSES))) for size in sizes]
    distractor_sizes = np.exp(rng.uniform(math.log(MIN_SIZE), math.log(0.6 * MAX_SIZE), size=num_distractors))
    items += [_draw_item(rng, size, 0) for size in distractor_sizes]

    canvas = _background(rng)
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    # Large first, so smaller items lie on top and stay visible.
    for item in sorted(items, key=lambda item: -item["radius"]):
        _paint(canvas, mask, item)
    canvas += rng.normal(0, 6, size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mask


def generate(root: str | Path, seed: int = 0, num_train: int = NUM_TRAIN, num_val: int = NUM_VAL) -> Path:
    """Write the dataset under root (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/) and, last, its marker."""
    root = Path(root).expanduser()
    images_dir, masks_dir, sets_dir = root / "JPEGImages", root / "SegmentationClass", root / "ImageSets/Segmentation"
    for folder in (images_dir, masks_dir, sets_dir):
        folder.mkdir(parents=True, exist_ok=True)
    voc_palette = palette("synthetic")
    for split, count in (("train", num_train), ("val", num_val)):
        ids = sample_ids(split, count)
        for index, sample_id in enumerate(ids):
            image, mask = render(seed, split, index)
            Image.fromarray(image).save(images_dir / f"{sample_id}.jpg", quality=90)
            mask_image = Image.fromarray(mask)
            mask_image.putpalette(voc_palette)  # turns the grayscale image into a palette one, indices unchanged
            mask_image.save(masks_dir / f"{sample_id}.png")
        (sets_dir / f"{split}.txt").write_text("".join(f"{sample_id}\n" for sample_id in ids))
    (root / MARKER_NAME).write_text(json.dumps(_params(seed, num_train, num_val), indent=2) + "\n")
    return root


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def ensure_generated(root: str | Path = DEFAULT_ROOT, seed: int = 0, num_train: int = NUM_TRAIN,
                     num_val: int = NUM_VAL) -> bool:
    """Generate the dataset at root unless its marker shows these exact parameters; True if it generated.

    A different generator version or parameters regenerate it. A non-empty root without a marker is never touched,
    so pointing data_root at real data by mistake cannot delete it.
    """
    root = Path(root).expanduser()
    wanted = _params(seed, num_train, num_val)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Processes of one distributed run all get here; the lock lets the first generate and the others reuse it.
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = _read_marker(root)
        if marker == wanted:
            return False
        if marker is None and root.exists() and any(root.iterdir()):
            raise DatasetError(f"refusing to write the synthetic dataset into non-empty {root}: "
                               f"it has no {MARKER_NAME}")
        # Build beside root and swap it in, so an interrupted run leaves no half-written dataset behind.
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            generate(staging, seed, num_train, num_val)
            if root.exists():
                shutil.rmtree(root)
            staging.rename(root)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the built-in synthetic multi-scale dataset.")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help=f"output folder (default {DEFAULT_ROOT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=NUM_TRAIN)
    parser.add_argument("--num-val", type=int, default=NUM_VAL)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        generated = ensure_generated(args.root, args.seed, args.num_train, args.num_val)
    except DatasetError as error:
        raise SystemExit(f"error: {error}")
    if generated:
        print(f"generated {args.num_train} train + {args.num_val} val images in {args.root} "
              f"({time.perf_counter() - start:.1f} s)")
    else:
        print(f"{args.root} is already generated with these parameters")


if __name__ == "__main__":
    main()
