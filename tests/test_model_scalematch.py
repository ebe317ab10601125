import copy

import pytest
import torch

from model import build_model
from util.resize import rescale, resize_to

CFG = {"backbone": "tv_resnet10", "head_channels": 32, "nclass": 4,
       "replace_stride_with_dilation": [False, False, True], "dilations": [6, 12, 18], "pretrained": None, "cif": True,
       "cif_channels": 8, "cif_blocks": 1, "cif_gate_channels": 8, "cif_gate": "release", "cif_wkv": "formula",
       "scaled_views_update_bn": True}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model(CFG)


def test_forward_returns_the_requested_branches(net):
    net.train()
    images = torch.randn(2, 3, 48, 64)
    plain = net(images)
    assert plain["pred"].shape == (2, 4, 48, 64)
    assert "pred_fp" not in plain and plain["pred_scaled"] == [] and plain["pred_cif"] == []
    full = net(images, feature_scale=1.25, image_scales=(0.5, 2.0))
    assert full["pred_fp"].shape == (2, 4, 48, 64)
    assert [p.shape for p in full["pred_scaled"]] == [(2, 4, 48, 64)] * 2
    assert [p.shape for p in full["pred_cif"]] == [(2, 4, 48, 64)] * 2
    assert [g.shape for g in full["gate"]] == [(2, 1, 48, 64)] * 2


def test_pred_with_feature_scale_is_decoded_from_the_resized_features(net):
    """pred is the clean half of the perturbed batch decoded from t-resized features (the release's pred_ori)."""
    net.eval()
    images = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        out = net(images, feature_scale=0.75)
        low, high = net.segmenter.encode(images)
        logits, _ = net.segmenter.decode(rescale(low, 0.75), rescale(high, 0.75))
        plain = net(images)["pred"]
    assert logits.shape[-2:] == (9, 12)  # the 12x16 stride-4 grid times 0.75
    torch.testing.assert_close(out["pred"], resize_to(logits, (48, 64)))
    torch.testing.assert_close(out["pred_fp"], out["pred"])  # no dropout in eval mode
    assert not torch.allclose(out["pred"], plain, atol=1e-4)
    net.train()
    with torch.no_grad():
        trained = net(images, feature_scale=0.75)
    assert not torch.allclose(trained["pred_fp"], trained["pred"], atol=1e-3)


def test_scaled_predictions_follow_the_order_of_image_scales(net):
    net.eval()
    images = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        out = net(images, image_scales=(2.0, 0.5))
        for scale, pred in zip((2.0, 0.5), out["pred_scaled"]):
            torch.testing.assert_close(pred, resize_to(net.predict(rescale(images, scale)), (40, 48)))


def test_views_run_lower_resolution_first(net):
    """The release's order, which decides BatchNorm's running statistics: views with v <= 1, the 1x view, then
    v > 1, each group in the order of image_scales."""
    seen = []
    hook = net.backbone.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    net.train()
    try:
        with torch.no_grad():
            net(torch.randn(2, 3, 40, 48), feature_scale=1.25, image_scales=(2.0, 0.75, 1.5, 0.5))
    finally:
        hook.remove()
    # 40 x 0.75 = 30, 48 x 0.75 = 36; 40 x 1.5 = 60, 48 x 1.5 = 72.
    assert seen == [(30, 36), (20, 24), (40, 48), (80, 96), (60, 72)]


def test_view_order_decides_the_running_statistics():
    torch.manual_seed(0)
    net = build_model(CFG).train()
    images = torch.randn(2, 3, 40, 48)
    manual = copy.deepcopy(net)
    with torch.no_grad():
        net(images, image_scales=(2.0, 0.5))
        for view in (rescale(images, 0.5), images, rescale(images, 2.0)):
            manual.segmenter(view)
    for (name, ours), theirs in zip(net.segmenter.named_buffers(), manual.segmenter.buffers()):
        if "running" in name:
            torch.testing.assert_close(ours, theirs)


def _running_stats(net):
    return [buffer.clone() for name, buffer in net.segmenter.named_buffers() if "running" in name]


