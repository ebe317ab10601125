"""util/resume.py: the check that a resumed run is the same experiment, and best/latest reconciliation."""
import logging

import pytest

from util.checkpoint import CheckpointError
from util.config import validate
from util.resume import check_resume_config, reconcile_best

BASE = {"dataset": "synthetic", "data_root": "unused", "nclass": 4}


def test_a_run_that_predates_the_release_sampling_resumes_only_with_its_own(caplog):
    saved = validate(BASE, "test")
    for key in ("data_order", "cutmix_partner", "truncate_labeled"):
        del saved[key]
    with pytest.raises(CheckpointError) as refused:
        check_resume_config(saved, validate(BASE, "test"), "latest.pth", logging.getLogger("test"))
    assert str(refused.value) == (
        "latest.pth: refusing to resume: it started before 'data_order' existed and trained as "
        "data_order='independent', 'cutmix_partner' existed and trained as cutmix_partner='other_image', "
        "'truncate_labeled' existed and trained as truncate_labeled=False; add data_order=independent "
        "cutmix_partner=other_image truncate_labeled=false to resume it")
    old_behaviour = validate(dict(BASE, data_order="independent", cutmix_partner="other_image",
                                  truncate_labeled=False), "test")
    with caplog.at_level(logging.WARNING, logger="test"):
        check_resume_config(saved, old_behaviour, "latest.pth", logging.getLogger("test"))
    assert "whose config predates data_order, cutmix_partner, truncate_labeled: taken as unchanged" in caplog.text


def test_an_evaluation_setting_may_change_and_a_training_one_may_not(caplog):
    saved = validate(BASE, "test")
    with caplog.at_level(logging.WARNING, logger="test"):
        check_resume_config(saved, validate(dict(BASE, eval_mode="sliding_window", epochs=90), "test"), "l.pth",
                            logging.getLogger("test"))
    assert "changed settings: epochs 80 -> 90, eval_mode 'original' -> 'sliding_window'" in caplog.text
    with pytest.raises(CheckpointError, match=r"^l\.pth: refusing to resume: 'sampler_seed' was 0, now 3; "):
        check_resume_config(saved, validate(dict(BASE, sampler_seed=3), "test"), "l.pth", logging.getLogger("test"))


def test_the_best_miou_is_taken_from_best_pth(tmp_path, caplog):
    progress = {"best_miou": 40.0}
    with caplog.at_level(logging.INFO, logger="test"):
        reconcile_best(progress, 42.0, "latest.pth", str(tmp_path / "best.pth"), True, logging.getLogger("test"))
    assert progress["best_miou"] == 42.0
    assert "latest.pth recorded best mIoU 40.00, but" in caplog.text and "does not exist" in caplog.text
