"""eval.py --predict-dir on a folder of images without masks, and --overlays in evaluation mode."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_cli
from conftest import run_script
from dataset.classes import palette
from model import build_model
from util.config import validate
from util.visualize import colourize

TINY_MODEL = {"backbone": "tv_resnet10", "head_channels": 32, "pretrained": None, "cif": True, "cif_channels": 8,
              "cif_gate_channels": 8, "crop_size": 32, "workers": 0, "amp": False}



@pytest.fixture
def run(monkeypatch, capsys):
    """run(*ARGS): ``python eval.py ARGS`` (its __main__ block, which turns the one-line errors into exit status 2)
    in this process, to spare an interpreter and torch start: (exit status, stdout, stderr). A real interpreter's
    eval.py is test_eval_cli.py's test_an_error_under_torchrun_is_printed_once."""
    def run_eval(*args) -> tuple[int, str, str]:
        status = run_script(monkeypatch, "eval.py", *args)
        captured = capsys.readouterr()
        return status, captured.out, captured.err
    return run_eval


def save_tiny_checkpoint(path, **config):
    cfg = validate(dict(TINY_MODEL, **config), source="test")
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict(), "config": cfg, "epoch": 0}, path)
    return str(path)


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory):
    """A CIF model of the synthetic dataset whose data_root does not exist: predicting must not need the data."""
    base = tmp_path_factory.mktemp("checkpoint")
    return save_tiny_checkpoint(base / "tiny.pth", dataset="synthetic", nclass=6, data_root=str(base / "absent"))


def write_images(folder, names, size=(40, 48)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)
    return folder


def rgb(path):
    with Image.open(path) as picture:
        return np.array(picture.convert("RGB")).astype(float)


def assert_prediction_panel_matches_png(overlay, image_path, png_path):
    """The first panel is the image and the second the saved prediction, coloured with its palette, blended half
    over the image (within 1 for the rounding of blending and, in evaluation, of normalising)."""
    with Image.open(png_path) as saved:
        labels, colours = np.array(saved), saved.getpalette()
    image = rgb(image_path)
    height, width = image.shape[:2]
    expected = (image + colourize(labels, colours)) / 2
    assert np.abs(overlay[:height, width:2 * width] - expected).max() <= 1
    assert np.abs(overlay[:height, :width] - image).max() <= 1


def test_predict_dir_writes_palette_pngs_and_two_panel_overlays(synthetic_checkpoint, tmp_path, run):
    images = write_images(tmp_path / "photos", ["a.jpg", "b.JPEG", "c.png"])
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    status, stdout, stderr = run("--checkpoint", synthetic_checkpoint, "--predict-dir", images, "--save-dir", out,
                                 "--cpu")
    assert status == 0, stderr
    assert "wrote 3 predictions" in stdout
    assert sorted(os.listdir(out)) == ["a.png", "a_overlay.png", "b.png", "b_overlay.png", "c.png", "c_overlay.png"]
    with Image.open(out / "a.png") as saved:
        assert saved.mode == "P" and saved.size == (48, 40)
        assert saved.getpalette()[:18] == palette("synthetic")[:18]
        assert np.array(saved).max() < 6
    overlay = rgb(out / "a_overlay.png")
    assert overlay.shape[1] == 2 * 48 and overlay.shape[0] > 40
    assert_prediction_panel_matches_png(rgb(out / "c_overlay.png"), images / "c.png", out / "c.png")


def test_predict_dir_multiscale_cif_sliding_window_with_masks(synthetic_checkpoint, tmp_path, run):
    images = write_images(tmp_path / "photos", ["x.png", "y.png"])
    masks = tmp_path / "masks"
    masks.mkdir()
    truth = np.zeros((40, 48), dtype=np.uint8)
    truth[10:30, 12:40] = 3
    truth[0, :] = 255
    Image.fromarray(truth).save(masks / "x.png")
    out = tmp_path / "out"
    status, stdout, stderr = run("--checkpoint", synthetic_checkpoint, "--predict-dir", images, "--save-dir", out,
                                 "--cpu", "--multiscale-cif", "--mode", "sliding_window", "--mask-dir", masks)
    assert status == 0, stderr
    assert "mode sliding_window" in stdout
    with_truth, without_truth = rgb(out / "x_overlay.png"), rgb(out / "y_overlay.png")
    assert with_truth.shape[1] == 3 * 48 and without_truth.shape[1] == 2 * 48
    expected_truth = (rgb(images / "x.png") + colourize(truth, palette("synthetic"))) / 2
    assert np.abs(with_truth[:40, 96:] - expected_truth).max() <= 1
    assert_prediction_panel_matches_png(with_truth, images / "x.png", out / "x.png")


