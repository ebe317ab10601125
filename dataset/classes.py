"""Class names and colour palettes of the supported datasets, and of a folder dataset from its config."""

from dataset.errors import DatasetError

CLASS_NAMES: dict[str, list[str]] = {
    "pascal": [
        "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
        "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
    ],
    "cityscapes": [
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
        "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
    ],
    # One (shape, texture) pair per foreground class; see dataset/synthetic.py.
    "synthetic": ["background", "disc_stripes", "square_checker", "triangle_dots", "ring_waves", "cross_grid"],
}

# Official Cityscapes colours of the 19 train ids, in train-id order.
_CITYSCAPES_COLOURS = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]


def _voc_palette() -> list[int]:
    """The Pascal VOC palette: the bits of each index are spread over R, G, B from the most significant bit down."""
    palette = []
    for index in range(256):
        r = g = b = 0
        bits = index
        for shift in range(7, -1, -1):
            r |= (bits & 1) << shift
            g |= ((bits >> 1) & 1) << shift
            b |= ((bits >> 2) & 1) << shift
            bits >>= 3
        palette += [r, g, b]
    return palette


def palette(dataset: str) -> list[int]:
    """Flat [r0, g0, b0, r1, ...] list of 768 ints for Image.putpalette; unused indices are black."""
    if dataset in ("pascal", "synthetic"):
        return _voc_palette()
    if dataset == "cityscapes":
        flat = [channel for colour in _CITYSCAPES_COLOURS for channel in colour]
        return flat + [0] * (768 - len(flat))
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(CLASS_NAMES)}")


def class_names(cfg: dict) -> list[str]:
    """The nclass class names of cfg: its class_names key, else the built-in names of its dataset."""
    names = cfg.get("class_names")
    if names is None:
        if cfg["dataset"] not in CLASS_NAMES:
            raise DatasetError(f"dataset {cfg['dataset']} needs class_names in the config, one name per class")
        names = CLASS_NAMES[cfg["dataset"]]
        if len(names) != cfg["nclass"]:
            raise DatasetError(f"nclass {cfg['nclass']} does not match the {len(names)} classes of {cfg['dataset']}")
    elif len(names) != cfg["nclass"]:
        raise DatasetError(f"class_names lists {len(names)} names but nclass is {cfg['nclass']}")
    return list(names)


def class_palette(cfg: dict) -> list[int]:
    """768 ints for Image.putpalette: cfg's palette key (r, g, b per class), else the built-in palette of its dataset
    (the VOC palette for a folder dataset)."""
    colours = cfg.get("palette")
    if colours is None:
        return palette(cfg["dataset"] if cfg["dataset"] in CLASS_NAMES else "pascal")
    if len(colours) != 3 * cfg["nclass"]:
        raise DatasetError(f"palette has {len(colours)} values but needs 3 (r, g, b) per class: "
                           f"{3 * cfg['nclass']} for nclass {cfg['nclass']}")
    return list(colours) + [0] * (768 - len(colours))
