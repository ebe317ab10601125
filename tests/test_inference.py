import torch
import torch.nn.functional as F

import pytest

from util.inference import (center_crop, predict_probs, predict_sliding_window, rescaled_predictor, window_spans,
                            window_starts)
from util.resize import rescale, resize_to, scaled_size


def pointwise_predictor(nclass: int = 5):
    """A 1x1-conv 'network': its prediction at a pixel depends on that pixel only, so any tiling is exact."""
    torch.manual_seed(0)
    weight = torch.randn(nclass, 3, 1, 1)
    calls = []

    def predict(images):
        calls.append(images.shape)
        return F.conv2d(images, weight)
    return predict, calls


def test_window_starts_cover_every_position_and_end_flush():
    for length, window, stride in [(100, 30, 20), (33, 33, 22), (10, 32, 21), (801, 801, 534), (1025, 513, 342)]:
        starts = window_starts(length, window, stride)
        covered = torch.zeros(length, dtype=torch.bool)
        for start in starts:
            covered[start:start + window] = True
        assert covered.all()
        assert starts[0] == 0
        assert min(length, starts[-1] + window) == length
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


def test_release_windows_start_every_two_thirds_of_the_crop_and_are_cut_at_the_border():
    # Cityscapes at crop 801: stride int(801 * 2 / 3) = 534.
    rows, columns = window_spans(1024, 801, 534), window_spans(2048, 801, 534)
    assert rows == [(0, 801), (534, 1024)]
    assert columns == [(0, 801), (534, 1335), (1068, 1869), (1602, 2048)]
    cut = [(r, c) for r in rows for c in columns if r[1] - r[0] < 801 or c[1] - c[0] < 801]
    assert len(rows) * len(columns) == 8 and len(cut) == 5
    # A Pascal image, 375 x 500 at crop 321 (stride 214): a 72-pixel sliver at the right.
    assert window_spans(375, 321, 214) == [(0, 321), (214, 375)]
    assert window_spans(500, 321, 214) == [(0, 321), (214, 500), (428, 500)]
    # Shorter than the crop: the whole side, and a sliver where the stride still starts inside it.
    assert window_spans(10, 32, 21) == [(0, 10)]
    assert window_spans(30, 32, 21) == [(0, 30), (21, 30)]


def test_flush_windows_are_whole_and_the_last_ends_at_the_border():
    assert window_spans(2048, 801, 534, "flush") == [(0, 801), (534, 1335), (1068, 1869), (1247, 2048)]
    assert window_spans(1024, 801, 534, "flush") == [(0, 801), (223, 1024)]
    assert window_spans(30, 32, 21, "flush") == [(0, 30)]
    with pytest.raises(ValueError, match="placement must be one of"):
        window_spans(30, 32, 21, "centred")


@pytest.mark.parametrize("placement, sizes", [
    ("release", {(24, 24), (24, 22), (24, 6), (8, 24), (8, 22), (8, 6)}), ("flush", {(24, 24)})])
def test_sliding_window_runs_the_windows_its_placement_gives(placement, sizes):
    predict, calls = pointwise_predictor()
    images = torch.randn(1, 3, 40, 70)
    tiled = predict_sliding_window(predict, images, crop_size=24, window_batch=1, placement=placement)
    assert {tuple(shape[-2:]) for shape in calls} == sizes
    assert len(calls) == (3 * 5 if placement == "release" else 2 * 4)
    torch.testing.assert_close(tiled, predict(images).softmax(dim=1), rtol=1e-5, atol=1e-6)


def test_sliding_window_equals_whole_image_for_pointwise_model():
    predict, calls = pointwise_predictor()
    images = torch.randn(2, 3, 50, 77)
    whole = predict(images).softmax(dim=1)
    tiled = predict_sliding_window(predict, images, crop_size=24, window_batch=3)
    assert tiled.shape == (2, 5, 50, 77)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)
    # windows are batched: 3 windows x 2 images per call, except the last
    assert calls[1][0] == 6


def test_sliding_window_on_image_smaller_than_crop():
    predict, _ = pointwise_predictor(nclass=3)
    images = torch.randn(1, 3, 10, 12)
    torch.testing.assert_close(predict_sliding_window(predict, images, crop_size=64),
                               predict(images).softmax(dim=1))


def test_predict_probs_modes_sum_to_one():
    predict, _ = pointwise_predictor()
    images = torch.randn(1, 3, 40, 40)
    for mode in ("original", "center_crop", "sliding_window"):
        probs = predict_probs(predict, images, mode, crop_size=16)
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 40, 40))


def test_center_crop_takes_the_middle():
    images = torch.arange(100.).view(1, 1, 10, 10).expand(1, 3, 10, 10)
    masks = torch.arange(100).view(1, 10, 10)
    cropped, cropped_mask = center_crop(images, masks, crop_size=4)
    assert cropped.shape == (1, 3, 4, 4) and cropped_mask.shape == (1, 4, 4)
    assert cropped_mask[0, 0, 0].item() == 33
    assert torch.equal(cropped[0, 0].long(), cropped_mask[0])


def test_rescaled_predictor_returns_input_size():
    predict, calls = pointwise_predictor()
    images = torch.randn(1, 3, 30, 44)
    out = rescaled_predictor(predict, 0.5)(images)
    assert out.shape == (1, 5, 30, 44)
    assert tuple(calls[-1][-2:]) == (15, 22)


def test_rescaled_predictor_floors_the_rescaled_size():
    predict, calls = pointwise_predictor()
    images = torch.randn(1, 3, 17, 45)
    out = rescaled_predictor(predict, 0.75)(images)
    assert out.shape == (1, 5, 17, 45)
    assert tuple(calls[-1][-2:]) == (12, 33)  # 12.75 and 33.75 floored, as the release's F.interpolate(scale_factor)
    scaled = F.interpolate(images, size=(12, 33), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, F.interpolate(predict(scaled), size=(17, 45), mode="bilinear", align_corners=True))


def test_scaled_size_is_what_interpolate_with_a_scale_factor_gives():
    for size, scale in [((17, 33), 0.75), ((65, 65), 0.5), ((21, 10), 1.25), ((7, 9), 1.5), ((40, 48), 2.0)]:
        expected = F.interpolate(torch.zeros(1, 1, *size), scale_factor=scale).shape[-2:]
        assert scaled_size(size, scale) == list(expected), (size, scale)
    assert scaled_size((17, 33), 0.75) == [12, 24]
    assert scaled_size((3, 2), 0.25) == [1, 1]  # never empty


def test_rescale_and_resize_to_are_bilinear_with_aligned_corners():
    x = torch.randn(2, 3, 17, 33)
    torch.testing.assert_close(rescale(x, 0.75),
                               F.interpolate(x, size=(12, 24), mode="bilinear", align_corners=True))
    # Aligned corners: the corner values survive any resize.
    y = resize_to(x, (5, 40))
    torch.testing.assert_close(y[..., [0, 0, -1, -1], [0, -1, 0, -1]], x[..., [0, 0, -1, -1], [0, -1, 0, -1]])
