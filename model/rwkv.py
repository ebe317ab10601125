"""Vision-RWKV block in pure PyTorch: bidirectional WKV attention, quad-directional token shift, spatial and
channel mixing.

Bi-WKV (Vision-RWKV's attention). For one channel with decay ``w``, bonus ``u``, keys ``k`` and values ``v`` over
``T`` tokens in row-major order::

    G[t, i] = k[i] - (|t - i| - 1) * w   (i != t),      G[t, t] = u + k[t],      M[t] = max_i G[t, i]
    y[t]    = sum_i exp(G[t, i]) v[i] / (sum_i exp(G[t, i]) + 1e-6 * exp(M[t]))

``y[t]`` splits into the tokens before ``t``, the tokens after ``t`` and ``t`` itself. Reading the sequence backwards
turns "after" into "before", so both directions are one decayed causal sum, batched together::

    past[t] = sum_{i < t} exp(k[i] - (t - i - 1) * w) v[i]

computed in O(T) by a two-level scan. Chunks of ``L ~ sqrt(T)`` positions take a cumulative sum of
``exp(k + j*w - m)`` (``j`` the position in the chunk, ``m`` the chunk's maximum exponent); chunk totals reach later
chunks through a small (T/L) x (T/L) matrix ``exp(m[n'] - (n - n') L w - R[n])`` normalised per row by its maximum
``R[n]``. Every term is finally expressed relative to ``exp(M[t])`` (computed exactly), so no exponent overflows and
the epsilon is relative to the largest term. All offsets (``m``, ``R``, ``M``) are detached: they cancel in ``y``, so
gradients stay exact, except the epsilon's dependence on ``M``, treated as a constant as Vision-RWKV's CUDA kernel does.
"""

import math

import torch
from torch import nn
from torchvision.ops import StochasticDepth

# Largest chunk_length * w allowed for a positive decay w: inside a chunk, terms below the chunk's maximum by more than
# float32's range (~87) are flushed, and they can matter up to exp(2 * chunk_length * w) later, so this keeps them
# below exp(-87 + 48) of the row's largest term.
MAX_CHUNK_DECAY = 24.0
# Headroom below log(finfo.max) for scale factors, so that a scale times a chunk sum (at most T) cannot overflow.
SCALE_HEADROOM = 24.0
# The epsilon of the Bi-WKV denominator, relative to the row's largest term.
EPSILON = 1e-6


def chunk_length(num_tokens: int, w: torch.Tensor) -> int:
    """Chunk length of the two-level scan: ceil(sqrt(T)), shortened so that chunk_length * max(w) <= MAX_CHUNK_DECAY."""
    length = math.isqrt(num_tokens - 1) + 1
    w_max = float(w.detach().max().clamp(min=0))
    if w_max * length > MAX_CHUNK_DECAY:
        length = max(1, int(MAX_CHUNK_DECAY / w_max))
    return length


