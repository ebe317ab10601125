"""Evaluation parity against the authors' release: its own evaluate() and eval.py's, on one network and one image set.

    python scripts/release_parity.py RELEASE_DIR --eval [--eval-data VOC_DIR] [--eval-crop 321] [--backbone resnet50]

The release's evaluate.py, util/utils.py (intersectionAndUnion), util/classes.py, dataset/semi.py and
dataset/transform.py are extracted from RELEASE_DIR into a temporary folder and imported from there; its val dataset
reads the images, its evaluate() runs with Tensor.cuda as the identity (the one thing it needs a GPU for) and with
the network of ../shared/tools/release_model.py. That network's release-format checkpoint is converted by
scripts/convert_release_checkpoint.py and loaded by eval.py's load_trained_model; eval.py's evaluate() then runs on
the same images in every mode. Compared: the per-class IoU (the release's, where an absent class scores 0) and the
release's mIoU against this codebase's all-class mean.

VOC_DIR holds JPEGImages/*.jpg and SegmentationClass/*.png (palette masks of the 21 VOC classes), e.g. the real VOC
photos of the labelme sdist (`pip download --no-deps --no-binary :all: labelme`, then its
examples/semantic_segmentation/data_dataset_voc). Without it, synthetic images (smooth noise, rectangles of classes).

The release's sliding-window mode hard-codes 19 classes (Cityscapes'), so that mode runs 19-class networks (the same
seed), with the masks' classes 19 and 20 set to ignore in the files both sides read; the other modes run 21 classes.
Also reported, not compared: eval.py's sliding windows with the flush placement (sliding_window_placement: flush),
and center_crop with a crop larger than the images, where the release's negative start offset wraps around
(util/inference.center_crop). Each row also gives the share of pixels on which eval.py predicts the class that the
release's evaluate() predicts (its predictions recorded on their way into its intersectionAndUnion).
"""
import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dataset.semi import SemiDataset, read_split  # noqa: E402
from eval import load_trained_model, prediction_saver  # noqa: E402
from scripts.convert_release_checkpoint import convert  # noqa: E402
from util.evaluation import evaluate  # noqa: E402

RELEASE_EVAL_FILES = ["evaluate.py", "util/utils.py", "util/classes.py", "dataset/semi.py", "dataset/transform.py"]
RELEASE_PACKAGES = ("dataset", "util", "model", "evaluate")
SLIDING_WINDOW_CLASSES = 19  # evaluate.py: torch.zeros(b, 19, h, w) in its sliding_window branch
IOU_TOLERANCE = 0.01  # IoU points; both sides should count the very same pixels
SYNTHETIC_IMAGES = 3


def extract_release_eval(release_dir: str, dest: str) -> None:
    """RELEASE_EVAL_FILES of a checkout, or `git archive`d from a git directory, into ``dest`` as packages."""
    if os.path.isfile(os.path.join(release_dir, "evaluate.py")):
        for rel in RELEASE_EVAL_FILES:
            os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
            shutil.copyfile(os.path.join(release_dir, rel), os.path.join(dest, rel))
    else:
        archive = subprocess.run(["git", "-c", "safe.directory=*", "--git-dir", release_dir, "archive", "--format=tar",
                                  "HEAD", "--", *RELEASE_EVAL_FILES], capture_output=True)
        if archive.returncode != 0:
            raise SystemExit(f"error: {release_dir}: {archive.stderr.decode(errors='replace').strip()}")
        with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
            tar.extractall(dest, filter="data")
    for package in ("dataset", "util"):
        open(os.path.join(dest, package, "__init__.py"), "a").close()


@contextlib.contextmanager
def release_imports(source: str, network_class: type):
    """The release's dataset and util packages importable from ``source``, its network module holding
    ``network_class`` (the class of release_model.py's network); this codebase's modules are put back after."""
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] in RELEASE_PACKAGES}
    for name in saved:
        del sys.modules[name]
    saved_path, saved_bytecode = list(sys.path), sys.dont_write_bytecode
    sys.path.insert(0, source)
    sys.dont_write_bytecode = True
    # The network module imports the CUDA kernel; release_model.py has built its class without it.
    network = types.ModuleType("model.semseg.deeplabv3plus_scalematch")
    network.DeepLabV3Plus = network_class
    sys.modules.update({"model": types.ModuleType("model"), "model.semseg": types.ModuleType("model.semseg"),
                        "model.semseg.deeplabv3plus_scalematch": network})
    try:
        yield
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] in RELEASE_PACKAGES]:
            del sys.modules[name]
        sys.modules.update(saved)
        sys.path[:] = saved_path
        sys.dont_write_bytecode = saved_bytecode


