"""scripts/cif_gate.py: how often the trained CIF gate leans to the right scale where 1x and v disagree."""
import sys

import torch

from conftest import run
from model import build_model
from util.config import validate

sys.path.insert(0, "scripts")
from cif_gate import gate_counts  # noqa: E402


def test_gate_counts_on_a_hand_made_case():
    mask = torch.tensor([[0, 1, 2, 3, 255]])
    pred_1x = torch.tensor([[0, 1, 0, 0, 1]])  # right, right, wrong, wrong, ignored
    pred_v = torch.tensor([[0, 2, 2, 1, 0]])   # right, wrong, right, wrong, ignored
    gate = torch.tensor([[0.9, 0.8, 0.7, 0.2, 0.1]])
    fused = torch.tensor([[0, 1, 2, 3, 0]])
    counts = gate_counts(pred_1x, pred_v, fused, gate, mask)
    # Contested: pixels 1 (1x right; gate 0.8 leans to 1x: right) and 2 (v right; gate 0.7 leans to 1x: wrong).
    assert counts["contested"] == 2 and counts["gate_right"] == 1
    assert counts["pixels"] == 4 and abs(counts["gate_sum"] - 2.6) < 1e-6
    assert (counts["right_1x"], counts["right_v"], counts["right_fused"]) == (2, 2, 4)


def test_cif_gate_prints_a_row_per_scale(tiny_voc, tmp_path):
    data_root, splits_dir = tiny_voc
    cfg = validate({"dataset": "pascal", "data_root": str(data_root), "splits_dir": str(splits_dir), "split": "tiny", "nclass": 21,
                    "backbone": "tv_resnet18", "pretrained": None, "cif_channels": 8, "cif_gate_channels": 8,
                    "crop_size": 32}, "test")
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict(), "config": cfg, "epoch": 0}, tmp_path / "cif.pth")
    out = run([sys.executable, "scripts/cif_gate.py", "--checkpoint", str(tmp_path / "cif.pth"), "--cpu",
               "--scales", "0.5", "2"]).stdout
    rows = [line for line in out.splitlines() if line.startswith("| 0.5 ") or line.startswith("| 2 ")]
    assert len(rows) == 2
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert 0 <= float(cells[1]) <= 1 and all(cell.endswith("%") for cell in cells[2:])

    plain_cfg = dict(cfg, cif=False, fusion="none")
    torch.save({"model": build_model(plain_cfg).state_dict(), "config": plain_cfg, "epoch": 0}, tmp_path / "plain.pth")
    refused = run([sys.executable, "scripts/cif_gate.py", "--checkpoint", str(tmp_path / "plain.pth"), "--cpu"],
                  check=False)
    assert refused.returncode != 0 and "cif: false" in refused.stderr
    missing = run([sys.executable, "scripts/cif_gate.py", "--checkpoint", str(tmp_path / "absent.pth"), "--cpu"],
                  check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1
