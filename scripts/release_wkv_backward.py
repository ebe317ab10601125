"""The Bi-WKV gradient three ways: this codebase's hand-derived backward, autograd of the paper's formula, and the
release's CUDA kernel_backward, the last run from the release's own source.

    python scripts/release_wkv_backward.py RELEASE_DIR [--lengths 289 16641] [--channels 32 8] [--markdown out.md]
    python scripts/release_wkv_backward.py RELEASE_DIR --write-fixture tests/data/release_wkv_kernel_reference.pt

RELEASE_DIR is the release's git directory (the `fetch` tool's mirror of github:lvliang6879/ScaleMatch) or a
checkout. Its wkv_cuda.cu is read at run time and its two kernels are translated statement by statement into Python
(see `translate_kernel`): one CUDA thread per token chunk, run phase by phase between __syncthreads(), every
statement vectorised over batch and channel (each (b, c) is an independent thread in the kernel), in float64. The
translated kernel_forward is checked against ../shared/tools/release_model.py's hand emulation (--tool) first, so
that a mistranslation shows.

Inputs: the decay and bonus of the release CIF's Vision-RWKV block (tests/data/release_cif_reference.pt, divided by T
as the release passes them), k, v and the output gradient standard normal, batch 1. --channels gives the channel
count per length (every 32 / C-th of the block's 32 channels, spread over its decays): at T = 16641 the O(T^2)
paper formula's autograd and the autograd through the kernel's forward loop take ~30 s per channel each on one core
(10 minutes in all with the defaults). Each gradient is compared as max|a - b| / max|b|; with T <= 1024 also against
the paper formula's gradient terms evaluated at kernel_forward's own outputs and denominators (paper_terms_at).
It also runs this codebase's emulation of the kernel (model/wkv_kernel.py, the cif_wkv: release_kernel setting)
beside the translation: forward and backward, float64 and float32. --write-fixture instead pins the translated
kernels' outputs on small random inputs (the lengths of FIXTURE_CASES) for tests/test_wkv_kernel.py.
"""
import argparse
import builtins
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model.rwkv import bi_wkv, bi_wkv_reference  # noqa: E402
from model.wkv_kernel import bi_wkv_release_kernel  # noqa: E402
from scripts.release_parity import DEFAULT_TOOL, load_tool  # noqa: E402

CIF_REFERENCE = ROOT / "tests" / "data" / "release_cif_reference.pt"
KERNEL_SOURCE = "ext/rwkv/cls_backbones/backbones/cuda/wkv_cuda.cu"
OP_SOURCE = "ext/rwkv/cls_backbones/backbones/vrwkv.py"  # compiles the kernel with -DTmax={T_MAX}
DECAY, BONUS = "RWKV_layers.layers.0.attn.spatial_decay", "RWKV_layers.layers.0.attn.spatial_first"
# (batch, tokens, channels) of the pinned cases: a short last chunk, full chunks, fewer tokens than chunks.
FIXTURE_CASES = ((2, 37, 4), (1, 100, 3), (2, 7, 2))
# Longest sequence for paper_terms_at (T^2 x channels float64 temporaries).
TERMS_MAX_TOKENS = 1024
# Rows of the paper formula differentiated at once: bounds its autograd graph to ~0.5 GiB.
PAPER_BLOCK_ELEMENTS = 1 << 22


