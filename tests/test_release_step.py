"""This codebase's training step pinned to the authors' release's own step (tests/data/release_step_reference.pt).

The fixture was written by scripts/release_step_parity.py, which executed the release's training-loop body from its
ScaleMatch.py beside this codebase's step and found them equal (docs/release.md, "The training step"):

    python scripts/release_step_parity.py RELEASE_DIR --backbone resnet50 --size 33 --case 0.5,1.25 --case 2.0,0.75 \
        --write-fixture tests/data/release_step_reference.pt

Its weights are this codebase's resnet50 network initialised under torch.manual_seed(0) with calibrated BatchNorm
statistics (seeded_model), which this test rebuilds; its batches come from make_batch; its Dropout2d channel masks
are stored. For two iterations from that state, the last warm-up one (pseudo-labels from 1x) with v = 0.5, t = 1.25
and the first after warm-up (from the CIF) with v = 2.0, t = 0.75, it holds the release's pseudo-labels and
confidences, loss terms and total, and per tensor the gradient's norm, the norm of the weight's change and the
BatchNorm statistics' norms.
"""
import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import one_thread
from scripts.release_step_parity import (ITERS_PER_EPOCH, ReleaseSourceError, ScriptedChoice, make_batch,
                                         ours_optimizer, ours_step, release_step_code, seeded_model, step_config)

REFERENCE = Path(__file__).parent / "data" / "release_step_reference.pt"
LOSS_TOLERANCE = 1e-5  # relative; the parity run finds <= 1.1e-7 on this fixture
NORM_TOLERANCE = 1e-3  # relative, per tensor; gradients of the gate's few weights differ most (float64 Bi-WKV there)
# Labels of pixels whose two best classes are within float32 rounding may flip on another CPU's arithmetic.
FLIPPED_PIXELS = 2


