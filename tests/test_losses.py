import math

import pytest
import torch

from util.losses import OHEMCrossEntropy, masked_cross_entropy


def two_class_logits(probs):
    """Logits (1, 2, 1, W) whose softmax gives class 0 the probabilities `probs`."""
    probs = torch.tensor(probs, dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(probs), torch.log((1 - probs) / probs)])
    return logits.view(1, 2, 1, -1).requires_grad_()


def test_masked_cross_entropy_by_hand():
    logits = torch.tensor([[[[2.0, 0.0, 1.0, 3.0]], [[0.0, 1.0, 1.0, 0.0]]]], requires_grad=True)  # (1, 2, 1, 4)
    pseudo_label = torch.tensor([[[0, 1, 1, 0]]])
    confident = torch.tensor([[[True, True, False, True]]])
    ignore_mask = torch.tensor([[[0, 0, 0, 255]]])
    # Pixels 0 and 1 count; pixel 2 is unconfident but non-ignored, so it joins the denominator (3).
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (1 + math.e))) / 3
    loss = masked_cross_entropy(logits, pseudo_label, confident, ignore_mask)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert logits.grad[0, :, 0, 2].abs().sum() == 0 and logits.grad[0, :, 0, 3].abs().sum() == 0
    assert logits.grad[0, :, 0, 0].abs().sum() > 0


def test_masked_cross_entropy_all_ignored_is_zero_with_grad():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    pseudo_label = torch.randint(0, 3, (2, 4, 4))
    loss = masked_cross_entropy(logits, pseudo_label, torch.ones(2, 4, 4, dtype=torch.bool),
                                torch.full((2, 4, 4), 255))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_masked_cross_entropy_nothing_confident_is_zero():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = masked_cross_entropy(logits, torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.bool),
                                torch.zeros(1, 2, 2, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad


def test_masked_cross_entropy_tolerates_ignore_labels_in_the_pseudo_label():
    logits = torch.randn(1, 3, 2, 2)
    pseudo_label = torch.tensor([[[0, 255], [1, 2]]])
    ignore_mask = torch.tensor([[[0, 255], [0, 0]]])
    loss = masked_cross_entropy(logits, pseudo_label, torch.ones(1, 2, 2, dtype=torch.bool), ignore_mask)
    expected = torch.nn.functional.cross_entropy(logits, pseudo_label, ignore_index=255, reduction="sum") / 3
    assert loss.item() == pytest.approx(expected.item())


PROBS = [0.1, 0.3, 0.5, 0.8, 0.9, 0.95]


def mean_nll(probs):
    return sum(-math.log(p) for p in probs) / len(probs)


def test_ohem_keeps_pixels_below_the_threshold():
    loss = OHEMCrossEntropy(thresh=0.7, min_kept=1)(two_class_logits(PROBS), torch.zeros(1, 1, 6, dtype=torch.long))
    assert loss.item() == pytest.approx(mean_nll(PROBS[:3]))


def test_ohem_min_kept_zero_mines_nothing():
    target = torch.tensor([[[0, 0, 255, 0, 0, 0]]])
    loss = OHEMCrossEntropy(thresh=0.7, min_kept=0)(two_class_logits(PROBS), target)
    assert loss.item() == pytest.approx(mean_nll([p for i, p in enumerate(PROBS) if i != 2]))


def test_ohem_keeps_at_least_min_kept_hardest():
    logits = two_class_logits(PROBS)
    loss = OHEMCrossEntropy(thresh=0.7, min_kept=5)(logits, torch.zeros(1, 1, 6, dtype=torch.long))
    assert loss.item() == pytest.approx(mean_nll(PROBS[:5]))
    loss.backward()
    assert logits.grad[0, :, 0, 5].abs().sum() == 0 and logits.grad[0, :, 0, 4].abs().sum() > 0


def test_ohem_min_kept_beyond_the_valid_pixels_keeps_all_valid():
    target = torch.tensor([[[0, 0, 255, 0, 0, 0]]])
    loss = OHEMCrossEntropy(thresh=0.7, min_kept=100)(two_class_logits(PROBS), target)
    assert loss.item() == pytest.approx(mean_nll([p for i, p in enumerate(PROBS) if i != 2]))


def test_ohem_never_keeps_ignored_pixels():
    # The hardest pixel is ignored; the next two hardest make up min_kept.
    target = torch.tensor([[[255, 0, 0, 0, 0, 0]]])
    loss = OHEMCrossEntropy(thresh=0.2, min_kept=2)(two_class_logits(PROBS), target)
    assert loss.item() == pytest.approx(mean_nll(PROBS[1:3]))


def test_ohem_uses_the_true_class_probability():
    # Class 1 is the target, so its probability is 1 - PROBS: the easy pixels are now the first ones.
    loss = OHEMCrossEntropy(thresh=0.25, min_kept=1)(two_class_logits(PROBS), torch.ones(1, 1, 6, dtype=torch.long))
    assert loss.item() == pytest.approx(mean_nll([1 - p for p in PROBS[3:]]))


def test_ohem_all_ignored_is_zero_with_grad():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = OHEMCrossEntropy(min_kept=10)(logits, torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("thresh, min_kept, message", [(0.0, 1, "thresh must be in"), (0.7, -1, "min_kept must be")])
def test_ohem_rejects_bad_arguments(thresh, min_kept, message):
    with pytest.raises(ValueError, match=message):
        OHEMCrossEntropy(thresh, min_kept)