def _prefix_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Running maximum along ``dim``; a loop over that (short) dim is much faster than torch.cummax on CPU."""
    out = x.clone()
    for j in range(1, x.shape[dim]):
        prev, cur = out.select(dim, j - 1), out.select(dim, j)
        torch.maximum(prev, cur, out=cur)
    return out


def _streams(x: torch.Tensor, fill: float, padded_len: int, shift: int) -> torch.Tensor:
    """(B,T,C) -> (2,B,padded_len,C): stream 0 is the sequence read forwards, stream 1 backwards, both delayed by
    ``shift`` positions and filled with ``fill`` elsewhere.

    With ``shift=1`` stream 0 holds token p-1 at position p and stream 1 holds token T-p, so for a target t at
    stream-0 position t (forward direction) or stream-1 position T-1-t (backward direction) the stream up to and
    including that position holds exactly the tokens on that side of t, the nearest one last.
    """
    batch, num_tokens, channels = x.shape
    out = x.new_full((2, batch, padded_len, channels), fill)
    out[0, :, shift:num_tokens] = x[:, : num_tokens - shift]
    out[1, :, shift:num_tokens] = x[:, shift:].flip(1)
    return out


def _bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    batch, num_tokens, channels = k.shape
    length = chunk_length(num_tokens, w)
    num_chunks = -(-num_tokens // length)
    padded = num_chunks * length
    lowest = torch.finfo(k.dtype).min
    max_scale = math.log(torch.finfo(k.dtype).max) - SCALE_HEADROOM
    chunked = (2, batch, num_chunks, length, channels)

    ks = _streams(k, -math.inf, padded, 1).view(chunked)
    vs = _streams(v, 0.0, padded, 1).view(chunked)
    # Decay from the chunk start to position j; the weight of stream position j' seen from j is exp(k + j'w - jw).
    jw = torch.arange(length, dtype=k.dtype, device=k.device)[:, None] * w
    exponent = ks + jw
    with torch.no_grad():
        running_max = _prefix_max(exponent, 3)
        # Clamped so that an all-padding chunk (T == 1) gives exp(-inf - lowest) = 0 instead of NaN.
        chunk_max = running_max[:, :, :, -1:].clamp(min=lowest)
    weight = torch.exp(exponent - chunk_max)
    sum_e = weight.cumsum(3)
    sum_ev = (weight * vs).cumsum(3)

    # Chunk n' seen from the start of chunk n: exp(chunk_max[n'] - (n - n') L w) * chunk total, for n' < n only.
    chunk_ids = torch.arange(num_chunks, device=k.device)
    lag = chunk_ids[:, None] - chunk_ids[None, :]
    lag_decay = (lag * length).to(k.dtype) * w[:, None, None]
    cross_exponent = (chunk_max[:, :, :, 0].transpose(2, 3)[..., None, :] - lag_decay).masked_fill(lag <= 0, -math.inf)
    with torch.no_grad():
        # Rows without earlier chunks (the first) get a finite offset, so their weights are exp(-inf) = 0.
        row_max = cross_exponent.amax(-1, keepdim=True).clamp(min=lowest)
    totals = torch.stack((sum_e[:, :, :, -1], sum_ev[:, :, :, -1]), -1).transpose(2, 3)
    carried = (torch.exp(cross_exponent - row_max) @ totals).transpose(2, 3).unsqueeze(3)
    row_max = row_max.squeeze(-1).transpose(2, 3).unsqueeze(3)

    with torch.no_grad():
        # Exact largest exponent of each row: over the stream (chunk prefix or earlier chunks) and the token itself.
        side_max = (torch.maximum(running_max, row_max) - jw).view(2, batch, padded, channels)[:, :, :num_tokens]
        row_top = torch.maximum(u + k, torch.maximum(side_max[0], side_max[1].flip(1)))
        top = _streams(row_top, 0.0, padded, 0).view(chunked)
    # Scales of both partial sums relative to exp(M[t]); the cap only bites where float32 has flushed those sums anyway.
    to_top = -(jw + top)
    in_chunk_scale = torch.exp((to_top + chunk_max).clamp(max=max_scale))
    carried_scale = torch.exp((to_top + row_max).clamp(max=max_scale))
    num = (in_chunk_scale * sum_ev + carried_scale * carried[..., 1]).view(2, batch, padded, channels)
    den = (in_chunk_scale * sum_e + carried_scale * carried[..., 0]).view(2, batch, padded, channels)

    own = torch.exp(u + k - row_top)
    num = num[0, :, :num_tokens] + num[1, :, :num_tokens].flip(1) + own * v
    den = den[0, :, :num_tokens] + den[1, :, :num_tokens].flip(1) + own + EPSILON
    return num / den


def _check_wkv_shapes(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dim() != 3 or v.shape != k.shape or w.shape != (k.shape[2],) or u.shape != w.shape:
        raise ValueError(
            f"bi_wkv: expected w, u of shape (C,) and k, v of shape (B, T, C), got w {tuple(w.shape)}, "
            f"u {tuple(u.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional WKV of keys/values (B, T, C) with per-channel decay w and bonus u (C,); O(T) time and memory.

    Computes in float64 when any input is float64, else in float32 (also under autocast), and returns that dtype.
    """
    _check_wkv_shapes(w, u, k, v)
    dtype = torch.float64 if torch.float64 in (w.dtype, u.dtype, k.dtype, v.dtype) else torch.float32
    with torch.autocast(k.device.type, enabled=False):
        return _bi_wkv(w.to(dtype), u.to(dtype), k.to(dtype), v.to(dtype))


# Elements of G a block of rows of the O(T^2) reference may hold at once.
REFERENCE_BLOCK_ELEMENTS = 1 << 25


def bi_wkv_reference(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bi-WKV straight from the formula in O(T^2) (blocks of rows bound the memory): the oracle for tests and benchmarks."""
    _check_wkv_shapes(w, u, k, v)
    batch, num_tokens, channels = k.shape
    positions = torch.arange(num_tokens, device=k.device)
    rows_per_block = max(1, REFERENCE_BLOCK_ELEMENTS // (batch * num_tokens * channels))
    rows = []
    for start in range(0, num_tokens, rows_per_block):
        distance = (positions[start : start + rows_per_block, None] - positions).abs()[None, :, :, None]
        exponent = torch.where(distance == 0, (u + k)[:, None], k[:, None] - (distance - 1).to(k.dtype) * w)
        weight = torch.exp(exponent - exponent.amax(2, keepdim=True))
        rows.append((weight * v[:, None]).sum(2) / (weight.sum(2) + EPSILON))
    return torch.cat(rows, 1)
