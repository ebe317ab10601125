"""GPU acceptance run: every CUDA path of the codebase on one GPU, within 8 minutes, and a short Markdown report.

    bash scripts/gpu_check.sh [--out exp/gpu_check/report.md] [--parts tests,memory,step,eval,wkv]

Parts, in this order, each in a process of its own, timed, a failure reported without stopping the others:

    tests   python -m pytest -m cuda tests/test_cuda.py: Bi-WKV against the float64 oracle in float32 and under bf16 /
            fp16 autocast, the training step under bf16 and under fp16 with the gradient scaler, SyncBatchNorm under
            torchrun, training, resuming and evaluation (three modes and multi-scale CIF) on the GPU, a checkpoint
            written on the GPU evaluated and resumed without one
    memory  scripts/benchmark.py --device cuda --steps 3 --sections 2: peak memory per GPU at each image scale v
            (Pascal setting: ResNet-101, 21 classes, crop 513, 2 + 2 images, CIF on, fp16 with the gradient scaler)
    step    --sections 1,6: step time per v against the release's 0.85 s per iteration, compute efficiency
    eval    --sections 5: evaluation throughput and the speed-up of batched sliding windows
    wkv     --sections 3: bi_wkv's error and time on the GPU

At 8 minutes the run stops: a part still running is ended and reported as stopped, later parts as not run. The report
is printed and written to --out; the exit code is 0 when every part passed, 1 otherwise. Without a GPU the script
checks its arguments, says so in one line and exits 0; bad arguments exit 2 with one line.
"""
import argparse
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "exp" / "gpu_check" / "report.md"
BUDGET_S = 480.0
# Seconds of the budget kept for starting up and writing the report.
REPORT_MARGIN_S = 10.0
# Three timed repetitions (after two warm-ups) instead of five keep the benchmark parts within the budget.
BENCHMARK = ["scripts/benchmark.py", "--device", "cuda", "--steps", "3", "--sections"]
# name: (what it checks, arguments of `python`).
PARTS = {
    "tests": ("CUDA tests (tests/test_cuda.py)",
              ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_cuda.py"]),
    "memory": ("peak memory per GPU (benchmark section 2)", [*BENCHMARK, "2"]),
    "step": ("training step time and compute efficiency (benchmark sections 1, 6)", [*BENCHMARK, "1,6"]),
    "eval": ("evaluation throughput, sliding-window speed-up (benchmark section 5)", [*BENCHMARK, "5"]),
    "wkv": ("bi_wkv error and time (benchmark section 3)", [*BENCHMARK, "3"]),
}
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


def writable_file(path: Path) -> str | None:
    """Why ``path`` cannot be written as a file (creating its missing folders), or None when it can."""
    if path.is_dir():
        return f"{path} is a folder; give a file path"
    folder = path.absolute().parent
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
                        help=f"report file (default: {DEFAULT_OUT.relative_to(REPO)} in the repository)")
    parser.add_argument("--parts", type=parse_parts, default=list(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (default: all), e.g. to rerun failed ones")
    args = parser.parse_args(argv)
    problem = writable_file(args.out)
    if problem:
        parser.error(f"argument --out: {problem}")
    return args


@dataclass
class Outcome:
    """How a part ended: ``code`` is its exit code, None when stopped at the time limit or not started."""
    name: str
    started: bool
    code: int | None
    seconds: float
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


def run_part(name: str, command: list[str], timeout_s: float) -> Outcome:
    """``command`` run from the repository for at most ``timeout_s`` seconds; a stop also ends the processes it started
    (pytest's subprocesses, torchrun's workers)."""
    if timeout_s <= 0:
        return Outcome(name, False, None, 0.0, "", "")
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr, text=True)
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
        stdout.seek(0)
        stderr.seek(0)
        return Outcome(name, True, code, seconds, stdout.read(), stderr.read())


def junit_results(junit_xml: Path) -> list[tuple[str, str, float, str]]:
    """(test, passed / failed / error / skipped, seconds, message) of each test in pytest's JUnit XML; [] without it."""
    if not junit_xml.exists() or junit_xml.stat().st_size == 0:
        return []
    results = []
    for case in ElementTree.parse(junit_xml).getroot().iter("testcase"):
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
        return False, f"stopped at the 8-minute limit after {outcome.seconds:.0f} s"
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


def cuda_machine() -> list[list[str]] | None:
    """The report's rows naming the GPU and the software, or None without a GPU."""
    # Imported here, once the arguments are known to be good, so that a typo is answered at once.
    import torch
    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return [["device", f"{torch.cuda.get_device_name(0)}, {properties.total_memory / 2 ** 30:.0f} GiB, compute "
                       f"capability {properties.major}.{properties.minor}"],
            ["software", f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
                         f"{torch.backends.cudnn.version()}, Python {platform.python_version()}"]]


def report(argv: list[str], machine: list[list[str]], started: datetime, seconds: float, outcomes: list[Outcome],
           tests: list[tuple[str, str, float, str]], verdicts: dict[str, tuple[bool, str]]) -> str:
    failed = [outcome.name for outcome in outcomes if not verdicts[outcome.name][0]]
    result = f"**failed: {', '.join(failed)}**" if failed else f"**passed** ({len(outcomes)} of {len(outcomes)} parts)"
    header = [["command", f"`{shlex.join(['bash', 'scripts/gpu_check.sh', *argv])}`"], *machine,
              ["started", started.strftime("%Y-%m-%d %H:%M UTC")],
              ["elapsed", f"{seconds / 60:.1f} min (budget {BUDGET_S / 60:.0f} min)"], ["result", result]]
    parts = [[outcome.name, PARTS[outcome.name][0], verdicts[outcome.name][1], f"{outcome.seconds:.0f}"]
             for outcome in outcomes]
    text = ["# GPU acceptance run", table(["", ""], header), "## Parts",
            table(["part", "what", "result", "seconds"], parts)]
    targets = [f"- {outcome.name}: {line.removeprefix('Target: ')}" for outcome in outcomes
               for line in outcome.stdout.splitlines() if line.startswith("Target: ")]
    if targets:
        text += ["## Targets", "\n".join(targets)]
    for outcome in outcomes:
        if not outcome.started:
            continue
        text.append(f"## {outcome.name}: {PARTS[outcome.name][0]}")
        text.append(f"`{shlex.join(['python', *PARTS[outcome.name][1]])}`")
        if outcome.name == "tests" and tests:
            rows = [[name, result if not message else f"{result}: {message[:300]}", f"{test_seconds:.1f}"]
                    for name, result, test_seconds, message in tests]
            text.append(table(["test", "result", "seconds"], rows))
        elif outcome.name != "tests":
            text.append(benchmark_sections(outcome.stdout) or "(no table was printed)")
        last_lines = tail(outcome.stdout + "\n" + outcome.stderr)
        if not verdicts[outcome.name][0] and last_lines:
            text.append("Output (last lines):\n\n```\n" + last_lines + "\n```")
    return "\n\n".join(text) + "\n"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    machine = cuda_machine()
    if machine is None:
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is false), so nothing was run")
        return 0
    started, start = datetime.now(timezone.utc), time.monotonic()
    deadline = start + BUDGET_S - REPORT_MARGIN_S
    outcomes, tests, verdicts = [], [], {}
    with tempfile.TemporaryDirectory() as folder:
        junit_xml = Path(folder) / "tests.xml"
        for name in args.parts:
            command = [sys.executable, *PARTS[name][1]] + ([f"--junitxml={junit_xml}"] if name == "tests" else [])
            outcome = run_part(name, command, deadline - time.monotonic())
            outcomes.append(outcome)
            if name == "tests":
                tests = junit_results(junit_xml)
            verdicts[name] = part_verdict(outcome, tests if name == "tests" else None)
            print(f"{name}: {verdicts[name][1]} ({outcome.seconds:.0f} s)", flush=True)
    text = report(argv, machine, started, time.monotonic() - start, outcomes, tests, verdicts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n" + text + f"\nreport written to {args.out}")
    return 0 if all(passed for passed, _ in verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
