import torch

from model.cif import ChannelAttention, CrossScaleInteractionFusion


def make_inputs(batch=2, channels=16, nclass=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features_w = torch.randn(batch, channels, 8, 10, generator=generator)
    features_v = torch.randn(batch, channels, 4, 5, generator=generator)  # a view at v = 0.5
    logits_w = torch.randn(batch, nclass, 8, 10, generator=generator)
    logits_v = torch.randn(batch, nclass, 4, 5, generator=generator)
    return features_w, features_v, logits_w, logits_v


def small_cif():
    torch.manual_seed(0)
    return CrossScaleInteractionFusion(feature_channels=16, reduced_channels=8, rwkv_blocks=1, gate_channels=8)


def test_gate_is_a_probability_map_on_the_logits_grid():
    cif = small_cif()
    fused, gate = cif(*make_inputs())
    assert fused.shape == (2, 4, 8, 10) and gate.shape == (2, 1, 8, 10)
    assert gate.min() > 0 and gate.max() < 1
    assert gate.std() > 0  # spatially varying, not a constant


def test_fusion_is_the_gated_sum_of_both_predictions():
    cif = small_cif()
    features_w, features_v, logits_w, logits_v = make_inputs()
    fused, gate = cif(features_w, features_v, logits_w, logits_v)
    logits_v_up = torch.nn.functional.interpolate(logits_v, size=(8, 10), mode="bilinear", align_corners=True)
    torch.testing.assert_close(fused, gate * logits_w + (1 - gate) * logits_v_up)


def test_saturated_gate_selects_one_prediction():
    cif = small_cif()
    cif.eval()
    features_w, features_v, logits_w, logits_v = make_inputs()
    torch.nn.init.zeros_(cif.to_gate.weight)
    torch.nn.init.constant_(cif.to_gate.bias, 40.0)
    fused, _ = cif(features_w, features_v, logits_w, logits_v)
    torch.testing.assert_close(fused, logits_w)
    torch.nn.init.constant_(cif.to_gate.bias, -40.0)
    fused, _ = cif(features_w, features_v, logits_w, logits_v)
    expected = torch.nn.functional.interpolate(logits_v, size=(8, 10), mode="bilinear", align_corners=True)
    torch.testing.assert_close(fused, expected)


def test_gate_depends_on_both_scales():
    cif = small_cif()
    cif.eval()
    features_w, features_v, _, _ = make_inputs()
    gate = cif.gate(features_w, features_v)
    assert not torch.allclose(gate, cif.gate(features_w, torch.randn_like(features_v)))
    assert not torch.allclose(gate, cif.gate(torch.randn_like(features_w), features_v))


def test_every_cif_parameter_receives_gradient():
    cif = small_cif()
    fused, _ = cif(*make_inputs())
    fused.square().mean().backward()
    for name, parameter in cif.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_cif_under_bf16_autocast_stays_finite():
    cif = small_cif()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, gate = cif(*make_inputs())
    assert torch.isfinite(fused).all() and torch.isfinite(gate).all()


def test_channel_attention_rescales_channels_only():
    attention = ChannelAttention(6, reduction=2)
    x = torch.randn(2, 6, 5, 5)
    y = attention(x)
    ratio = y / x
    torch.testing.assert_close(ratio, ratio[:, :, :1, :1].expand_as(ratio))
