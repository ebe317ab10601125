"""The Bi-WKV as the authors' release computes it: Vision-RWKV's CUDA kernel (``wkv_cuda.cu``, ``kernel_forward`` and
``kernel_backward``), emulated in PyTorch step for step; the arithmetic of ``cif_wkv: release_kernel``.

The kernel gives each (image, channel) 32 threads; thread n owns the token chunk [n L, n L + L), L = ceil(T / 32).
Each thread sums its chunk both ways, the threads exchange their sums through shared memory, then each walks its
chunk emitting y. Here every statement of a thread is one tensor operation over (batch, chunk, channel), so the loops
run L and 32 times rather than T, with its running stabilisers and, but for the order of a few final sums (the k,
v gradients' two halves, the w and u gradients over chunks), its order of operations.

What it computes differs from the formula that ``model/rwkv.py`` computes exactly (measured in docs/release.md):
tokens after t and tokens before t's chunk are decayed by |t - i| instead of |t - i| - 1; tokens i of t's own chunk
with chunk start < i <= t keep a residual weight (1 - e^w) e^{w (t - i)} (its sum over the tokens after t is undecayed
by e^w, then the next token is subtracted at e^{k + w}); the 1e-6 of the denominator is relative to its stabiliser. Its backward is not the
derivative of that forward: for u, k and v it evaluates the formula's gradient terms at the kernel's outputs and
denominators; only its w gradient is the forward's derivative.
"""
import torch

# wkv_cuda.cu: TOKEN_SPLIT threads per (image, channel), MIN_VALUE for "no term yet", EPS in the denominator.
TOKEN_SPLIT = 32
MIN_VALUE = -1e38
EPS = 1e-6



