import logging
import re

import pytest
import torch

from model.backbone import BACKBONES, PretrainedError, build_backbone, load_pretrained

# Nothing runs beside these tests: torch on two threads where two CPUs are idle (conftest).
pytestmark = pytest.mark.usefixtures("two_threads_if_idle")

# Smallest input on which stride 32 still leaves a 1x1 c4.
IMAGE_SIZE = 32
DILATION_SETTINGS = {
    (False, False, False): (4, 8, 16, 32),
    (False, False, True): (4, 8, 16, 16),
    (False, True, True): (4, 8, 8, 8),
}
CHANNELS = {
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
    "tv_resnet10": (64, 128, 256, 512),
    "tv_resnet18": (64, 128, 256, 512),
    "tv_resnet34": (64, 128, 256, 512),
    "tv_resnet50": (256, 512, 1024, 2048),
    "tv_resnet101": (256, 512, 1024, 2048),
}


def test_every_backbone_name_is_covered():
    assert set(CHANNELS) == set(BACKBONES)


def test_tv_resnet10_has_one_basic_block_a_stage():
    backbone = build_backbone("tv_resnet10")
    assert [len(layer) for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)] == [1] * 4
    assert type(backbone.layer1[0]).__name__ == "BasicBlock"


@pytest.mark.parametrize("dilation", list(DILATION_SETTINGS), ids=str)
@pytest.mark.parametrize("name", list(CHANNELS))
def test_feature_channels_and_strides(name, dilation):
    # Shapes alone: on the meta device, which computes no values (nor initialises resnet101's 44M weights).
    with torch.device("meta"):
        backbone = build_backbone(name, dilation).eval()
        features = backbone(torch.empty(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert all(feature.is_meta for feature in features)

    assert backbone.channels == CHANNELS[name]
    assert [f.shape[1] for f in features] == list(CHANNELS[name])
    strides = tuple(IMAGE_SIZE // f.shape[-1] for f in features)
    assert strides == DILATION_SETTINGS[dilation]
    assert all(f.shape[-2] == f.shape[-1] for f in features)


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_resnet50"])
def test_dilated_layers_compute_the_strided_features_densely(name):
    # A trous: with the same weights, the dilated c4 sampled every 2 (or 4) pixels equals the strided c4.
    torch.manual_seed(0)
    strided = build_backbone(name, (False, False, False)).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = strided(image)[3]
        for dilation, step in (((False, False, True), 2), ((False, True, True), 4)):
            dilated = build_backbone(name, dilation).eval()
            dilated.load_state_dict(strided.state_dict())
            dense = dilated(image)[3]
            torch.testing.assert_close(dense[..., ::step, ::step], reference, rtol=1e-4, atol=1e-4)


def test_basic_block_dilation_rule():
    backbone = build_backbone("tv_resnet18", (False, True, True))
    layer3, layer4 = backbone.layer3, backbone.layer4

    assert layer3[0].conv1.stride == (1, 1) and layer3[0].downsample[0].stride == (1, 1)
    assert layer3[0].conv1.dilation == (1, 1)
    assert [layer3[0].conv2.dilation, layer3[1].conv1.dilation, layer3[1].conv2.dilation] == [(2, 2)] * 3
    assert layer4[0].conv1.dilation == (2, 2) and layer4[0].conv1.padding == (2, 2)
    assert [layer4[0].conv2.dilation, layer4[1].conv1.dilation, layer4[1].conv2.padding] == [(4, 4)] * 3
    assert backbone.layer2[0].conv1.stride == (2, 2)


def test_deep_stem_names_and_shapes():
    backbone = build_backbone("resnet50")
    shapes = {name: tuple(t.shape) for name, t in backbone.state_dict().items()}

    assert shapes["conv1.0.weight"] == (64, 3, 3, 3)
    assert backbone.conv1[0].stride == (2, 2)
    assert shapes["conv1.1.weight"] == shapes["conv1.1.running_var"] == (64,)
    assert isinstance(backbone.conv1[2], torch.nn.ReLU)
    assert shapes["conv1.3.weight"] == (64, 64, 3, 3)
    assert shapes["conv1.4.weight"] == shapes["conv1.4.running_mean"] == (64,)
    assert isinstance(backbone.conv1[5], torch.nn.ReLU)
    assert shapes["conv1.6.weight"] == (128, 64, 3, 3)
    assert shapes["bn1.weight"] == shapes["bn1.running_mean"] == (128,)
    assert shapes["layer1.0.conv1.weight"] == (64, 128, 1, 1)
    assert shapes["layer1.0.downsample.0.weight"] == (256, 128, 1, 1)
    assert not any(name.startswith(("fc.", "avgpool")) for name in shapes)


def test_standard_stem_matches_torchvision_names():
    import torchvision

    backbone = build_backbone("tv_resnet50")
    reference = torchvision.models.resnet50().state_dict()
    ours = backbone.state_dict()

    assert set(reference) - set(ours) == {"fc.weight", "fc.bias"}
    assert all(ours[name].shape == reference[name].shape for name in ours)


def test_rejects_unknown_name_and_bad_dilation():
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'"):
        build_backbone("resnet7")
    with pytest.raises(ValueError, match="3 entries"):
        build_backbone("tv_resnet18", (False, True))


def _saved_weights(tmp_path, name="tv_resnet18", wrap=None, prefix="", extra=None, drop=()):
    torch.manual_seed(1)
    source = build_backbone(name)
    state = {prefix + k: v for k, v in source.state_dict().items() if k not in drop}
    state.update(extra or {})
    path = tmp_path / "weights.pth"
    torch.save({wrap: state, "epoch": 3} if wrap else state, path)
    return source, str(path)


def _assert_same_weights(a, b):
    b_state = b.state_dict()
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(tensor, b_state[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "wrap, prefix", [(None, ""), ("state_dict", ""), ("model", ""), ("state_dict", "module."), (None, "module.")]
)
def test_load_pretrained_unwraps_and_loads_values(tmp_path, caplog, wrap, prefix):
    fc = {prefix + "fc.weight": torch.randn(10, 512), prefix + "fc.bias": torch.randn(10)}
    source, path = _saved_weights(tmp_path, wrap=wrap, prefix=prefix, extra=fc)
    torch.manual_seed(2)
    target = build_backbone("tv_resnet18")
    assert not torch.equal(target.conv1.weight, source.conv1.weight)

    with caplog.at_level(logging.INFO, logger="scalematch"):
        load_pretrained(target, path)

    _assert_same_weights(source, target)
    n_tensors = sum(1 for k in target.state_dict() if not k.endswith("num_batches_tracked"))
    assert f"loaded {n_tensors}/{n_tensors} backbone tensors from {path}" in caplog.text


def test_build_backbone_loads_a_deep_stem_checkpoint(tmp_path):
    source, path = _saved_weights(tmp_path, name="resnet50", wrap="state_dict", prefix="module.")
    target = build_backbone("resnet50", pretrained=path)
    _assert_same_weights(source, target)


# tv_resnet18 has exactly 100 counted tensors, so one missing is the most the 99 % rule accepts.
def test_load_pretrained_tolerates_one_missing_tensor(tmp_path, caplog):
    source, path = _saved_weights(tmp_path, drop=("layer4.1.conv2.weight",))
    target = build_backbone("tv_resnet18")
    before = target.layer4[1].conv2.weight.clone()

    with caplog.at_level(logging.INFO, logger="scalematch"):
        load_pretrained(target, path)

    torch.testing.assert_close(target.layer4[1].conv2.weight, before, rtol=0, atol=0)
    torch.testing.assert_close(target.layer4[1].conv1.weight, source.layer4[1].conv1.weight, rtol=0, atol=0)
    assert "loaded 99/100 backbone tensors" in caplog.text
    assert "layer4.1.conv2.weight" in caplog.text


def test_load_pretrained_rejects_too_many_missing_tensors(tmp_path):
    _, path = _saved_weights(tmp_path, drop=("layer4.1.conv1.weight", "layer4.1.conv2.weight"))
    missing = re.escape("2 missing (e.g. layer4.1.conv1.weight, layer4.1.conv2.weight)")
    with pytest.raises(PretrainedError, match=rf"only 98/100 backbone tensors .*; {missing}$"):
        load_pretrained(build_backbone("tv_resnet18"), path)


def test_load_pretrained_rejects_a_file_for_another_backbone(tmp_path):
    _, path = _saved_weights(tmp_path, name="tv_resnet18")
    target = build_backbone("tv_resnet50")
    before = target.conv1.weight.clone()

    with pytest.raises(PretrainedError) as error:
        load_pretrained(target, path)

    message = str(error.value)
    n_tensors = sum(1 for k in target.state_dict() if not k.endswith("num_batches_tracked"))
    assert "\n" not in message
    assert re.match(rf"{re.escape(path)}: only \d+/{n_tensors} backbone tensors match by name and shape; ", message)
    assert "missing (e.g. layer1.0.conv3.weight, " in message
    assert "mis-shaped (e.g. layer1.0.conv1.weight (64, 64, 3, 3) vs (64, 64, 1, 1), " in message
    assert torch.equal(target.conv1.weight, before)


def test_load_pretrained_names_a_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "resnet101.pth"
    with pytest.raises(PretrainedError, match=f"pretrained weights file not found: {re.escape(str(path))}$"):
        build_backbone("tv_resnet18", pretrained=str(path))


def test_load_pretrained_names_an_unreadable_file(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(PretrainedError, match=f"^{re.escape(str(path))}: cannot read pretrained weights"):
        load_pretrained(build_backbone("tv_resnet18"), str(path))
