"""The published Pascal VOC and Cityscapes split files shipped in splits/, read through the project's own reader.

Counts are those of the published lists (UniMatch / ScaleMatch releases); no image is needed.
"""
from pathlib import Path

import pytest

from dataset.semi import read_split

REPO = Path(__file__).resolve().parents[1]
SPLITS = REPO / "splits"
# CI keeps the published copy beside the clone; the byte comparison runs only where it exists.
PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "published_splits"

PASCAL_TRAIN_AUG = 10582
CITYSCAPES_TRAIN = 2975
# split folder -> labeled count; unlabeled is the rest of the training set.
PASCAL_SPLITS = {"92": 92, "183": 183, "366": 366, "732": 732, "1464": 1464,
                 "1_16": 662, "1_8": 1323, "1_4": 2646,
                 "u2pl_1_16": 662, "u2pl_1_8": 1323, "u2pl_1_4": 2646}
CITYSCAPES_SPLITS = {"1_30": 100, "1_16": 186, "1_8": 372, "1_4": 744, "1_2": 1488}


def _expected_counts() -> dict[str, int]:
    """Relative path under splits/ -> number of samples, for every shipped published file."""
    counts = {"pascal/val.txt": 1449, "pascal/train_aug.txt": PASCAL_TRAIN_AUG, "cityscapes/val.txt": 500}
    for dataset, splits, total in (("pascal", PASCAL_SPLITS, PASCAL_TRAIN_AUG),
                                   ("cityscapes", CITYSCAPES_SPLITS, CITYSCAPES_TRAIN)):
        for split, labeled in splits.items():
            counts[f"{dataset}/{split}/labeled.txt"] = labeled
            counts[f"{dataset}/{split}/unlabeled.txt"] = total - labeled
    return counts


EXPECTED = _expected_counts()
SHIPPED = sorted(EXPECTED)


def _images(relative: str) -> set[str]:
    return {image for image, _ in read_split(SPLITS / relative, require_mask=True)}


def test_exactly_the_published_files_ship():
    shipped = {path.relative_to(SPLITS).as_posix() for dataset in ("pascal", "cityscapes")
               for path in (SPLITS / dataset).rglob("*") if path.is_file()}
    assert len(SHIPPED) == 35
    assert shipped == set(SHIPPED)


@pytest.mark.parametrize("relative", SHIPPED)
def test_sample_count(relative):
    path = SPLITS / relative
    # Lines as `grep -c ''` counts them: a last line without a newline counts too.
    assert len(path.read_bytes().splitlines()) == EXPECTED[relative]
    assert len(read_split(path, require_mask=True)) == EXPECTED[relative]


@pytest.mark.parametrize("split", sorted(PASCAL_SPLITS))
def test_pascal_split_partitions_train_aug(split):
    labeled, unlabeled = _images(f"pascal/{split}/labeled.txt"), _images(f"pascal/{split}/unlabeled.txt")
    assert not labeled & unlabeled
    assert labeled | unlabeled == _images("pascal/train_aug.txt")
    # A validation image among the training images would inflate the reported mIoU.
    assert not (labeled | unlabeled) & _images("pascal/val.txt")


def test_pascal_original_protocol_labels_come_from_voc_train():
    # 1464 is VOC's whole `train` set; the smaller original-protocol splits draw from it.
    voc_train = _images("pascal/1464/labeled.txt")
    for split in ("92", "183", "366", "732"):
        assert _images(f"pascal/{split}/labeled.txt") <= voc_train, split


@pytest.mark.parametrize("split", sorted(CITYSCAPES_SPLITS))
def test_cityscapes_split_partitions_train(split):
    labeled, unlabeled = _images(f"cityscapes/{split}/labeled.txt"), _images(f"cityscapes/{split}/unlabeled.txt")
    assert not labeled & unlabeled
    train = labeled | unlabeled
    assert len(train) == CITYSCAPES_TRAIN
    assert all(image.startswith("leftImg8bit/train/") for image in train)
    # No train list ships for Cityscapes: every split must cover the same 2975 images as the largest one.
    assert train == _images("cityscapes/1_2/labeled.txt") | _images("cityscapes/1_2/unlabeled.txt")
    assert not train & _images("cityscapes/val.txt")


def test_files_without_final_newline_keep_their_last_sample():
    unterminated = [relative for relative in SHIPPED if not (SPLITS / relative).read_bytes().endswith(b"\n")]
    # The published files mix both endings; make sure this case is really exercised.
    assert unterminated
    for relative in unterminated:
        last_line = (SPLITS / relative).read_text().rsplit("\n", 1)[-1]
        samples = read_split(SPLITS / relative, require_mask=True)
        assert samples[-1] == tuple(last_line.split()), relative
        assert len(samples) == EXPECTED[relative], relative


@pytest.mark.skipif(not PUBLISHED.is_dir(), reason=f"no published copy at {PUBLISHED}")
@pytest.mark.parametrize("relative", SHIPPED)
def test_shipped_bytes_equal_published(relative):
    assert (SPLITS / relative).read_bytes() == (PUBLISHED / relative).read_bytes()
