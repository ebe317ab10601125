"""The release's loss and metric helpers on crafted inputs, beside this codebase's, and the fixture that pins them.

    python scripts/release_helpers_reference.py RELEASE_DIR [--write tests/data/release_helpers_reference.pt]

RELEASE_DIR is the release's git directory (the `fetch` tool's mirror of github:lvliang6879/ScaleMatch) or a
checkout; its files are extracted to a temporary folder and imported from there:

  * the unsupervised loss as its ScaleMatch.py computes it: `criterion_u` (the expression of its assignment in
    ScaleMatch.py, without `.cuda(...)`) per pixel, then util/train_utils.py's confidence_weighted_loss, against
    util.losses.masked_cross_entropy with confident = conf >= conf_thresh (as scalematch.py passes it);
  * util/ohem.py's ProbOhemCrossEntropy2d against util.losses.OHEMCrossEntropy: min_kept below, equal to and above
    the valid count, 0, ties at the threshold and at the min_kept-th probability, every pixel ignored, large logits;
  * util/utils.py's intersectionAndUnion (numpy) against util.metrics.intersection_and_union: 1, 2 and 3 dims,
    ignored pixels, absent classes, and labels outside 0..K-1.

Prints one line per case (release, here, difference) and writes the inputs with the release's outputs, which
tests/test_release_helpers.py checks this codebase against without the release. Exit status 1 when a case differs
beyond float32 rounding, apart from the differences docs/release.md lists (every pixel ignored: the release divides
0 by 0; OHEM with min_kept 0: the release mines nothing; a label outside 0..K-1: the release miscounts or drops it,
this codebase raises).
"""
import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from util.losses import OHEMCrossEntropy, masked_cross_entropy  # noqa: E402
from util.metrics import intersection_and_union  # noqa: E402

FIXTURE = ROOT / "tests" / "data" / "release_helpers_reference.pt"
TOLERANCE = 1e-6  # relative, float32 rounding of the same operations in another order
CONF_THRESH = 0.95  # configs/pascal.yaml of the release and of this codebase


