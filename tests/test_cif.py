"""model/cif.py: the release's Cross-scale Interaction Fusion (VCFI, Scale-Aware Gate, fusion at image resolution)."""
import pytest
import torch
import torch.nn.functional as F

from model.cif import LAYER_NORM_EPS, CrossScaleInteractionFusion, SqueezeExcitation

FEATURES, NCLASS = 16, 4
GRID, IMAGE = (8, 10), (32, 40)  # the 1x decoder grid (stride 4) and the 1x image


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def make_inputs(scale, batch=2, seed=0):
    """(features_1x, pred_1x, features_v, pred_v, scale) as ScaleMatchNet passes them: pred_v at the rescaled
    image's size when scale < 1, at the 1x image size when scale > 1."""
    generator = torch.Generator().manual_seed(seed)
    features_1x = torch.randn(batch, FEATURES, *GRID, generator=generator)
    pred_1x = torch.randn(batch, NCLASS, *IMAGE, generator=generator)
    features_v = torch.randn(batch, FEATURES, *(int(side * scale) for side in GRID), generator=generator)
    pred_v_size = IMAGE if scale > 1 else tuple(int(side * scale) for side in IMAGE)
    pred_v = torch.randn(batch, NCLASS, *pred_v_size, generator=generator)
    return features_1x, pred_1x, features_v, pred_v, scale


def small_cif(gate_input="release", seed=0, wkv="formula"):
    # se_reduction 2: the default 16 would leave the paper gate's 8 channels a single hidden ReLU unit, often dead.
    torch.manual_seed(seed)
    return CrossScaleInteractionFusion(feature_channels=FEATURES, reduced_channels=8, rwkv_blocks=1, gate_channels=8,
                                       gate_input=gate_input, se_reduction=2, wkv=wkv)


def constant_gate(cif, value):
    """Replace the learned gate by ``value`` on the shared grid (an instance attribute shadows the method)."""
    cif.gate = lambda features_low, features_high: torch.full((len(features_low), 1, *features_low.shape[-2:]), value)


def saturate(cif, sign):
    """Drive the real gate to 1 (sign +1) or 0 (sign -1): the last BN+ReLU outputs 1, the last conv +-40."""
    cif.eval()
    with torch.no_grad():
        cif.gate_head[7].weight.zero_()
        cif.gate_head[7].bias.fill_(1.0)
        cif.gate_head[9].weight.fill_(sign * 40.0 / cif.gate_head[9].in_channels)


@pytest.mark.parametrize("gate_input", ["release", "paper"])
def test_gate_is_a_probability_map_on_the_shared_grid(gate_input):
    cif = small_cif(gate_input)
    features_1x, _, features_v, _, _ = make_inputs(0.5)
    gate = cif.gate(up(features_v, GRID), features_1x)
    assert gate.shape == (2, 1, *GRID)
    assert gate.min() > 0 and gate.max() < 1
    assert gate.std() > 0  # spatially varying, not a constant


def test_gate_needs_both_views_on_one_grid():
    cif = small_cif()
    features_1x, _, features_v, _, _ = make_inputs(0.5)
    with pytest.raises(ValueError, match="share one grid"):
        cif.gate(features_v, features_1x)


@pytest.mark.parametrize("gate_input", ["release", "paper"])
def test_gate_depends_on_both_views_and_their_order(gate_input):
    cif = small_cif(gate_input).eval()
    features_1x, _, features_v, _, _ = make_inputs(2.0)
    low, high = features_1x, up(features_v, GRID)
    with torch.no_grad():
        gate = cif.gate(low, high)
        assert not torch.allclose(gate, cif.gate(low, torch.randn_like(high)))
        assert not torch.allclose(gate, cif.gate(torch.randn_like(low), high))
        assert not torch.allclose(gate, cif.gate(high, low))


