"""Training across nodes with torchrun: the rendezvous variables scripts/train.sh passes on, and two CPU "nodes" on
127.0.0.1 that train, are pre-empted, resume and evaluate like one node with the same number of processes."""
import os
import re
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import eval as eval_cli
from conftest import EXACT, REPO, command_env, fault_command, train_command
from test_fault_tolerance import checkpoint_iteration, differing_tensors
from util import dist
from util.dist import collective_timeout
from util.launcher import LaunchError, _root_cause, rendezvous_args


def test_collectives_wait_as_long_as_the_environment_says(monkeypatch):
    monkeypatch.delenv("SCALEMATCH_COLLECTIVE_TIMEOUT_S", raising=False)
    assert collective_timeout() is None  # torch's default
    monkeypatch.setenv("SCALEMATCH_COLLECTIVE_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="SCALEMATCH_COLLECTIVE_TIMEOUT_S=0 must be at least 1"):
        collective_timeout()
    monkeypatch.setenv("SCALEMATCH_COLLECTIVE_TIMEOUT_S", "60")
    # The process group of a torchrun worker is made with it.
    calls = []
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.dist, "init_process_group", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert dist.init_distributed(force_cpu=True)[:2] == (1, 2)
    assert calls == [(("gloo",), {"device_id": None, "timeout": timedelta(seconds=60)})]


def test_one_node_is_standalone():
    assert rendezvous_args({}) == (["--standalone"], None, None)
    assert rendezvous_args({"NNODES": "1"}) == (["--standalone"], None, None)


def test_static_rendezvous_from_the_usual_variables():
    args, endpoint, line = rendezvous_args({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "host0",
                                            "MASTER_PORT": "29400"})
    assert args == ["--nnodes=2", "--node-rank=1", "--master-addr=host0", "--master-port=29400"]
    assert endpoint == "host0:29400" and line == "node 1 of 2: meeting at host0:29400"
    args, _, _ = rendezvous_args({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "host0"})
    assert args[-1] == "--master-port=29500"


def test_c10d_rendezvous_from_an_endpoint():
    args, endpoint, line = rendezvous_args({"NNODES": "4", "RDZV_ENDPOINT": "host0:29400", "RDZV_ID": "job7"})
    assert args == ["--nnodes=4", "--rdzv-backend=c10d", "--rdzv-endpoint=host0:29400", "--rdzv-id=job7"]
    assert endpoint == "host0:29400" and line == "4 node(s): meeting at host0:29400 (c10d rendezvous, id job7)"


@pytest.mark.parametrize("environ, message", [
    ({"NNODES": "2"}, "NNODES=2 needs MASTER_ADDR (the address of the node with NODE_RANK=0) or RDZV_ENDPOINT"),
    ({"NNODES": "2", "MASTER_ADDR": "host0"}, "NODE_RANK is not set"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "host0"}, "NODE_RANK=2 must be below NNODES=2"),
    ({"NNODES": "two"}, "NNODES='two' must be a whole number of at least 1"),
    ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "host0", "MASTER_PORT": "0"},
     "MASTER_PORT='0' must be a whole number of at least 1"),
    ({"NNODES": "2", "RDZV_ENDPOINT": "host0"}, "RDZV_ENDPOINT='host0' must be HOST:PORT")])
def test_a_multi_node_setting_that_cannot_work_is_one_line(environ, message):
    with pytest.raises(LaunchError) as caught:
        rendezvous_args(environ)
    assert str(caught.value) == message


