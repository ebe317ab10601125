"""Pictures of segmentations: palette colouring, blended overlays, side-by-side panels and a legend of class colours.

Knows no dataset: palettes (flat [r0, g0, b0, r1, ...] lists, as for Image.putpalette) and class names are arguments.
"""
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]

# No class colour of the VOC or Cityscapes palettes is white, so ignored pixels never pass for a class.
IGNORE_COLOUR: Colour = (255, 255, 255)
LEGEND_BACKGROUND: Colour = (255, 255, 255)
LEGEND_TEXT: Colour = (0, 0, 0)
# The swatch outline keeps white and near-white swatches visible on the white strip.
SWATCH_OUTLINE: Colour = (128, 128, 128)


def colour_table(palette: Sequence[int], ignore_index: int | None = 255) -> np.ndarray:
    """(256, 3) uint8 lookup table: the palette padded with black, ``ignore_index`` in IGNORE_COLOUR."""
    if len(palette) % 3 or len(palette) > 768:
        raise ValueError(f"palette must be a flat list of at most 256 RGB triplets, got {len(palette)} values")
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:len(palette) // 3] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if ignore_index is not None:
        table[ignore_index] = IGNORE_COLOUR
    return table


def colourize(labels: np.ndarray, palette: Sequence[int], ignore_index: int | None = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 RGB: each index in its palette colour, ignore_index in IGNORE_COLOUR."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"class indices must lie in [0, 255], got [{labels.min()}, {labels.max()}]")
    return colour_table(palette, ignore_index)[labels.astype(np.uint8)]


def palette_image(labels: np.ndarray, palette: Sequence[int]) -> Image.Image:
    """(H, W) class indices as a mode 'P' image carrying ``palette``: the indices survive saving as PNG."""
    picture = Image.fromarray(np.asarray(labels, dtype=np.uint8))
    # putpalette turns the grayscale ('L') image into a palette ('P') one, indices unchanged.
    picture.putpalette(list(palette))
    return picture


def blend(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """``colours`` laid over ``image`` (both (H, W, 3) uint8) with opacity ``alpha``."""
    return Image.blend(Image.fromarray(image), Image.fromarray(colours), alpha)


def legend_entries(class_names: Sequence[str], palette: Sequence[int], label_maps: Sequence[np.ndarray],
                   show_all_up_to: int = 8, ignore_index: int | None = 255) -> list[tuple[str, Colour]]:
    """(name, colour) of every class when there are at most ``show_all_up_to`` of them, else of the classes
    present in ``label_maps``; an 'ignore' entry when ignore_index occurs in them."""
    present = set()
    for labels in label_maps:
        present.update(int(index) for index in np.unique(labels))
    table = colour_table(palette, ignore_index)
    if len(class_names) <= show_all_up_to:
        indices = list(range(len(class_names)))
    else:
        indices = sorted(index for index in present if index != ignore_index)
    entries = [(class_names[index] if index < len(class_names) else f"class {index}", tuple(map(int, table[index])))
               for index in indices]
    if ignore_index is not None and ignore_index in present:
        entries.append(("ignore", IGNORE_COLOUR))
    return entries


@dataclass(frozen=True)
class LegendItem:
    """One placed legend entry: a colour swatch (left, top, right, bottom; right/bottom exclusive) and its name."""
    name: str
    colour: Colour
    swatch: tuple[int, int, int, int]
    text_origin: tuple[int, int]


def legend_font(panel_height: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font, grown with the picture so that the legend stays legible on large images."""
    return ImageFont.load_default(max(10, panel_height // 32))


def legend_layout(entries: Sequence[tuple[str, Colour]], width: int,
                  font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> tuple[list[LegendItem], int]:
    """Entries flowed left to right in rows that fit ``width`` (an entry too wide for any row gets one alone and is
    clipped); returns the placed items and the height of the strip (0 without entries)."""
    if not entries:
        return [], 0
    line = font.getbbox("Agy_")[3]
    gap = max(2, line // 3)
    items, left, top = [], gap, gap
    for name, colour in entries:
        item_width = line + gap + math.ceil(font.getlength(name))
        if left > gap and left + item_width > width - gap:
            left, top = gap, top + line + gap
        items.append(LegendItem(name, colour, (left, top, left + line, top + line), (left + line + gap, top)))
        left += item_width + 2 * gap
    return items, top + line + gap


def draw_legend(entries: Sequence[tuple[str, Colour]], width: int,
                font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> Image.Image | None:
    """A ``width``-wide RGB strip of colour swatches with their names, or None without entries."""
    items, height = legend_layout(entries, width, font)
    if not items:
        return None
    strip = Image.new("RGB", (width, height), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for item in items:
        left, top, right, bottom = item.swatch
        draw.rectangle((left, top, right - 1, bottom - 1), fill=item.colour, outline=SWATCH_OUTLINE)
        draw.text(item.text_origin, item.name, fill=LEGEND_TEXT, font=font)
    return strip


def side_by_side(panels: Sequence[Image.Image], legend: Image.Image | None = None) -> Image.Image:
    """Panels left to right, top-aligned, with ``legend`` (if any) below them."""
    width = sum(panel.width for panel in panels)
    height = max(panel.height for panel in panels)
    legend_height = legend.height if legend is not None else 0
    canvas = Image.new("RGB", (width, height + legend_height), LEGEND_BACKGROUND)
    left = 0
    for panel in panels:
        canvas.paste(panel.convert("RGB"), (left, 0))
        left += panel.width
    if legend is not None:
        canvas.paste(legend, (0, height))
    return canvas


def overlay_figure(image: np.ndarray, prediction: np.ndarray, class_names: Sequence[str], palette: Sequence[int],
                   ground_truth: np.ndarray | None = None, alpha: float = 0.5, ignore_index: int = 255,
                   show_all_up_to: int = 8) -> Image.Image:
    """image | prediction over the image | ground truth over the image (when given), side by side, with a legend
    of the classes shown below (all of them when there are at most ``show_all_up_to``).

    image is (H, W, 3) uint8 RGB; prediction and ground_truth are (H, W) class indices.
    """
    if prediction.shape != image.shape[:2] or (ground_truth is not None and ground_truth.shape != image.shape[:2]):
        raise ValueError(f"image {image.shape[:2]}, prediction {prediction.shape} and ground truth "
                         f"{None if ground_truth is None else ground_truth.shape} must have the same size")
    label_maps = [prediction] + ([ground_truth] if ground_truth is not None else [])
    panels = [Image.fromarray(image)]
    panels += [blend(image, colourize(labels, palette, ignore_index), alpha) for labels in label_maps]
    entries = legend_entries(class_names, palette, label_maps, show_all_up_to, ignore_index)
    legend = draw_legend(entries, image.shape[1] * len(panels), legend_font(image.shape[0]))
    return side_by_side(panels, legend)
