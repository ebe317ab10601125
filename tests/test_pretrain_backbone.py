"""scripts/pretrain_backbone.py writes backbone weights that `pretrained:` loads, with its record beside them."""
import json
import sys

import torch

from conftest import run
from model.backbone import build_backbone, load_pretrained


def test_pretraining_writes_loadable_weights_and_reuses_them(tmp_path):
    out = tmp_path / "shapes_tv_resnet18.pth"
    command = [sys.executable, "scripts/pretrain_backbone.py", "--out", str(out), "--samples", "16", "--held-out", "4",
               "--iterations", "2", "--report-interval", "1", "--batch", "4"]
    output = run(command).stdout
    assert "held-out mIoU" in output and out.exists()
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["samples"] == 16 and 0 <= record["held_out_miou"] <= 100
    backbone = build_backbone("tv_resnet18", (False, False, True))
    before = backbone.layer1[0].conv1.weight.clone()
    load_pretrained(backbone, str(out))
    assert not torch.equal(before, backbone.layer1[0].conv1.weight)
    assert torch.equal(backbone.layer1[0].conv1.weight, torch.load(out)["layer1.0.conv1.weight"])
    assert not list(tmp_path.glob(".*.tmp"))
    stamp = out.stat().st_mtime_ns
    assert "reused" in run(command).stdout and out.stat().st_mtime_ns == stamp


def test_bad_arguments_stop_in_one_line(tmp_path):
    result = run([sys.executable, "scripts/pretrain_backbone.py", "--out", str(tmp_path / "w.pth"), "--batch", "0"],
                 check=False)
    assert result.returncode == 2 and "--batch must be at least 1" in result.stderr
