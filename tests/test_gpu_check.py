"""scripts/gpu_check.py on the CPU: without a GPU one line and exit 0 (1 with --require-gpu), bad arguments one line and
exit 2, a missing package named, and (with stand-in parts) the timing, each part's limit, the verdicts, the logs and the
report of a run, rewritten after every part so that a run killed mid-way leaves one."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, command_env

sys.path.insert(0, os.path.join(REPO, "scripts"))
import gpu_check  # noqa: E402


def gpu_check_command(*args: str, hide_gpu: bool = True) -> subprocess.CompletedProcess:
    env = dict(command_env(), CUDA_VISIBLE_DEVICES="") if hide_gpu else command_env()
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(monkeypatch, tmp_path, capsys):
    """Without a GPU: one line on stdout, exit status 0, no output folder. In this process (gpu_rows asks torch,
    told that no GPU is visible); the real interpreter's exit status through gpu_check.sh with the GPU hidden is
    test_require_gpu_without_a_gpu_exits_1_with_a_report's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu_check"
    assert gpu_check.main(["--out", str(out), "--parts", "tests,memory"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is false), so nothing was run"]
    assert not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--parts", "tests,speed"], "error: argument --parts: 'tests,speed': expected distinct names from tests, memory, "
                                 "step, eval, wkv separated by commas"),
    (["--parts", "eval,eval"], "error: argument --parts: 'eval,eval': expected distinct names"),
    (["--out", "README.md"], "error: argument --out: README.md is not a folder"),
    (["--budget", "5"], "error: unrecognized arguments: --budget 5"),
])
def test_bad_arguments_exit_2_in_one_line(args, expected):
    # Checked before anything looks for a GPU, so the answer is the same with one.
    result = gpu_check_command(*args, hide_gpu=False)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(expected), result.stderr
    assert result.stdout == ""


