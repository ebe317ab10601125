import copy
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


@pytest.fixture(scope="module")
def odd_features():
    """Encoder-shaped features on a 17x17 low-level and 5x5 deep grid, where floor and round disagree at t = 0.75."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 64, 17, 17, generator=generator).relu(), torch.randn(2, 512, 5, 5, generator=generator).relu()


def _resized(features, sides):
    return [F.interpolate(x, size=(side, side), mode="bilinear", align_corners=True) for x, side in zip(features, sides)]


def test_encode_returns_c1_and_c4(model, encoded):
    low, high = encoded
    assert low.shape == (2, 64, 16, 16)
    assert high.shape == (2, 512, 4, 4)


def test_decode_shapes(model, encoded):
    model.train()
    with torch.no_grad():
        logits, features = model.decode(*encoded)
    assert logits.shape == (2, NCLASS, 16, 16)
    assert features.shape == (2, 256, 16, 16)


# 17 * 0.75 = 12.75 -> 12 and 5 * 0.75 = 3.75 -> 3 (round would give 13 and 4); 17 * 1.25 = 21.25 -> 21, 5 -> 6.
@pytest.mark.parametrize("feature_scale, side", [(1.0, 17), (0.75, 12), (1.25, 21)])
@pytest.mark.parametrize("train", [False, True])
def test_decode_perturbed_shapes_are_floored(model, odd_features, feature_scale, side, train):
    model.train(train)
    seen = []
    hook = model.aspp.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-2:]))
    with torch.no_grad():
        logits, features, logits_fp = model.decode_perturbed(*odd_features, feature_scale)
    hook.remove()
    assert logits.shape == logits_fp.shape == (2, NCLASS, side, side)
    assert features.shape == (2, 256, side, side)
    assert seen == [(math.floor(5 * feature_scale),) * 2]


def test_logits_are_the_classifier_applied_to_features(model, encoded):
    model.eval()
    with torch.no_grad():
        logits, features = model.decode(*encoded)
        torch.testing.assert_close(logits, model.classifier(features))
        logits, features, _ = model.decode_perturbed(*encoded, 0.75)
        torch.testing.assert_close(logits, model.classifier(features))


def test_decode_perturbed_in_eval_mode_is_decode_of_the_resized_features(model, odd_features):
    model.eval()
    with torch.no_grad():
        logits, features, logits_fp = model.decode_perturbed(*odd_features, 0.75)
        manual_logits, manual_features = model.decode(*_resized(odd_features, (12, 3)))
        unscaled, _ = model.decode(*odd_features)
    torch.testing.assert_close(logits, manual_logits)
    torch.testing.assert_close(features, manual_features)
    # No dropout in eval mode: the "perturbed" half is the clean decoding.
    torch.testing.assert_close(logits_fp, logits)
    assert unscaled.shape[-2:] == (17, 17)


def test_decode_perturbed_in_train_mode_is_one_batch_of_clean_and_dropped_features(model, odd_features):
    model.train()
    resized = _resized(odd_features, (12, 3))
    joint_model, clean_model, perturbed_model = (copy.deepcopy(model) for _ in range(3))
    with torch.no_grad():
        torch.manual_seed(5)
        logits, features, logits_fp = perturbed_model.decode_perturbed(*odd_features, 0.75)
        # The same two Dropout2d draws by hand, then one decoder batch [clean, dropped].
        torch.manual_seed(5)
        dropped = [joint_model.feature_dropout(x) for x in resized]
        joint_logits, joint_features = joint_model.decode(*(torch.cat((x, d)) for x, d in zip(resized, dropped)))
        clean_only, _ = clean_model.decode(*resized)
    torch.testing.assert_close(logits, joint_logits[:2])
    torch.testing.assert_close(features, joint_features[:2])
    torch.testing.assert_close(logits_fp, joint_logits[2:])
    assert not torch.allclose(logits_fp, logits, atol=1e-3)
    # BatchNorm normalises the clean half with statistics of the whole batch, perturbed half included ...
    assert not torch.allclose(logits, clean_only, atol=1e-3)
    # ... and its running statistics take them in too.
    for name, buffer in perturbed_model.named_buffers():
        if "running" in name:
            torch.testing.assert_close(buffer, dict(joint_model.named_buffers())[name])
    assert not all(torch.equal(buffer, dict(clean_model.named_buffers())[name])
                   for name, buffer in perturbed_model.named_buffers() if "running" in name)


def _decoder_inputs(model, features, feature_scale=1.0):
    """What the low-level reduce conv and the ASPP receive during one decode_perturbed."""
    seen = {}
    hooks = [
        model.reduce.register_forward_pre_hook(lambda m, args: seen.__setitem__("low", args[0])),
        model.aspp.register_forward_pre_hook(lambda m, args: seen.__setitem__("high", args[0])),
    ]
    with torch.no_grad():
        model.decode_perturbed(*features, feature_scale)
    for hook in hooks:
        hook.remove()
    return seen["low"], seen["high"]


def test_perturbation_drops_whole_channels_of_the_second_half_in_train_mode(model, encoded):
    model.train()
    torch.manual_seed(3)
    for clean, seen in zip(encoded, _decoder_inputs(model, encoded)):
        assert len(seen) == 2 * len(clean)
        torch.testing.assert_close(seen[:2], clean, rtol=0, atol=0)
        perturbed = seen[2:]
        # Dropout2d(0.5): each channel of each sample is zeroed or doubled.
        live = clean.sum(dim=(2, 3)) > 0
        ratio = perturbed.sum(dim=(2, 3))[live] / clean.sum(dim=(2, 3))[live]
        zeroed = ratio.abs() < 1e-6
        torch.testing.assert_close(ratio[~zeroed], torch.full_like(ratio[~zeroed], 2.0))
        assert 0.3 < zeroed.float().mean().item() < 0.7


def test_perturbation_is_off_in_eval_mode(model, encoded):
    model.eval()
    for clean, seen in zip(encoded, _decoder_inputs(model, encoded)):
        torch.testing.assert_close(seen, torch.cat((clean, clean)), rtol=0, atol=0)


def test_aspp_has_no_dropout(model, encoded):
    assert not any(isinstance(m, torch.nn.Dropout2d) for m in model.aspp.modules())
    model.train()
    high = encoded[1]
    with torch.no_grad():
        torch.manual_seed(0)
        first = model.aspp(high)
        torch.manual_seed(1)
        torch.testing.assert_close(model.aspp(high), first, rtol=0, atol=0)


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


def test_head_keeps_pytorch_default_initialisation():
    """As the release (and UniMatch): no Kaiming-normal head, no std-0.01 classifier. A default Conv2d draws its
    weights and bias from U(-b, b), b = 1 / sqrt(fan_in), so the weights' std is b / sqrt(3)."""
    torch.manual_seed(0)
    head = DeepLabV3Plus(build_backbone("tv_resnet18"), NCLASS)
    for conv in (head.fuse[0][0], head.aspp.branches[1][0], head.aspp.project[0], head.classifier):
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = 1 / math.sqrt(fan_in)
        assert conv.weight.abs().max().item() <= bound
        assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.all(head.fuse[0][1].weight == 1) and torch.all(head.fuse[0][1].bias == 0)
    bias_bound = 1 / math.sqrt(head.classifier.in_channels)
    assert head.classifier.bias.abs().max().item() <= bias_bound
    assert head.classifier.bias.abs().min().item() > 0


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
        "head_channels": 256,
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


def test_head_channels_set_the_aspp_the_decoder_and_the_cif_it_feeds():
    net = build_model(_config(backbone="tv_resnet10", head_channels=16, cif=True, cif_channels=8, cif_blocks=1,
                              cif_gate_channels=8, cif_gate="release", cif_wkv="formula"))
    segmenter = net.segmenter
    assert segmenter.aspp.project[0].out_channels == segmenter.fuse[-1][0].out_channels == 16
    assert segmenter.classifier.in_channels == 16
    assert net.cif.reduce[0].in_channels == 2 * 16  # the concatenated decoder features of the two views
    with torch.no_grad():
        logits, features = segmenter.eval().decode(*segmenter.encode(torch.randn(1, 3, 32, 32)))
    assert features.shape == (1, 16, 8, 8) and logits.shape == (1, 3, 8, 8)


def test_build_model_loads_pretrained_backbone(tmp_path):
    torch.manual_seed(4)
    source = build_backbone("tv_resnet18")
    path = tmp_path / "tv_resnet18.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)

    net = build_model(_config(pretrained=str(path)))

    torch.testing.assert_close(net.backbone.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    torch.testing.assert_close(net.backbone.bn1.running_mean, source.bn1.running_mean)
