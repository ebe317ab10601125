"""The ScaleMatch training step of scalematch.py: branch selection, ablation switches, gradients, learning."""
import random

import pytest
import torch

import scalematch
from model import build_model
from util.config import validate
from util.metrics import MeanIoU

NCLASS = 4


def config(**overrides):
    base = {"dataset": "synthetic", "data_root": "unused", "nclass": NCLASS, "backbone": "tv_resnet18",
            "pretrained": None, "cif_channels": 8, "cif_gate_channels": 8, "conf_thresh": 0.0, "warm_up": 0}
    return validate(dict(base, **overrides), "test")


def batches(seed=0, batch=2, size=32):
    generator = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, NCLASS, (batch, size // 8, size // 8), generator=generator)
    mask = cells.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
    # Images that encode their mask, so the task is learnable in a few steps.
    image = (mask.float().unsqueeze(1).expand(batch, 3, size, size) - 1.5) + 0.1 * torch.randn(
        batch, 3, size, size, generator=generator)
    box = torch.zeros(batch, size, size, dtype=torch.long)
    box[:, 4:12, 4:12] = 1
    ignore = torch.zeros(batch, size, size, dtype=torch.long)
    ignore[:, :, -3:] = 255
    labeled = {"image": image, "mask": mask}
    unlabeled = {"image_weak": image, "image_strong": [image.clone()], "cutmix_box": [box], "ignore_mask": ignore,
                 "mask": mask}
    partner = {"image_weak": image.flip(0), "image_strong": [image.flip(0)], "cutmix_box": [box],
               "ignore_mask": ignore}
    return labeled, unlabeled, partner


def quality_meters():
    return {name: MeanIoU(NCLASS) for name in ("1x", "average", "cif")}


def step_terms(cfg, epoch=0, seed=0):
    torch.manual_seed(seed)
    random.seed(seed)
    model = build_model(cfg).train()
    terms, extras, pictures = scalematch.semi_supervised_losses(
        model, *batches(), cfg, epoch, torch.device("cpu"), scalematch.labeled_criterion(cfg), quality_meters())
    return model, terms, extras, pictures


def total_loss(cfg, terms):
    weights = cfg["loss_weights"]
    return (terms["supervised"] + sum(weights[k] * v for k, v in terms.items() if k != "supervised")) / 2


def test_scalematch_step_gives_every_parameter_a_gradient():
    cfg = config()
    model, terms, extras, pictures = step_terms(cfg)
    assert set(terms) == {"supervised", "strong", "isvc", "fp"}
    assert pictures["gate"] is not None and 0 <= extras["mask_ratio"] <= 1
    total_loss(cfg, terms).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_loss_goes_down_over_a_few_steps():
    cfg = config(lr=0.05, lr_multi=1.0, img_scales=[0.5, 2.0], conf_thresh=0.95)
    torch.manual_seed(0)
    random.seed(0)
    model = build_model(cfg).train()
    optimizer = scalematch.build_optimizer(cfg, model)
    losses = []
    for _ in range(10):
        terms, _, _ = scalematch.semi_supervised_losses(model, *batches(), cfg, 0, torch.device("cpu"),
                                                        scalematch.labeled_criterion(cfg), quality_meters())
        loss = total_loss(cfg, terms)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("overrides, expected_terms, has_cif", [
    ({"isvc": False, "fsvc": False, "cif": False}, {"supervised", "strong", "fp"}, False),
    ({"isvc": False, "fsvc": False, "cif": False, "fp": False}, {"supervised", "strong"}, False),
    ({"cif": False}, {"supervised", "strong", "isvc", "fp"}, False),
    ({"isvc": False}, {"supervised", "strong", "fp"}, True),
    ({}, {"supervised", "strong", "isvc", "fp"}, True),
])
def test_ablation_switches_change_the_terms(overrides, expected_terms, has_cif):
    model, terms, _, pictures = step_terms(config(**overrides))
    assert set(terms) == expected_terms
    assert (model.cif is not None) == has_cif
    assert (pictures["gate"] is not None) == has_cif


def test_supervise_1x_averages_the_fused_and_the_1x_labeled_losses():
    _, fused_only, _, pictures = step_terms(config())
    _, both, _, _ = step_terms(config(supervise_1x=True))
    loss_1x = torch.nn.functional.cross_entropy(pictures["pred_x"], pictures["mask_x"], ignore_index=255)
    assert torch.allclose(both["supervised"], (fused_only["supervised"] + loss_1x) / 2)
    assert not torch.allclose(both["supervised"], fused_only["supervised"])
    assert torch.allclose(both["strong"], fused_only["strong"])  # only L_s changes


def test_draw_scales_rules():
    random.seed(0)
    paired = config()
    for _ in range(50):
        (scale,), feature_scale = scalematch.draw_scales(paired)
        assert scale in paired["img_scales"]
        assert feature_scale <= 1 if scale > 1 else feature_scale >= 1
    assert scalematch.draw_scales(config(mri=True))[0] == (0.25, 0.5, 1.5, 2.0)
    assert scalematch.draw_scales(config(isvc=False, cif=False))[0] == ()
    assert scalematch.draw_scales(config(isvc=False, cif=False, fusion="average"))[0] != ()
    assert scalematch.draw_scales(config(fsvc=False))[1] == 1.0
    assert scalematch.draw_scales(config(fsvc=False, fp=False))[1] is None
    drawn = {scalematch.draw_scales(config(feature_scale_rule="random", img_scales=[2.0]))[1] for _ in range(60)}
    assert drawn == {0.75, 1.0, 1.25}


def test_warm_up_takes_pseudo_labels_from_the_1x_prediction():
    cfg = config(warm_up=3)
    assert [scalematch.pseudo_label_source(cfg, epoch) for epoch in (0, 2, 3, 9)] == ["none", "none", "cif", "cif"]
    assert scalematch.pseudo_label_source(config(warm_up=0, cif=False, fusion="average"), 0) == "average"


def test_fused_probs_of_each_fusion():
    logits = [torch.randn(3, NCLASS, 4, 4) for _ in range(4)]
    out = {"pred": logits[0], "pred_scaled": [logits[1]], "pred_cif": [logits[2], logits[3]]}
    torch.testing.assert_close(scalematch.fused_probs(out, "none", 1), logits[0][1:].softmax(1))
    torch.testing.assert_close(scalematch.fused_probs(out, "average", 1),
                               (logits[0][1:].softmax(1) + logits[1][1:].softmax(1)) / 2)
    torch.testing.assert_close(scalematch.fused_probs(out, "cif", 1),
                               (logits[2][1:].softmax(1) + logits[3][1:].softmax(1)) / 2)


def test_mri_runs_every_scale_of_the_group():
    model, terms, _, _ = step_terms(config(mri=True, img_scales=[0.5, 2.0]))
    assert set(terms) == {"supervised", "strong", "isvc", "fp"}


def test_pseudo_label_quality_is_measured_against_unlabeled_masks():
    cfg = config()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    meters = quality_meters()
    scalematch.semi_supervised_losses(model, *batches(), cfg, 0, torch.device("cpu"),
                                      scalematch.labeled_criterion(cfg), meters)
    for name in ("1x", "average", "cif"):
        assert meters[name].target_area.sum() > 0, name
