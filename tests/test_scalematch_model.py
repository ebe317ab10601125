import pytest
import torch

from model import build_model

CFG = {"backbone": "tv_resnet18", "nclass": 4, "replace_stride_with_dilation": [False, False, True],
       "dilations": [6, 12, 18], "pretrained": None, "cif": True, "cif_channels": 8, "cif_blocks": 1,
       "cif_gate_channels": 8, "scaled_views_update_bn": False}


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


def _running_stats(net):
    return [buffer.clone() for name, buffer in net.segmenter.named_buffers() if "running" in name]


@pytest.mark.parametrize("scaled_views_update_bn", [False, True])
def test_rescaled_views_leave_bn_running_statistics_alone_unless_asked(scaled_views_update_bn):
    torch.manual_seed(0)
    net = build_model(dict(CFG, scaled_views_update_bn=scaled_views_update_bn)).train()
    images = torch.randn(2, 3, 48, 64)
    start = {name: value.clone() for name, value in net.state_dict().items()}
    torch.manual_seed(1)  # the decoder's dropout draws the same masks in both passes
    net(images)  # the 1x pass alone
    after_1x = _running_stats(net)
    net.load_state_dict(start)
    torch.manual_seed(1)
    with_scales = net(images, image_scales=(0.5, 2.0))
    same = all(torch.equal(a, b) for a, b in zip(after_1x, _running_stats(net)))
    assert same != scaled_views_update_bn
    # Normalisation inside the step uses batch statistics either way: the predictions do not change.
    net_other = build_model(dict(CFG, scaled_views_update_bn=not scaled_views_update_bn)).train()
    net_other.load_state_dict(start)
    torch.manual_seed(1)
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


def test_multiscale_cif_without_extra_scales_is_single_scale(net):
    net.eval()
    images = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(net.predict_multiscale_cif(images, ()), net.predict(images))
        multi = net.predict_multiscale_cif(images, (0.5, 2.0))
    assert multi.shape == (1, 4, 40, 40)
    assert not torch.allclose(multi, net.predict(images))


def test_multiscale_cif_is_the_sequential_gated_fusion(net):
    net.eval()
    images = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        out = net(images, image_scales=(0.5,))
        torch.testing.assert_close(net.predict_multiscale_cif(images, (0.5,)), out["pred_cif"][0],
                                   rtol=1e-4, atol=1e-4)
