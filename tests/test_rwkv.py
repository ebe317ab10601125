import math

import pytest
import torch

import model.rwkv as rwkv
from model.rwkv import ChannelMix, SpatialMix, VRWKVBlock, bi_wkv, bi_wkv_reference, chunk_length, q_shift

# Error bounds relative to max|v| (forward) or to the largest gradient entry (backward).
FORWARD_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
GRAD_TOLERANCE = {"w": 1e-4, "u": 2e-5, "k": 2e-5, "v": 2e-5}
KINDS = ("normal", "uniform", "spikes", "ramps")


def make_inputs(kind: str, batch: int, num_tokens: int, channels: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """float64 (w, u, k, v): ``normal`` keys ~ N(0, 2^2) with Vision-RWKV-sized decays, or adversarial keys
    (``uniform`` in [-60, 60], ``spikes`` of +60 among -60, ``ramps`` over [-60, 60]) with |w * T| up to 50."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, num_tokens, channels)
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    u = torch.empty(channels, dtype=torch.float64).uniform_(-5, 5, generator=g)
    w = torch.linspace(-50, 50, channels, dtype=torch.float64) / num_tokens
    if kind == "normal":
        k = torch.randn(shape, generator=g, dtype=torch.float64) * 2
        w = torch.linspace(-5, 3, channels, dtype=torch.float64) / num_tokens
        u = u / num_tokens
    elif kind == "uniform":
        k = torch.empty(shape, dtype=torch.float64).uniform_(-60, 60, generator=g)
    elif kind == "spikes":
        k = torch.full(shape, -60.0, dtype=torch.float64)
        k.scatter_(1, torch.randint(num_tokens, (batch, num_tokens // 10 + 1, channels), generator=g), 60.0)
    else:
        k = torch.linspace(-60, 60, num_tokens, dtype=torch.float64)[None, :, None].repeat(batch, 1, channels)
        k[..., 1::2] = k[..., 1::2].flip(1)
    return w, u, k, v


def relative_error(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / scale.abs().max()).item()


def gradients(fn, inputs: tuple[torch.Tensor, ...], grad_y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    leaves = [x.detach().requires_grad_() for x in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, grad_y.to(leaves[2].dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_tokens, channels", [(1, 3), (2, 1), (7, 4), (64, 8), (130, 5), (257, 16)])
def test_bi_wkv_matches_quadratic_oracle(num_tokens, channels, kind, dtype):
    w, u, k, v = make_inputs(kind, 2, num_tokens, channels, seed=num_tokens)
    expected = bi_wkv_reference(w, u, k, v)
    y = bi_wkv(*(x.to(dtype) for x in (w, u, k, v)))
    assert y.dtype == dtype and y.shape == k.shape
    assert relative_error(y, expected, v) <= FORWARD_TOLERANCE[dtype]


def test_oracle_is_the_formula_for_one_row():
    # y[t] for t = 2 of 4 tokens, written out term by term.
    w, u = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    k = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64).view(1, 4, 1)
    v = torch.tensor([2.0, -1.0, 4.0, 0.5], dtype=torch.float64).view(1, 4, 1)
    exponents = [1.0 - 1 * 0.3, -2.0 - 0 * 0.3, 0.5 + 0.5, 3.0 - 0 * 0.3]
    weights = [math.exp(g) for g in exponents]
    expected = sum(e * x for e, x in zip(weights, [2.0, -1.0, 4.0, 0.5])) / (sum(weights) + 1e-6 * math.exp(3.0))
    assert bi_wkv_reference(w, u, k, v)[0, 2, 0].item() == pytest.approx(expected, rel=1e-14)
    assert bi_wkv(w, u, k, v)[0, 2, 0].item() == pytest.approx(expected, rel=1e-14)


def test_large_decays_shorten_chunks_and_stay_exact():
    num_tokens, channels = 300, 4
    w, u, k, v = make_inputs("uniform", 2, num_tokens, channels)
    w = torch.tensor([-5.0, -0.5, 2.0, 20.0], dtype=torch.float64)
    assert chunk_length(num_tokens, w) == 1 and chunk_length(num_tokens, w[:3]) == 4
    assert chunk_length(num_tokens, w[:2]) == math.isqrt(num_tokens - 1) + 1
    expected = bi_wkv_reference(w, u, k, v)
    assert relative_error(bi_wkv(w, u, k, v), expected, v) <= FORWARD_TOLERANCE[torch.float64]
    assert relative_error(bi_wkv(*(x.float() for x in (w, u, k, v))), expected, v) <= FORWARD_TOLERANCE[torch.float32]


def test_pieces_give_the_same_values_and_gradients(monkeypatch):
    inputs = make_inputs("uniform", 3, 50, 6)
    grad_y = torch.randn(3, 50, 6, dtype=torch.float64)
    expected_y = bi_wkv(*inputs)
    expected_grads = gradients(bi_wkv, inputs, grad_y)
    monkeypatch.setattr(rwkv, "PIECE_ELEMENTS", 100)
    monkeypatch.setattr(rwkv, "MIN_PIECE_CHANNELS", 2)
    assert len(rwkv._pieces(inputs[2])) == 9
    torch.testing.assert_close(bi_wkv(*inputs), expected_y, rtol=0, atol=1e-14)
    for actual, expected in zip(gradients(bi_wkv, inputs, grad_y), expected_grads):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bonus", [-35.0, 60.0])
def test_own_term_far_from_its_key_within_the_documented_range(bonus, dtype):
    # A key spike whose own term is scaled by exp(bonus): with u = -35 its neighbours dominate its own output.
    w, u = torch.tensor([0.0, 0.02], dtype=torch.float64), torch.full((2,), bonus, dtype=torch.float64)
    k = torch.full((1, 9, 2), -60.0, dtype=torch.float64)
    k[0, 4] = 60.0
    v = torch.randn(1, 9, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = bi_wkv_reference(w, u, k, v)
    assert relative_error(bi_wkv(*(x.to(dtype) for x in (w, u, k, v))), expected, v) <= FORWARD_TOLERANCE[dtype]


@pytest.mark.parametrize("num_tokens", [1, 2, 5, 17])
def test_gradcheck_float64(num_tokens):
    w, u, k, v = make_inputs("normal", 2, num_tokens, 3, seed=num_tokens)
    w = w * num_tokens / 4  # decays of a few per token, so that a 17-token sequence uses several chunks
    inputs = tuple(x.requires_grad_() for x in (w, u, k, v))
    assert torch.autograd.gradcheck(bi_wkv, inputs)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_gradients_match_oracle(kind):
    inputs = make_inputs(kind, 2, 300, 6, seed=1)
    grad_y = torch.randn(2, 300, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = gradients(bi_wkv_reference, inputs, grad_y)
    for name, actual, reference in zip("wukv", gradients(bi_wkv, tuple(x.float() for x in inputs), grad_y), expected):
        assert actual.dtype == torch.float32
        assert relative_error(actual, reference, reference) <= GRAD_TOLERANCE[name], name


@pytest.mark.parametrize("kind", KINDS)
def test_float64_gradients_match_oracle(kind):
    inputs = make_inputs(kind, 2, 120, 5, seed=3)
    grad_y = torch.randn(2, 120, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for actual, reference in zip(gradients(bi_wkv, inputs, grad_y), gradients(bi_wkv_reference, inputs, grad_y)):
        assert relative_error(actual, reference, reference) <= 1e-11


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shift", [-45.0, 30.0])
def test_adding_a_constant_to_the_keys_leaves_y_unchanged(shift, dtype):
    w, u, k, v = (x.to(dtype) for x in make_inputs("normal", 2, 200, 4))
    tolerance = FORWARD_TOLERANCE[dtype]
    assert relative_error(bi_wkv(w, u, k + shift, v), bi_wkv(w, u, k, v).double(), v) <= tolerance


def test_autocast_bfloat16_computes_and_returns_float32():
    w, u, k, v = (x.float() for x in make_inputs("uniform", 2, 100, 4))
    expected = bi_wkv(w, u, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bi_wkv(w, u, k, v)
        y_from_bf16 = bi_wkv(w, u, k.bfloat16(), v.bfloat16())
    assert y.dtype == torch.float32 and y_from_bf16.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(y_from_bf16, bi_wkv(w, u, k.bfloat16().float(), v.bfloat16().float()), rtol=0, atol=0)


def test_bi_wkv_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"bi_wkv: expected w, u of shape \(C,\)"):
        bi_wkv(torch.zeros(3), torch.zeros(3), torch.zeros(1, 5, 4), torch.zeros(1, 5, 4))


def as_tokens(grid: torch.Tensor) -> torch.Tensor:
    return grid.flatten(2).transpose(1, 2)


def test_q_shift_on_a_hand_checked_grid():
    grid = torch.arange(36.0).view(1, 4, 3, 3)  # channel c holds 9c .. 9c + 8, row-major
    expected = torch.tensor(
        [
            [[0, 0, 1], [0, 3, 4], [0, 6, 7]],  # channel 0: from the left neighbour
            [[10, 11, 0], [13, 14, 0], [16, 17, 0]],  # channel 1: from the right neighbour
            [[0, 0, 0], [18, 19, 20], [21, 22, 23]],  # channel 2: from the neighbour above
            [[30, 31, 32], [33, 34, 35], [0, 0, 0]],  # channel 3: from the neighbour below
        ],
        dtype=torch.float32,
    ).view(1, 4, 3, 3)
    assert torch.equal(q_shift(as_tokens(grid), (3, 3)), as_tokens(expected))


def test_q_shift_leaves_the_rest_unchanged_and_pads_large_shifts():
    grid = torch.arange(1.0, 1 + 2 * 9 * 3 * 4).view(2, 9, 3, 4)
    out = q_shift(as_tokens(grid), (3, 4), shift_pixel=2).transpose(1, 2).reshape(2, 9, 3, 4)
    assert torch.equal(out[:, 8], grid[:, 8])  # 9 channels, groups of int(9 / 4) = 2: channel 8 is untouched
    assert torch.equal(out[:, 0:2, :, 2:], grid[:, 0:2, :, :2]) and not out[:, 0:2, :, :2].any()
    assert torch.equal(out[:, 6:8, :1], grid[:, 6:8, 2:]) and not out[:, 6:8, 1:].any()
    shifted_out = q_shift(as_tokens(grid), (3, 4), shift_pixel=5).transpose(1, 2).reshape(2, 9, 3, 4)
    assert not shifted_out[:, :8].any() and torch.equal(shifted_out[:, 8], grid[:, 8])
    with pytest.raises(ValueError, match=r"q_shift: hw \(3, 3\) does not match 12 tokens"):
        q_shift(as_tokens(grid), (3, 3))


def test_fancy_init_follows_vision_rwkv():
    attention = SpatialMix(8, layer_id=2, n_layers=5)
    ramp = torch.arange(8) / 8
    assert attention.spatial_decay[0].item() == pytest.approx(-5)
    assert attention.spatial_decay[-1].item() == pytest.approx(3)
    # Decay exponent 0.7 + 1.3 * (2 / 4) = 1.35 for the middle layer of five.
    torch.testing.assert_close(attention.spatial_decay.data, -5 + 8 * torch.linspace(0, 1, 8) ** 1.35)
    zigzag = torch.tensor([0, 0.5, -0.5, 0, 0.5, -0.5, 0, 0.5])
    torch.testing.assert_close(attention.spatial_first.data, math.log(0.3) + zigzag)
    torch.testing.assert_close(attention.spatial_mix_k.data, ramp**0.6)
    torch.testing.assert_close(attention.spatial_mix_v.data, ramp**0.6 + 0.15)
    torch.testing.assert_close(attention.spatial_mix_r.data, ramp**0.3)
    feed_forward = ChannelMix(8, layer_id=0, n_layers=1)
    torch.testing.assert_close(feed_forward.spatial_mix_k.data, ramp)
    assert feed_forward.key.out_features == 32


def test_block_output_shape_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    block = VRWKVBlock(16, layer_id=1, n_layers=3, key_norm=True)
    x = torch.randn(2, 12, 16, requires_grad=True)
    y = block(x, (3, 4))
    assert y.shape == x.shape and y.dtype == torch.float32
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [name for name, p in block.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert torch.equal(block.gamma1.data, torch.full((16,), 1e-2)) and torch.equal(block.gamma2.data, block.gamma1.data)


def test_block_runs_under_bfloat16_autocast_and_rejects_wrong_grid():
    block = VRWKVBlock(8)
    x = torch.randn(1, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(x, (2, 3)).shape == x.shape
    with pytest.raises(ValueError, match="does not match 6 tokens"):
        block(x, (2, 2))
