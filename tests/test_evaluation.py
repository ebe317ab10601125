"""util/evaluation.py: evaluate, which gives every reported mIoU (the trainer's and eval.py's), and averaged_predictor
(flip and multi-scale inference) against answers known by construction: validation images whose red channel is their
mask."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dataset.semi import build_val_dataset
from dataset.transforms import IMAGENET_MEAN, IMAGENET_STD
from util import evaluation
from util.config import validate

NCLASS = 21
HEIGHT, WIDTH = 16, 24  # the smallest crop_size is 16
RED_PER_CLASS = 10  # an image's red value is 10 x its pixel's class


def masks():
    """Two masks: 'halves' (class 1 left, 2 right, 4 ignored pixels in the class-1 half) and 'block' (class 0, a
    3 x 3 block of class 1 in the right half)."""
    halves = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    halves[:, :WIDTH // 2], halves[:, WIDTH // 2:] = 1, 2
    halves[0, :4] = 255
    block = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    block[2:5, 16:19] = 1
    return {"halves": halves, "block": block}


# Valid pixels of each class over both images, counted by hand from masks().
CLASS_0 = 16 * 24 - 9
CLASS_1 = 16 * 12 - 4 + 9
CLASS_2 = 16 * 12
VALID = CLASS_0 + CLASS_1 + CLASS_2


@pytest.fixture(scope="module")
def encoded_val(tmp_path_factory):
    """(config, validation set) of the two masks, each image (lossless PNG) holding its mask in its red channel."""
    base = tmp_path_factory.mktemp("encoded")
    root, splits = base / "data", base / "splits"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (splits / "pascal").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, mask in masks().items():
        image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        image[..., 0] = np.where(mask == 255, 250, mask * RED_PER_CLASS)
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    (splits / "pascal" / "val.txt").write_text("images/halves.png masks/halves.png\nimages/block.png masks/block.png\n")
    cfg = validate({"dataset": "pascal", "nclass": NCLASS, "data_root": str(root), "splits_dir": str(splits),
                    "split": "tiny", "crop_size": 16, "workers": 0, "backbone": "tv_resnet10", "head_channels": 32,
                    "pretrained": None},
                   source="test")
    return cfg, build_val_dataset(cfg, cfg["splits_dir"])


def decoded_classes(images):
    """The class each pixel of normalised ``images`` encodes in its red channel."""
    red = images[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    return (red * 255 / RED_PER_CLASS).round().long().clamp(0, NCLASS - 1)


def decoder(images):
    """Logits that pick the encoded class: right everywhere."""
    return 20.0 * F.one_hot(decoded_classes(images), NCLASS).permute(0, 3, 1, 2).float()


def left_biased_decoder(images):
    """The decoder with a pull towards class 0 over the left half of what it is given: alone it calls the left half
    0; averaged with its mirror image's prediction, each pixel is pulled once, and the encoded class wins."""
    logits = 4.0 * F.one_hot(decoded_classes(images), NCLASS).permute(0, 3, 1, 2).float()
    logits[:, 0, :, :images.shape[-1] // 2] += 5.0
    return logits


def constant(class_index, images):
    return 20.0 * F.one_hot(torch.full(images.shape[:1] + images.shape[2:], class_index), NCLASS).permute(
        0, 3, 1, 2).float()


def miou(predict, encoded_val, **options):
    cfg, val_set = encoded_val
    metric = evaluation.evaluate(predict, val_set, cfg, torch.device("cpu"), **options)
    return metric.miou(), metric.iou()


@pytest.mark.parametrize("mode", ["original", "center_crop", "sliding_window"])
def test_a_predictor_that_decodes_the_masks_scores_100(encoded_val, mode):
    score, iou = miou(decoder, encoded_val, mode=mode)
    assert score == 100.0
    assert iou[:3].tolist() == [100.0] * 3 and iou[3:].isnan().all()  # classes in neither mask nor prediction


def test_a_constant_class_scores_its_share_of_the_valid_pixels(encoded_val):
    # Class 1 everywhere: its IoU is its pixels over all valid ones; classes 0 and 2 are missed (IoU 0).
    score, iou = miou(lambda images: constant(1, images), encoded_val)
    assert iou[:3].tolist() == pytest.approx([0.0, 100 * CLASS_1 / VALID, 0.0])
    assert score == pytest.approx(100 * CLASS_1 / VALID / 3)
    # Class 5, in no mask: four classes with a union, one (class 5) predicted but never right.
    score, iou = miou(lambda images: constant(5, images), encoded_val)
    assert score == 0.0 and (~iou.isnan()).nonzero().flatten().tolist() == [0, 1, 2, 5]


def test_each_process_scores_its_own_share_of_the_images(encoded_val):
    """Without a process group the counts are not summed: rank 1 of 2 sees the second image ('block') alone."""
    score, iou = miou(lambda images: constant(1, images), encoded_val, rank=1, world_size=2)
    assert iou[:2].tolist() == pytest.approx([0.0, 100 * 9 / (HEIGHT * WIDTH)]) and iou[2:].isnan().all()
    assert score == pytest.approx(100 * 9 / (HEIGHT * WIDTH) / 2)


def test_flip_averaging_averages_each_pixel_with_its_mirror_images_prediction(encoded_val):
    # Alone: the left halves are called 0, so class 1 of 'halves' (all but the block's 9 pixels) is lost to class 0.
    score, iou = miou(left_biased_decoder, encoded_val)
    lost = CLASS_1 - 9
    assert iou[:3].tolist() == pytest.approx([100 * CLASS_0 / (CLASS_0 + lost), 100 * 9 / CLASS_1, 100.0])
    assert score == pytest.approx((100 * CLASS_0 / (CLASS_0 + lost) + 100 * 9 / CLASS_1 + 100) / 3)
    assert miou(evaluation.averaged_predictor(left_biased_decoder, [1.0], flip=True), encoded_val)[0] == 100.0
    assert miou(evaluation.averaged_predictor(decoder, [1.0], flip=True), encoded_val)[0] == 100.0


def size_dependent(probs_by_height):
    """A predictor whose output is one probability vector everywhere, chosen by the height of what it is given: a
    rescaled copy's prediction is resized back unchanged, so the average over scales is known exactly."""
    def predict(images):
        probs = probs_by_height[images.shape[-2]]
        return probs.log().view(1, NCLASS, 1, 1).expand(images.shape[0], NCLASS, *images.shape[-2:])
    return predict


def probs_for(**share):
    """A probability vector over the classes: the given shares of classes c0, c1, ..., the rest spread evenly."""
    probs = torch.full((NCLASS,), (1 - sum(share.values())) / (NCLASS - len(share)))
    for name, value in share.items():
        probs[int(name[1:])] = value
    return probs


def test_multi_scale_averaging_takes_the_mean_probability_over_every_scale(encoded_val):
    """At 0.5 x the predictor is sure of class 1; at 1 x and 2 x it leans to class 2. The mean of the three
    probabilities picks class 1 (0.59 against 0.30), where a vote or any one of 1 x and 2 x would pick class 2."""
    predict = size_dependent({HEIGHT // 2: probs_for(c1=0.98), HEIGHT: probs_for(c1=0.4, c2=0.45),
                              HEIGHT * 2: probs_for(c1=0.4, c2=0.45)})
    averaged = evaluation.averaged_predictor(predict, [0.5, 1.0, 2.0], flip=False)
    probs = averaged(torch.zeros(1, 3, HEIGHT, WIDTH)).exp()
    assert probs.shape == (1, NCLASS, HEIGHT, WIDTH)
    torch.testing.assert_close(probs, probs[..., :1, :1].expand_as(probs))  # the same at every pixel
    rest_sure, rest_leaning = 0.02 / 20, 0.15 / 19  # the share of each other class
    assert probs[0, :3, 0, 0].tolist() == pytest.approx([(rest_sure + 2 * rest_leaning) / 3, (0.98 + 2 * 0.4) / 3,
                                                         (rest_sure + 2 * 0.45) / 3], rel=1e-5)
    assert miou(averaged, encoded_val)[0] == pytest.approx(100 * CLASS_1 / VALID / 3)  # class 1 everywhere
    assert miou(evaluation.averaged_predictor(predict, [1.0, 2.0], flip=False), encoded_val)[0] == pytest.approx(
        100 * CLASS_2 / VALID / 3)  # class 2 everywhere
