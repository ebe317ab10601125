"""The run's TensorBoard record: scalars and picture panels, written by rank 0, never fatal to the run."""
import sys
import threading
from typing import Callable

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from util.visualize import colourize


class RunEvents:
    """The run's TensorBoard events (rank 0). A write that fails (a full disk) is told once on stderr, in one line, and
    the run goes on without events, as it does without train.log: its checkpoints are its record."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.failed = False
        # TensorBoard writes from a thread of its own, whose OSError would otherwise be printed as a traceback.
        self.previous_excepthook = threading.excepthook
        threading.excepthook = self._thread_failed
        try:
            self.writer = SummaryWriter(run_dir)
        except OSError as error:  # it writes and flushes the file's first record at once
            self._failed(error)

    def _failed(self, error: OSError) -> None:
        if not self.failed:
            print(f"warning: {self.run_dir}: cannot write the TensorBoard events ({error.strerror or error}); the run "
                  "goes on without them", file=sys.stderr)
        self.failed = True

    def _thread_failed(self, args) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            self._failed(args.exc_value)
        else:
            self.previous_excepthook(args)

    def _write(self, method: str, *args) -> None:
        if self.failed:
            return
        try:
            getattr(self.writer, method)(*args)
        except OSError as error:  # the writer thread's, raised again at the next call
            self._failed(error)

    def add_scalar(self, *args) -> None:
        self._write("add_scalar", *args)

    def add_image(self, *args) -> None:
        self._write("add_image", *args)

    def add_images(self, *args) -> None:
        self._write("add_images", *args)

    def close(self) -> None:
        self._write("close")
        threading.excepthook = self.previous_excepthook


def log_pictures(writer, tag: str, images, panels, palette, step: int, to_rgb: Callable, max_images: int = 4) -> None:
    """One TensorBoard grid: a row of images (``to_rgb`` turns a normalised one into (H, W, 3) uint8), then one row
    per label map in the dataset's colours."""
    count = min(max_images, len(images))
    tiles = [to_rgb(images[i]) for i in range(count)]
    tiles += [colourize(labels[i].cpu().numpy(), palette) for labels in panels for i in range(count)]
    writer.add_image(tag, make_grid(torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2), nrow=count), step)


def log_step_pictures(writer, pictures: dict, palette, step: int, to_rgb: Callable) -> None:
    """The panels of one training step: labeled images, unlabeled ones with their pseudo-labels, the CIF gate."""
    log_pictures(writer, "train/labeled (image, ground truth, prediction)", pictures["image_x"],
                 [pictures["mask_x"], pictures["pred_x"].argmax(1)], palette, step, to_rgb)
    if "image_w" in pictures:
        log_pictures(writer, "train/unlabeled (image, ground truth, prediction, confident pseudo-label)",
                     pictures["image_w"], [pictures["truth_u"], pictures["pred_w"].argmax(1),
                                           pictures["pseudo_label"]], palette, step, to_rgb)
    if pictures.get("gate") is not None:
        writer.add_images("train/cif gate (weight of the 1x prediction)", pictures["gate"][:4].float().cpu(), step)