@pytest.mark.parametrize("scaled_views_update_bn", [False, True])
def test_rescaled_views_leave_bn_running_statistics_alone_unless_asked(scaled_views_update_bn):
    torch.manual_seed(0)
    net = build_model(dict(CFG, scaled_views_update_bn=scaled_views_update_bn)).train()
    images = torch.randn(2, 3, 48, 64)
    start = {name: value.clone() for name, value in net.state_dict().items()}
    net(images)  # the 1x pass alone
    after_1x = _running_stats(net)
    net.load_state_dict(start)
    with_scales = net(images, image_scales=(0.5, 2.0))
    same = all(torch.equal(a, b) for a, b in zip(after_1x, _running_stats(net)))
    assert same != scaled_views_update_bn
    # Normalisation inside the step uses batch statistics either way: the predictions do not change.
    net_other = build_model(dict(CFG, scaled_views_update_bn=not scaled_views_update_bn)).train()
    net_other.load_state_dict(start)
    other = net_other(images, image_scales=(0.5, 2.0))
    assert all(torch.allclose(a, b) for a, b in zip(with_scales["pred_scaled"], other["pred_scaled"]))
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_without_cif_no_fusion_is_computed():
    net = build_model(dict(CFG, cif=False))
    assert net.cif is None
    out = net.train()(torch.randn(2, 3, 32, 32), image_scales=(0.5,))
    assert len(out["pred_scaled"]) == 1 and out["pred_cif"] == [] and out["gate"] == []
    with pytest.raises(ValueError, match="cif: true"):
        net.predict_multiscale_cif(torch.randn(1, 3, 32, 32), (0.5,))


@pytest.mark.parametrize("gate_input", ["release", "paper"])
def test_build_model_passes_the_gate_input(gate_input):
    net = build_model(dict(CFG, cif_gate=gate_input))
    assert net.cif.gate_input == gate_input
    assert net.cif.attention.squeeze.in_channels == 8 + (2 * CFG["head_channels"] if gate_input == "release" else 0)


def _saturate(cif, sign):
    with torch.no_grad():
        cif.gate_head[7].weight.zero_()
        cif.gate_head[7].bias.fill_(1.0)
        cif.gate_head[9].weight.fill_(sign * 40.0 / cif.gate_head[9].in_channels)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_returned_gate_is_the_weight_of_the_1x_prediction(scale):
    """A gate saturated at 1 selects the lower-resolution view: the 1x view for v > 1, the rescaled one for v < 1."""
    torch.manual_seed(0)
    net = build_model(CFG).eval()
    _saturate(net.cif, 1)
    images = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        out = net(images, image_scales=(scale,))
    selected, weight_of_1x = (out["pred"], 1.0) if scale > 1 else (out["pred_scaled"][0], 0.0)
    torch.testing.assert_close(out["pred_cif"][0], selected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["gate"][0], torch.full_like(out["gate"][0], weight_of_1x), rtol=0, atol=1e-6)


def test_multiscale_cif_without_extra_scales_is_single_scale(net):
    net.eval()
    images = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(net.predict_multiscale_cif(images, ()), net.predict(images))
        multi = net.predict_multiscale_cif(images, (0.5, 2.0))
    assert multi.shape == (1, 4, 40, 40)
    assert not torch.allclose(multi, net.predict(images))


@pytest.mark.parametrize("scale", [0.5, 0.75, 2.0])
def test_multiscale_cif_with_one_scale_is_the_training_fusion(net, scale):
    net.eval()
    images = torch.randn(1, 3, 40, 44)
    with torch.no_grad():
        out = net(images, image_scales=(scale,))
        torch.testing.assert_close(net.predict_multiscale_cif(images, (scale,)), out["pred_cif"][0],
                                   rtol=1e-5, atol=1e-5)


def test_multiscale_cif_fuses_the_running_prediction_scale_by_scale(net):
    net.eval()
    images = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        low, high = net.segmenter.encode(images)
        logits, features = net.segmenter.decode(low, high)
        fused = resize_to(logits, (40, 40))
        for scale in (0.5, 2.0):
            view = rescale(images, scale)
            logits_v, features_v = net.segmenter.decode(*net.segmenter.encode(view))
            # At the view's own image size; for v > 1 then resized to the 1x image size (as pred_scaled).
            logits_v = resize_to(logits_v, view.shape[-2:])
            if scale > 1:
                logits_v = resize_to(logits_v, (40, 40))
            fused, _ = net.cif(features, fused, features_v, logits_v, scale)
        torch.testing.assert_close(net.predict_multiscale_cif(images, (0.5, 2.0)), fused, rtol=1e-5, atol=1e-5)