def extract(release_dir: str, destination: str) -> None:
    if (Path(release_dir) / "ScaleMatch.py").is_file():
        shutil.copytree(release_dir, destination, dirs_exist_ok=True)
        return
    archive = subprocess.run(["git", f"--git-dir={release_dir}", "archive", "HEAD"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"error: {release_dir}: not a release checkout or git directory "
                         f"({archive.stderr.decode().strip()})")
    subprocess.run(["tar", "-x", "-C", destination], input=archive.stdout, check=True)


def import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def release_criterion_u(checkout: Path) -> nn.Module:
    """ScaleMatch.py's `criterion_u = ...` evaluated on the CPU (its `.cuda(local_rank)` dropped)."""
    source = (checkout / "ScaleMatch.py").read_text()
    found = re.search(r"^\s*criterion_u\s*=\s*(.+?)\s*$", source, re.M)
    if found is None:
        raise SystemExit(f"error: {checkout}/ScaleMatch.py: no criterion_u assignment")
    return eval(re.sub(r"\.cuda\([^)]*\)", "", found.group(1)), {"nn": nn})


# --- crafted inputs ---------------------------------------------------------------------------------------------

def confidence_cases(generator: torch.Generator) -> list[dict]:
    """Student logits, the teacher's confidence and pseudo-label, the ignore map (0 or 255)."""
    def case(name, logits, teacher, ignore):
        confidence, pseudo_label = teacher.softmax(1).max(1)
        return dict(name=name, logits=logits, confidence=confidence, pseudo_label=pseudo_label, ignore=ignore)

    shape = (2, 5, 6, 7)
    logits = torch.randn(shape, generator=generator) * 3
    teacher = torch.randn(shape, generator=generator) * 4
    ignore = torch.where(torch.rand(2, 6, 7, generator=generator) < 0.3, 255, 0)
    cases = [case("random, 30 % ignored", logits, teacher, ignore)]
    # Confidences exactly at the threshold: the teacher's top probability set to CONF_THRESH.
    tied = case("confidence equal to the threshold", logits, teacher, ignore)
    tied["confidence"] = torch.where(torch.rand(2, 6, 7, generator=generator) < 0.5, CONF_THRESH,
                                     tied["confidence"])
    cases.append(tied)
    cases.append(case("every pixel ignored", logits, teacher, torch.full((2, 6, 7), 255)))
    cases.append(case("nothing ignored, large logits", logits * 1e3, teacher * 1e3, torch.zeros(2, 6, 7,
                                                                                              dtype=torch.long)))
    return cases


def ohem_cases(generator: torch.Generator) -> list[dict]:
    """Logits (2, 4, 5, 6), targets with some 255, and (thresh, min_kept)."""
    logits = torch.randn(2, 4, 5, 6, generator=generator) * 2
    target = torch.randint(0, 4, (2, 5, 6), generator=generator)
    target = torch.where(torch.rand(2, 5, 6, generator=generator) < 0.25, 255, target)
    valid = int((target != 255).sum())
    # Uniform logits give every class probability 0.25 exactly: ties at a 0.25 threshold and among the hardest.
    flat = logits.clone()
    flat[:, :, :2] = 0.0
    huge = logits * 1e4
    cases = []
    for name, case_logits, thresh, min_kept in [
        ("min_kept below the valid count", logits, 0.7, valid // 3),
        ("min_kept equal to the valid count", logits, 0.7, valid),
        ("min_kept above the valid count", logits, 0.7, valid + 5),
        ("min_kept 0", logits, 0.7, 0),
        ("min_kept 1", logits, 0.3, 1),
        ("ties at the threshold (p = 0.25 = thresh)", flat, 0.25, 3),
        ("ties at the min_kept-th probability", flat, 0.1, 5),
        ("large logits (saturated probabilities)", huge, 0.7, valid // 2),
    ]:
        cases.append(dict(name=name, logits=case_logits, target=target, thresh=thresh, min_kept=min_kept))
    for min_kept in (0, 10):
        cases.append(dict(name=f"every pixel ignored, min_kept {min_kept}", logits=logits,
                          target=torch.full_like(target, 255), thresh=0.7, min_kept=min_kept))
    return cases


def iou_cases(generator: torch.Generator) -> list[dict]:
    """pred and target label maps with K classes; target holds 255 where ignored."""
    cases = []
    for name, shape in [("1 dim", (50,)), ("2 dims", (9, 11)), ("3 dims", (2, 9, 11))]:
        pred = torch.randint(0, 5, shape, generator=generator)
        target = torch.randint(0, 5, shape, generator=generator)
        target = torch.where(torch.rand(shape, generator=generator) < 0.2, 255, target)
        cases.append(dict(name=name, pred=pred, target=target, num_classes=5))
    pred = torch.randint(0, 3, (9, 11), generator=generator)
    target = torch.randint(0, 3, (9, 11), generator=generator)
    cases.append(dict(name="classes 3 and 4 absent", pred=pred, target=target, num_classes=5))
    cases.append(dict(name="every pixel ignored", pred=pred, target=torch.full_like(target, 255), num_classes=5))
    out_of_range = pred.clone()
    out_of_range[0, :4] = 5
    cases.append(dict(name="pred holds K (out of range)", pred=out_of_range, target=target, num_classes=5))
    out_of_range = target.clone()
    out_of_range[1, :4] = 7
    cases.append(dict(name="target holds K + 2 (out of range)", pred=pred, target=out_of_range, num_classes=5))
    return cases


# --- both sides ---------------------------------------------------------------------------------------------------

def release_outputs(checkout: Path, confidence: list, ohem: list, iou: list) -> None:
    """Adds "release" to every case, computed by the release's own functions."""
    sys.path.insert(0, str(checkout))
    try:
        ohem_module = import_file(checkout / "util" / "ohem.py", "release_ohem")
        train_utils = import_file(checkout / "util" / "train_utils.py", "release_train_utils")
        utils = import_file(checkout / "util" / "utils.py", "release_utils")
    finally:
        sys.path.remove(str(checkout))
    criterion_u = release_criterion_u(checkout)
    for case in confidence:
        per_pixel = criterion_u(case["logits"], case["pseudo_label"])
        case["release"] = train_utils.confidence_weighted_loss(per_pixel, case["confidence"], case["ignore"],
                                                               conf_thresh=CONF_THRESH).detach()
    for case in ohem:
        criterion = ohem_module.ProbOhemCrossEntropy2d(ignore_index=255, thresh=case["thresh"],
                                                       min_kept=case["min_kept"])
        case["release"] = criterion(case["logits"].clone(), case["target"].clone()).detach()
    for case in iou:
        counts = utils.intersectionAndUnion(case["pred"].numpy(), case["target"].numpy(), case["num_classes"], 255)
        case["release"] = torch.from_numpy(np.stack(counts)).long()


def ours(kind: str, case: dict) -> torch.Tensor:
    """This codebase's output for a case of ``kind``; raises ValueError where it refuses the input."""
    if kind == "confidence":
        return masked_cross_entropy(case["logits"], case["pseudo_label"], case["confidence"] >= CONF_THRESH,
                                    case["ignore"]).detach()
    if kind == "ohem":
        return OHEMCrossEntropy(case["thresh"], case["min_kept"], ignore_index=255)(case["logits"],
                                                                                   case["target"]).detach()
    return torch.stack(intersection_and_union(case["pred"], case["target"], case["num_classes"]))


def known_difference(kind: str, case: dict) -> str | None:
    """The documented difference a case shows, if any (docs/release.md)."""
    if kind in ("confidence", "ohem") and "every pixel ignored" in case["name"]:
        return "release 0/0 = nan, here 0"
    if kind == "ohem" and case["min_kept"] == 0:
        return "the release's min_kept 0 keeps every valid pixel, here those with p <= thresh"
    if kind == "iou" and "out of range" in case["name"]:
        return "release miscounts or drops the label, here ValueError"
    return None


def compare(kind: str, case: dict) -> tuple[str, bool]:
    release = case["release"]
    try:
        here = ours(kind, case)
    except ValueError as error:
        here = f"ValueError: {error}"
    if isinstance(here, str):
        same = False
    elif kind == "iou":
        same = torch.equal(here, release)
    else:
        same = bool(torch.isclose(here, release, rtol=TOLERANCE, atol=0, equal_nan=True))
    shown = here if isinstance(here, str) else here.tolist()
    known = known_difference(kind, case)
    line = f"{kind:10s} {case['name']:45s} release {release.tolist()}  here {shown}"
    if not same:
        line += f"  ** differs{f' (known: {known})' if known else ''}"
    return line, same or known is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("release_dir", help="the release's git directory or a checkout of it")
    parser.add_argument("--write", type=Path, help=f"write the fixture here (e.g. {FIXTURE.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    cases = {"confidence": confidence_cases(generator), "ohem": ohem_cases(generator), "iou": iou_cases(generator)}
    with tempfile.TemporaryDirectory() as folder:
        extract(args.release_dir, folder)
        commit = subprocess.run(["git", f"--git-dir={args.release_dir}", "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "checkout"
        release_outputs(Path(folder), cases["confidence"], cases["ohem"], cases["iou"])
    passed = True
    for kind, kind_cases in cases.items():
        for case in kind_cases:
            line, ok = compare(kind, case)
            print(line)
            passed &= ok
    if args.write:
        torch.save({"commit": commit, "conf_thresh": CONF_THRESH, **cases}, args.write)
        print(f"wrote {args.write} ({args.write.stat().st_size / 1024:.0f} KiB)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
