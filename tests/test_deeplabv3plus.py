import math

import pytest
import torch
import torch.nn.functional as F

from model import build_model
from model.backbone import build_backbone
from model.deeplabv3plus import DeepLabV3Plus

NCLASS = 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepLabV3Plus(build_backbone("tv_resnet18"), NCLASS, dilations=(2, 4, 6))


@pytest.fixture(scope="module")
def encoded(model):
    model.eval()
    with torch.no_grad():
        return model.encode(torch.randn(2, 3, 64, 64))


def test_encode_returns_c1_and_c4(model, encoded):
    low, high = encoded
    assert low.shape == (2, 64, 16, 16)
    assert high.shape == (2, 512, 4, 4)


@pytest.mark.parametrize("feature_scale, side", [(1.0, 16), (0.75, 12), (1.25, 20)])
@pytest.mark.parametrize("perturb", [False, True])
def test_decode_shapes(model, encoded, feature_scale, side, perturb):
    model.train()
    with torch.no_grad():
        logits, features = model.decode(*encoded, perturb=perturb, feature_scale=feature_scale)
    assert logits.shape == (2, NCLASS, side, side)
    assert features.shape == (2, 256, side, side)


def test_logits_are_the_classifier_applied_to_features(model, encoded):
    model.eval()
    with torch.no_grad():
        logits, features = model.decode(*encoded)
        torch.testing.assert_close(logits, model.classifier(features))


def test_feature_scale_decodes_the_resized_inputs(model, encoded):
    low, high = encoded
    model.eval()
    with torch.no_grad():
        scaled, _ = model.decode(low, high, feature_scale=0.5)
        resized_low = F.interpolate(low, size=(8, 8), mode="bilinear", align_corners=True)
        resized_high = F.interpolate(high, size=(2, 2), mode="bilinear", align_corners=True)
        manual, _ = model.decode(resized_low, resized_high)
        clean, _ = model.decode(low, high)
    torch.testing.assert_close(scaled, manual)
    assert scaled.shape[-2:] != clean.shape[-2:]


def _decoder_inputs(model, encoded, perturb):
    """What the low-level reduce conv and the ASPP receive during one decode."""
    seen = {}
    hooks = [
        model.reduce.register_forward_pre_hook(lambda m, args: seen.__setitem__("low", args[0])),
        model.aspp.register_forward_pre_hook(lambda m, args: seen.__setitem__("high", args[0])),
    ]
    with torch.no_grad():
        model.decode(*encoded, perturb=perturb)
    for hook in hooks:
        hook.remove()
    return seen["low"], seen["high"]


def test_perturbation_drops_whole_channels_in_train_mode(model, encoded):
    model.train()
    torch.manual_seed(3)
    for clean, perturbed in zip(encoded, _decoder_inputs(model, encoded, perturb=True)):
        # Dropout2d(0.5): each channel of each sample is zeroed or doubled.
        live = clean.sum(dim=(2, 3)) > 0
        ratio = perturbed.sum(dim=(2, 3))[live] / clean.sum(dim=(2, 3))[live]
        zeroed = ratio.abs() < 1e-6
        torch.testing.assert_close(ratio[~zeroed], torch.full_like(ratio[~zeroed], 2.0))
        assert 0.3 < zeroed.float().mean().item() < 0.7


def test_perturbation_is_off_in_eval_mode_and_without_perturb(model, encoded):
    model.eval()
    for clean, seen in zip(encoded, _decoder_inputs(model, encoded, perturb=True)):
        torch.testing.assert_close(seen, clean, rtol=0, atol=0)
    model.train()
    for clean, seen in zip(encoded, _decoder_inputs(model, encoded, perturb=False)):
        torch.testing.assert_close(seen, clean, rtol=0, atol=0)


@pytest.mark.parametrize("size", [(65, 97), (64, 64), (33, 50)])
def test_forward_returns_logits_at_the_input_size(model, size):
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, NCLASS, *size)


def test_forward_trains_end_to_end(model):
    model.train()
    images, masks = torch.randn(2, 3, 33, 41), torch.randint(0, NCLASS, (2, 33, 41))
    model.zero_grad()
    F.cross_entropy(model(images), masks).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_head_parameters_are_separable_from_the_backbone(model):
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    assert len(backbone_ids) + len(head) == len(list(model.parameters()))
    head_by_name = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    assert {id(p) for p in head} == {id(p) for p in head_by_name}
    assert {id(p) for p in model.classifier.parameters()} <= {id(p) for p in head}


def test_aspp_uses_the_given_dilations(model):
    atrous = [m for m in model.aspp.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [m.dilation for m in atrous] == [(2, 2), (4, 4), (6, 6)]
    assert [m.padding for m in atrous] == [(2, 2), (4, 4), (6, 6)]


def test_head_initialisation():
    head = DeepLabV3Plus(build_backbone("tv_resnet18"), NCLASS)
    fuse_conv = head.fuse[0][0]
    expected_std = math.sqrt(2.0 / (fuse_conv.out_channels * 9))
    assert fuse_conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    assert torch.all(head.fuse[0][1].weight == 1) and torch.all(head.fuse[0][1].bias == 0)
    assert torch.all(head.classifier.bias == 0)


def test_channels_follow_the_bottleneck_backbone():
    net = DeepLabV3Plus(build_backbone("tv_resnet50"), NCLASS).eval()
    assert net.reduce[0].in_channels == 256
    assert net.aspp.branches[0][0].in_channels == 2048
    with torch.no_grad():
        logits, features = net.decode(*net.encode(torch.randn(1, 3, 64, 64)))
    assert logits.shape == (1, NCLASS, 16, 16) and features.shape == (1, 256, 16, 16)


def _config(**overrides):
    cfg = {
        "backbone": "tv_resnet18",
        "nclass": 3,
        "replace_stride_with_dilation": [False, True, True],
        "dilations": [6, 12, 18],
        "pretrained": None,
        "cif": False,
        "scaled_views_update_bn": False,
    }
    cfg.update(overrides)
    return cfg


def test_build_model_from_config():
    net = build_model(_config()).segmenter
    assert isinstance(net, DeepLabV3Plus)
    assert net.classifier.out_channels == 3
    assert net.backbone.layer4[0].conv2.dilation == (4, 4)
    net.eval()
    with torch.no_grad():
        assert net.encode(torch.randn(1, 3, 64, 64))[1].shape[-1] == 8


def test_build_model_loads_pretrained_backbone(tmp_path):
    torch.manual_seed(4)
    source = build_backbone("tv_resnet18")
    path = tmp_path / "tv_resnet18.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)

    net = build_model(_config(pretrained=str(path)))

    torch.testing.assert_close(net.backbone.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    torch.testing.assert_close(net.backbone.bn1.running_mean, source.bn1.running_mean)
