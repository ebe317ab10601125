"""The release-faithful CIF and fusion, pinned to outputs of the authors' own code.

tests/data/release_cif_reference.pt was written by ../shared/tools/release_model.py from the release (commit 445cde83):

    python ../shared/tools/release_model.py RELEASE_DIR --backbone resnet50 --cif-only --size 33 --batch 1 \
        --write-reference tests/data/release_cif_reference.pt

It holds the release CIF's weights (RWKV_layers, se_block, scale_attn; calibrated BatchNorm statistics, perturbed
affines), the decoder features and logits of the 1x branch per t and of the rescaled branch per v that its CIF read,
and per (v, t) the CIF's outputs. Here those inputs go through this codebase's CIF, loaded through the converter's
name mapping, and must give the release's outputs (docs/release.md: scripts/release_parity.py checks the whole network).
"""
from pathlib import Path

import pytest
import torch

from model.cif import CrossScaleInteractionFusion
from model.release import convert_state_dict
from util.resize import resize_to

REFERENCE = Path(__file__).parent / "data" / "release_cif_reference.pt"
TOLERANCE = 1e-4  # relative to the largest magnitude of the release's output


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


@pytest.fixture(scope="module")
def cif(reference):
    module = CrossScaleInteractionFusion()
    target = {f"cif.{name}": tensor for name, tensor in module.state_dict().items()}
    converted = convert_state_dict(reference["state_dict"], target, str(REFERENCE))
    module.load_state_dict({name.removeprefix("cif."): tensor for name, tensor in converted.items()})
    return module.eval()


def assert_close(ours: torch.Tensor, release: torch.Tensor, what: str) -> None:
    assert ours.shape == release.shape, what
    relative = float((ours - release).abs().max() / release.abs().max())
    assert relative <= TOLERANCE, f"{what}: {relative:.2e} of max|release|"


def cases(reference):
    branch_1x = {branch["t"]: branch for branch in reference["branch_1x"]}
    branch_v = {branch["v"]: branch for branch in reference["branch_v"]}
    for case in reference["cases"]:
        yield case, branch_1x[case["t"]], branch_v[case["v"]]


def test_reference_covers_both_sides_of_one_and_every_feature_scale(reference):
    assert reference["info"]["commit"].startswith("445cde83")
    assert {case["v"] for case in reference["cases"]} == {0.25, 0.5, 1.5, 2.0}
    assert {case["t"] for case in reference["cases"]} == {0.75, 1.0, 1.25}


def test_interacted_features_match_the_release(reference, cif):
    with torch.no_grad():
        for case, branch_1x, branch_v in cases(reference):
            features_1x = branch_1x["feature"]
            features_v = resize_to(branch_v["feature"], features_1x.shape[-2:])
            low, high = (features_1x, features_v) if case["v"] > 1 else (features_v, features_1x)
            assert_close(cif.interact(torch.cat((low, high), 1)), case["rwkv_out"], f"rwkv_out v={case['v']}")


def test_gate_and_fused_prediction_match_the_release(reference, cif):
    gates = []
    cif.gate_head.register_forward_hook(lambda module, args, out: gates.append(out))
    with torch.no_grad():
        for case, branch_1x, branch_v in cases(reference):
            v = case["v"]
            # What ScaleMatchNet hands the CIF: the rescaled logits at their own size below 1x, at 1x above.
            pred_v = branch_v["pred_size"] if v > 1 else branch_v["logits"]
            fused, gate_1x = cif(branch_1x["feature"], branch_1x["pred_ori"], branch_v["feature"], pred_v, v)
            what = f"v={v} t={case['t']}"
            assert_close(gates[-1], case["gate"], f"gate {what}")
            assert_close(fused, case["pred_joint"], f"pred_joint {what}")
            # The returned weight of 1x is the release's gate_1x, resized the way the fusion applies it.
            size = fused.shape[-2:]
            expected = (resize_to(case["gate_1x"], size) if v > 1
                        else 1 - resize_to(resize_to(case["gate"], pred_v.shape[-2:]), size))
            assert_close(gate_1x, expected, f"gate_1x {what}")


def test_the_paper_blend_differs_from_the_release_below_one_only(reference, cif):
    paper = CrossScaleInteractionFusion(gate_input="paper").eval()
    with torch.no_grad():
        for case, branch_1x, branch_v in cases(reference):
            gate = case["gate"]
            low, high = ((branch_1x["pred_ori"], branch_v["pred_size"]) if case["v"] > 1
                         else (branch_v["logits"], branch_1x["pred_ori"]))
            release_fused, _ = cif.blend(gate, low, high)
            paper_fused, _ = paper.blend(gate, low, high)
            assert_close(release_fused, case["pred_joint"], f"blend v={case['v']}")
            if case["v"] > 1:
                assert torch.equal(release_fused, paper_fused)
            else:
                assert not torch.allclose(release_fused, paper_fused, rtol=0, atol=1e-4)
