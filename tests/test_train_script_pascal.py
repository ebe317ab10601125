"""`bash scripts/train.sh pascal 1_16 0` starts from the shipped split files given only data_root.

Every image and mask those files name must exist (build_datasets checks before training), so the Pascal layout is
built from hard links to a tiny JPEG and a tiny mask: 12031 samples cost four real files, one pair for training and a
smaller pair for the 1449 validation images.
"""
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conftest import REPO, run
from dataset.semi import read_split

SPLITS = Path(REPO) / "splits" / "pascal"
SIZE = 16  # the smallest crop_size
# Validation images: a forward pass at 4x4 costs about three quarters of one at 16x16, and the run makes 1449.
VAL_SIZE = 4


def _write_sources(folder: Path, size: int) -> tuple[Path, Path]:
    """One random size x size RGB JPEG and one palette PNG mask of classes 0..20 with a 255 (ignore) border."""
    rng = np.random.default_rng(size)
    image, mask = folder / f"image_{size}.jpg", folder / f"mask_{size}.png"
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(image)
    indices = rng.integers(0, 21, (size, size), dtype=np.uint8)
    indices[0] = 255
    png = Image.fromarray(indices, mode="P")
    png.putpalette([value for index in range(256) for value in (index, 255 - index, 7 * index % 256)])
    png.save(mask)
    return image, mask


def _pascal_tree(root: Path, sources: Path) -> None:
    """JPEGImages/ for every listed image; masks in SegmentationClass/ for val, SegmentationClassAug/ for training.

    The split lines name SegmentationClass/X.png for all samples; keeping the training masks in
    SegmentationClassAug/ is the common layout, which the reader's fallback must find.
    """
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        (root / folder).mkdir(parents=True)
    listed = {"SegmentationClass": (read_split(SPLITS / "val.txt", require_mask=True), VAL_SIZE),
              "SegmentationClassAug": (read_split(SPLITS / "1_16/labeled.txt", require_mask=True)
                                       + read_split(SPLITS / "1_16/unlabeled.txt"), SIZE)}
    for mask_folder, (samples, size) in listed.items():
        image, mask = _write_sources(sources, size)
        for image_rel, mask_rel in samples:
            os.link(image, root / image_rel)
            os.link(mask, root / mask_folder / Path(mask_rel).name)


def shipped_split_run(folder: Path, tiny_voc) -> Path:
    """The run directory of train.sh's run on the shipped 1_16 split, given only data_root."""
    data_root, exp_dir = folder / "VOC2012", folder / "exp"
    _pascal_tree(data_root, folder)
    # Without splits_dir the script reads the shipped splits/pascal/; the rest keeps a CPU run to seconds.
    run(["bash", "scripts/train.sh", "pascal", "1_16", "0", f"data_root={data_root}", f"exp_dir={exp_dir}",
         "run_name=t", "backbone=tv_resnet10", "head_channels=32", "pretrained=null", "crop_size=16", "batch_size=2",
         "epochs=1", "iters_per_epoch=1", "workers=0", "amp=false"])
    return exp_dir / "pascal" / "1_16" / "t"


SESSION_RUNS = {"test_train_script_runs_on_shipped_pascal_split": shipped_split_run}
# One process evaluating 1449 images, about 13 s of one CPU: it starts with the session rather than end it alone.
SESSION_RUNS_START_FIRST = True


def test_train_script_runs_on_shipped_pascal_split(session_run):
    run_dir = session_run
    state = torch.load(run_dir / "latest.pth", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["iteration"]) == (0, 1)
    log = (run_dir / "train.log").read_text()
    assert "662 labeled (repeated to 9920), 9920 unlabeled, 1449 val samples, 21 classes" in log
    # The last epoch always evaluates, here over all 1449 validation images.
    assert "validation (original)" in log