def test_train_sh_refuses_a_node_without_its_master_in_one_line(tiny_voc, tmp_path):
    command = train_command(tiny_voc, tmp_path, 1, "run_name=nowhere")
    result = subprocess.run(command, cwd=REPO, env={**command_env(), "NNODES": "2"}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: NNODES=2 needs MASTER_ADDR (the address of the node with NODE_RANK=0) or RDZV_ENDPOINT"]
    assert not os.path.exists(tmp_path / "pascal")


def free_port():
    """A port of 127.0.0.1 free now; node 0's launcher binds it a moment later, so run_nodes tries another if it
    was taken meanwhile."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_nodes(commands, port):
    """Each "node" is one launch of one process, as on two machines that share exp_dir."""
    return [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**command_env(), "NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": str(port)})
            for node, command in enumerate(commands)]


def run_nodes(commands, attempts=3):
    """(exit codes, (stdout, stderr) of each) of two nodes run to their end, meeting at a free port: where node 0
    finds it taken (EADDRINUSE, its one-line error), node 1 is stopped and both start again on another port."""
    for _ in range(attempts):
        nodes = start_nodes(commands, free_port())
        first = nodes[0].communicate(timeout=600)
        if nodes[0].returncode == 2 and "EADDRINUSE" in first[1]:
            nodes[1].kill()
            nodes[1].communicate()
            continue
        second = nodes[1].communicate(timeout=600)
        return [node.returncode for node in nodes], [first, second]
    raise AssertionError(f"{attempts} free ports were taken before node 0 could bind them")


def run_dir_of(state: dict) -> Path:
    """The run directory a checkpoint was trained in, from its config (as util.run_dir.run_directory names it)."""
    cfg = state["config"]
    return Path(cfg["exp_dir"], cfg["dataset"], cfg["split"], cfg["run_name"])


def evaluated_alone(capsys, checkpoint) -> str:
    """What `python eval.py --checkpoint CHECKPOINT --cpu` prints, run in this process: on one thread (conftest),
    as each node's process, so the same arithmetic, without an interpreter and torch start."""
    eval_cli.main(["--checkpoint", str(checkpoint), "--cpu"])
    return capsys.readouterr().out


def two_nodes_preempted_resumed_evaluated(folder, tiny_voc):
    """Two nodes of one process each: pre-empted, then resumed, then evaluating: ((exit codes, outputs) of each
    launch, latest.pth)."""
    latest = folder / "pascal" / "tiny" / "two_nodes" / "latest.pth"
    # Pre-emption: SIGTERM reaches both nodes (as a scheduler sends it: launcher and worker) after their step 2, the
    # end of epoch 0.
    preempted = [sys.executable, "-m", "util.launcher", "1",
                 *fault_command(tiny_voc, folder, 1, ("SIGTERM", "step:2", "everything"), *EXACT,
                                "run_name=two_nodes")[1:]]
    launches = [run_nodes([preempted, preempted])]
    latest_after_preemption = checkpoint_iteration(latest)
    command = train_command(tiny_voc, folder, 1, *EXACT, "run_name=two_nodes")
    launches.append(run_nodes([command, command]))
    evaluate = [sys.executable, "-m", "util.launcher", "1", "eval.py", "--checkpoint", str(latest), "--cpu"]
    launches.append(run_nodes([evaluate, evaluate]))
    return launches, latest_after_preemption, latest


def slurm_run(folder, tiny_voc):
    """scripts/slurm_train.sh under stand-ins for srun (one task per node, here two on this machine) and scontrol:
    (its CompletedProcess, latest.pth)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[ "$1 $2 $3" = "show hostnames fake[0-1]" ] || exit 9\n'
                                      'printf "127.0.0.1\\nfake1\\n"\n')
    # As srun --kill-on-bad-exit=1: a task that fails ends the others (node 1 would wait for a node 0 that is gone).
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
                                  'for node in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do\n'
                                  '    SLURM_NODEID=$node "$@" & pids+=($!)\ndone\n'
                                  'status=0; for _ in "${pids[@]}"; do wait -n || { status=$?; kill "${pids[@]}" '
                                  '2>/dev/null; }; done\nexit $status\n')
    for name in ("scontrol", "srun"):
        (bin_dir / name).chmod(0o755)
    # From another directory: sbatch runs a copy of the script, which finds the repository by SLURM_SUBMIT_DIR.
    arguments = train_command(tiny_voc, folder, 1, "epochs=1", "iters_per_epoch=1", "run_name=slurm")[2:]
    command = ["bash", os.path.join(REPO, "scripts", "slurm_train.sh"), *arguments]
    env = {**command_env(), "SLURM_JOB_NODELIST": "fake[0-1]", "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": REPO}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    for _ in range(3):  # another free port where the one found free was taken before node 0 bound it
        result = subprocess.run(command, cwd=folder, env={**env, "MASTER_PORT": str(free_port())},
                                capture_output=True, text=True, timeout=600)
        if "EADDRINUSE" not in result.stderr:
            break
    return result, folder / "pascal" / "tiny" / "slurm" / "latest.pth"


SESSION_RUNS = {
    "test_two_nodes_train_are_preempted_resume_and_evaluate_like_one_node_with_two_processes":
        two_nodes_preempted_resumed_evaluated,
    "test_the_slurm_script_starts_one_node_per_task": slurm_run}


def test_two_nodes_train_are_preempted_resume_and_evaluate_like_one_node_with_two_processes(
        session_run, two_process_reference_run, capsys):
    (preempted, resumed, evaluated), latest_after_preemption, latest = session_run
    run_dir = latest.parent

    # Pre-emption: rank 0 checkpoints, both nodes exit 143.
    codes, outputs = preempted
    assert codes == [143, 143], outputs
    assert "node 0 of 2: meeting at 127.0.0.1" in outputs[0][1] and "node 1 of 2" in outputs[1][1]
    assert latest_after_preemption == 2
    assert "checkpoint written at iteration 2" in outputs[0][1]

    codes, outputs = resumed
    assert codes == [0, 0], outputs
    log = (run_dir / "train.log").read_text()
    assert "2 process(es) on cpu" in log and f"resumed from {latest}" in log
    # Global rank 0 alone writes: node 1's console has no run log lines, the run directory one set of files.
    assert "resumed from" in outputs[0][0] and "resumed from" not in outputs[1][0]
    kinds = {re.sub(r"^events\.out\.tfevents\..*", "events", name) for name in os.listdir(run_dir)}
    assert kinds == {"best.pth", "latest.pth", "config.yaml", "train.log", "run.lock", "events", "results.json"}
    assert len([name for name in os.listdir(run_dir) if name.startswith("events")]) == 2  # one per launch

    one_node = two_process_reference_run
    two_nodes = torch.load(latest, weights_only=True)
    assert two_nodes["iteration"] == one_node["iteration"] == 4
    assert differing_tensors(one_node, two_nodes) == []
    assert two_nodes["best_miou"] == one_node["best_miou"]

    # eval.py across the two nodes counts every validation image once: the table one process prints.
    codes, outputs = evaluated
    assert codes == [0, 0], outputs
    alone = evaluated_alone(capsys, latest)
    table = alone[alone.index("class"):]
    assert outputs[0][0].endswith(table) and "mIoU" not in outputs[1][0]


def test_a_node_that_cannot_see_the_run_directory_is_refused(tiny_voc, tmp_path, two_process_reference_run):
    """exp_dir must be shared: here node 1's exp_dir is another folder, as on a node-local disk."""
    shared, local = tmp_path / "shared", tmp_path / "local"
    # The run to go on with, in the shared exp_dir only: a two-process run's latest.pth (the reference run's, linked
    # rather than trained again; the nodes stop before they read or write it).
    run_dir = shared / "pascal" / "tiny" / "split_brain"
    run_dir.mkdir(parents=True)
    os.link(run_dir_of(two_process_reference_run) / "latest.pth", run_dir / "latest.pth")
    codes, outputs = run_nodes([train_command(tiny_voc, exp_dir, 1, *EXACT, "epochs=3", "run_name=split_brain")
                                for exp_dir in (shared, local)])
    assert codes == [2, 2], outputs
    for exp_dir, (_, stderr) in zip((shared, local), outputs):
        assert stderr.strip().splitlines()[-1] == (
            f"error: {exp_dir}/pascal/tiny/split_brain/latest.pth: rank 0 resumes from it, but a process on another "
            "node cannot see it; exp_dir must be on a filesystem that every node shares")
        assert "Traceback" not in stderr


def test_the_slurm_script_starts_one_node_per_task(session_run):
    result, latest = session_run
    assert result.returncode == 0, result.stderr
    assert "node 0 of 2: meeting at 127.0.0.1" in result.stderr and "node 1 of 2" in result.stderr
    state = torch.load(latest, weights_only=True)
    assert len(state["processes"]) == 2 and state["iteration"] == 1


def test_a_rendezvous_port_in_use_is_one_line(tiny_voc, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(train_command(tiny_voc, tmp_path, 1, "run_name=port"), cwd=REPO, capture_output=True,
                                text=True, timeout=300, env={**command_env(), "NNODES": "2", "NODE_RANK": "0",
                                                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"node 0 of 2: meeting at 127.0.0.1:{port}, 1 process(es) here"
    assert lines[1].startswith(f"error: the processes could not meet at 127.0.0.1:{port} (") and len(lines) == 2
    assert "EADDRINUSE" in lines[1]


def failure(exitcode, time=None, message=None, caused_by_another_process=False):
    data = {} if time is None else {"time": time, "message": message,
                                    "caused_by_another_process": caused_by_another_process}
    return SimpleNamespace(exitcode=exitcode, error_file_data=data, timestamp=time or 0,
                           signal_name=lambda: signal.Signals(-exitcode).name)


def test_the_job_ends_with_the_code_of_the_process_that_failed_by_itself():
    """Every process reported the same bad checkpoint; the launcher's SIGTERM caught rank 0 after its report, before
    its exit. Before, the job then ended 143 as if pre-empted (seen about once in ten eval.py runs)."""
    failures = {0: failure(-15, 1.0, "error: x.pth: no such checkpoint file"),
                1: failure(2, 1.5, "error: x.pth: no such checkpoint file")}
    assert _root_cause(failures) == ("error: x.pth: no such checkpoint file", 2)
    # A lost peer is the consequence; the process that failed first says why.
    failures = {0: failure(1, 1.0, "error: lost another process", caused_by_another_process=True),
                1: failure(3, 2.0, "error: iteration 4: non-finite loss")}
    assert _root_cause(failures) == ("error: iteration 4: non-finite loss", 3)
    assert _root_cause({1: failure(-9)}) == ("error: process 1 was killed by SIGKILL (its output above says why)", 137)
