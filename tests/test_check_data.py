"""scripts/check_data.py: start-up checks, every sample opened once, class histogram; exit 0 clean, 2 otherwise."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, write_voc_tree
from dataset.classes import CLASS_NAMES

NAMES = [f"img_{i:03d}" for i in range(7)]
SCRIPT = Path(REPO) / "scripts/check_data.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("check_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_data = _load_script()


def _line(name: str) -> str:
    return f"JPEGImages/{name}.jpg SegmentationClass/{name}.png\n"


@pytest.fixture
def tree(tmp_path):
    """(config path, data root) of a 7-image Pascal-layout tree: split 's' with 2 labeled, 3 unlabeled, 2 val."""
    root, splits = tmp_path / "VOC", tmp_path / "splits"
    write_voc_tree(str(root), NAMES, size=(16, 20))
    (splits / "pascal/s").mkdir(parents=True)
    (splits / "pascal/s/labeled.txt").write_text("".join(_line(n) for n in NAMES[:2]))
    (splits / "pascal/s/unlabeled.txt").write_text("".join(f"JPEGImages/{n}.jpg\n" for n in NAMES[2:5]))
    (splits / "pascal/val.txt").write_text("".join(_line(n) for n in NAMES[5:]))
    config = tmp_path / "check.yaml"
    config.write_text(f"dataset: pascal\ndata_root: {root}\nsplits_dir: {splits}\nnclass: 21\nworkers: 0\n")
    return config, root


def _counts(root: Path, names: list[str]) -> np.ndarray:
    return sum(np.bincount(np.array(Image.open(root / f"SegmentationClass/{n}.png")).ravel(), minlength=256)
               for n in names)


def test_clean_tree_prints_histogram_and_summary(tree, capsys):
    config, root = tree
    assert check_data.main(["--config", str(config), "split=s"]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert out[0].split() == ["class", "labeled", "pixels", "%", "val", "pixels", "%"]
    rows = {line[:12].strip(): line[12:].split() for line in out[1:23]}
    assert list(rows) == [*CLASS_NAMES["pascal"], "ignore (255)"]
    labeled, val = _counts(root, NAMES[:2]), _counts(root, NAMES[5:])
    for index, name in [*enumerate(CLASS_NAMES["pascal"]), (255, "ignore (255)")]:
        pixels, share, val_pixels, val_share = rows[name]
        assert int(pixels.replace(",", "")) == labeled[index] and int(val_pixels.replace(",", "")) == val[index]
        assert float(share) == pytest.approx(100 * labeled[index] / labeled.sum(), abs=0.006)
    assert out[-2] == f"pascal split s at {root}: 2 labeled (repeated to 3), 3 unlabeled, 2 val samples, 21 classes"
    assert out[-1] == "data OK"
    absent = [name for index, name in enumerate(CLASS_NAMES["pascal"]) if labeled[index] == 0]
    assert absent and f"warning: no labeled pixel of class {', '.join(absent)}\n" in captured.err
    assert "most labeled pixels are 255" not in captured.err


def test_masks_that_are_mostly_ignore_are_flagged(tree, capsys):
    config, root = tree
    for name in NAMES[:2]:
        Image.fromarray(np.full((16, 20), 255, dtype=np.uint8)).save(root / f"SegmentationClass/{name}.png")
    assert check_data.main(["--config", str(config), "split=s"]) == 0
    assert ("warning: most labeled pixels are 255 (ignored); masks must hold class indices 0 ... 20"
            in capsys.readouterr().err)


def test_broken_samples_are_all_named(tree, capsys):
    config, root = tree
    mask = root / f"SegmentationClass/{NAMES[1]}.png"
    indices = np.array(Image.open(mask))
    indices[2, 3] = 30
    Image.fromarray(indices).save(mask)
    image = root / f"JPEGImages/{NAMES[6]}.jpg"
    image.write_bytes(image.read_bytes()[:-40])
    assert check_data.main(["--config", str(config), "split=s", "workers=1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert errors[0] == f"error: mask {mask} has value 30: classes are 0 ... 20 (nclass 21) and 255 is ignored"
    assert errors[1].startswith(f"error: cannot read image {image}: the file is truncated (PIL: image file is "
                                "truncated (")
    assert errors[2] == "error: 2 of 4 samples failed the check"


def test_unlabeled_images_are_checked_on_request(tree, capsys):
    config, root = tree
    image = root / f"JPEGImages/{NAMES[3]}.jpg"
    image.write_bytes(b"not a picture")
    assert check_data.main(["--config", str(config), "split=s"]) == 0
    assert check_data.main(["--config", str(config), "--unlabeled", "split=s"]) == 2
    assert f"error: cannot read image {image}: not an image PIL can read" in capsys.readouterr().err


def test_start_up_error_exits_2_with_one_line(tree):
    config, root = tree
    (root / f"JPEGImages/{NAMES[0]}.jpg").unlink()
    result = subprocess.run([sys.executable, str(SCRIPT), "--config", str(config), "split=s"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: {config.parent / 'splits/pascal/s/labeled.txt'}: 1 listed file(s) missing "
                             f"under data_root {root}: JPEGImages/{NAMES[0]}.jpg\n")


def test_overlap_warning_and_config_error(tree, capsys):
    config, root = tree
    val = config.parent / "splits/pascal/val.txt"
    val.write_text(val.read_text() + _line(NAMES[0]))
    assert check_data.main(["--config", str(config), "split=s"]) == 0
    assert "warning: 1 of 2 labeled images" in capsys.readouterr().err
    assert check_data.main(["--config", str(config), "split=s", "nclas=3"]) == 2
    assert "unknown key 'nclas' (did you mean 'nclass'?)" in capsys.readouterr().err


def _to_utf16(config: Path, root: Path) -> str:
    val = config.parent / "splits/pascal/val.txt"
    val.write_bytes(val.read_text().encode("utf-16"))
    return f"split file {val} is UTF-16 text; save it as UTF-8"


def _data_root_is_a_file(config: Path, root: Path) -> str:
    config.write_text(config.read_text().replace(f"data_root: {root}", f"data_root: {config}"))
    return (f"data_root {config} is a file, not a folder (set data_root in the config, or data_root=DIR on the "
            "command line)")


@pytest.mark.parametrize("spoil", [_to_utf16, _data_root_is_a_file])
def test_a_utf16_split_or_a_file_as_data_root_is_one_line(tree, capsys, spoil):
    config, root = tree
    message = spoil(config, root)
    assert check_data.main(["--config", str(config), "split=s"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_split_file_with_a_byte_order_mark_checks_clean(tree, capsys):
    config, _ = tree
    labeled = config.parent / "splits/pascal/s/labeled.txt"
    labeled.write_bytes(b"\xef\xbb\xbf" + labeled.read_bytes())
    assert check_data.main(["--config", str(config), "split=s"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "data OK"
