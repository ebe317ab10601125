"""Vision-RWKV block in pure PyTorch: bidirectional WKV attention (Bi-WKV), quad-directional token shift, spatial and
channel mixing.

Bi-WKV, for one channel with decay ``w``, bonus ``u``, keys ``k`` and values ``v`` over ``T`` tokens in row-major
order::

    G[t, i] = k[i] - (|t - i| - 1) * w   (i != t),      G[t, t] = u + k[t],      M[t] = max_i G[t, i]
    y[t]    = sum_i exp(G[t, i]) v[i] / (sum_i exp(G[t, i]) + 1e-6 * exp(M[t]))

Besides its own term, ``y[t]`` needs decayed sums over the tokens before ``t`` and after ``t``. Reading the sequence
backwards turns "after" into "before", so both sides are one causal sum, computed for both directions at once::

    side[t] = sum_{i < t} exp(k[i] - (t - i - 1) * w) x[i]        (x = 1 and x = v)

in O(T) by a two-level scan. Chunks of ``L ~ sqrt(T)`` positions take cumulative sums of ``exp(k + j w - base)``
(``j`` the position in the chunk, ``base`` the largest exponent up to the chunk's end); chunk totals reach later chunks
through a (T/L) x (T/L) matrix ``exp(base[n'] - (n - n') L w - R[n])``, normalised per row by its maximum ``R[n]``.
Every sum is finally taken relative to ``exp(M[t])``, with ``M`` computed exactly from running maxima, so no
exponential overflows and the epsilon is relative to the largest term. The offsets cancel in ``y``. The backward pass
is derived by hand and runs the same scan (see ``_BiWKV``); like Vision-RWKV's CUDA kernel it treats ``M`` as a
constant, which only matters through the epsilon.

Range: float32 results stay within ~1e-6 of max|v| for keys spanning [-60, 60] and decays of either sign. A chunk is
scaled by its largest exponent, so terms more than ~57 below it are flushed (~678 in float64); they stay negligible
while no token's own term lies far below its key, i.e. for u >= w - 40 (u >= w - 600 in float64). Vision-RWKV's
u = spatial_first / T is close to 0.
"""

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torchvision.ops import StochasticDepth

from model.wkv_kernel import bi_wkv_release_kernel

# Largest chunk_length * w allowed for a positive decay w. A chunk's sums are scaled by its largest exponent, which can
# exceed the row's largest term by up to 2 * chunk_length * w; this bounds that excess by exp(16).
MAX_CHUNK_DECAY = 8.0
# Exponents relative to a row's largest term are floored at log(finfo.tiny) + this (-57 in float32), leaving room for
# the product with a gradient to stay a normal float.
EXPONENT_FLOOR_MARGIN = 30.0
# Headroom below log(finfo.max) for scale factors, so that a scale times a chunk sum (at most T) cannot overflow.
SCALE_HEADROOM = 24.0
# The epsilon of the Bi-WKV denominator, relative to the row's largest term.
EPSILON = 1e-6
# The Bi-WKV's arithmetic: this module's exact formula, or the release's CUDA kernel (model/wkv_kernel.py).
WKV_ARITHMETICS = ("formula", "release_kernel")


def chunk_length(num_tokens: int, w: torch.Tensor) -> int:
    """Chunk length of the two-level scan: ceil(sqrt(T)), shortened so that chunk_length * max(w) <= MAX_CHUNK_DECAY.

    Shorter chunks make the (T/L)^2 cross-chunk matrix grow; for Vision-RWKV's w = decay / T it takes decay > 8 sqrt(T).
    """
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


def _exp_(exponent: torch.Tensor, max_exponent: float = math.inf) -> torch.Tensor:
    """In-place exp of exponents taken relative to their row's largest term, floored where the result (or it times a
    gradient) would be denormal: those are ~100x slower on x86 and far below float precision of that term anyway."""
    min_exponent = math.log(torch.finfo(exponent.dtype).tiny) + EXPONENT_FLOOR_MARGIN
    return exponent.clamp_(min_exponent, max_exponent).exp_()