def read_release_file(release_dir: str, path: str) -> str:
    if (Path(release_dir) / path).is_file():
        return (Path(release_dir) / path).read_text()
    result = subprocess.run(["git", f"--git-dir={release_dir}", "show", f"HEAD:{path}"], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {release_dir}: cannot read {path} ({result.stderr.strip()})")
    return result.stdout


# --- translation of the CUDA source ------------------------------------------------------------------------------

TYPE_PREFIX = re.compile(r"^(?:__shared__\s+)?(?:const\s+)?(int|F)\b\s*(\*\s*__restrict__\s*(?:const\s+)?)?")
FOR_HEADER = re.compile(r"^int\s+(\w+)\s*=\s*(.+?);\s*\1\s*(<|<=|>=|>)\s*(.+?);\s*\1(\+\+|--)$")


def _split_top_level(text: str, separator: str) -> list[str]:
    """``text`` split at the ``separator`` characters that are outside brackets."""
    parts, depth, current = [], 0, ""
    for character in text:
        depth += character in "([" and 1 or 0
        depth -= character in ")]" and 1 or 0
        if character == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += character
    return [*parts, current]


def _expression(text: str, integer: bool) -> str:
    """A C expression as Python: integer division where the C operands are ints."""
    text = text.strip()
    return re.sub(r"(?<![/*])/(?![/*])", "//", text) if integer else text


def _matching(text: str, start: int, opening: str, closing: str) -> int:
    depth = 0
    for position in range(start, len(text)):
        depth += text[position] == opening
        depth -= text[position] == closing
        if depth == 0:
            return position
    raise SystemExit(f"error: {KERNEL_SOURCE}: unbalanced {opening}{closing}")


def _statements(body: str, indent: int, out: list[tuple[int, str]]) -> None:
    """Append (indent, Python line) for the C statements of ``body``; a top-level __syncthreads() becomes the line
    "SYNC" (a phase boundary)."""
    position = 0
    while True:
        while position < len(body) and body[position].isspace():
            position += 1
        if position >= len(body):
            return
        head = re.match(r"(for|if)\s*\(", body[position:])
        if head:
            close = _matching(body, position + head.end() - 1, "(", ")")
            condition = body[position + head.end():close].strip()
            open_brace = body.index("{", close)
            end = _matching(body, open_brace, "{", "}")
            if head.group(1) == "if":
                out.append((indent, f"if {_expression(condition, True)}:"))
            else:
                loop = FOR_HEADER.match(condition)
                if loop is None:
                    raise SystemExit(f"error: {KERNEL_SOURCE}: loop header not understood: for ({condition})")
                name, first, comparison, bound, step = loop.groups()
                first, bound = _expression(first, True), _expression(bound, True)
                stop = {"<": bound, "<=": f"({bound}) + 1", ">": bound, ">=": f"({bound}) - 1"}[comparison]
                out.append((indent, f"for {name} in range({first}, {stop}{'' if step == '++' else ', -1'}):"))
            _statements(body[open_brace + 1:end], indent + 1, out)
            position = end + 1
            continue
        end = body.index(";", position)
        _statement(" ".join(body[position:end].split()), indent, out)
        position = end + 1


def _statement(text: str, indent: int, out: list[tuple[int, str]]) -> None:
    if text == "__syncthreads()":
        if indent != 0:
            raise SystemExit(f"error: {KERNEL_SOURCE}: __syncthreads() inside a block is not emulated")
        out.append((0, "SYNC"))
        return
    declared = TYPE_PREFIX.match(text)
    if declared:
        integer = declared.group(1) == "int"
        shared = text.startswith("__shared__")
        for declarator in _split_top_level(text[declared.end():], ","):
            declarator = declarator.strip()
            array = re.match(r"^(\w+)((?:\[[^\]]+\])+)$", declarator)
            if array:
                dimensions = [_expression(d, True) for d in re.findall(r"\[([^\]]+)\]", array.group(2))]
                # Thread-local arrays are dictionaries; shared ones nested lists, created once for all threads.
                value = "{}" if not shared else "[[None] * (" + dimensions[1] + ") for _ in range(" + \
                    dimensions[0] + ")]"
                out.append((indent, f"{'SHARED ' if shared else ''}{array.group(1)} = {value}"))
            else:
                name, expression = declarator.split("=", 1)
                out.append((indent, f"{name.strip()} = {_expression(expression, integer)}"))
        return
    compound = re.match(r"^(.+?)\s*([-+*/])=\s*(.+)$", text)
    if compound:
        # Never in place: a local may share its tensor with a stored value.
        target, operator, expression = compound.groups()
        out.append((indent, f"{target} = {target} {operator} ({expression})"))
        return
    out.append((indent, text))


def translate_kernel(source: str, name: str) -> tuple[list[str], list[str], list[str]]:
    """The kernel ``name`` of ``source`` as (parameter names, shared-memory declarations, phases): each phase is
    Python source for one thread, run for every thread before the next phase starts (the __syncthreads() barriers)."""
    match = re.search(r"__global__\s+void\s+" + name + r"\s*\(", source)
    if match is None:
        raise SystemExit(f"error: {KERNEL_SOURCE}: no kernel {name}")
    close = _matching(source, match.end() - 1, "(", ")")
    parameters = [re.findall(r"\w+", p)[-1] for p in _split_top_level(source[match.end():close], ",")]
    open_brace = source.index("{", close)
    body = source[open_brace + 1:_matching(source, open_brace, "{", "}")]
    lines: list[tuple[int, str]] = []
    _statements(body, 0, lines)
    shared = [line.removeprefix("SHARED ") for _, line in lines if line.startswith("SHARED ")]
    phases, current = [], []
    for indent, line in lines:
        if line == "SYNC":
            phases.append(current)
            current = []
        elif not line.startswith("SHARED "):
            current.append("    " * indent + line)
    phases.append(current)
    return parameters, shared, ["\n".join(phase) for phase in phases if phase]


def macros(source: str, defined: dict) -> dict:
    """The #define constants of ``source`` (comments removed), after those ``defined`` on the compiler's command
    line."""
    values = dict(defined)
    for name, expression in re.findall(r"^#define\s+(\w+)\s+(.+)$", source, re.M):
        expression = expression.strip()
        integer = re.search(r"\d[.eE]", expression) is None
        values[name] = eval(_expression(expression, integer), {}, dict(values))
    return values


class DeviceArray:
    """A (B, T, C) tensor seen as the kernel sees one thread's pointer: element t * C of token t, with C = 1 here
    because every (b, c) thread runs at once, vectorised. Reads past the end give NaN (the CUDA read there is out of
    bounds): if such a value reached an output, the output would show it."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __add__(self, offset: int) -> "DeviceArray":
        if offset != 0:
            raise ValueError("only the offset 0 of one vectorised thread is emulated")
        return self

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.tensor.shape[1]:
            return torch.full_like(self.tensor[:, 0], torch.nan)
        return self.tensor[:, index]

    def __setitem__(self, index: int, value) -> None:
        self.tensor[:, index] = value


def _maximum(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.maximum(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    return builtins.max(a, b)


def _exp(x):
    return torch.exp(torch.as_tensor(x, dtype=torch.float64))


def _minimum(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.minimum(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    return builtins.min(a, b)


class TranslatedKernel:
    """A __global__ kernel of a CUDA source (comments removed), runnable as one block of token threads (threadIdx.y)
    whose channel threads (threadIdx.x = 0, blockDim.x = 1) are vectorised: pass C = 1 and DeviceArray arguments."""

    def __init__(self, source: str, name: str, constants: dict):
        self.name, self.constants = name, constants
        self.parameters, self.shared, phases = translate_kernel(source, name)
        self.phases = [compile(phase, f"{KERNEL_SOURCE}:{name}:phase{index}", "exec")
                       for index, phase in enumerate(phases)]

    def __call__(self, token_threads: int, **arguments) -> list[dict]:
        """Runs every phase for every thread before the next phase; returns each thread's local variables."""
        if set(self.parameters) != set(arguments):
            raise SystemExit(f"error: {self.name} takes {self.parameters}, emulated with {sorted(arguments)}")
        common = dict(self.constants, exp=_exp, max=_maximum, min=_minimum, blockIdx=types.SimpleNamespace(x=0),
                      blockDim=types.SimpleNamespace(x=1), **arguments)
        for declaration in self.shared:
            exec(declaration, common)
        threads = [{"threadIdx": types.SimpleNamespace(x=0, y=token)} for token in range(token_threads)]
        for phase in self.phases:
            for local in threads:
                exec(phase, common, local)
        return threads


class ReleaseKernels:
    """kernel_forward and kernel_backward of the release's wkv_cuda.cu, translated at run time."""

    def __init__(self, release_dir: str):
        source = re.sub(r"//[^\n]*", "", read_release_file(release_dir, KERNEL_SOURCE))
        tmax = re.search(r"^T_MAX\s*=\s*(\d+)", read_release_file(release_dir, OP_SOURCE), re.M)
        if tmax is None:
            raise SystemExit(f"error: {OP_SOURCE}: no T_MAX")
        self.constants = macros(source, {"Tmax": int(tmax.group(1))})
        self.kernels = {name: TranslatedKernel(source, name, self.constants)
                        for name in ("kernel_forward", "kernel_backward")}

    def _launch(self, name: str, arguments: dict) -> list[dict]:
        return self.kernels[name](self.constants["TOKEN_SPLIT"], **arguments)

    def forward(self, w, u, k, v) -> torch.Tensor:
        batch, length, _ = k.shape
        y = torch.zeros_like(k)
        self._launch("kernel_forward", dict(B=batch, T=length, C=1, _w=DeviceArray(w[None, None]),
                                            _u=DeviceArray(u[None, None]), _k=DeviceArray(k), _v=DeviceArray(v),
                                            _y=DeviceArray(y)))
        return y

    def backward(self, w, u, k, v, gy) -> tuple[tuple[torch.Tensor, ...], dict]:
        """(gw, gu, gk, gv) as the release's WKV.backward returns them (gw and gu summed over the batch), and the
        kernel's per-token y, z (1 / denominator) and zexp (minus the stabiliser), each (B, T, C)."""
        batch, length, channels = k.shape
        gw, gu = k.new_zeros(batch, 1, channels), k.new_zeros(batch, 1, channels)
        gk, gv = torch.zeros_like(k), torch.zeros_like(k)
        threads = self._launch("kernel_backward", dict(B=batch, T=length, C=1, _w=DeviceArray(w[None, None]),
                                             _u=DeviceArray(u[None, None]), _k=DeviceArray(k), _v=DeviceArray(v),
                                             _gy=DeviceArray(gy), _gw=DeviceArray(gw), _gu=DeviceArray(gu),
                                             _gk=DeviceArray(gk), _gv=DeviceArray(gv)))
        chunk = -(-length // self.constants["TOKEN_SPLIT"])
        internals = {name: torch.stack([threads[t // chunk][name][t % chunk] for t in range(length)], 1)
                     for name in ("y", "z", "zexp")}
        return (gw.sum((0, 1)), gu.sum((0, 1)), gk, gv), internals


# --- the gradients ----------------------------------------------------------------------------------------------

def paper_gradients(w, u, k, v, gy) -> tuple[torch.Tensor, ...]:
    """Autograd of the paper's formula (model.rwkv.bi_wkv_reference: O(T^2), M held constant), block of rows by
    block of rows so that the graph stays small."""
    inputs = [tensor.detach().clone().requires_grad_() for tensor in (w, u, k, v)]
    grads = [torch.zeros_like(tensor) for tensor in inputs]
    length = k.shape[1]
    rows_per_block = max(1, PAPER_BLOCK_ELEMENTS // (k.shape[0] * length * k.shape[2]))
    for rows in torch.arange(length).split(rows_per_block):
        y = bi_wkv_reference(*inputs, rows=rows)
        for total, grad in zip(grads, torch.autograd.grad(y, inputs, gy[:, rows])):
            total += grad
    return tuple(grads)


def paper_terms_at(w, u, k, v, gy, y, z, zexp) -> tuple[torch.Tensor, ...]:
    """The paper formula's gradient terms (decays |t - i| - 1, M constant) evaluated with another forward's outputs
    y, inverse denominators z and stabilisers -zexp in place of the formula's own; O(T^2) memory."""
    index = torch.arange(k.shape[1])
    distance = (index[:, None] - index[None, :]).abs()[None, :, :, None]  # (1, t, i, 1)
    exponent = torch.where(distance == 0, (u + k)[:, None], k[:, None] - (distance - 1).to(k.dtype) * w)
    weight = torch.exp(exponent + zexp[:, :, None]) * (z * gy)[:, :, None]  # dL/dy_t times dy_t/dv_i
    term = weight * (v[:, None] - y[:, :, None])
    gu = torch.diagonal(term, dim1=1, dim2=2).sum((0, 2))
    gw = -(term * (distance - 1).clamp(min=0).to(k.dtype)).sum((0, 1, 2))
    return gw, gu, term.sum(1), weight.sum(1)


def autograd_of(function, w, u, k, v, gy, dtype=torch.float64) -> tuple[torch.Tensor, ...]:
    inputs = [tensor.detach().to(dtype).requires_grad_() for tensor in (w, u, k, v)]
    return tuple(g.double() for g in torch.autograd.grad(function(*inputs), inputs, gy.to(dtype)))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def write_fixture(kernels: ReleaseKernels, release_dir: str, path: str, seed: int) -> None:
    """The translated kernels' y and gradients on FIXTURE_CASES (float64; decays spread over both signs)."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for batch, length, channels in FIXTURE_CASES:
        w = torch.linspace(-5, 3, channels, dtype=torch.float64) / length
        u = torch.randn(channels, generator=generator, dtype=torch.float64) / length
        k, v, gy = (torch.randn(batch, length, channels, generator=generator, dtype=torch.float64) for _ in range(3))
        gradients, _ = kernels.backward(w, u, k, v, gy)
        cases.append({"w": w, "u": u, "k": k, "v": v, "gy": gy, "y": kernels.forward(w, u, k, v),
                      **dict(zip(("gw", "gu", "gk", "gv"), gradients))})
    commit = subprocess.run(["git", f"--git-dir={release_dir}", "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown (a checkout)"
    torch.save({"commit": commit, "cases": cases}, path)
    print(f"wrote {path}: {len(cases)} cases from release {commit}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("release_dir", help="the release's git directory or a checkout of it")
    parser.add_argument("--tool", type=Path, default=DEFAULT_TOOL, help=f"release_model.py (default: {DEFAULT_TOOL})")
    parser.add_argument("--lengths", type=int, nargs="+", default=[289, 16641])
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 8], help="channel count per length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--write-fixture", metavar="PATH", help="pin the translated kernels on small inputs and exit")
    args = parser.parse_args(argv)
    if len(args.channels) != len(args.lengths):
        raise SystemExit("error: --channels needs one count per --lengths entry")
    kernels = ReleaseKernels(args.release_dir)
    if args.write_fixture:
        write_fixture(kernels, args.release_dir, args.write_fixture, args.seed)
        return 0
    tool = load_tool(args.tool)
    state = torch.load(CIF_REFERENCE, weights_only=True)["state_dict"]
    decay, bonus = state[DECAY].double(), state[BONUS].double()
    generator = torch.Generator().manual_seed(args.seed)
    pairs = [("this codebase, float32", "paper formula autograd"),
             ("this codebase, float64", "paper formula autograd"),
             ("release kernel_backward", "paper formula autograd"),
             ("release kernel_backward", "autograd of release kernel_forward"),
             ("release kernel_backward", "paper terms at kernel_forward's y and denominators"),
             ("release kernel_backward", "this codebase, float64"),
             ("this codebase's release_kernel, float64", "release kernel_backward"),
             ("this codebase's release_kernel, float32", "release kernel_backward")]
    lines = ["| gradients a | against b | T | channels | w | u | k | v |", "| --- " * 8 + "|"]
    forward_lines = ["| forward a | against b | T | channels | y |", "| --- " * 5 + "|"]
    for length, channels in zip(args.lengths, args.channels):
        started = time.time()
        chosen = torch.arange(0, decay.numel(), decay.numel() // channels)[:channels]
        w, u = decay[chosen] / length, bonus[chosen] / length
        k, v, gy = (torch.randn(1, length, channels, generator=generator, dtype=torch.float64) for _ in range(3))
        forward = kernels.forward(w, u, k, v)
        check = relative(forward, tool.wkv_kernel(w, u, k, v))
        print(f"T={length}: translated kernel_forward vs the tool's emulation: {check:.2e}", flush=True)
        if check > 1e-12:
            raise SystemExit(f"error: the translated kernel_forward is {check:.2e} from the tool's emulation")
        for dtype in (torch.float64, torch.float32):
            ours = bi_wkv_release_kernel(*(x.to(dtype) for x in (w, u, k, v))).double()
            forward_lines.append(f"| this codebase's release_kernel, {str(dtype)[6:]} | translated kernel_forward | "
                                 f"{length} | {channels} | {relative(ours, forward):.2e} |")
        gradients, internals = kernels.backward(w, u, k, v, gy)
        results = {"release kernel_backward": gradients}
        if length <= TERMS_MAX_TOKENS:
            results["paper terms at kernel_forward's y and denominators"] = paper_terms_at(w, u, k, v, gy,
                                                                                          **internals)
        print(f"T={length}: kernel_backward {time.time() - started:.0f} s", flush=True)
        results["autograd of release kernel_forward"] = autograd_of(tool.wkv_kernel, w, u, k, v, gy)
        results["this codebase, float32"] = autograd_of(bi_wkv, w, u, k, v, gy, torch.float32)
        results["this codebase, float64"] = autograd_of(bi_wkv, w, u, k, v, gy)
        results["this codebase's release_kernel, float64"] = autograd_of(bi_wkv_release_kernel, w, u, k, v, gy)
        results["this codebase's release_kernel, float32"] = autograd_of(bi_wkv_release_kernel, w, u, k, v, gy,
                                                                          torch.float32)
        print(f"T={length}: kernel autograd and this codebase {time.time() - started:.0f} s", flush=True)
        results["paper formula autograd"] = paper_gradients(w, u, k, v, gy)
        print(f"T={length}: paper formula {time.time() - started:.0f} s", flush=True)
        for a, b in pairs:
            if a not in results or b not in results:
                continue
            cells = " | ".join(f"{relative(x, y):.2e}" for x, y in zip(results[a], results[b]))
            lines.append(f"| {a} | {b} | {length} | {channels} | {cells} |")
    text = "\n".join(lines + [""] + forward_lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
