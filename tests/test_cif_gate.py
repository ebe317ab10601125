"""scripts/cif_gate.py: how often the trained CIF gate leans to the right scale where 1x and v disagree."""
import json
import math
import sys

import pytest
import torch

from conftest import concurrently, run
from dataset.semi import build_val_dataset
from eval import load_trained_model
from model import build_model
from util.config import validate

sys.path.insert(0, "scripts")
import cif_gate  # noqa: E402
from cif_gate import (COUNTS, constant_gate_right, gate_counts, gate_figures, gate_report,  # noqa: E402
                      gate_totals)
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
    figures = gate_figures(dict.fromkeys(COUNTS, 0.0) | counts)  # the constant-gate pass adds right_constant
    assert abs(figures["mean gate"] - 0.65) < 1e-6 and abs(figures["gate std"] - 0.0725 ** 0.5) < 1e-6
    assert (counts["right_1x"], counts["right_v"], counts["right_fused"]) == (2, 2, 4)
    # Of the two contested pixels 1x is right on one; the mean 0.65 leans to 1x, so a constant is right on 1 of 2.
    assert counts["contested_right_1x"] == 1 and figures["constant right"] == 0.5


def test_a_constant_gate_fuses_by_its_weight_and_leans_to_the_side_of_its_mean():
    mask = torch.tensor([[0, 1, 255]])
    logits_1x = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # classes 0, 1, 0 at the three pixels
    logits_v = torch.tensor([[[0.0, 3.0, 0.0], [1.0, 0.0, 9.0]]])  # classes 1, 0, 1
    assert constant_gate_right(logits_1x, logits_v, 1.0, mask) == 2  # all 1x: both valid pixels right
    assert constant_gate_right(logits_1x, logits_v, 0.0, mask) == 0  # all v: both wrong
    # Weight 0.6 of 1x: pixel 0 is 1.2 vs 1.2 (a tie: argmax takes class 0, right), pixel 1 0.4 vs 0.6 (wrong).
    assert constant_gate_right(logits_1x, logits_v, 0.6, mask) == 1
    # A mean below 0.5 leans to v: right where 1x is not.
    counts = dict.fromkeys(COUNTS, 0.0) | {"pixels": 10.0, "contested": 4.0, "contested_right_1x": 1.0, "gate_sum": 3.0}
    assert gate_figures(counts)["constant right"] == 0.75


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
    # scripts/study.py records the --json figures: mean and std with 4 decimals, percentages with 2.
    columns = gate_columns({f"{scale:g}": figures for scale in GATE_SCALES})
    assert columns["gate_0.5_std"] == f"{expected.std(unbiased=False).item():.4f}"
    assert columns["gate_2.0_right"] == f"{100 * total['gate_right'] / total['contested']:.2f}"


