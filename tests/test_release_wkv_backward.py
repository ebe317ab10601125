"""scripts/release_wkv_backward.py: the CUDA-to-Python translation it runs the release's kernels through, and the
reference terms it explains kernel_backward with (the release's kernels themselves need the release: see the script)."""
import sys

import torch

from model.rwkv import EPSILON, bi_wkv_reference

sys.path.insert(0, "scripts")
from release_wkv_backward import DeviceArray, TranslatedKernel, macros, paper_terms_at  # noqa: E402

# A made-up kernel in the release kernels' style: per-chunk prefix sums, chunk totals through shared memory
# between barriers, a reverse loop, integer division, an if on the thread index, and compound assignments.
SCAN_SOURCE = """
#define SPLIT (512 / 64)
template <typename F>
__global__ void kernel_scan(const int B, const int T, const int C,
                            const F *__restrict__ const _x, F *__restrict__ const _y, F *__restrict__ const _total) {
    const int token_id = threadIdx.y;
    const int _T = (T + SPLIT - 1) / SPLIT;
    const int _t = _T * token_id;
    const int _tokenLength = min(T - _t, _T);
    const F *__restrict__ const x = _x + 0;
    F *__restrict__ const y = _y + 0;
    __shared__ F S[1][SPLIT];
    F s = 0, carried = 0;
    for (int i = _t; i < (_t + _tokenLength); i++) {
        s += x[i * C];
        y[i * C] = s;
    }
    __syncthreads();
    S[0][token_id] = s;
    __syncthreads();
    for (int i = token_id - 1; i >= 0; i--) {
        carried = carried + S[0][i];
    }
    for (int i = _t; i < (_t + _tokenLength); i++) {
        y[i * C] += carried;
    }
    if (token_id == SPLIT - 1) {
        _total[0] = carried + s;
    }
}
"""


def test_translated_kernel_runs_each_phase_for_every_thread_before_the_next():
    constants = macros(SCAN_SOURCE, {})
    assert constants == {"SPLIT": 8}
    kernel = TranslatedKernel(SCAN_SOURCE, "kernel_scan", constants)
    assert kernel.parameters == ["B", "T", "C", "_x", "_y", "_total"] and len(kernel.phases) == 3
    x = torch.randn(2, 61, 3, dtype=torch.float64)  # 8 chunks of 8 tokens, the last one 5 long
    y, total = torch.zeros_like(x), torch.zeros(2, 1, 3, dtype=torch.float64)
    kernel(8, B=1, T=61, C=1, _x=DeviceArray(x), _y=DeviceArray(y), _total=DeviceArray(total))
    assert torch.allclose(y, x.cumsum(1), rtol=0, atol=1e-12)
    assert torch.allclose(total[:, 0], x.sum(1), rtol=0, atol=1e-12)


def test_paper_terms_at_the_formulas_own_outputs_are_its_gradient():
    generator = torch.Generator().manual_seed(0)
    k, v, gy = (torch.randn(2, 23, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    w = torch.tensor([-0.3, 0.05, 0.2], dtype=torch.float64)
    u = torch.tensor([0.4, -0.1, 0.0], dtype=torch.float64)
    inputs = [tensor.clone().requires_grad_() for tensor in (w, u, k, v)]
    expected = torch.autograd.grad(bi_wkv_reference(*inputs), inputs, gy)
    # The formula's own y, stabiliser M and denominator relative to exp(M).
    index = torch.arange(23)
    distance = (index[:, None] - index[None, :]).abs()[None, :, :, None]
    exponent = torch.where(distance == 0, (u + k)[:, None], k[:, None] - (distance - 1).double() * w)
    largest = exponent.amax(2)
    denominator = torch.exp(exponent - largest[:, :, None]).sum(2) + EPSILON
    y = bi_wkv_reference(w, u, k, v)
    terms = paper_terms_at(w, u, k, v, gy, y, 1 / denominator, -largest)
    for ours, reference in zip(terms, expected, strict=True):
        assert torch.allclose(ours, reference, rtol=1e-12, atol=1e-14)
