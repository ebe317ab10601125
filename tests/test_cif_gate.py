"""scripts/cif_gate.py: how often the trained CIF gate leans to the right scale where 1x and v disagree."""
import sys

import torch

from conftest import run
from model import build_model
from util.config import validate

sys.path.insert(0, "scripts")
from cif_gate import COUNTS, gate_counts, gate_figures, gate_row  # noqa: E402
from study import GATE_SCALES, gate_columns  # noqa: E402


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
    assert abs(counts["gate_square_sum"] - (0.81 + 0.64 + 0.49 + 0.04)) < 1e-6  # the ignored pixel left out
    # Mean 0.65; population std sqrt(1.98 / 4 - 0.65²) = sqrt(0.0725).
    figures = gate_figures(counts)
    assert abs(figures["mean gate"] - 0.65) < 1e-6 and abs(figures["gate std"] - 0.0725 ** 0.5) < 1e-6
    assert (counts["right_1x"], counts["right_v"], counts["right_fused"]) == (2, 2, 4)


def test_gate_std_is_over_the_valid_pixels_of_every_batch():
    torch.manual_seed(0)
    total, valid_gates = dict.fromkeys(COUNTS, 0.0), []
    for _ in range(3):
        mask = torch.randint(0, 3, (2, 8, 8))
        mask[:, 0] = 255
        gate = torch.rand(2, 8, 8)
        for key, value in gate_counts(torch.randint(0, 3, (2, 8, 8)), torch.randint(0, 3, (2, 8, 8)),
                                      torch.randint(0, 3, (2, 8, 8)), gate, mask).items():
            total[key] += value
        valid_gates.append(gate[mask != 255])
    expected = torch.cat(valid_gates).double()
    figures = gate_figures(total)
    assert abs(figures["mean gate"] - expected.mean().item()) < 1e-6
    assert abs(figures["gate std"] - expected.std(unbiased=False).item()) < 1e-6
    # scripts/study.py reads the printed rows back: mean and std with 4 decimals, percentages with 2.
    columns = gate_columns("\n".join(gate_row(scale, total) for scale in GATE_SCALES))
    assert columns["gate_0.5_std"] == f"{expected.std(unbiased=False).item():.4f}"
    assert columns["gate_2.0_right"] == f"{100 * total['gate_right'] / total['contested']:.2f}"


def test_cif_gate_prints_a_row_per_scale(tiny_voc, tmp_path):
    data_root, splits_dir = tiny_voc
    cfg = validate({"dataset": "pascal", "data_root": str(data_root), "splits_dir": str(splits_dir), "split": "tiny", "nclass": 21,
                    "backbone": "tv_resnet18", "pretrained": None, "cif_channels": 8, "cif_gate_channels": 8,
                    "crop_size": 32}, "test")
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict(), "config": cfg, "epoch": 0}, tmp_path / "cif.pth")
    out = run([sys.executable, "scripts/cif_gate.py", "--checkpoint", str(tmp_path / "cif.pth"), "--cpu",
               "--scales", *map(str, GATE_SCALES)]).stdout
    rows = [line for line in out.splitlines() if line.startswith(("| 0.25 ", "| 0.5 ", "| 1.5 ", "| 2 "))]
    assert len(rows) == 4
    columns = gate_columns(out)  # what scripts/study.py records from this output
    assert columns["gate_1.5_std"] == rows[2].split("|")[3].strip()
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 8 and 0 <= float(cells[1]) <= 1 and 0 <= float(cells[2]) <= 0.5  # mean gate, gate std
        assert all(cell.endswith("%") for cell in cells[3:])

    plain_cfg = dict(cfg, cif=False, fusion="none")
    torch.save({"model": build_model(plain_cfg).state_dict(), "config": plain_cfg, "epoch": 0}, tmp_path / "plain.pth")
    refused = run([sys.executable, "scripts/cif_gate.py", "--checkpoint", str(tmp_path / "plain.pth"), "--cpu"],
                  check=False)
    assert refused.returncode != 0 and "cif: false" in refused.stderr
    missing = run([sys.executable, "scripts/cif_gate.py", "--checkpoint", str(tmp_path / "absent.pth"), "--cpu"],
                  check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1