@pytest.fixture(scope="module", autouse=True)
def written_on_one_thread():
    """The fixture was written with one thread: more threads sum in another order, and this random network turns
    that rounding into differences beyond the tolerances (2e-4 on a loss term with two threads)."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


# Sum of |tensor| over the seeded network's state, weights and calibrated BatchNorm statistics, as the torch builds
# that wrote and pass the fixture compute it (2.14.1 and 2.15.0 on x86_64 CPUs).
SEEDED_STATE_SUM = 900917.9660479061


@pytest.fixture(scope="module")
def seeded(reference):
    info = reference["info"]
    cfg = step_config(info["backbone"], info["conf_thresh"], [])
    model = seeded_model(cfg, info["size"], info["seed"])
    state_sum = sum(float(t.double().abs().sum()) for t in model.state_dict().values() if t.is_floating_point())
    if abs(state_sum - SEEDED_STATE_SUM) > 1e-9 * SEEDED_STATE_SUM:
        # The initial weights are the same on every torch; the calibration's float rounding is not (torch 2.4.1:
        # 900916.486), and this random network's near-tied logits turn that into hundreds of flipped pseudo-labels.
        pytest.skip(f"this torch {torch.__version__} calibrates the seeded network's BatchNorm to a state of |sum| "
                    f"{state_sum!r}, not the {SEEDED_STATE_SUM!r} the fixture was written from")
    return model, {name: tensor.clone() for name, tensor in model.state_dict().items()}


@contextlib.contextmanager
def recorded_dropout(keep: dict):
    """Every active Dropout2d drops the channels the release's step dropped for an input of the same (N, C)."""
    original = F.dropout2d

    def dropout2d(input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        mask = keep[f"{input.shape[0]}x{input.shape[1]}"]
        scale = (mask.to(input.dtype) / (1 - p)).view(*mask.shape, 1, 1)
        return input.mul_(scale) if inplace else input * scale

    F.dropout2d = dropout2d
    try:
        yield
    finally:
        F.dropout2d = original


def run_step(reference, seeded, step, overrides=()):
    """This codebase's step from the seeded state on the pinned step's batch, (v, t) and dropout masks."""
    info = reference["info"]
    model, start = seeded
    model.load_state_dict(start)
    cfg = step_config(info["backbone"], info["conf_thresh"], list(overrides))
    optimizer = ours_optimizer(model, cfg, step["epoch"] * ITERS_PER_EPOCH + step["index"])
    batch = make_batch(info["size"], 2, info["seed"], step["batch"])
    with recorded_dropout(step["dropout_keep"]):
        out = ours_step(model, optimizer, batch, cfg, step["epoch"], step["index"], ITERS_PER_EPOCH,
                        (step["v"], step["t"]))
    return out, model, optimizer, start


def relative(ours: torch.Tensor, release: torch.Tensor) -> torch.Tensor:
    return (ours.double() - release.double()).abs() / release.double().abs().clamp_min(1e-12)


def test_reference_crosses_warm_up_on_both_sides_of_one(reference):
    assert reference["info"]["commit"].startswith("445cde83")
    steps = reference["steps"]
    assert [(step["v"] > 1, step["epoch"]) for step in steps] == [(False, 9), (True, 10)]
    assert all(0 < value for step in steps for value in step["terms"].values()), "every term must count"


@pytest.mark.parametrize("number", range(2))
def test_step_matches_the_release(reference, seeded, number):
    step = reference["steps"][number]
    info = reference["info"]
    out, model, optimizer, start = run_step(reference, seeded, step)
    where = f"v={step['v']} t={step['t']} epoch {step['epoch']}"
    assert int((out["pseudo_label"] != step["pseudo_label"].long()).sum()) <= FLIPPED_PIXELS, where
    assert int((out["partner_pseudo_label"] != step["partner_pseudo_label"].long()).sum()) <= FLIPPED_PIXELS, where
    assert float((out["confidence"] - step["confidence"]).abs().max()) <= 1e-5, where
    for name, value in step["terms"].items():
        assert relative(out["terms"][name], torch.tensor(value)) <= LOSS_TOLERANCE, f"{name} {where}"
    assert relative(out["total"], torch.tensor(step["total"])) <= LOSS_TOLERANCE, where
    parameters = dict(model.named_parameters())
    names = info["parameter_names"]
    gradient = torch.stack([parameters[name].grad.double().norm() for name in names])
    update = torch.stack([(parameters[name].detach().double() - start[name].double()).norm() for name in names])
    buffers = dict(model.named_buffers())
    statistics = torch.stack([buffers[name].double().norm() for name in info["statistic_names"]])
    for what, ours, release, tensors in (("gradient norm", gradient, step["gradient_norm"], names),
                                         ("weight change norm", update, step["update_norm"], names),
                                         ("BatchNorm statistic norm", statistics, step["statistic_norm"],
                                          info["statistic_names"])):
        worst = int(relative(ours, release).argmax())
        assert relative(ours, release)[worst] <= NORM_TOLERANCE, f"{what} {where}: {tensors[worst]}"
    assert [group["lr"] for group in optimizer.param_groups] == step["lr"], where


@pytest.mark.parametrize("override", ["loss_weights.strong=0.3", "loss_divisor=2.5"])
def test_a_changed_weight_or_divisor_departs_from_the_release(reference, seeded, override):
    step = reference["steps"][1]
    out, *_ = run_step(reference, seeded, step, [override])
    assert relative(out["total"], torch.tensor(step["total"])) > 100 * LOSS_TOLERANCE


FAKE_RELEASE = '''
def main():
    conf_thresh = cfg["conf_thresh"]
    optimizer = "sgd"
    if cfg["criterion"] == "CELoss":
        criterion_l = "ce"
    else:
        criterion_l = "ohem"
    criterion_u = "ce-none"
    total_epochs = cfg["epochs"]
    total_iters = 8 * total_epochs
    unused = 1
    for i, ((img_x, mask_x), (img_u_w, _), _) in enumerate(loader):
        seen = (i, img_x, mask_x, img_u_w, random.choice(cfg["img_scales"]), conf_thresh, criterion_l, total_iters)
'''


def test_release_code_is_main_setup_and_the_loop_body_with_its_own_unpacking():
    setup, body = release_step_code(FAKE_RELEASE, "ScaleMatch.py")
    namespace = {"cfg": {"conf_thresh": 0.95, "criterion": "CELoss", "epochs": 80, "img_scales": [0.5, 2.0]}}
    exec(setup, namespace)
    assert "unused" not in namespace and namespace["total_iters"] == 640
    namespace.update(_batch=(3, (("x", "m"), ("w", "s"), ("partner",))), random=ScriptedChoice([2.0], "release"))
    exec(body, namespace)
    assert namespace["seen"] == (3, "x", "m", "w", 2.0, 0.95, "ce", 640)


def test_release_code_refuses_a_source_without_the_loop_or_the_setup():
    with pytest.raises(ReleaseSourceError, match="loops over enumerate"):
        release_step_code(FAKE_RELEASE.replace("enumerate(loader)", "loader"), "ScaleMatch.py")
    with pytest.raises(ReleaseSourceError, match="no longer assigns criterion_u"):
        release_step_code(FAKE_RELEASE.replace("criterion_u =", "criterion_v ="), "ScaleMatch.py")


def test_scripted_choice_refuses_a_scale_the_side_cannot_draw():
    chooser = ScriptedChoice([2.0, 1.0], "this codebase")
    assert chooser.choice([0.25, 2.0]) == 2.0
    with pytest.raises(ReleaseSourceError, match=r"1.0 is not among its choices \[0.75\]"):
        chooser.choice([0.75])
