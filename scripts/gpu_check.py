"""GPU acceptance run: every CUDA path of the codebase on one GPU, within 8 minutes, and a short Markdown report.

    bash scripts/gpu_check.sh [--out DIR] [--parts tests,memory,step,eval,wkv] [--require-gpu]

It installs nothing: it runs on the Python that ``python3`` names, checks that torch, torchvision, numpy, yaml, PIL,
tqdm, tensorboard and pytest import there, and says which do not (exit 1). Then, in this order, each part in a process
of its own, a failure reported without stopping the others:

    tests   pytest -m cuda tests/test_cuda.py: Bi-WKV against the float64 oracle in float32 and under bf16 / fp16
            autocast, the training step under bf16 and under fp16 with the gradient scaler, SyncBatchNorm under
            torchrun, training, resuming and evaluation (three modes and multi-scale CIF) on the GPU, a checkpoint
            written on the GPU evaluated and resumed without one
    memory  scripts/benchmark.py --device cuda --steps 3 --sections 2: peak memory per GPU at each image scale v
            (Pascal setting: ResNet-101, 21 classes, crop 513, 2 + 2 images, CIF on, fp16 with the gradient scaler)
    step    --sections 1,6: step time per v against the release's 0.85 s per iteration, compute efficiency
    eval    --sections 5: evaluation throughput and the speed-up of batched sliding windows
    wkv     --sections 3: bi_wkv's error and time on the GPU

Each part has a time limit of its own (PART_LIMIT_S), cut to what is left of the 8 minutes; a part still running at
its limit is ended with the processes it started and reported as stopped, a part with no time left as not run. The
parts' collectives give up after COLLECTIVE_TIMEOUT_S (SCALEMATCH_COLLECTIVE_TIMEOUT_S, which util/dist.py and the
tests' torchrun workers read), so a stalled peer fails its test instead of waiting out the part.

DIR (default exp/gpu_check) receives report.md, rewritten before and after every part, so a run killed from outside
leaves the figures of the parts it finished; beside it each part's output as it is written (PART.log, PART.stderr.log)
and the tests' JUnit XML (tests.xml). The report is also printed at the end. Exit code: 0 when every part passed,
1 otherwise. Without a GPU it says so in one line and exits 0, or with --require-gpu writes the report and exits 1.
Bad arguments exit 2 with one line.
"""
import argparse
import importlib
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "exp" / "gpu_check"
BUDGET_S = 480.0
# Seconds of the budget kept for starting up and writing the report.
REPORT_MARGIN_S = 10.0
# Each part's own limit: together within the budget, so that a stalled part leaves the later ones their time.
PART_LIMIT_S = {"tests": 240.0, "memory": 90.0, "step": 60.0, "eval": 45.0, "wkv": 25.0}
COLLECTIVE_TIMEOUT_S = 60
# Three timed repetitions (after two warm-ups) instead of five keep the benchmark parts within the budget.
BENCHMARK = ["scripts/benchmark.py", "--device", "cuda", "--steps", "3", "--sections"]
# name: (what it checks, arguments of python3).
PARTS = {
    "tests": ("CUDA tests (tests/test_cuda.py)",
              ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_cuda.py"]),
    "memory": ("peak memory per GPU (benchmark section 2)", [*BENCHMARK, "2"]),
    "step": ("training step time and compute efficiency (benchmark sections 1, 6)", [*BENCHMARK, "1,6"]),
    "eval": ("evaluation throughput, sliding-window speed-up (benchmark section 5)", [*BENCHMARK, "5"]),
    "wkv": ("bi_wkv error and time (benchmark section 3)", [*BENCHMARK, "3"]),
}
# What the parts import (torchvision.ops registers the operators that a torchvision built for another torch lacks).
MODULES = ["torch", "torchvision.ops", "numpy", "yaml", "PIL", "tqdm", "tensorboard", "pytest"]
# Lines of a failed part's output that the report quotes.
TAIL_LINES = 15


class OneLineParser(argparse.ArgumentParser):
    """Argument errors in one line, without the usage block, exiting with 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def parse_parts(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in PARTS]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct names from {', '.join(PARTS)} separated by "
                                         "commas")
    return [name for name in PARTS if name in names]


def writable_folder(path: Path) -> str | None:
    """Why ``path`` cannot be used as the output folder (creating it and its missing parents), or None when it can."""
    if path.exists() and not path.is_dir():
        return f"{path} is not a folder"
    folder = path.absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable"
    return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for report.md and the parts' logs (default: {DEFAULT_OUT.relative_to(REPO)} in "
                             "the repository)")
    parser.add_argument("--parts", type=parse_parts, default=list(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (default: all), e.g. to rerun failed ones")
    parser.add_argument("--require-gpu", action="store_true",
                        help="without a visible GPU, fail (exit 1) instead of saying so and exiting 0")
    args = parser.parse_args(argv)
    problem = writable_folder(args.out)
    if problem:
        parser.error(f"argument --out: {problem}")
    return args


def check_environment() -> tuple[dict[str, str], dict[str, str]]:
    """({module: version} of the modules that import, {module: why not} of those that do not)."""
    found, missing = {}, {}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # a torchvision built for another torch fails with a RuntimeError, not ImportError
            missing[name] = " ".join(f"{type(error).__name__}: {error}".split())[:200]
            continue
        top = sys.modules[name.split(".")[0]]
        found[name] = getattr(module, "__version__", None) or getattr(top, "__version__", "?")
    return found, missing


def gpu_rows() -> list[list[str]] | None:
    """The report's rows naming the GPU and the CUDA software, or None without a GPU."""
    import torch
    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return [["GPU", f"{torch.cuda.get_device_name(0)}, {properties.total_memory / 2 ** 30:.0f} GiB, compute "
                    f"capability {properties.major}.{properties.minor}, {torch.cuda.device_count()} visible"],
            ["CUDA", f"{torch.version.cuda} (torch's build), cuDNN {torch.backends.cudnn.version()}"]]


@dataclass
class Outcome:
    """How a part ended: ``code`` is its exit code, None when stopped at its limit or not started."""
    name: str
    started: bool
    code: int | None
    seconds: float
    limit_s: float
    stdout: str
    stderr: str


def descendants(pid: int) -> list[int]:
    """The processes that ``pid`` started, and theirs, from /proc (torchrun starts its workers in sessions of their
    own, so ending a process group would leave them)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def log_paths(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / f"{name}.log", folder / f"{name}.stderr.log"


def part_environment() -> dict[str, str]:
    """The environment of the parts: collectives that give up, and Python's output unbuffered into the logs."""
    return dict(os.environ, SCALEMATCH_COLLECTIVE_TIMEOUT_S=str(COLLECTIVE_TIMEOUT_S), PYTHONUNBUFFERED="1")


def run_part(name: str, command: list[str], timeout_s: float, folder: Path) -> Outcome:
    """``command`` run from the repository for at most ``timeout_s`` seconds, its output written into ``folder`` as
    it comes; a stop also ends the processes it started (pytest's subprocesses, torchrun's workers)."""
    if timeout_s <= 0:
        return Outcome(name, False, None, 0.0, 0.0, "", "")
    stdout_path, stderr_path = log_paths(folder, name)
    start = time.monotonic()
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr, env=part_environment())
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for pid in [process.pid, *descendants(process.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait()
            code = None
    seconds = time.monotonic() - start
    return Outcome(name, True, code, seconds, timeout_s, stdout_path.read_text(errors="replace"),
                   stderr_path.read_text(errors="replace"))


def junit_results(junit_xml: Path) -> list[tuple[str, str, float, str]]:
    """(test, passed / failed / error / skipped, seconds, message) of each test in pytest's JUnit XML; [] without it or
    when it was left unfinished (pytest writes it at the end, so a part stopped while writing leaves it cut)."""
    try:
        root = ElementTree.parse(junit_xml).getroot()
    except (OSError, ElementTree.ParseError):
        return []
    results = []
    for case in root.iter("testcase"):
        ending = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        result = "passed" if ending is None else {"failure": "failed"}.get(ending.tag, ending.tag)
        message = "" if ending is None else " ".join((ending.get("message") or "").split())
        results.append((case.get("name"), result, float(case.get("time", 0)), message))
    return results


def part_verdict(outcome: Outcome, tests: list[tuple[str, str, float, str]] | None) -> tuple[bool, str]:
    """(passed, what the report says) of a part; the tests part also fails when a test was skipped, since on a GPU
    every one of them should run."""
    if not outcome.started:
        return False, "not run: the 8-minute budget was spent"
    if outcome.code is None:
        return False, f"stopped at its limit of {outcome.limit_s:.0f} s"
    if outcome.code != 0:
        return False, f"failed (exit code {outcome.code})"
    if tests is not None:
        skipped = [name for name, result, _, _ in tests if result == "skipped"]
        if not tests or skipped:
            return False, f"{len(skipped)} of {len(tests)} tests skipped" if tests else "no test ran"
        return True, f"passed: {len(tests)} of {len(tests)} tests"
    return True, "passed"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def benchmark_sections(stdout: str) -> str:
    """The sections of scripts/benchmark.py's Markdown, one heading level down, without its machine table (the
    report's header has the machine) and its closing load-average line."""
    start = stdout.find("\n## ")
    body = stdout[start + 1:] if start >= 0 else ""
    lines = [line for line in body.splitlines() if not line.startswith("Load average at the end")]
    return "\n".join("#" + line if line.startswith("## ") else line for line in lines).strip()


def tail(text: str) -> str:
    return "\n".join(text.strip().splitlines()[-TAIL_LINES:])


@dataclass
class Run:
    """What the report is made of, as far as the run has got."""
    argv: list[str]
    parts: list[str]
    machine: list[list[str]]
    started: datetime
    start: float
    outcomes: list[Outcome] = field(default_factory=list)
    tests: list[tuple[str, str, float, str]] = field(default_factory=list)
    verdicts: dict[str, tuple[bool, str]] = field(default_factory=dict)
    running: str | None = None
    result: str | None = None


def report(run: Run) -> str:
    done = [outcome.name for outcome in run.outcomes]
    failed = [name for name in done if not run.verdicts[name][0]]
    if run.result is not None:
        result = run.result
    elif len(done) < len(run.parts):
        result = (f"**incomplete**: {len(done)} of {len(run.parts)} parts done; a report left like this means the "
                  "run was stopped from outside")
    elif failed:
        result = f"**failed: {', '.join(failed)}**"
    else:
        result = f"**passed** ({len(done)} of {len(done)} parts)"
    header = [["command", f"`{shlex.join(['bash', 'scripts/gpu_check.sh', *run.argv])}`"], *run.machine,
              ["started", run.started.strftime("%Y-%m-%d %H:%M:%S UTC")],
              ["elapsed", f"{(time.monotonic() - run.start) / 60:.1f} min (budget {BUDGET_S / 60:.0f} min)"],
              ["result", result]]
    rows = []
    for name in run.parts:
        outcome = next((outcome for outcome in run.outcomes if outcome.name == name), None)
        if outcome is not None:
            rows.append([name, PARTS[name][0], run.verdicts[name][1], f"{outcome.seconds:.0f}"])
        else:
            state = "running (its logs so far are beside this report)" if name == run.running else "pending"
            rows.append([name, PARTS[name][0], state, ""])
    text = ["# GPU acceptance run", table(["", ""], header), "## Parts",
            f"Each part's limit: {', '.join(f'{name} {PART_LIMIT_S[name]:.0f} s' for name in run.parts)}; "
            f"collectives time out after {COLLECTIVE_TIMEOUT_S} s. Each part's output is in PART.log and "
            "PART.stderr.log beside this report.",
            table(["part", "what", "result", "seconds"], rows)]
    targets = [f"- {outcome.name}: {line.removeprefix('Target: ')}" for outcome in run.outcomes
               for line in outcome.stdout.splitlines() if line.startswith("Target: ")]
    if targets:
        text += ["## Targets", "\n".join(targets)]
    for outcome in run.outcomes:
        if not outcome.started:
            continue
        text.append(f"## {outcome.name}: {PARTS[outcome.name][0]}")
        text.append(f"`{shlex.join(['python3', *PARTS[outcome.name][1]])}`")
        if outcome.name == "tests" and run.tests:
            rows = [[name, result if not message else f"{result}: {message[:300]}", f"{test_seconds:.1f}"]
                    for name, result, test_seconds, message in run.tests]
            text.append(table(["test", "result", "seconds"], rows))
        elif outcome.name != "tests":
            text.append(benchmark_sections(outcome.stdout) or "(no table was printed)")
        last_lines = tail(outcome.stdout + "\n" + outcome.stderr)
        if not run.verdicts[outcome.name][0] and last_lines:
            text.append("Output (last lines):\n\n```\n" + last_lines + "\n```")
    return "\n\n".join(text) + "\n"


def write_report(folder: Path, text: str) -> Path:
    """``text`` into folder/report.md (creating the folder), whole or not at all: a kill while writing leaves the
    previous report."""
    folder.mkdir(parents=True, exist_ok=True)
    path, temporary = folder / "report.md", folder / ".report.md.tmp"
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def environment_rows(found: dict[str, str], missing: dict[str, str]) -> list[list[str]]:
    rows = [["Python", f"{platform.python_version()} ({sys.executable})"],
            ["torch", found.get("torch", "**does not import**")],
            ["packages", ", ".join(f"{name} {version}" for name, version in found.items() if name != "torch")]]
    return rows + ([["missing", "; ".join(f"{name} ({why})" for name, why in missing.items())]] if missing else [])


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    found, missing = check_environment()
    started, start = datetime.now(timezone.utc), time.monotonic()
    if missing:
        run = Run(argv, args.parts, environment_rows(found, missing), started, start,
                  result=f"**failed: {', '.join(missing)} did not import** (this script installs nothing)")
        print(f"gpu_check: {len(missing)} of the packages it needs do not import in {sys.executable} (it installs "
              f"nothing): {'; '.join(f'{name} ({why})' for name, why in missing.items())}; report written to "
              f"{write_report(args.out, report(run))}", file=sys.stderr)
        return 1
    gpu = gpu_rows()
    run = Run(argv, args.parts, environment_rows(found, missing) + (gpu or []), started, start)
    if gpu is None:
        line = "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is false), so nothing was run"
        if not args.require_gpu:
            print(line)
            return 0
        run.result = "**failed: no CUDA GPU is visible** (--require-gpu)"
        print(f"{line}; report written to {write_report(args.out, report(run))}", file=sys.stderr)
        return 1
    deadline = run.start + BUDGET_S - REPORT_MARGIN_S
    junit_xml = args.out / "tests.xml"
    # What an earlier run into the same folder left of these parts would pass for this run's.
    for path in [junit_xml, *(path for name in args.parts for path in log_paths(args.out, name))]:
        path.unlink(missing_ok=True)
    for name in args.parts:
        run.running = name
        write_report(args.out, report(run))
        command = [sys.executable, *PARTS[name][1]] + ([f"--junitxml={junit_xml}"] if name == "tests" else [])
        outcome = run_part(name, command, min(PART_LIMIT_S[name], deadline - time.monotonic()), args.out)
        run.outcomes.append(outcome)
        if name == "tests":
            run.tests = junit_results(junit_xml)
        run.verdicts[name] = part_verdict(outcome, run.tests if name == "tests" else None)
        run.running = None
        write_report(args.out, report(run))
        print(f"{name}: {run.verdicts[name][1]} ({outcome.seconds:.0f} s)", flush=True)
    text = report(run)
    path = write_report(args.out, text)
    print("\n" + text + f"\nreport written to {path}")
    return 0 if all(passed for passed, _ in run.verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