class _Chunks:
    """Tokens (B, T, C) as the kernel's 32 chunks (B, 32, L, C), padded after the last token with ``fill`` (keys
    -inf, values and gradients 0: every step of the kernel's loops is then a no-op there)."""

    def __init__(self, num_tokens: int, device: torch.device):
        self.num_tokens = num_tokens
        self.length = -(-num_tokens // TOKEN_SPLIT)
        real = (num_tokens - torch.arange(TOKEN_SPLIT, device=device) * self.length).clamp(0, self.length)
        steps = torch.arange(self.length, device=device)
        # Backwards, step m of chunk n reads its token real[n] - 1 - m, then its last slot (padding where it is short).
        self.backwards = torch.where(steps < real[:, None], real[:, None] - 1 - steps, self.length - 1)

    def split(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        batch, _, channels = x.shape
        padded = x.new_full((batch, TOKEN_SPLIT * self.length, channels), fill)
        padded[:, :self.num_tokens] = x
        return padded.view(batch, TOKEN_SPLIT, self.length, channels)

    def reverse(self, chunked: torch.Tensor) -> torch.Tensor:
        """Each chunk in the order the kernel reads it backwards."""
        return chunked.gather(2, self.backwards[None, :, :, None].expand_as(chunked))

    def unreverse(self, reversed_chunks: torch.Tensor) -> torch.Tensor:
        """The inverse of reverse on the real tokens (the padding steps add into padding)."""
        index = self.backwards[None, :, :, None].expand_as(reversed_chunks)
        return torch.zeros_like(reversed_chunks).scatter_add_(2, index, reversed_chunks)

    def tokens(self, chunked: torch.Tensor) -> torch.Tensor:
        return chunked.flatten(1, 2)[:, :self.num_tokens]


def _push(sums: list, largest, step, weight, exponent, y):
    """One stabilised step of the kernel's pair of running gradient sums: decay both by e^step (as an exponent), then
    add weight e^exponent, times y to the first; returns the pair and its new stabiliser."""
    decayed = largest + step
    new = torch.maximum(decayed, exponent)
    scale, added = torch.exp(decayed - new), weight * torch.exp(exponent - new)
    return [sums[0] * scale + added * y, sums[1] * scale + added], new


def _exchange(values: list, largest, sources, source_largest, lags, takes):
    """The threads' exchange through shared memory: chunk n adds the sums of each chunk i with takes[i][n], in
    ascending i, decayed by lags[i] (w times the tokens between them); sources(i) gives chunk i's sums."""
    for i, (lag, take) in enumerate(zip(lags, takes)):
        exponent = source_largest[:, i:i + 1] - lag
        new = torch.maximum(exponent, largest)
        scale, weight = torch.exp(largest - new), torch.exp(exponent - new)
        values = [torch.where(take, value * scale + source * weight, value)
                  for value, source in zip(values, sources(i))]
        largest = torch.where(take, new, largest)
    return values, largest


class _State:
    """One walk's running sums, each (B, 32, C): a, b over the tokens before the current one (stabiliser o2); c, d
    over the tokens after it (o1), as the kernel keeps them; their w-derivatives when ``derivatives``."""

    def __init__(self, w, k: torch.Tensor, v: torch.Tensor, chunks: _Chunks, derivatives: bool):
        self.w, self.derivatives = w, derivatives
        batch, splits, length, channels = k.shape
        zeros = k.new_zeros(batch, splits, channels)
        lowest = torch.full_like(zeros, MIN_VALUE)
        a, b, c, d, o1, o2 = zeros, zeros, zeros, zeros, lowest, lowest
        dadw, dbdw, dcdw, dddw = zeros, zeros, zeros, zeros
        k_back, v_back = chunks.reverse(k), chunks.reverse(v)
        # Each chunk read forwards (c, d: decay from its start) and backwards (a, b: decay to one past its end).
        for m in range(length):
            exponent = k[:, :, m] - w * m
            no = torch.maximum(o1, exponent)
            e1, e3 = torch.exp(o1 - no), torch.exp(exponent - no)
            if derivatives:
                dcdw, dddw = dcdw * e1 - m * e3 * v[:, :, m], dddw * e1 - m * e3
            c, d, o1 = e1 * c + e3 * v[:, :, m], e1 * d + e3, no
            exponent = k_back[:, :, m] - w * (m + 1)
            no = torch.maximum(o2, exponent)
            e2, e3 = torch.exp(o2 - no), torch.exp(exponent - no)
            if derivatives:
                dadw, dbdw = dadw * e2 - (m + 1) * e3 * v_back[:, :, m], dbdw * e2 - (m + 1) * e3
            a, b, o2 = e2 * a + e3 * v_back[:, :, m], e2 * b + e3, no
        chunk = torch.arange(splits, device=k.device).view(1, splits, 1)
        empty = [zeros] * (4 if derivatives else 2)
        # Chunk n takes the chunks before it (their a, b) and the chunks from itself on (c, d).
        lags = [((chunk - i - 1) * length).clamp(min=0).to(k.dtype) for i in range(splits)]
        left = lambda i: [a[:, i:i + 1], b[:, i:i + 1], dadw[:, i:i + 1] - lags[i] * a[:, i:i + 1],
                          dbdw[:, i:i + 1] - lags[i] * b[:, i:i + 1]][:len(empty)]
        sums, self.o2 = _exchange(empty, lowest, left, o2, [w * lag for lag in lags],
                                  [chunk > i for i in range(splits - 1)])
        self.a, self.b, *left_w = sums
        lags = [((i - chunk) * length).clamp(min=0).to(k.dtype) for i in range(splits)]
        right = lambda i: [c[:, i:i + 1], d[:, i:i + 1], dcdw[:, i:i + 1] - lags[i] * c[:, i:i + 1],
                           dddw[:, i:i + 1] - lags[i] * d[:, i:i + 1]][:len(empty)]
        sums, self.o1 = _exchange(empty, lowest, right, o1, [w * lag for lag in lags],
                                  [chunk <= i for i in range(splits)])
        self.c, self.d, *right_w = sums
        # The walk starts at the chunk's first token: it leaves the sum after it.
        first = torch.exp(k[:, :, 0] - self.o1)
        self.c, self.d = self.c - first * v[:, :, 0], self.d - first
        if derivatives:
            self.dadw, self.dbdw = left_w
            self.dcdw, self.dddw = right_w

    def terms(self, u, k_t, v_t):
        """At the current token t: the numerator and denominator of y relative to e^no, no, and the weights e1, e2,
        e3 of the sums after t, before t and t's own term."""
        own = u + k_t
        no = torch.maximum(torch.maximum(self.o1, own), self.o2)
        e1, e2, e3 = torch.exp(self.o1 - no), torch.exp(self.o2 - no), torch.exp(own - no)
        return self.c * e1 + self.a * e2 + e3 * v_t, self.d * e1 + self.b * e2 + e3 + EPS, no, e1, e2, e3

    def advance(self, k_t, v_t, k_next, v_next) -> None:
        """Token t joins the sums before t + 1; token t + 1 leaves the sums after it, undecayed by one step first."""
        w = self.w
        no = torch.maximum(self.o2 - w, k_t)
        e2, e3 = torch.exp(self.o2 - w - no), torch.exp(k_t - no)
        if self.derivatives:
            self.dadw, self.dbdw = e2 * (self.dadw - self.a), e2 * (self.dbdw - self.b)
        self.a, self.b, self.o2 = e2 * self.a + e3 * v_t, e2 * self.b + e3, no
        no = torch.maximum(self.o1 + w, k_next + w)
        e1, e3 = torch.exp(self.o1 + w - no), torch.exp(k_next + w - no)
        if self.derivatives:
            self.dcdw, self.dddw = e1 * (self.c + self.dcdw) - e3 * v_next, e1 * (self.d + self.dddw) - e3
        self.c, self.d, self.o1 = e1 * self.c - e3 * v_next, e1 * self.d - e3, no


def kernel_forward(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """kernel_forward: y (B, T, C) of decay w, bonus u (C,) and keys, values k, v (B, T, C), in their dtype."""
    chunks = _Chunks(k.shape[1], k.device)
    k, v = chunks.split(k, -torch.inf), chunks.split(v, 0.0)
    state = _State(w, k, v, chunks, derivatives=False)
    y = torch.empty_like(k)
    for m in range(chunks.length):
        numerator, denominator = state.terms(u, k[:, :, m], v[:, :, m])[:2]
        y[:, :, m] = numerator / denominator
        if m + 1 < chunks.length:
            state.advance(k[:, :, m], v[:, :, m], k[:, :, m + 1], v[:, :, m + 1])
    return chunks.tokens(y)


def kernel_backward(w, u, k, v, grad_y) -> tuple[torch.Tensor, ...]:
    """kernel_backward: the gradients (gw, gu) (C,), summed over the batch as the release's WKV.backward does, and
    (gk, gv) (B, T, C)."""
    chunks = _Chunks(k.shape[1], k.device)
    k, v, grad_y = chunks.split(k, -torch.inf), chunks.split(v, 0.0), chunks.split(grad_y, 0.0)
    state = _State(w, k, v, chunks, derivatives=True)
    batch, splits, length, channels = k.shape
    zeros = k.new_zeros(batch, splits, channels)
    lowest = torch.full_like(zeros, MIN_VALUE)
    y, z, zexp, gk, gv = (torch.empty_like(k) for _ in range(5))
    gw, gu, gc, gd, go1 = zeros, zeros, zeros, zeros, lowest
    # The walk again: y, z = 1 / denominator and -no per token, the w and u gradients, each token's own k and v
    # gradient terms, and gc, gd: the chunk's output gradients so far, decayed forwards.
    for m in range(length):
        k_t, v_t, gy = k[:, :, m], v[:, :, m], grad_y[:, :, m]
        numerator, denominator, no, e1, e2, e3 = state.terms(u, k_t, v_t)
        z[:, :, m] = iden = 1 / denominator
        y[:, :, m] = y_t = numerator * iden
        zexp[:, :, m] = -no
        gw = gw + gy * (state.dadw - state.dbdw * y_t) * iden * e2
        gw = gw + gy * (state.dcdw - state.dddw * y_t) * iden * e1
        gu = gu + gy * (v_t - y_t) * e3 * iden
        gk[:, :, m] = gy * iden * (v_t - y_t) * e3
        gv[:, :, m] = gy * iden * e3
        (gc, gd), go1 = _push([gc, gd], go1, -w, gy * iden, -no, y_t)
        if m + 1 < length:
            state.advance(k_t, v_t, k[:, :, m + 1], v[:, :, m + 1])
    # ga, gb: the same over the chunk walked backwards.
    ga, gb, go2 = zeros, zeros, lowest
    for m in reversed(range(length)):
        (ga, gb), go2 = _push([ga, gb], go2, -w, grad_y[:, :, m] * z[:, :, m], zexp[:, :, m], y[:, :, m])
    chunk = torch.arange(splits, device=k.device).view(1, splits, 1)
    lags = [w * ((chunk - i - 1) * length).clamp(min=0).to(k.dtype) for i in range(splits)]
    (gc, gd), go1 = _exchange([zeros, zeros], lowest, lambda i: [gc[:, i:i + 1], gd[:, i:i + 1]], go1, lags,
                              [chunk > i for i in range(splits)])
    lags = [w * ((i - chunk - 1) * length).clamp(min=0).to(k.dtype) for i in range(splits)]
    (ga, gb), go2 = _exchange([zeros, zeros], lowest, lambda i: [ga[:, i:i + 1], gb[:, i:i + 1]], go2, lags,
                              [chunk < i for i in range(splits)])
    # The other tokens' output gradients reach each token from before it (gc, gd, walking forwards) and from after it
    # (ga, gb, walking backwards), decayed one step per token.
    k_back, v_back, gy_back, z_back, zexp_back, y_back = (chunks.reverse(x) for x in (k, v, grad_y, z, zexp, y))
    gk_back, gv_back = torch.empty_like(gk), torch.empty_like(gv)
    for m in range(length):
        before, after = torch.exp(k[:, :, m] + go1), torch.exp(k_back[:, :, m] + go2)
        gk[:, :, m] += before * (gd * v[:, :, m] - gc)
        gv[:, :, m] += before * gd
        gk_back[:, :, m] = after * (gb * v_back[:, :, m] - ga)
        gv_back[:, :, m] = after * gb
        (gc, gd), go1 = _push([gc, gd], go1, -w, grad_y[:, :, m] * z[:, :, m], zexp[:, :, m], y[:, :, m])
        (ga, gb), go2 = _push([ga, gb], go2, -w, gy_back[:, :, m] * z_back[:, :, m], zexp_back[:, :, m],
                              y_back[:, :, m])
    gk, gv = gk + chunks.unreverse(gk_back), gv + chunks.unreverse(gv_back)
    return gw.sum((0, 1)), gu.sum((0, 1)), chunks.tokens(gk), chunks.tokens(gv)


class _KernelBiWKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v):
        ctx.save_for_backward(w, u, k, v)
        return kernel_forward(w, u, k, v)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        return kernel_backward(*ctx.saved_tensors, grad_y.contiguous())


def bi_wkv_release_kernel(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The release's Bi-WKV, forward and backward, in float32 as its kernel (float64 when any input is: for tests)."""
    dtype = torch.float64 if torch.float64 in (w.dtype, u.dtype, k.dtype, v.dtype) else torch.float32
    with torch.autocast(k.device.type, enabled=False):
        return _KernelBiWKV.apply(w.to(dtype), u.to(dtype), k.to(dtype), v.to(dtype))