def test_release_and_paper_gate_inputs():
    """release: squeeze-excitation over [both views' features, interacted features]; paper: interacted only."""
    release, paper = small_cif("release"), small_cif("paper")
    assert release.attention.squeeze.in_channels == 2 * FEATURES + 8
    assert release.gate_head[0].in_channels == release.gate_head[0].groups == 2 * FEATURES + 8
    assert paper.attention.squeeze.in_channels == 8
    assert paper.gate_head[0].in_channels == paper.gate_head[0].groups == 8
    with pytest.raises(ValueError, match="gate_input"):
        CrossScaleInteractionFusion(FEATURES, 8, gate_input="both")


def test_release_sized_cif_has_the_release_parameter_count():
    cif = CrossScaleInteractionFusion(feature_channels=256, reduced_channels=32, rwkv_blocks=1, gate_channels=128)
    assert sum(p.numel() for p in cif.parameters()) == 145218
    # The release's SE block: 544 = 2 x 256 + 32 channels, squeezed 16x to 34.
    assert (cif.attention.squeeze.in_channels, cif.attention.squeeze.out_channels) == (544, 34)
    assert cif.gate_head[9].bias is None and isinstance(cif.gate_head[10], torch.nn.Sigmoid)


def test_layer_norms_use_the_release_epsilon():
    cif = small_cif()
    norms = [m for m in cif.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 3  # the block's two and the final one
    assert LAYER_NORM_EPS == 1e-6 and all(norm.eps == 1e-6 for norm in norms)


@pytest.mark.parametrize("gate_input", ["release", "paper"])
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_forward_shapes_and_gate_range(gate_input, scale):
    fused, gate_1x = small_cif(gate_input)(*make_inputs(scale))
    assert fused.shape == (2, NCLASS, *IMAGE) and gate_1x.shape == (2, 1, *IMAGE)
    assert gate_1x.min() > 0 and gate_1x.max() < 1 and gate_1x.std() > 0


@pytest.mark.parametrize("gate_input", ["release", "paper"])
def test_constant_gate_weights_the_lower_resolution_view(gate_input):
    g = 0.3
    cif = small_cif(gate_input)
    constant_gate(cif, g)
    # v > 1: the 1x view is the lower-resolution one, g is its weight.
    features_1x, pred_1x, features_v, pred_v, _ = make_inputs(2.0)
    fused, gate_1x = cif(features_1x, pred_1x, features_v, pred_v, 2.0)
    torch.testing.assert_close(fused, g * pred_1x + (1 - g) * pred_v)
    torch.testing.assert_close(gate_1x, torch.full_like(gate_1x, g))
    # v < 1: the rescaled view is the lower-resolution one; the 1x prediction gets 1 - g.
    features_1x, pred_1x, features_v, pred_v, _ = make_inputs(0.5)
    fused, gate_1x = cif(features_1x, pred_1x, features_v, pred_v, 0.5)
    torch.testing.assert_close(fused, g * up(pred_v, IMAGE) + (1 - g) * pred_1x)
    torch.testing.assert_close(gate_1x, torch.full_like(gate_1x, 1 - g))


@pytest.mark.parametrize("gate_input", ["release", "paper"])
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_saturated_gate_selects_the_lower_resolution_prediction(gate_input, scale):
    cif = small_cif(gate_input)
    features_1x, pred_1x, features_v, pred_v, _ = inputs = make_inputs(scale)
    low, high = (pred_1x, pred_v) if scale > 1 else (up(pred_v, IMAGE), pred_1x)
    for sign, selected, weight_of_low in ((1, low, 1.0), (-1, high, 0.0)):
        saturate(cif, sign)
        with torch.no_grad():
            fused, gate_1x = cif(*inputs)
        torch.testing.assert_close(fused, selected, rtol=1e-5, atol=1e-5)
        weight_of_1x = weight_of_low if scale > 1 else 1 - weight_of_low
        torch.testing.assert_close(gate_1x, torch.full_like(gate_1x, weight_of_1x), rtol=0, atol=1e-6)


def test_release_and_paper_blending_agree_exactly_when_the_predictions_share_a_size():
    """v > 1: both predictions are at the 1x image size, so the two fusion rules are the same computation."""
    release, paper = small_cif("release"), small_cif("paper")
    gate = torch.rand(2, 1, *GRID, generator=torch.Generator().manual_seed(3))
    _, pred_low, _, pred_high, _ = make_inputs(2.0)
    fused_release, gate_release = release.blend(gate, pred_low, pred_high)
    fused_paper, gate_paper = paper.blend(gate, pred_low, pred_high)
    assert torch.equal(fused_release, fused_paper) and torch.equal(gate_release, gate_paper)
    torch.testing.assert_close(fused_paper, up(gate, IMAGE) * pred_low + (1 - up(gate, IMAGE)) * pred_high)


def test_release_blending_multiplies_at_the_lower_resolution():
    """v < 1: the release resizes the gate to the low prediction's size, multiplies there and resizes the product;
    the paper's rule resizes the gate and the prediction to the image size first. Both weight pred_high by 1 - s."""
    release, paper = small_cif("release"), small_cif("paper")
    gate = torch.rand(2, 1, *GRID, generator=torch.Generator().manual_seed(3))
    _, pred_high, _, pred_low, _ = make_inputs(0.5)
    small = pred_low.shape[-2:]
    fused, gate_high = release.blend(gate, pred_low, pred_high)
    gate_low = up(gate, small)
    torch.testing.assert_close(gate_high, up(gate_low, IMAGE))
    torch.testing.assert_close(fused, up(gate_low * pred_low, IMAGE) + (1 - up(gate_low, IMAGE)) * pred_high)
    fused_paper, gate_paper = paper.blend(gate, pred_low, pred_high)
    torch.testing.assert_close(fused_paper, up(gate, IMAGE) * up(pred_low, IMAGE) + (1 - up(gate, IMAGE)) * pred_high)
    assert not torch.allclose(fused, fused_paper, atol=1e-4)


@pytest.mark.parametrize("gate_input, wkv", [("release", "formula"), ("paper", "formula"),
                                             ("release", "release_kernel")])
def test_every_cif_parameter_receives_gradient(gate_input, wkv):
    cif = small_cif(gate_input, wkv=wkv)
    fused, _ = cif(*make_inputs(0.5))
    fused.square().mean().backward()
    for name, parameter in cif.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_cif_under_bf16_autocast_stays_finite():
    cif = small_cif()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, gate = cif(*make_inputs(2.0))
    assert torch.isfinite(fused).all() and torch.isfinite(gate).all()


def test_squeeze_excitation_rescales_channels_by_global_weights():
    torch.manual_seed(0)
    attention = SqueezeExcitation(32, reduction=16)
    assert (attention.squeeze.in_channels, attention.squeeze.out_channels) == (32, 2)
    assert attention.squeeze.kernel_size == attention.excite.kernel_size == (1, 1)
    assert attention.squeeze.bias is not None and attention.excite.bias is not None
    x = torch.randn(2, 32, 5, 6)
    y = attention(x)
    ratio = y / x
    # One weight per (sample, channel), in (0, 1), the same at every position.
    torch.testing.assert_close(ratio, ratio[:, :, :1, :1].expand_as(ratio))
    assert ratio.min() > 0 and ratio.max() < 1
    expected = torch.sigmoid(attention.excite(torch.relu(attention.squeeze(x.mean(dim=(2, 3), keepdim=True)))))
    torch.testing.assert_close(ratio[:, :, :1, :1], expected)
    # The weights come from the whole map: changing one position changes the others' outputs.
    changed = x.clone()
    changed[:, :, 0, 0] += 5
    assert not torch.allclose(attention(changed)[:, :, 1:, 1:], y[:, :, 1:, 1:])
    assert SqueezeExcitation(8, reduction=16).squeeze.out_channels == 1


def test_the_release_kernels_arithmetic_moves_the_gate_a_little():
    formula, kernel = small_cif(), small_cif(wkv="release_kernel")
    with torch.no_grad():
        features = make_inputs(2.0)[0]
        gates = [cif.gate(features, features.flip(0)) for cif in (formula, kernel)]
    assert 0 < float((gates[0] - gates[1]).abs().max()) < 1e-3
