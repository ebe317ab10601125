"""scripts/convert_release_checkpoint.py and model/release.py: checkpoints of the authors' release
(github:lvliang6879/ScaleMatch) converted for this codebase, then evaluated by eval.py.

The release's tensor names and shapes are its real resnet50 network's (tests/data/release_resnet50_names.txt). The
fake release checkpoints carry OUR resnet50 network's tensors under those names (each listed name projected onto ours
by model.release.project_name, our tensor reshaped to the listed shape), so a converted checkpoint must give back
exactly our tensors.
"""
import contextlib
import io
import math
import os
import re
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import eval as evaluation
from conftest import REPO, run, run_script, start_runs
from dataset.semi import build_val_dataset
from model import build_model
from model.release import ReleaseStateError, convert_state_dict, project_name, release_state_dict
from util.checkpoint import CheckpointError
from util.config import ConfigError, load_config
from util.evaluation import evaluate

sys.path.insert(0, os.path.join(REPO, "scripts"))
import convert_release_checkpoint  # noqa: E402

NAMES_FILE = Path(__file__).parent / "data" / "release_resnet50_names.txt"
CONFIG = os.path.join(REPO, "configs", "pascal.yaml")
NETWORK = ["backbone=resnet50", "pretrained=null"]
SCRIPT = [sys.executable, "scripts/convert_release_checkpoint.py"]



def release_names() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the release's resnet50 network, in its state dict's order."""
    entries = []
    for line in NAMES_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, shape = line.partition(" ")
        entries.append((name, tuple(int(side) for side in shape.split("x")) if shape.strip() else ()))
    return entries


@pytest.fixture(scope="module")
def ours():
    """(config, state dict) of our resnet50 network, every float tensor nudged to distinct values so that a tensor
    loaded into the wrong place shows (BatchNorm weights, biases and statistics are otherwise all 1 or all 0)."""
    cfg = load_config(CONFIG, NETWORK)
    torch.manual_seed(0)
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for index, tensor in enumerate(model.state_dict().values()):
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.rand(tensor.shape, generator=generator))
            else:
                tensor.fill_(index)
    return cfg, OrderedDict((name, tensor.clone()) for name, tensor in model.state_dict().items())


def release_state(state: dict) -> "OrderedDict[str, torch.Tensor]":
    """A release state dict (names without 'module.') holding ``state``'s tensors."""
    return OrderedDict((name, state[project_name(name)].reshape(shape).clone()) for name, shape in release_names())


@pytest.fixture(scope="module")
def release_files(ours, tmp_path_factory):
    """A release checkpoint as its ScaleMatch.py writes it after a DDP run, and a bare state dict."""
    base = tmp_path_factory.mktemp("release")
    state = release_state(ours[1])
    torch.save({"model": OrderedDict(("module." + name, tensor) for name, tensor in state.items()),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "params": [0, 1]}]},
                "epoch": 3, "previous_best": 1.0}, base / "ddp.pth")
    torch.save(state, base / "bare.pth")
    return base, state