def test_unreadable_image_is_a_one_line_error_and_keeps_earlier_outputs(synthetic_checkpoint, tmp_path, run):
    images = write_images(tmp_path / "photos", ["a.jpg", "c.jpg"])
    (images / "b.jpg").write_bytes(b"\xff\xd8 this is no jpeg")
    out = tmp_path / "out"
    status, stdout, stderr = run("--checkpoint", synthetic_checkpoint, "--predict-dir", images, "--save-dir", out,
                                 "--cpu")
    assert status == 2
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    assert errors[0].startswith("error: cannot read image") and "b.jpg" in errors[0]
    assert sorted(os.listdir(out)) == ["a.png", "a_overlay.png"]


@pytest.mark.parametrize("make_folder, message", [
    (lambda path: path / "missing", "no such folder"),
    (lambda path: path.mkdir() or path, "no .jpg/.jpeg/.png/.bmp images"),
])
def test_missing_or_empty_folder_is_refused(synthetic_checkpoint, tmp_path, make_folder, message):
    folder = make_folder(tmp_path / "photos")
    with pytest.raises(eval_cli.DatasetError, match=message) as error:
        eval_cli.main(["--checkpoint", synthetic_checkpoint, "--predict-dir", str(folder),
                       "--save-dir", str(tmp_path / "out"), "--cpu"])
    assert str(folder) in str(error.value)


def test_outputs_that_would_collide_are_refused(tmp_path):
    folder = write_images(tmp_path / "photos", ["a.jpg", "a.png"])
    with pytest.raises(eval_cli.DatasetError, match="a.png"):
        eval_cli.list_images(str(folder))


@pytest.mark.parametrize("extra, message", [
    (["--mode", "center_crop"], "center_crop"),
    ([], "--predict-dir needs --save-dir"),
])
def test_predict_argument_errors_are_one_line(tmp_path, extra, message):
    save = ["--save-dir", str(tmp_path / "out")] if extra else []
    with pytest.raises(SystemExit, match=message) as error:
        eval_cli.parse_args(["--predict-dir", str(tmp_path), *save, *extra])
    assert "\n" not in str(error.value.code)
    assert not (tmp_path / "out").exists()


def test_eval_overlays_show_image_prediction_and_ground_truth(tiny_voc, tmp_path, run):
    data_root, splits_dir = tiny_voc
    checkpoint = save_tiny_checkpoint(tmp_path / "voc.pth", dataset="pascal", nclass=21, data_root=data_root,
                                      splits_dir=splits_dir, split="tiny", cif=False)
    out = tmp_path / "out"
    status, stdout, stderr = run("--checkpoint", checkpoint, "--save-dir", out, "--overlays", "--cpu")
    assert status == 0, stderr
    assert "mIoU" in stdout
    names = [f"img_{i:03d}" for i in range(8, 12)]
    assert sorted(os.listdir(out)) == sorted([f"{n}.png" for n in names] + [f"{n}_overlay.png" for n in names])
    overlay = rgb(out / "img_008_overlay.png")
    assert overlay.shape[1] == 3 * 48 and overlay.shape[0] > 40
    image_path = os.path.join(data_root, "JPEGImages", "img_008.jpg")
    with Image.open(os.path.join(data_root, "SegmentationClass", "img_008.png")) as mask:
        truth = np.array(mask)
    assert (truth == 255).any()
    expected_truth = (rgb(image_path) + colourize(truth, palette("pascal"))) / 2
    assert np.abs(overlay[:40, 96:] - expected_truth).max() <= 1
    assert_prediction_panel_matches_png(overlay, image_path, out / "img_008.png")
