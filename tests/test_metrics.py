import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed import TCPStore

from util.metrics import MeanIoU, format_iou_table, intersection_and_union

# Two rows of four pixels; the last column is ignored (255) and its predictions must not count.
TARGET = torch.tensor([[0, 0, 1, 255], [1, 2, 2, 255]])
PRED = torch.tensor([[0, 1, 1, 2], [1, 2, 0, 0]])
# Counted by hand over the six valid pixels.
INTERSECTION = [1, 2, 1]
AREA_PRED = [2, 3, 1]
AREA_TARGET = [2, 2, 2]
UNION = [3, 3, 2]


def test_intersection_and_union_by_hand():
    intersection, union, target_area = intersection_and_union(PRED, TARGET, 3)
    assert intersection.tolist() == INTERSECTION
    assert union.tolist() == UNION
    assert target_area.tolist() == AREA_TARGET
    assert [t.dtype for t in (intersection, union, target_area)] == [torch.int64] * 3
    assert (union + intersection).tolist() == [p + t for p, t in zip(AREA_PRED, AREA_TARGET)]


def test_absent_class_has_zero_counts():
    intersection, union, target_area = intersection_and_union(PRED, TARGET, 5)
    assert intersection.tolist() == INTERSECTION + [0, 0]
    assert union.tolist() == UNION + [0, 0]


def test_custom_ignore_index():
    target = TARGET.masked_fill(TARGET == 255, 0)
    _, union, target_area = intersection_and_union(PRED, target, 3, ignore_index=2)
    assert target_area.tolist() == [4, 2, 0]
    # Pixels with target 2 are ignored, so the prediction 2 at (0, 3) is the only one of class 2 left.
    assert union.tolist() == [4, 3, 1]


def test_label_outside_the_classes_is_an_error():
    with pytest.raises(ValueError, match="target contains label 7, outside 0..2 and not 255"):
        intersection_and_union(PRED, TARGET.masked_fill(TARGET == 0, 7), 3)
    with pytest.raises(ValueError, match="pred has shape"):
        intersection_and_union(PRED[:1], TARGET, 3)


def test_iou_and_miou_are_percentages():
    metric = MeanIoU(4)
    metric.update(PRED, TARGET)
    iou = metric.iou()
    assert iou[:3].tolist() == pytest.approx([100 / 3, 200 / 3, 50.0])
    assert math.isnan(iou[3].item())
    assert metric.miou() == pytest.approx(50.0)


def test_the_release_mean_counts_an_absent_class_as_zero():
    metric = MeanIoU(4)
    metric.update(PRED, TARGET)
    assert metric.miou_all_classes() == pytest.approx((100 / 3 + 200 / 3 + 50.0 + 0.0) / 4)
    every_class = MeanIoU(3)
    every_class.update(PRED, TARGET)
    assert every_class.miou_all_classes() == pytest.approx(every_class.miou())
    assert MeanIoU(3).miou_all_classes() == 0.0


def test_accumulation_over_batches_equals_one_batch():
    generator = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (4, 9, 7), generator=generator)
    target = torch.randint(0, 5, (4, 9, 7), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = 255
    whole, parts = MeanIoU(5), MeanIoU(5)
    whole.update(pred, target)
    for index in range(4):
        parts.update(pred[index], target[index])
    assert torch.equal(parts.intersection, whole.intersection)
    assert torch.equal(parts.union, whole.union)
    assert parts.miou() == whole.miou()


def test_accumulation_by_hand():
    metric = MeanIoU(3)
    metric.update(PRED, TARGET)
    metric.update(torch.tensor([[2, 2]]), torch.tensor([[2, 0]]))
    assert metric.intersection.tolist() == [1, 2, 2]
    assert metric.union.tolist() == [4, 3, 4]
    assert metric.iou().tolist() == pytest.approx([25.0, 200 / 3, 50.0])


def test_miou_of_nothing_is_nan():
    assert math.isnan(MeanIoU(3).miou())
    metric = MeanIoU(3)
    metric.all_reduce()
    assert metric.union.tolist() == [0, 0, 0]


def test_format_iou_table():
    iou = torch.tensor([100 / 3, 200 / 3, 50.0, float("nan")], dtype=torch.float64)
    table = format_iou_table(["background", "cat", "dog", "person"], iou)
    assert table.splitlines() == [
        "class       IoU (%)",
        "background    33.33",
        "cat           66.67",
        "dog           50.00",
        "person          n/a",
        "mIoU (all)    37.50  over all 4 classes, 0 for a class absent from predictions and masks (the release's)",
        "mIoU          50.00  over the 3 classes present",
    ]
    with pytest.raises(ValueError, match="3 class names for 4 IoU values"):
        format_iou_table(["a", "b", "c"], iou)


def _reduce_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    from util import dist

    _, world_size, _, device = dist.init_distributed(force_cpu=True)
    metric = MeanIoU(3, device=device)
    # Each process sees one row of the image; together they see the whole.
    metric.update(PRED[rank], TARGET[rank])
    metric.all_reduce()
    results.put((rank, world_size, dist.is_main(), metric.intersection.tolist(), metric.union.tolist()))
    dist.cleanup()


def test_all_reduce_sums_over_processes():
    # The store the workers meet at is served from here, on a port it holds from the start (as torchrun's agent
    # serves its workers): a port found free, closed and then bound again by a worker could be taken meanwhile.
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_reduce_worker, args=(store.port, results), nprocs=2)
    assert sorted([results.get(), results.get()]) == [(0, 2, True, INTERSECTION, UNION),
                                                      (1, 2, False, INTERSECTION, UNION)]
