"""Colouring, overlays and the legend of util/visualize.py."""
import numpy as np
import pytest
from PIL import Image, ImageFont

from util.visualize import (IGNORE_COLOUR, LEGEND_BACKGROUND, colourize, draw_legend, legend_entries, legend_layout,
                            overlay_figure, palette_image)

# Distinct, non-white colours for indices 0..5; everything after is black.
PALETTE = [10, 20, 30, 200, 0, 0, 0, 200, 0, 0, 0, 200, 200, 200, 0, 0, 200, 200]
NAMES = ["background", "cat", "dog", "bird", "car", "tree"]


def colour(index):
    return tuple(PALETTE[3 * index:3 * index + 3])


def test_colourize_maps_every_index_to_its_palette_colour():
    labels = np.array([[0, 1, 2], [3, 4, 5]])
    rgb = colourize(labels, PALETTE)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    for (row, col), index in np.ndenumerate(labels):
        assert tuple(rgb[row, col]) == colour(index)


def test_colourize_paints_ignore_in_the_fixed_colour_whatever_the_palette():
    labels = np.array([[255, 1], [7, 255]])
    for palette in (PALETTE, [index % 256 for index in range(768)]):
        rgb = colourize(labels, palette)
        assert tuple(rgb[0, 0]) == tuple(rgb[1, 1]) == IGNORE_COLOUR
    assert tuple(colourize(labels, PALETTE)[1, 0]) == (0, 0, 0)  # beyond the palette: black


def test_colourize_rejects_indices_outside_a_byte():
    with pytest.raises(ValueError, match="256"):
        colourize(np.array([[0, 256]]), PALETTE)


def test_palette_image_keeps_indices_and_palette(tmp_path):
    labels = np.array([[0, 1, 2], [5, 4, 3]], dtype=np.int64)
    palette_image(labels, PALETTE).save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as saved:
        assert saved.mode == "P"
        np.testing.assert_array_equal(np.array(saved), labels)
        assert saved.getpalette()[:len(PALETTE)] == PALETTE


def test_legend_lists_all_classes_when_few_else_those_present_plus_ignore():
    prediction = np.array([[0, 4], [4, 4]])
    ground_truth = np.array([[255, 2], [2, 2]])
    assert [name for name, _ in legend_entries(NAMES, PALETTE, [prediction])] == NAMES
    entries = legend_entries(NAMES, PALETTE, [prediction, ground_truth], show_all_up_to=3)
    assert entries == [("background", colour(0)), ("dog", colour(2)), ("car", colour(4)), ("ignore", IGNORE_COLOUR)]


def test_legend_draws_each_given_name_beside_its_swatch():
    font = ImageFont.load_default(10)
    entries = [(name, colour(index)) for index, name in enumerate(NAMES)]
    strip = draw_legend(entries, 120, font)
    items, height = legend_layout(entries, 120, font)
    assert strip.size == (120, height)
    assert [item.name for item in items] == NAMES
    assert len({item.swatch[1] for item in items}) > 1  # 120 px is too narrow for one row: the entries wrap
    pixels = np.array(strip)
    for item in items:
        left, top, right, bottom = item.swatch
        inside = pixels[top + 1:bottom - 1, left + 1:right - 1]
        assert (inside == item.colour).all()
        text_left, text_top = item.text_origin
        text_width = int(font.getlength(item.name))
        text = pixels[text_top:bottom, text_left:min(120, text_left + text_width)]
        assert (text != LEGEND_BACKGROUND).any(axis=-1).sum() > 5, item.name
    assert draw_legend([], 120, font) is None


def test_overlay_is_panels_side_by_side_over_the_legend():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    prediction = rng.integers(0, 6, (20, 30))
    ground_truth = prediction.copy()
    ground_truth[:5] = 255
    for truth, panels in ((None, 2), (ground_truth, 3)):
        figure = overlay_figure(image, prediction, NAMES, PALETTE, truth)
        maps = [prediction] + ([truth] if truth is not None else [])
        _, legend_height = legend_layout(legend_entries(NAMES, PALETTE, maps), 30 * panels, ImageFont.load_default(10))
        assert legend_height > 0
        assert figure.size == (30 * panels, 20 + legend_height)
        pixels = np.array(figure)
        np.testing.assert_array_equal(pixels[:20, :30], image)
        blended = (image.astype(float) + colourize(prediction, PALETTE)) / 2
        assert np.abs(pixels[:20, 30:60] - blended).max() <= 1
    # The third panel is the ground truth over the image, its ignore rows in the ignore colour.
    assert np.abs(pixels[:5, 60:90] - (image[:5].astype(float) + IGNORE_COLOUR) / 2).max() <= 1


def test_overlay_refuses_maps_of_another_size():
    with pytest.raises(ValueError, match="same size"):
        overlay_figure(np.zeros((4, 5, 3), np.uint8), np.zeros((4, 6), np.int64), NAMES, PALETTE)