def test_a_part_past_its_time_is_stopped_with_the_processes_it_started(tmp_path):
    # The child runs in a session of its own, as torchrun's workers do.
    child_pid = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        open({str(child_pid)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(60)
    """)
    outcome = gpu_check.run_part("slow", [sys.executable, "-c", script], timeout_s=3, folder=tmp_path)
    assert outcome.started and outcome.code is None and 3 <= outcome.seconds < 20
    assert outcome.stdout == "started\n" == (tmp_path / "slow.log").read_text()
    pid = int(child_pid.read_text())
    # SIGKILL takes a moment to land.
    for _ in range(50):
        if ended(pid):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the part's child process {pid} is still running")


def ended(pid: int) -> bool:
    """Whether process ``pid`` is gone or a zombie (state Z) that whoever inherited it has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# Stand-ins for the parts: pytest writing JUnit XML with a failure and a skip, a benchmark printing a section with a
# target, a failing part, and one that runs past the budget.
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_cuda" name="test_bi_wkv_under_autocast[torch.float16]" time="0.52"/>
<testcase classname="tests.test_cuda" name="test_eval_on_the_gpu[original]" time="3.10">
<failure message="AssertionError: mIoU out of range&#10;assert False">trace</failure></testcase>
<testcase classname="tests.test_cuda" name="test_sync_batch_norm_under_torchrun[gloo-2]" time="0.00">
<skipped message="needs a CUDA GPU"/></testcase>
</testsuite></testsuites>"""
BENCHMARK_OUTPUT = ("# scalematch benchmarks\n\n| | |\n| --- | --- |\n| device | GPU |\n\n## 2. Peak memory\n\n"
                    "| setting | peak |\n| --- | --- |\n| v=2 | 9.50 |\n\n"
                    "Target: at most 12 GiB per GPU: largest 9.50 GiB **met**.\n\nLoad average at the end: 1.00.\n")
STAND_INS = {
    "tests": ("CUDA tests", ["-c", f"import sys; open(sys.argv[1].split('=', 1)[1], 'w').write({JUNIT!r}); "
                                   "sys.exit(1)"]),
    "memory": ("peak memory", ["-c", f"print({BENCHMARK_OUTPUT!r}, end='')"]),
    "step": ("step time", ["-c", "import sys; print('Traceback: boom', file=sys.stderr); sys.exit(3)"]),
    "eval": ("evaluation", ["-c", "import time; time.sleep(60)"]),
    "wkv": ("bi_wkv", ["-c", "print('never')"]),
}


def stand_in_run(monkeypatch, budget_s: float, limits: dict | None = None) -> None:
    monkeypatch.setattr(gpu_check, "PARTS", STAND_INS)
    monkeypatch.setattr(gpu_check, "gpu_rows", lambda: [["GPU", "Stand-in GPU, 80 GiB"]])
    monkeypatch.setattr(gpu_check, "BUDGET_S", gpu_check.REPORT_MARGIN_S + budget_s)
    monkeypatch.setattr(gpu_check, "PART_LIMIT_S", limits or dict.fromkeys(STAND_INS, 100.0))


def test_a_run_reports_every_part_and_exits_1_when_one_failed(monkeypatch, tmp_path, capsys):
    # 5 s: time for the three quick stand-ins even on a loaded machine; what is left is the stalling eval's limit,
    # then none for wkv.
    stand_in_run(monkeypatch, budget_s=5)
    out = tmp_path / "new" / "gpu_check"
    assert gpu_check.main(["--out", str(out)]) == 1
    report = (out / "report.md").read_text()
    assert capsys.readouterr().out.rstrip().endswith(f"report written to {out / 'report.md'}")
    assert "| result | **failed: tests, step, eval, wkv** |" in report
    assert "| GPU | Stand-in GPU, 80 GiB |" in report
    assert f"| torch | {torch.__version__} |" in report
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("| ")}
    assert "failed (exit code 1)" in rows["tests"]
    assert "| memory | peak memory | passed |" in rows["memory"]
    assert "failed (exit code 3)" in rows["step"]
    assert "stopped at its limit of " in rows["eval"]  # what was left of the budget
    assert "not run: the 8-minute budget was spent" in rows["wkv"]
    # The tests, one row each, with the failure's message; the benchmark's section a level down, with its target.
    assert "| test_eval_on_the_gpu[original] | failed: AssertionError: mIoU out of range assert False | 3.1 |" in report
    assert "| test_sync_batch_norm_under_torchrun[gloo-2] | skipped: needs a CUDA GPU | 0.0 |" in report
    assert "\n### 2. Peak memory\n" in report and "\n# scalematch benchmarks" not in report
    assert "\nLoad average at the end" not in report
    assert "\n`python3 -c 'import time; time.sleep(60)'`\n" in report  # each part's command
    assert "- memory: at most 12 GiB per GPU: largest 9.50 GiB **met**." in report
    assert "Traceback: boom" in report  # a failed part's last lines
    # Each part's output beside the report, the tests' JUnit XML too.
    assert (out / "memory.log").read_text() == BENCHMARK_OUTPUT
    assert (out / "step.stderr.log").read_text() == "Traceback: boom\n"
    assert (out / "tests.xml").read_text() == JUNIT
    assert not (out / "wkv.log").exists()
    # A rerun of some parts into the same folder leaves no output of an earlier run beside them.
    assert gpu_check.main(["--out", str(out), "--parts", "wkv"]) == 0
    assert not (out / "tests.xml").exists() and (out / "wkv.log").read_text() == "never\n"


def test_a_stalled_part_leaves_the_later_parts_their_time(monkeypatch, tmp_path):
    # Each stalling part is stopped at its own limit (2 s, 1 s), well within the budget: wkv still runs.
    stand_in_run(monkeypatch, budget_s=60, limits={"tests": 2, "memory": 5, "step": 5, "eval": 1, "wkv": 5})
    monkeypatch.setitem(STAND_INS, "tests", ("stalls", ["-c", "import time; time.sleep(60)"]))
    start = time.monotonic()
    assert gpu_check.main(["--out", str(tmp_path), "--parts", "tests,eval,wkv"]) == 1
    assert time.monotonic() - start < 30
    rows = {line.split(" | ")[0].strip("| "): line for line in (tmp_path / "report.md").read_text().splitlines()
            if line.startswith("| ")}
    assert "stopped at its limit of 2 s" in rows["tests"] and "stopped at its limit of 1 s" in rows["eval"]
    assert "| wkv | bi_wkv | passed |" in rows["wkv"]


def test_the_parts_collectives_time_out(monkeypatch, tmp_path):
    stand_in_run(monkeypatch, budget_s=30)
    script = "import os, json; print(json.dumps(os.environ.get('SCALEMATCH_COLLECTIVE_TIMEOUT_S')))"
    monkeypatch.setitem(STAND_INS, "wkv", ("environment", ["-c", script]))
    assert gpu_check.main(["--out", str(tmp_path), "--parts", "wkv"]) == 0
    assert json.loads((tmp_path / "wkv.log").read_text()) == str(gpu_check.COLLECTIVE_TIMEOUT_S)


# A run of stand-ins in a process of its own: the first part passes, the second stalls, until the test kills the run.
KILLED_RUN = """
import sys
sys.path.insert(0, "scripts")
import gpu_check
gpu_check.MODULES = []  # the package check is the other tests'; its imports (torch...) would take seconds here
gpu_check.PARTS = {{"memory": ("passes", ["-c", "print('first part done')"]),
                   "step": ("stalls", ["-c", "print('second part started', flush=True); import time; time.sleep(60)"])}}
gpu_check.gpu_rows = lambda: [["GPU", "Stand-in GPU"]]
sys.exit(gpu_check.main(["--out", {out!r}]))
"""


def test_a_run_killed_mid_way_leaves_a_readable_report_of_the_parts_it_finished(tmp_path):
    out = tmp_path / "gpu_check"
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN.format(out=str(out))], cwd=REPO, env=command_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for _ in range(600):
            if (out / "step.log").exists() and "second part started" in (out / "step.log").read_text():
                break
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.1)
        else:
            pytest.fail("the second part did not start within 60 s")
    finally:
        # The run and the part it is waiting for, as an outer time limit would end them.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    report = (out / "report.md").read_text()
    assert "| result | **incomplete**: 1 of 2 parts done;" in report
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("| ")}
    assert "| memory | passes | passed |" in rows["memory"]
    assert "| step | stalls | running" in rows["step"]
    assert (out / "memory.log").read_text() == "first part done\n"
    assert (out / "step.log").read_text() == "second part started\n"
    assert not list(out.glob(".*.tmp"))


# ``bash scripts/gpu_check.sh --require-gpu`` with the GPU hidden, started with the session (conftest): (output
# folder, CompletedProcess).
SESSION_RUNS = {"test_require_gpu_without_a_gpu_exits_1_with_a_report": lambda out, tiny_voc: (
    out, gpu_check_command("--out", str(out), "--require-gpu"))}


def test_require_gpu_without_a_gpu_exits_1_with_a_report(session_run):
    """The script through gpu_check.sh in a real interpreter that sees no GPU: exit status 1, one line on stderr."""
    tmp_path, result = session_run
    assert result.returncode == 1
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("gpu_check: no CUDA GPU is visible")
    report = (tmp_path / "report.md").read_text()
    assert "| result | **failed: no CUDA GPU is visible** (--require-gpu) |" in report
    assert f"| torch | {torch.__version__} |" in report


def test_a_package_that_does_not_import_is_named_and_nothing_runs(monkeypatch, tmp_path, capsys):
    stand_in_run(monkeypatch, budget_s=30)
    monkeypatch.setattr(gpu_check, "MODULES", ["torch", "no_such_package"])
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1
    assert "1 of the packages it needs do not import" in error and "no_such_package (ModuleNotFoundError:" in error
    report = (tmp_path / "report.md").read_text()
    assert "| result | **failed: no_such_package did not import** (this script installs nothing) |" in report
    assert not list(tmp_path.glob("*.log"))


def test_junit_xml_cut_short_reads_as_no_tests(tmp_path):
    cut = tmp_path / "tests.xml"
    cut.write_text(JUNIT[:len(JUNIT) // 2])
    assert gpu_check.junit_results(cut) == []
    assert gpu_check.junit_results(tmp_path / "absent.xml") == []


def test_skipped_cuda_tests_fail_the_tests_part():
    passed = gpu_check.Outcome("tests", True, 0, 1.0, 10.0, "", "")
    assert gpu_check.part_verdict(passed, [("a", "passed", 0.1, ""), ("b", "skipped", 0.0, "no GPU")]) == (
        False, "1 of 2 tests skipped")
    assert gpu_check.part_verdict(passed, []) == (False, "no test ran")
    assert gpu_check.part_verdict(passed, [("a", "passed", 0.1, "")]) == (True, "passed: 1 of 1 tests")