def convert_main(*argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        convert_release_checkpoint.main([str(arg) for arg in argv])
    return out.getvalue()


@pytest.fixture(scope="module")
def converted(release_files, tiny_voc, tmp_path_factory):
    """The DDP-style checkpoint converted through the CLI's main, for the tiny Pascal-layout dataset."""
    data_root, splits_dir = tiny_voc
    out = tmp_path_factory.mktemp("converted") / "release_converted.pth"
    stdout = convert_main(release_files[0] / "ddp.pth", out, "--config", CONFIG, *NETWORK, f"data_root={data_root}",
                          f"splits_dir={splits_dir}", "split=tiny")
    return out, stdout


def assert_state_equals(model, state):
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


def test_release_names_cover_our_network_one_to_one(ours):
    _, state = ours
    names = release_names()
    assert len({name for name, _ in names}) == len(names) == 437
    projected = {name: project_name(name) for name, _ in names}
    assert [name for name, ours_name in projected.items() if ours_name is None] == []
    assert len(set(projected.values())) == len(names)  # distinct tensors of ours
    assert set(projected.values()) == set(state)  # together: our whole state dict
    reshaped = []
    for name, shape in names:
        tensor = state[projected[name]]
        assert tensor.numel() == math.prod(shape), name
        if tensor.shape != shape:
            reshaped.append(name)
            assert shape == (1, 1, *tensor.shape), name
    # Only Vision-RWKV's token-shift mix ratios differ in layout: (1, 1, C) in the release, (C,) here.
    assert reshaped and all(re.fullmatch(r"RWKV_layers\.layers\.0\.(attn|mlp)\.spatial_mix_[kvr]", name)
                            for name in reshaped)


@pytest.mark.parametrize("release, expected", [
    ("backbone.conv1.0.weight", "segmenter.backbone.conv1.0.weight"),
    ("backbone.layer4.2.bn3.running_var", "segmenter.backbone.layer4.2.bn3.running_var"),
    ("head.b0.0.weight", "segmenter.aspp.branches.0.0.weight"),
    ("head.b3.1.num_batches_tracked", "segmenter.aspp.branches.3.1.num_batches_tracked"),
    ("head.b4.gap.1.weight", "segmenter.aspp.branches.4.conv.0.weight"),
    ("head.b4.gap.2.running_mean", "segmenter.aspp.branches.4.conv.1.running_mean"),
    ("head.project.0.weight", "segmenter.aspp.project.0.weight"),
    ("reduce.1.bias", "segmenter.reduce.1.bias"),
    ("fuse.0.weight", "segmenter.fuse.0.0.weight"),
    ("fuse.1.weight", "segmenter.fuse.0.1.weight"),
    ("fuse.3.weight", "segmenter.fuse.1.0.weight"),
    ("fuse.4.running_var", "segmenter.fuse.1.1.running_var"),
    ("classifier.bias", "segmenter.classifier.bias"),
    ("RWKV_layers.reduce.0.weight", "cif.reduce.0.weight"),
    ("RWKV_layers.layers.0.norm2.bias", "cif.rwkv.0.ln2.bias"),
    ("RWKV_layers.layers.0.layer_scale_1", "cif.rwkv.0.gamma1"),
    ("RWKV_layers.layers.0.attn.spatial_mix_k", "cif.rwkv.0.att.spatial_mix_k"),
    ("RWKV_layers.layers.0.mlp.value.weight", "cif.rwkv.0.ffn.value.weight"),
    ("RWKV_layers.norm.weight", "cif.norm.weight"),
    ("se_block.fc1.bias", "cif.attention.squeeze.bias"),
    ("se_block.fc2.weight", "cif.attention.excite.weight"),
    ("scale_attn.9.weight", "cif.gate_head.9.weight"),
    ("aux_head.weight", None),
    ("fuse.2.weight", None),  # a ReLU's index: nothing of the release lives there
])
def test_project_name(release, expected):
    assert project_name(release) == expected


def test_the_cli_converts_a_ddp_checkpoint(converted, ours, tiny_voc):
    out, stdout = converted
    assert stdout.strip() == f"wrote {out}: 437 tensors, pascal resnet50 nclass 21, release epoch 3"
    model, cfg, state = evaluation.load_trained_model(str(out), torch.device("cpu"))
    assert not model.training
    assert_state_equals(model, ours[1])
    assert (cfg["backbone"], cfg["nclass"], cfg["cif_gate"], cfg["data_root"]) == ("resnet50", 21, "release",
                                                                                   tiny_voc[0])
    assert state["epoch"] == 3 and state["release"]["previous_best"] == 1.0
    assert state["release"]["source"].endswith("ddp.pth")


def test_the_cli_converts_a_bare_state_dict(release_files, ours, tmp_path):
    out = tmp_path / "bare_converted.pth"
    stdout = convert_main(release_files[0] / "bare.pth", out, "--config", CONFIG, *NETWORK)
    assert "437 tensors" in stdout and stdout.strip().endswith("release epoch 0")
    model, _, state = evaluation.load_trained_model(str(out), torch.device("cpu"))
    assert_state_equals(model, ours[1])
    assert state["epoch"] == 0 and state["release"]["previous_best"] is None


def test_eval_refuses_an_unconverted_release_checkpoint(release_files):
    with pytest.raises(CheckpointError, match=r"ddp\.pth: not a scalematch checkpoint .*convert_release_checkpoint"):
        evaluation.load_trained_model(str(release_files[0] / "ddp.pth"), torch.device("cpu"))


def test_convert_refuses_to_overwrite_its_input_or_drop_the_cif(release_files, tmp_path):
    path = str(release_files[0] / "bare.pth")
    with pytest.raises(CheckpointError, match="overwrite the release checkpoint"):
        convert_release_checkpoint.convert(path, path, CONFIG, NETWORK)
    with pytest.raises(ConfigError, match="cif is false, but the release's network always has the CIF module"):
        convert_release_checkpoint.convert(path, str(tmp_path / "out.pth"), CONFIG, [*NETWORK, "cif=false"])
    assert os.listdir(tmp_path) == []


def test_release_state_dict_strips_module_prefixes_and_refuses_non_tensors():
    weight = torch.ones(2)
    assert list(release_state_dict({"model": {"module.a.b": weight}}, "x")) == ["a.b"]
    assert list(release_state_dict({"a.b": weight}, "x")) == ["a.b"]
    for bad in ({"model": {"a": 1}}, {"model": {}}, [weight], {"model": [weight]}):
        with pytest.raises(ReleaseStateError, match="^x: not a release checkpoint"):
            release_state_dict(bad, "x")


def test_convert_state_dict_reshapes_only_the_layout():
    target = {"cif.rwkv.0.att.spatial_mix_k": torch.zeros(4), "segmenter.classifier.bias": torch.zeros(3)}
    mix = torch.arange(4.0).reshape(1, 1, 4)
    converted = convert_state_dict({"RWKV_layers.layers.0.attn.spatial_mix_k": mix,
                                    "classifier.bias": torch.ones(3)}, target, "x")
    assert torch.equal(converted["cif.rwkv.0.att.spatial_mix_k"], torch.arange(4.0))
    with pytest.raises(ReleaseStateError, match=r"'classifier\.bias' has shape \(4,\).*\(3,\)"):
        convert_state_dict({"RWKV_layers.layers.0.attn.spatial_mix_k": mix, "classifier.bias": torch.ones(4)},
                           target, "x")


def _without(state, name):
    return OrderedDict((key, tensor) for key, tensor in state.items() if key != name)


# (file content from the release state, overrides, what the one-line message must name)
ERROR_CASES = {
    "not_a_checkpoint": (None, [], ["not a readable checkpoint"]),
    "model_not_a_state_dict": (lambda state: {"model": [1, 2, 3], "epoch": 0}, [], ["not a release checkpoint"]),
    "missing_tensor": (lambda state: _without(state, "se_block.fc2.bias"), [],
                       ["1 tensor(s) missing", "cif.attention.excite.bias"]),
    "unexpected_tensor": (lambda state: OrderedDict(state, **{"RWKV_layers.layers.1.layer_scale_1": torch.ones(32)}),
                          [], ["1 unexpected tensor(s)", "RWKV_layers.layers.1.layer_scale_1"]),
    "class_count": (lambda state: {"model": state, "epoch": 1}, ["nclass=19"], ["has 21 classes", "nclass 19"]),
    "gate_size": (lambda state: state, ["cif_gate_channels=64"], ["'scale_attn.3.weight' has shape (128, 544, 1, 1)",
                                                                  "(64, 544, 1, 1)"]),
}


def run_cli(argv, monkeypatch, capsys) -> tuple[int, str, str]:
    """The script run as ``python scripts/convert_release_checkpoint.py ARGV`` (its __main__ block), in this process
    to spare the interpreter start: (exit status, stdout, stderr)."""
    status = run_script(monkeypatch, SCRIPT[1], *argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def write_error_case(case, release, path):
    make = ERROR_CASES[case][0]
    if make is None:
        path.write_text("epoch 3, previous best 1.0\n")
    else:
        torch.save(make(release), path)


def assert_one_line_error(case, status, stdout, stderr, source, out):
    assert status == 2, stderr
    assert stdout == "" and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"error: {source}: ")
    for part in ERROR_CASES[case][2]:
        assert part in stderr
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_one_line_and_write_nothing(case, release_files, tmp_path, monkeypatch, capsys):
    source, out = tmp_path / f"{case}.pth", tmp_path / "out" / "converted.pth"
    write_error_case(case, release_files[1], source)
    status, stdout, stderr = run_cli([source, out, "--config", CONFIG, *NETWORK, *ERROR_CASES[case][1]],
                                     monkeypatch, capsys)
    assert_one_line_error(case, status, stdout, stderr, source, out)


@pytest.fixture(scope="module", autouse=True)
def script_run(request, release_files, tmp_path_factory):
    """{test node name: Future of (source, out, CompletedProcess)} of the script run by a real interpreter on the
    class_count case, started with the module if its test runs, so that its interpreter start overlaps the tests that
    run in this process."""
    def class_count(folder):
        source, out = folder / "class_count.pth", folder / "out" / "converted.pth"
        write_error_case("class_count", release_files[1], source)
        command = [*SCRIPT, str(source), str(out), "--config", CONFIG, *NETWORK, *ERROR_CASES["class_count"][1]]
        return source, out, run(command, check=False)

    return start_runs(request, tmp_path_factory, {"test_the_script_exits_with_status_2": class_count})


def test_the_script_exits_with_status_2(script_run, request):
    """The same through a real interpreter: the exit status a shell sees."""
    source, out, result = script_run[request.node.name].result()
    assert_one_line_error("class_count", result.returncode, result.stdout, result.stderr, source, out)


def assert_miou_table(stdout, out, flags):
    """eval.py's table for the converted checkpoint, ending in the mIoU its evaluation in this process gives."""
    assert f"checkpoint {out} (epoch 3), 4 val images" in stdout
    table = stdout[stdout.index("class "):].splitlines()
    assert table[1].split()[0] == "background" and len(table) == 1 + 21 + 2 and table[-2].startswith("mIoU (all)")
    model, cfg, _ = evaluation.load_trained_model(str(out), torch.device("cpu"))
    predict = evaluation.build_predictor(model, evaluation.parse_args(["--checkpoint", str(out), *flags]))
    metric = evaluate(predict, build_val_dataset(cfg, cfg["splits_dir"]), cfg, torch.device("cpu"))
    assert table[-1].split()[:2] == ["mIoU", f"{metric.miou():.2f}"]
    assert table[-2].split()[2] == f"{metric.miou_all_classes():.2f}"


@pytest.mark.parametrize("flags", [[], ["--multiscale-cif"]])
def test_a_converted_checkpoint_evaluates(converted, flags, capsys):
    """eval.py's main on the converted checkpoint, in this process (a real interpreter's eval.py is
    test_eval_cli.py's): it returns, and prints the table of the checkpoint's own evaluation."""
    out, _ = converted
    evaluation.main(["--checkpoint", str(out), "--cpu", *flags])
    assert_miou_table(capsys.readouterr().out, out, flags)