def test_cif_gate_prints_a_row_per_scale(tiny_voc, tmp_path, capsys):
    """The script's table and --json on a CIF checkpoint; its refusal of a checkpoint without the gate; and, through
    a real interpreter, a missing checkpoint as exit status 2 and one line. The first two run the script's main in
    this process."""
    # Started first: its interpreter start overlaps the runs in this process.
    missing = concurrently({"run": lambda: run([sys.executable, "scripts/cif_gate.py", "--checkpoint",
                                                str(tmp_path / "absent.pth"), "--cpu"], check=False)})["run"]
    data_root, splits_dir = tiny_voc
    cfg = validate({"dataset": "pascal", "data_root": str(data_root), "splits_dir": str(splits_dir), "split": "tiny", "nclass": 21,
                    "backbone": "tv_resnet10", "head_channels": 32, "pretrained": None, "cif_channels": 8,
                    "cif_gate_channels": 8, "crop_size": 32}, "test")
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict(), "config": cfg, "epoch": 0}, tmp_path / "cif.pth")
    cif_gate.main(["--checkpoint", str(tmp_path / "cif.pth"), "--cpu", "--json", str(tmp_path / "gate.json"),
                   "--scales", *map(str, GATE_SCALES)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| 0.25 ", "| 0.5 ", "| 1.5 ", "| 2 "))]
    assert len(rows) == 4
    columns = gate_columns(json.loads((tmp_path / "gate.json").read_text()))  # what scripts/study.py records
    assert columns["gate_1.5_std"] == rows[2].split("|")[3].strip()
    assert columns["gate_2.0_right"] == rows[3].split("|")[5].strip().rstrip("%")
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 10 and all(cell.endswith("%") for cell in cells[3:])
    # The rows are the report of that model on that validation set (the report's figures are checked above).
    model, _, _ = load_trained_model(str(tmp_path / "cif.pth"), torch.device("cpu"))
    report = gate_report(gate_totals(model, build_val_dataset(cfg, cfg["splits_dir"]), list(GATE_SCALES),
                                     torch.device("cpu")))
    assert rows == [line for line in report.splitlines() if line.startswith(("| 0.25 ", "| 0.5 ", "| 1.5 ", "| 2 "))]

    plain_cfg = dict(cfg, cif=False, fusion="none")
    torch.save({"model": build_model(plain_cfg).state_dict(), "config": plain_cfg, "epoch": 0}, tmp_path / "plain.pth")
    # SystemExit(message): an interpreter prints the message on stderr and exits with status 1.
    with pytest.raises(SystemExit) as refused:
        cif_gate.main(["--checkpoint", str(tmp_path / "plain.pth"), "--cpu"])
    assert isinstance(refused.value.code, str) and "cif: false" in refused.value.code
    missing = missing.result()
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1


def test_a_gate_that_is_constant_matches_the_constant_gate_columns():
    """A gate head held at 0.8 everywhere (the weight of the lower-resolution side): the per-pixel columns must equal
    the constant-gate ones, which checks that mean * pred_1x + (1 - mean) * pred_v is the model's own blend."""
    for gate_input in ("release", "paper"):
        # tv_resnet18's 256-channel head: the narrow test network's 1x and v = 2 predictions agree on every pixel.
        cfg = validate({"dataset": "pascal", "data_root": "unused", "nclass": 4, "backbone": "tv_resnet18",
                        "pretrained": None, "cif_channels": 8, "cif_gate_channels": 8, "cif_gate": gate_input,
                        "crop_size": 32}, "test")
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        held = torch.nn.Conv2d(cfg["cif_gate_channels"], 1, 1)
        torch.nn.init.zeros_(held.weight)
        torch.nn.init.constant_(held.bias, math.log(4))  # sigmoid(log 4) = 0.8
        model.cif.gate_head[-2] = held
        # Masks the two sides get half right each: the 1x prediction on the left, the v = 2 one on the right.
        val_set = []
        for _ in range(3):
            image = torch.randn(3, 32, 48)
            with torch.no_grad():
                out = model(image[None], image_scales=(2.0,))
            mask = torch.cat((out["pred"].argmax(1)[0, :, :24], out["pred_scaled"][0].argmax(1)[0, :, 24:]), dim=1)
            val_set.append({"image": image, "mask": mask})
        rows = gate_report(gate_totals(model, val_set, list(GATE_SCALES), torch.device("cpu")))
        cells = {float(row.split("|")[1]): [cell.strip() for cell in row.strip("|").split("|")]
                 for row in rows.splitlines()[2:]}
        for scale, row in cells.items():
            assert row[1] == ("0.2000" if scale < 1 else "0.8000") and row[2] == "0.0000"  # mean gate, gate std
            assert row[4] == row[8] and row[7] == row[9], (gate_input, row)
        # The check could fail: 1x and v disagree on some pixels, so a swapped weight would change the fusion.
        assert float(cells[2.0][3].rstrip("%")) > 0 and cells[2.0][5] != cells[2.0][6]
