"""Benchmark of model.rwkv.bi_wkv: float32 error against the float64 O(T^2) oracle on adversarial inputs, forward +
backward time over T, linearity against a plain exp/cumsum chain, and speed-up over the O(T^2) formula; beside it the
time of the release kernel's emulation (model/wkv_kernel.py, cif_wkv: release_kernel).

    python scripts/benchmark_wkv.py [--batch 4] [--channels 32] [--repeats 7] [--device cpu]

Timings are medians over --repeats runs after one warm-up, with torch's default thread count. They only mean something
on an otherwise idle machine (with a busy core, every parallel op waits for its slowest thread), so each row also
shows the share of CPU time other processes took meanwhile (Linux only).
"""
import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model.rwkv import bi_wkv, bi_wkv_reference  # noqa: E402
from model.wkv_kernel import bi_wkv_release_kernel  # noqa: E402

LENGTHS = (1024, 4096, 16641, 40401)  # 16641 = 129^2 tokens for a 513 crop, 40401 = 201^2 for an 801 crop
LINEARITY = (4096, 16641)
SPEEDUP_LENGTH = 2048
# Rows of the oracle evaluated per input kind (it costs O(rows * T)); the first and last token are always among them.
ORACLE_ROWS = 256
KEY_RANGE = 60.0  # adversarial keys span [-KEY_RANGE, KEY_RANGE]
DECAY_RANGE = 50.0  # adversarial |w * T| up to this
TARGETS = {"error": 1e-5, "time_16641": 0.5, "linearity": 1.3, "speedup": 20.0}


def adversarial_inputs(kind: str, num_tokens: int, channels: int, seed: int) -> tuple[torch.Tensor, ...]:
    """float64 (w, u, k, v) for one batch element: keys ``uniform`` in the key range, ``spikes`` (a few keys at the
    top of the range, the rest at the bottom) or ``ramps`` (the whole range, up or down); w * T spread over
    [-DECAY_RANGE, DECAY_RANGE] over the channels."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, num_tokens, channels)
    if kind == "uniform":
        k = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * KEY_RANGE
    elif kind == "spikes":
        k = torch.full(shape, -KEY_RANGE, dtype=torch.float64)
        spikes = torch.randint(num_tokens, (1, num_tokens // 100 + 1, channels), generator=g)
        k.scatter_(1, spikes, KEY_RANGE)
    else:
        k = torch.linspace(-KEY_RANGE, KEY_RANGE, num_tokens, dtype=torch.float64)[None, :, None].repeat(1, 1, channels)
        k[..., ::2] = k[..., ::2].flip(1)
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.linspace(-DECAY_RANGE, DECAY_RANGE, channels, dtype=torch.float64) / num_tokens
    u = torch.randn(channels, generator=g, dtype=torch.float64)
    return w, u, k, v


def float32_error(num_tokens: int, channels: int, device: str) -> float:
    """Largest |y - oracle| / max|v| of float32 bi_wkv over the adversarial kinds, on sampled oracle rows."""
    worst = 0.0
    for seed, kind in enumerate(("uniform", "spikes", "ramps")):
        w, u, k, v = adversarial_inputs(kind, num_tokens, channels, seed)
        g = torch.Generator().manual_seed(seed)
        rows = torch.cat((torch.tensor([0, num_tokens - 1]), torch.randperm(num_tokens, generator=g)[:ORACLE_ROWS]))
        rows = rows.unique()
        expected = bi_wkv_reference(w, u, k, v, rows)
        y = bi_wkv(*(x.to(device, torch.float32) for x in (w, u, k, v)))[:, rows.to(device)].cpu()
        worst = max(worst, ((y.double() - expected).abs().max() / v.abs().max()).item())
    return worst


def timing_inputs(batch: int, num_tokens: int, channels: int, device: str) -> tuple[torch.Tensor, ...]:
    """float32 (w, u, k, v) as a Vision-RWKV layer sees them (w = decay / T, u = first / T), requiring grad."""
    g = torch.Generator().manual_seed(0)
    decay = -5 + 8 * torch.linspace(0, 1, channels) ** 0.7
    first = torch.randn(channels, generator=g)
    k = torch.randn(batch, num_tokens, channels, generator=g) * 3
    v = torch.randn(batch, num_tokens, channels, generator=g)
    return tuple(x.to(device).requires_grad_() for x in (decay / num_tokens, first / num_tokens, k, v))


class OtherLoad:
    """Share of all CPUs' time spent by other processes between start() and share(), from /proc/stat (Linux)."""

    def start(self) -> None:
        self.begin = self._sample()

    def share(self) -> float | None:
        end = self._sample()
        if self.begin is None or end is None or end[2] <= self.begin[2]:
            return None
        busy, own, total = (e - b for e, b in zip(end, self.begin))
        return max(0.0, busy - own) / total

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(busy, own, total) CPU seconds so far, or None where /proc/stat is missing."""
        try:
            with open("/proc/stat") as stat:
                jiffies = [int(x) for x in stat.readline().split()[1:9]]
        except OSError:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        idle = jiffies[3] + jiffies[4]
        times = os.times()
        return (sum(jiffies) - idle) / hz, times.user + times.system, sum(jiffies) / hz


def median_seconds(run: Callable[[], None], repeats: int, device: str) -> float:
    """Median wall time of ``run`` over ``repeats`` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fast_step(inputs: tuple[torch.Tensor, ...], grad_y: torch.Tensor) -> Callable[[], None]:
    return lambda: bi_wkv(*inputs).backward(grad_y)