@contextlib.contextmanager
def cuda_as_identity():
    """The release moves every tensor with .cuda(); on the CPU that is the tensor itself."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def synthetic_voc(folder: Path, seed: int) -> list[str]:
    """SYNTHETIC_IMAGES 375 x 500 images of smooth noise, masks of rectangles of random classes; their stems."""
    generator = np.random.default_rng(seed)
    stems = []
    for index in range(SYNTHETIC_IMAGES):
        coarse = generator.uniform(0, 255, (12, 16, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC)
        image.save(folder / "JPEGImages" / f"s{index}.jpg")
        mask = np.zeros((375, 500), np.uint8)
        for _ in range(6):
            top, left = generator.integers(0, 300), generator.integers(0, 420)
            label = generator.integers(1, 21)
            height, width = generator.integers(30, 200), generator.integers(30, 250)
            mask[top:top + height, left:left + width] = label
        Image.fromarray(mask, mode="L").save(folder / "SegmentationClass" / f"s{index}.png")
        stems.append(f"s{index}")
    return stems


def prepare_data(eval_data: str | None, folder: Path, seed: int) -> tuple[list[str], str]:
    """A VOC tree under ``folder``: JPEGImages, SegmentationClass (21 classes), SegmentationClass19 (classes 19, 20
    ignored) and splits/pascal/val.txt (read by the release's dataset); returns the stems and their description."""
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClass19", "splits/pascal"):
        (folder / sub).mkdir(parents=True)
    if eval_data is None:
        stems, what = synthetic_voc(folder, seed), f"{SYNTHETIC_IMAGES} synthetic 375 x 500 images"
    else:
        source = Path(eval_data)
        stems = sorted(path.stem for path in (source / "SegmentationClass").glob("*.png"))
        if not stems:
            raise SystemExit(f"error: {source / 'SegmentationClass'}: no masks (*.png)")
        for stem in stems:
            shutil.copyfile(source / "JPEGImages" / f"{stem}.jpg", folder / "JPEGImages" / f"{stem}.jpg")
            indices = np.array(Image.open(source / "SegmentationClass" / f"{stem}.png"))
            Image.fromarray(indices, mode="L").save(folder / "SegmentationClass" / f"{stem}.png")
        sizes = sorted({Image.open(folder / "JPEGImages" / f"{stem}.jpg").size for stem in stems})
        what = f"{len(stems)} photos of {source} ({', '.join(f'{w} x {h}' for w, h in sizes)})"
    for stem in stems:
        mask = np.array(Image.open(folder / "SegmentationClass" / f"{stem}.png"))
        mask[(mask >= SLIDING_WINDOW_CLASSES) & (mask != 255)] = 255
        Image.fromarray(mask, mode="L").save(folder / "SegmentationClass19" / f"{stem}.png")
    return stems, what


def write_val_list(folder: Path, stems: list[str], mask_dir: str) -> Path:
    path = folder / "splits" / "pascal" / "val.txt"
    path.write_text("".join(f"JPEGImages/{stem}.jpg {mask_dir}/{stem}.png\n" for stem in stems))
    return path


def release_evaluation(release, tool, net, folder: Path, mode: str, crop: int, nclass: int, seed: int):
    """(mIoU, per-class IoU) of the release's evaluate() on the images listed in folder's val.txt."""
    with contextlib.chdir(folder):  # its dataset reads splits/pascal/val.txt from the working directory
        val_set = release.semi.SemiDataset("pascal", str(folder), "val")
    loader = torch.utils.data.DataLoader(val_set, batch_size=1, num_workers=0)
    with cuda_as_identity(), tool.deterministic_dropout(seed):
        miou, iou_class = release.evaluate(net, loader, mode, {"crop_size": crop, "nclass": nclass})
    return float(miou), torch.as_tensor(np.asarray(iou_class), dtype=torch.float64)


def converted_model(tool, net, folder: Path, config: str, backbone: str):
    release_path, converted = folder / f"release_{config}.pth", folder / f"converted_{config}.pth"
    tool.write_release_checkpoint(net, str(release_path))
    convert(str(release_path), str(converted), str(ROOT / "configs" / f"{config}.yaml"), [f"backbone={backbone}"])
    model, cfg, _ = load_trained_model(str(converted), torch.device("cpu"))
    return model, cfg


def evaluation_parity(tool, release_dir: str, backbone: str, seed: int, eval_data: str | None,
                crop: int) -> tuple[list[str], bool]:
    """The table's lines and whether every compared mode agrees within IOU_TOLERANCE."""
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="scalematch_eval_parity_") as temporary:
        folder = Path(temporary)
        networks = {}
        for nclass, config in ((21, "pascal"), (SLIDING_WINDOW_CLASSES, "cityscapes")):
            net = tool.build_release_model(release_dir, nclass=nclass, backbone=backbone, seed=seed)
            networks[nclass] = (net, *converted_model(tool, net, folder, config, backbone))
        extract_release_eval(release_dir, str(folder / "release"))
        with release_imports(str(folder / "release"), type(networks[21][0])):
            import dataset.semi as release_semi
            import evaluate as release_evaluate_module
        predictions = []
        count_pixels = release_evaluate_module.intersectionAndUnion

        def recorded(output, target, *args, **kwargs):
            predictions.append(np.array(output, copy=True))
            return count_pixels(output, target, *args, **kwargs)

        # Its counting function, recording each prediction on the way; no progress bars.
        release_evaluate_module.intersectionAndUnion = recorded
        release_evaluate_module.tqdm = lambda iterable, *args, **kwargs: iterable
        release = types.SimpleNamespace(semi=release_semi, evaluate=release_evaluate_module.evaluate,
                                        predictions=predictions)
        stems, what = prepare_data(eval_data, folder / "voc", seed)
        heights = [Image.open(folder / "voc" / "JPEGImages" / f"{stem}.jpg").size[1] for stem in stems]
        large_crop = max(heights) + 2  # taller than every image: the release's start offset is negative
        runs = [("original", 21, crop, "release", True), ("center_crop", 21, crop, "release", True),
                ("center_crop", 21, large_crop, "release", False),
                ("sliding_window", SLIDING_WINDOW_CLASSES, crop, "release", True),
                ("sliding_window", SLIDING_WINDOW_CLASSES, crop, "flush", False)]
        lines = [f"Evaluation on {what}; {backbone} networks of release_model.py (seed {seed}); IoU in points.", "",
                 "| mode | classes | crop | placement (here) | release mIoU | here: mIoU (all) | "
                 "here: mIoU (present) | max abs per-class IoU diff | same class as the release | compared |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        passed = True
        for mode, nclass, crop_size, placement, compared in runs:
            net, model, cfg = networks[nclass]
            mask_dir = "SegmentationClass" if nclass == 21 else "SegmentationClass19"
            val_list = write_val_list(folder / "voc", stems, mask_dir)
            release_miou, release_iou = release_evaluation(release, tool, net, folder / "voc", mode, crop_size,
                                                           nclass, seed)
            ours_cfg = dict(cfg, crop_size=crop_size, workers=0, sliding_window_placement=placement)
            val_set = SemiDataset(folder / "voc", read_split(val_list, require_mask=True), "val", nclass, crop_size)
            saved = folder / f"ours_{len(lines)}"
            saved.mkdir()
            metric = evaluate(model.predict, val_set, ours_cfg, cpu, mode=mode,
                              on_prediction=prediction_saver(str(saved), ours_cfg, overlays=False))
            same = pixel_agreement(release.predictions[-len(stems):], saved, stems)
            difference = float((torch.nan_to_num(metric.iou(), nan=0.0) - release_iou).abs().max())
            agrees = difference <= IOU_TOLERANCE and abs(metric.miou_all_classes() - release_miou) <= IOU_TOLERANCE
            passed &= agrees or not compared
            verdict = ("yes" if agrees else "**no**") if compared else "not compared (a documented difference)"
            lines.append(f"| {mode} | {nclass} | {crop_size} | {placement if mode == 'sliding_window' else '-'} | "
                         f"{release_miou:.2f} | {metric.miou_all_classes():.2f} | {metric.miou():.2f} | "
                         f"{difference:.2e} | {same} | {verdict} |")
    return lines, passed


def pixel_agreement(release_predictions: list[np.ndarray], saved: Path, stems: list[str]) -> str:
    """Share of the pixels on which the release's predictions and eval.py's saved ones agree ('n/a' when their
    sizes differ)."""
    same = total = 0
    for release_labels, stem in zip(release_predictions, stems):
        ours = np.array(Image.open(saved / f"{stem}.png"))
        if ours.shape != release_labels.shape[-2:]:
            return "n/a (other sizes)"
        same += int((ours == release_labels.reshape(ours.shape)).sum())
        total += ours.size
    return f"{100 * same / total:.3f} % ({total - same} of {total} differ)"