def _streams(x: torch.Tensor, fill: float, padded_len: int, shift: int) -> torch.Tensor:
    """(B,T,C) -> (2,B,padded_len,C): stream 0 is the sequence read forwards, stream 1 backwards, both delayed by
    ``shift`` positions and filled with ``fill`` elsewhere.

    With ``shift=1`` stream 0 holds token p-1 at position p and stream 1 holds token T-p, so for a target t at
    stream-0 position t (forward direction) or stream-1 position T-1-t (backward direction) the stream up to and
    including that position holds exactly the tokens on that side of t, the nearest one last.
    """
    batch, num_tokens, channels = x.shape
    out = x.new_empty((2, batch, padded_len, channels))
    out[:, :, :shift] = fill
    out[:, :, num_tokens:] = fill
    out[0, :, shift:num_tokens] = x[:, : num_tokens - shift]
    out[1, :, shift:num_tokens] = x[:, shift:].flip(1)
    return out


def _sides(x: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(2,B,N,L,C) chunked stream results -> (B,T,C) in token order, the two sides added."""
    x = x.flatten(2, 3)
    return x[0, :, :num_tokens] + x[1, :, :num_tokens].flip(1)


def _per_chunk(carried: torch.Tensor) -> list[torch.Tensor]:
    """(2,B,C,N,V) per-chunk values -> V contiguous (2,B,N,1,C) tensors that broadcast over a chunk's positions."""
    return list(carried.permute(4, 0, 1, 3, 2).unsqueeze(4).contiguous().unbind(0))


def _side_sums(
    w: torch.Tensor,
    keys: torch.Tensor,
    values: list[torch.Tensor | None],
    length: int,
    norm: torch.Tensor | None = None,
    own: torch.Tensor | None = None,
    distance: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Decayed sums over the other tokens, both sides at once, relative to a per-token scale ``exp(norm)``.

    For keys and values of shape (B, T, C) and each value x (None meaning ones)::

        sums[t]      = sum_{i != t} exp(keys[i] - (|t - i| - 1) w - norm[t]) x[i]
        distances[t] = the same with each term weighted by (|t - i| - 1)          (only with ``distance``)

    ``norm`` defaults to max(own[t], max_{i != t} keys[i] - (|t - i| - 1) w), computed exactly and returned. No term
    may exceed exp(norm[t]): each chunk's sums are scaled by its largest exponent, and the scan relies on that staying
    within exp(2 * length * w) of every row's largest term (see MAX_CHUNK_DECAY).
    """
    batch, num_tokens, channels = keys.shape
    num_chunks = -(-num_tokens // length)
    padded = num_chunks * length
    chunked = (2, batch, num_chunks, length, channels)
    positions = torch.arange(length, dtype=keys.dtype, device=keys.device)[:, None]

    # Stream position j' of a chunk seen from position j of the same chunk weighs exp(key + j'w - jw).
    jw = positions * w
    exponent = _streams(keys, -math.inf, padded, 1).view(chunked).add_(jw)
    # Chunk n' seen from the start of chunk n > n' lies (n - n') L positions back; other pairs are masked by +inf.
    chunk_ids = torch.arange(num_chunks, device=keys.device)
    lag = chunk_ids[:, None] - chunk_ids[None, :]
    lag_decay = ((lag * length).to(keys.dtype) * w[:, None, None]).masked_fill(lag <= 0, math.inf)
    running_max = _prefix_max(exponent, 3) if norm is None else None
    chunk_max = running_max[:, :, :, -1:] if norm is None else exponent.amax(3, keepdim=True)
    # Largest exponent carried in from earlier chunks, seen from the start of chunk n (lowest float for the first).
    carried_max = (chunk_max[:, :, :, 0].transpose(2, 3)[..., None, :] - lag_decay).amax(-1)
    carried_max = carried_max.clamp_(min=torch.finfo(keys.dtype).min)
    carried_max_chunked = carried_max.transpose(2, 3).unsqueeze(3)
    # Largest exponent anywhere up to the end of chunk n, seen from its start: the scale of chunk n's sums.
    base = torch.maximum(chunk_max, carried_max_chunked)
    if norm is None:
        side_max = (torch.maximum(running_max, carried_max_chunked) - jw).view(2, batch, padded, channels)
        norm = torch.maximum(own, torch.maximum(side_max[0, :, :num_tokens], side_max[1, :, :num_tokens].flip(1)))
    # exp(base - jw - norm) takes chunk-scaled sums to the token's scale; its cap keeps scale * sum finite.
    scale = _exp_(_streams(norm, 0.0, padded, 0).view(chunked).neg_().add_(base).sub_(jw),
                  math.log(torch.finfo(keys.dtype).max) - SCALE_HEADROOM)
    weight = _exp_(exponent.sub_(base))
    # Chunk totals reach chunk n with weight exp(base[n'] - (n - n') L w - carried_max[n]) <= 1, and are then
    # taken to chunk n's scale by exp(carried_max[n] - base[n]) <= 1.
    base = base[:, :, :, 0].transpose(2, 3)
    reach = _exp_((base[..., None, :] - carried_max[..., None]).sub_(lag_decay)).tril_(-1)
    to_base = _exp_(carried_max - base)[..., None]

    prefix = [
        (weight if x is None else weight * _streams(x, 0.0, padded, 1).view(chunked)).cumsum(3) for x in values
    ]
    totals = torch.stack([p[:, :, :, -1] for p in prefix], -1).transpose(2, 3)
    if distance:
        # sum_{j' <= j} (j - j') x[j'] is the sum of the prefix sums before j; at the chunk's end it is the chunk
        # total weighted by the distance to the chunk's end, (L - 1 - j').
        second = [nn.functional.pad(p[:, :, :, :-1], (0, 0, 1, 0)).cumsum(3) for p in prefix]
        end_totals = torch.stack([p[:, :, :, -1] for p in second], -1).transpose(2, 3)
        # Distance from (n', j') to (n, j), minus one, as (n - n' - 1) L + (L - 1 - j') + (j + 1): no cancellation.
        lag_weight = ((lag - 1).clamp(min=0) * length).to(keys.dtype)
        carried_far = ((reach * lag_weight) @ totals + reach @ end_totals) * to_base
    carried = _per_chunk((reach @ totals) * to_base)
    sums = [_sides(scale * p.add_(c), num_tokens) for p, c in zip(prefix, carried)]
    if not distance:
        return sums, [], norm
    distances = [
        _sides(scale * s.add_(c_far).addcmul_(positions + 1, c), num_tokens)
        for s, c_far, c in zip(second, _per_chunk(carried_far), carried)
    ]
    return sums, distances, norm


# Elements of (B, T, C) computed at once on CPU: bounds the memory of one pass, and keeps each temporary below glibc's
# largest mmap threshold (32 MiB), above which every allocation would fault its pages in afresh.
PIECE_ELEMENTS = 1 << 21
# Fewest channels in a piece, so the innermost (channel) axis stays long enough to vectorise.
MIN_PIECE_CHANNELS = 16


def _pieces(x: torch.Tensor) -> list[tuple[slice, slice]]:
    """(batch, channel) slices splitting (B, T, C) into pieces of about PIECE_ELEMENTS on CPU; one piece elsewhere."""
    batch, num_tokens, channels = x.shape
    if x.device.type != "cpu":
        return [(slice(None), slice(None))]
    channel_groups = max(1, min(-(-num_tokens * channels // PIECE_ELEMENTS), channels // MIN_PIECE_CHANNELS))
    group = -(-channels // channel_groups)
    batch_group = -(-batch // -(-batch * num_tokens * group // PIECE_ELEMENTS))
    return [
        (slice(b, b + batch_group), slice(c, c + group))
        for b in range(0, batch, batch_group)
        for c in range(0, channels, group)
    ]


class _BiWKV(torch.autograd.Function):
    """Bi-WKV with a hand-derived backward that runs the same scan: with W[t, i] = exp(G[t, i] - M[t]) and
    q = (dL/dy) / D, D the denominator relative to exp(M),

        dL/dv[i] = sum_t W[t, i] q[t],           dL/dk[i] = sum_t W[t, i] q[t] (v[i] - y[t]),
        dL/du    = sum_t W[t, t] q[t] (v[t] - y[t]),
        dL/dw    = -sum_{t, i != t} W[t, i] q[t] (v[i] - y[t]) (|t - i| - 1),

    i.e. side sums with keys -M and values q and q * y, taken relative to exp(-k) so that every term is at most 1.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        length = chunk_length(k.shape[1], w)
        # largest holds M, den the denominator relative to exp(M): both are needed by backward.
        y, largest, den = torch.empty_like(k), torch.empty_like(k), torch.empty_like(k)
        for bs, cs in _pieces(k):
            kp, vp, own_exponent = k[bs, :, cs], v[bs, :, cs], u[cs] + k[bs, :, cs]
            (den_sides, num_sides), _, largest[bs, :, cs] = _side_sums(w[cs], kp, [None, vp], length, own=own_exponent)
            own = _exp_(own_exponent - largest[bs, :, cs])
            den[bs, :, cs] = den_sides.add_(own).add_(EPSILON)
            y[bs, :, cs] = num_sides.addcmul_(own, vp).div_(den[bs, :, cs])
        ctx.save_for_backward(w, u, k, v, y, largest, den)
        ctx.length = length
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w, u, k, v, y, largest, den = ctx.saved_tensors
        grad_w, grad_u = torch.zeros_like(w), torch.zeros_like(u)
        grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
        for bs, cs in _pieces(k):
            kp, vp, yp, largest_p = k[bs, :, cs], v[bs, :, cs], y[bs, :, cs], largest[bs, :, cs]
            q = grad_y[bs, :, cs] / den[bs, :, cs]
            (z_q, z_qy), (zd_q, zd_qy), _ = _side_sums(w[cs], -largest_p, [q, q * yp], ctx.length, -kp, distance=True)
            own_q = _exp_(u[cs] + kp - largest_p).mul_(q)
            grad_v[bs, :, cs] = z_q + own_q
            grad_k[bs, :, cs] = (z_q * vp).sub_(z_qy).addcmul_(own_q, vp - yp)
            grad_u[cs] += (own_q * (vp - yp)).sum((0, 1))
            grad_w[cs] += (zd_qy - zd_q * vp).sum((0, 1))
        return grad_w, grad_u, grad_k, grad_v


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
        return _BiWKV.apply(w.to(dtype), u.to(dtype), k.to(dtype), v.to(dtype))


# Elements of G a block of rows of the O(T^2) reference may hold at once.
REFERENCE_BLOCK_ELEMENTS = 1 << 25


def bi_wkv_reference(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Bi-WKV straight from the formula in O(T^2), for the token indices ``rows`` (default all): the oracle for tests
    and benchmarks. Blocks of rows bound its memory.

    Like ``bi_wkv`` (and Vision-RWKV's CUDA kernel) it holds M constant under differentiation; M only enters y
    through the epsilon.
    """
    _check_wkv_shapes(w, u, k, v)
    batch, num_tokens, channels = k.shape
    positions = torch.arange(num_tokens, device=k.device)
    rows = positions if rows is None else rows.to(k.device)
    rows_per_block = max(1, REFERENCE_BLOCK_ELEMENTS // (batch * num_tokens * channels))
    out = []
    for block in rows.split(rows_per_block):
        distance = (block[:, None] - positions).abs()[None, :, :, None]
        exponent = torch.where(distance == 0, (u + k)[:, None], k[:, None] - (distance - 1).to(k.dtype) * w)
        weight = torch.exp(exponent - exponent.detach().amax(2, keepdim=True))
        out.append((weight * v[:, None]).sum(2) / (weight.sum(2) + EPSILON))
    return torch.cat(out, 1)


def q_shift(x: torch.Tensor, hw: tuple[int, int], shift_pixel: int = 1, gamma: float = 0.25) -> torch.Tensor:
    """Quad-directional token shift of (B, T, C) tokens on an (H, W) grid, zero-padded at the borders.

    Each of the first four groups of int(gamma * C) channels takes its value from the token ``shift_pixel`` away:
    group 0 from the left, group 1 from the right, group 2 from above, group 3 from below; the rest are unchanged.
    """
    batch, num_tokens, channels = x.shape
    height, width = hw
    if height * width != num_tokens:
        raise ValueError(f"q_shift: hw {tuple(hw)} does not match {num_tokens} tokens")
    if not 0 <= gamma <= 0.25:
        raise ValueError(f"q_shift: gamma must lie in [0, 0.25], got {gamma}")
    if shift_pixel < 0:
        raise ValueError(f"q_shift: shift_pixel must be >= 0, got {shift_pixel}")
    grid = x.transpose(1, 2).reshape(batch, channels, height, width)
    group = int(channels * gamma)
    # Shifting by the whole extent or more leaves only padding.
    dx, dy = min(shift_pixel, width), min(shift_pixel, height)
    out = torch.zeros_like(grid)
    g0, g1, g2, g3 = (slice(i * group, (i + 1) * group) for i in range(4))
    out[:, g0, :, dx:] = grid[:, g0, :, : width - dx]
    out[:, g1, :, : width - dx] = grid[:, g1, :, dx:]
    out[:, g2, dy:, :] = grid[:, g2, : height - dy, :]
    out[:, g3, : height - dy, :] = grid[:, g3, dy:, :]
    out[:, 4 * group :] = grid[:, 4 * group :]
    return out.flatten(2).transpose(1, 2)


def _layer_ratios(layer_id: int, n_layers: int) -> tuple[float, float]:
    """Depth ratios of Vision-RWKV's fancy init: 0 -> 1 over the layers, and 1 -> almost 0."""
    if not 0 <= layer_id < n_layers:
        raise ValueError(f"rwkv: layer_id must lie in [0, n_layers={n_layers}), got {layer_id}")
    rising = layer_id / (n_layers - 1) if n_layers > 1 else 0.0
    return rising, 1.0 - layer_id / n_layers


def _interpolate(x: torch.Tensor, shifted: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """x * ratio + shifted * (1 - ratio), per channel (written out rather than lerp so that dtypes may differ)."""
    return shifted + ratio * (x - shifted)


def _mix_ramp(dim: int) -> torch.Tensor:
    """Channel position c / C, the base of the fancy init's mix ratios."""
    return torch.arange(dim, dtype=torch.float32) / dim


class SpatialMix(nn.Module):
    """Vision-RWKV's attention: shifted-token interpolation, key / value / receptance, Bi-WKV gated by
    sigmoid(receptance). ``wkv`` picks the Bi-WKV's arithmetic (WKV_ARITHMETICS)."""

    def __init__(self, dim: int, layer_id: int = 0, n_layers: int = 1, shift_pixel: int = 1, gamma: float = 0.25,
                 key_norm: bool = False, wkv: str = "formula"):
        super().__init__()
        if wkv not in WKV_ARITHMETICS:
            raise ValueError(f"rwkv: wkv must be one of {WKV_ARITHMETICS}, got {wkv!r}")
        self.wkv = bi_wkv if wkv == "formula" else bi_wkv_release_kernel
        self.shift_pixel = shift_pixel
        self.gamma = gamma
        rising, falling = _layer_ratios(layer_id, n_layers)
        # Decay speeds ramp from -5 to 3 over the channels, more sharply in deeper layers.
        self.spatial_decay = nn.Parameter(-5 + 8 * torch.linspace(0, 1, dim) ** (0.7 + 1.3 * rising))
        # Bonus log(0.3) plus a zigzag of +-0.5 (0, +0.5, -0.5, ...) so neighbouring channels differ.
        zigzag = 0.5 * ((torch.arange(dim) + 1) % 3 - 1).float()
        self.spatial_first = nn.Parameter(math.log(0.3) + zigzag)
        ramp = _mix_ramp(dim)
        self.spatial_mix_k = nn.Parameter(ramp**falling)
        self.spatial_mix_v = nn.Parameter(ramp**falling + 0.3 * rising)
        self.spatial_mix_r = nn.Parameter(ramp ** (0.5 * falling))
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key_norm = nn.LayerNorm(dim) if key_norm else nn.Identity()
        self.output = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        shifted = q_shift(x, hw, self.shift_pixel, self.gamma)
        k = self.key(_interpolate(x, shifted, self.spatial_mix_k))
        v = self.value(_interpolate(x, shifted, self.spatial_mix_v))
        gate = torch.sigmoid(self.receptance(_interpolate(x, shifted, self.spatial_mix_r)))
        num_tokens = x.shape[1]
        # Decay and bonus are per-image quantities, spread over the sequence as Vision-RWKV does.
        mixed = self.wkv(self.spatial_decay / num_tokens, self.spatial_first / num_tokens, k, v)
        return self.output(gate * self.key_norm(mixed))


class ChannelMix(nn.Module):
    """Vision-RWKV's feed-forward: shifted-token interpolation, squared-ReLU MLP gated by sigmoid(receptance)."""

    def __init__(self, dim: int, layer_id: int = 0, n_layers: int = 1, shift_pixel: int = 1, gamma: float = 0.25,
                 hidden_rate: int = 4, key_norm: bool = False):
        super().__init__()
        self.shift_pixel = shift_pixel
        self.gamma = gamma
        _, falling = _layer_ratios(layer_id, n_layers)
        ramp = _mix_ramp(dim)
        self.spatial_mix_k = nn.Parameter(ramp**falling)
        self.spatial_mix_r = nn.Parameter(ramp**falling)
        hidden = hidden_rate * dim
        self.key = nn.Linear(dim, hidden, bias=False)
        self.key_norm = nn.LayerNorm(hidden) if key_norm else nn.Identity()
        self.value = nn.Linear(hidden, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        shifted = q_shift(x, hw, self.shift_pixel, self.gamma)
        hidden = torch.relu(self.key(_interpolate(x, shifted, self.spatial_mix_k))).square()
        gate = torch.sigmoid(self.receptance(_interpolate(x, shifted, self.spatial_mix_r)))
        return gate * self.value(self.key_norm(hidden))


class VRWKVBlock(nn.Module):
    """Pre-norm Vision-RWKV block: x + drop_path(gamma1 * SpatialMix(LN(x))), then the same with ChannelMix.

    ``layer_id`` / ``n_layers`` place the block in its stack for the depth-dependent fancy init; ``norm_eps`` is the
    epsilon of its two LayerNorms; ``wkv`` the arithmetic of its Bi-WKV.
    """

    def __init__(self, dim: int, hidden_rate: int = 4, shift_pixel: int = 1, gamma: float = 0.25,
                 layer_scale: float = 1e-2, drop_path: float = 0.0, layer_id: int = 0, n_layers: int = 1,
                 key_norm: bool = False, norm_eps: float = 1e-5, wkv: str = "formula"):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=norm_eps)
        self.ln2 = nn.LayerNorm(dim, eps=norm_eps)
        self.att = SpatialMix(dim, layer_id, n_layers, shift_pixel, gamma, key_norm, wkv)
        self.ffn = ChannelMix(dim, layer_id, n_layers, shift_pixel, gamma, hidden_rate, key_norm)
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale))
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.gamma1 * self.att(self.ln1(x), hw))
        return x + self.drop_path(self.gamma2 * self.ffn(self.ln2(x), hw))