def kernel_step(inputs: tuple[torch.Tensor, ...], grad_y: torch.Tensor) -> Callable[[], None]:
    return lambda: bi_wkv_release_kernel(*inputs).backward(grad_y)


def chain_step(inputs: tuple[torch.Tensor, ...], grad_y: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of a plain element-wise exp / cumsum chain on the same shapes: the linearity yardstick."""
    _, _, k, v = inputs

    def run() -> None:
        weight = torch.exp(k)
        (torch.cumsum(weight * v, 1) / torch.cumsum(weight, 1)).backward(grad_y)

    return run


def quadratic_step(inputs: tuple[torch.Tensor, ...], grad_y: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of the O(T^2) formula, one block of rows at a time (rows are independent)."""
    w, u, k, v = inputs
    blocks = torch.arange(k.shape[1], device=k.device).split(128)

    def run() -> None:
        for rows in blocks:
            bi_wkv_reference(w, u, k, v, rows).backward(grad_y[:, rows])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, load average {load}")
    print(f"B={args.batch}, C={args.channels}, float32; error: max|y - oracle| / max|v| over uniform, spike and ramp "
          f"keys in [-{KEY_RANGE:g}, {KEY_RANGE:g}], |w*T| <= {DECAY_RANGE:g}, on {ORACLE_ROWS} + 2 oracle rows\n")

    seconds, chain_seconds = {}, {}
    other_load = OtherLoad()
    print(f"{'T':>7} | {'float32 error':>13} | {'fwd+bwd ms':>10} | {'exp/cumsum chain ms':>19} | "
          f"{'release kernel ms':>17} | {'other CPU use':>13}")
    for num_tokens in LENGTHS:
        error = float32_error(num_tokens, args.channels, args.device)
        inputs = timing_inputs(args.batch, num_tokens, args.channels, args.device)
        grad_y = torch.randn_like(inputs[2])
        other_load.start()
        seconds[num_tokens] = median_seconds(fast_step(inputs, grad_y), args.repeats, args.device)
        chain_seconds[num_tokens] = median_seconds(chain_step(inputs, grad_y), args.repeats, args.device)
        kernel_seconds = median_seconds(kernel_step(inputs, grad_y), args.repeats, args.device)
        share = other_load.share()
        print(f"{num_tokens:>7} | {error:>13.2e} | {seconds[num_tokens] * 1e3:>10.1f} | "
              f"{chain_seconds[num_tokens] * 1e3:>19.1f} | {kernel_seconds * 1e3:>17.1f} | "
              f"{'n/a' if share is None else f'{share:.0%}':>13}")

    short, long = LINEARITY
    linearity = (seconds[long] / seconds[short]) / (chain_seconds[long] / chain_seconds[short])
    inputs = timing_inputs(args.batch, SPEEDUP_LENGTH, args.channels, args.device)
    grad_y = torch.randn_like(inputs[2])
    other_load.start()
    fast = median_seconds(fast_step(inputs, grad_y), args.repeats, args.device)
    quadratic = median_seconds(quadratic_step(inputs, grad_y), 1, args.device)  # seconds per run: one is enough
    share = other_load.share()
    print(f"\nlinearity: time({long}) / time({short}) relative to the chain's: {linearity:.2f} "
          f"(target <= {TARGETS['linearity']})")
    print(f"speed-up over the O(T^2) formula at T={SPEEDUP_LENGTH}: {quadratic / fast:.0f}x "
          f"({quadratic * 1e3:.0f} ms vs {fast * 1e3:.1f} ms; target >= {TARGETS['speedup']:g}x; "
          f"other CPU use {'n/a' if share is None else f'{share:.0%}'})")
    print(f"fwd+bwd at T=16641: {seconds[16641]:.3f} s (target <= {TARGETS['time_16641']} s on a 2-core CPU); "
          f"float32 error target <= {TARGETS['error']:g}")


if __name__ == "__main__":
    main()
