"""model/wkv_kernel.py: the release's CUDA Bi-WKV kernel emulated in PyTorch, against the release's own kernels
(translated from its wkv_cuda.cu by scripts/release_wkv_backward.py and pinned in tests/data)."""
from pathlib import Path

import pytest
import torch

import model.wkv_kernel as wkv_kernel
from model.rwkv import SpatialMix, bi_wkv
from model.wkv_kernel import TOKEN_SPLIT, bi_wkv_release_kernel, kernel_backward, kernel_forward

REFERENCE = Path(__file__).parent / "data" / "release_wkv_kernel_reference.pt"


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double() - expected).abs().max() / expected.abs().max())


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


def inputs(batch: int, num_tokens: int, channels: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.linspace(-5, 3, channels, dtype=dtype) / num_tokens
    u = torch.randn(channels, generator=g, dtype=dtype) / num_tokens
    k, v = (torch.randn(batch, num_tokens, channels, generator=g, dtype=dtype) for _ in range(2))
    return w, u, k, v


@pytest.mark.parametrize("case", range(3))
def test_forward_and_backward_are_the_release_kernels_in_float64(reference, case):
    """Short last chunk (37 tokens), full chunks (100), fewer tokens than chunks (7)."""
    c = reference["cases"][case]
    assert relative(kernel_forward(c["w"], c["u"], c["k"], c["v"]), c["y"]) <= 1e-13
    for ours, name in zip(kernel_backward(c["w"], c["u"], c["k"], c["v"], c["gy"]), ("gw", "gu", "gk", "gv")):
        assert relative(ours, c[name]) <= 1e-13, name


@pytest.mark.parametrize("case", range(3))
def test_float32_autograd_follows_the_release_kernels(reference, case):
    c = reference["cases"][case]
    leaves = [c[name].float().requires_grad_() for name in ("w", "u", "k", "v")]
    y = bi_wkv_release_kernel(*leaves)
    assert y.dtype == torch.float32 and relative(y, c["y"]) <= 1e-5
    for grad, name in zip(torch.autograd.grad(y, leaves, c["gy"].float()), ("gw", "gu", "gk", "gv")):
        assert relative(grad, c[name]) <= 1e-4, name


def closed_form(w, u, k, v):
    """The kernel's weights in exact arithmetic without its epsilon, O(T^2): the formula's, except that tokens after
    t and before t's chunk decay by |t - i| and tokens of t's chunk after its start, up to t, add (1 - e^w) e^{w(t-i)}."""
    num_tokens = k.shape[1]
    length = -(-num_tokens // TOKEN_SPLIT)
    t, i = torch.arange(num_tokens)[:, None, None], torch.arange(num_tokens)[None, :, None]
    start = t // length * length
    distance = (t - i).abs().to(k.dtype)
    weight = torch.where(i == t, torch.exp(u), torch.exp(-w * (distance - 1)))
    weight = torch.where((i > t) | (i < start), torch.exp(-w * distance), weight)
    weight = weight + torch.where((i > start) & (i <= t), (1 - torch.exp(w)) * torch.exp(w * (t - i)), 0.0)
    terms = weight[None] * torch.exp(k)[:, None]
    return (terms * v[:, None]).sum(2) / terms.sum(2)


@pytest.mark.parametrize("num_tokens", [7, 37, 100])
def test_the_deviation_from_the_formula_is_the_documented_weighting(monkeypatch, num_tokens):
    monkeypatch.setattr(wkv_kernel, "EPS", 0.0)
    w, u, k, v = inputs(2, num_tokens, 5)
    expected = closed_form(w, u, k, v)
    assert relative(kernel_forward(w, u, k, v), expected) <= 1e-12
    assert relative(bi_wkv(w, u, k, v), expected) > 1e-4


def test_its_w_gradient_is_the_forwards_derivative_and_its_k_gradient_is_not():
    w, u, k, v = inputs(1, 37, 3)
    gy = torch.randn(k.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gw, _, gk, _ = kernel_backward(w, u, k, v, gy)
    loss = lambda w_, k_: float((kernel_forward(w_, u, k_, v) * gy).sum())
    step = 1e-6
    for c in range(3):
        dw = torch.zeros_like(w)
        dw[c] = step
        numeric = (loss(w + dw, k) - loss(w - dw, k)) / (2 * step)
        assert abs(gw[c] - numeric) <= 1e-6 * abs(numeric)
    dk = torch.zeros_like(k)
    dk[0, 20, 0] = step
    numeric = (loss(w, k + dk) - loss(w, k - dk)) / (2 * step)
    assert abs(gk[0, 20, 0] - numeric) > 1e-4 * abs(numeric)


def test_spatial_mix_computes_with_the_chosen_arithmetic():
    torch.manual_seed(0)
    formula, kernel = SpatialMix(8), SpatialMix(8, wkv="release_kernel")
    kernel.load_state_dict(formula.state_dict())
    x = torch.randn(2, 36, 8)
    assert kernel.wkv is bi_wkv_release_kernel and formula.wkv is bi_wkv
    with torch.no_grad():
        difference = float((kernel(x, (6, 6)) - formula(x, (6, 6))).abs().max())
    assert 0 < difference < 1e-2
    with pytest.raises(ValueError, match="wkv must be one of"):
        SpatialMix(8, wkv="cuda")


def test_autocast_computes_in_float32():
    w, u, k, v = inputs(1, 40, 4, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bi_wkv_release_kernel(w, u, k.bfloat16(), v.bfloat16())
    assert y.dtype == torch.float32
    assert relative(y, kernel_forward(*(x.double() for x in (w, u, k.bfloat16().float(), v.bfloat16().float())))) < 1e-5
