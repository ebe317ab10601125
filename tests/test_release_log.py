"""util/release_log.py and scripts/release_log.py on small logs written in the release's format (tests/data/
release_logs: invented values; one log with the old header and FP name, CRLF lines, a lost IoU line and a last line
cut short; one run resumed across two logs)."""
import sys
from pathlib import Path

import pytest

from conftest import REPO
from util.config import load_config
from util.release_log import (ReleaseLogError, eval_rows, join_run, loss_rows, map_settings, override_text,
                              read_release_log, train_command)

sys.path.insert(0, str(Path(REPO) / "scripts"))
from release_log import main  # noqa: E402

LOGS = Path(REPO) / "tests" / "data" / "release_logs"
OLD = LOGS / "old_92" / "92-63.75.log"
PART_1, PART_2 = LOGS / "resumed_1_8" / "u2pl_1_8(1).log", LOGS / "resumed_1_8" / "u2pl_1_8(2).log"


def test_old_header_crlf_w_fp_lost_iou_line_and_a_last_line_cut_short():
    log = read_release_log(OLD)
    assert log.settings["ngpus"] == 4 and "img_scales" not in log.settings
    assert [(r.epoch, r.iteration) for r in log.losses] == [(0, 0), (0, 3), (0, 6), (1, 0), (1, 3), (1, 6)]
    # 'Loss w_fp' is the FP column, as 'Loss w_fp_scale' is in newer logs.
    assert log.losses[1].terms == {"total": 0.45, "x": 0.9, "u_s": 0.06, "u_scale": 0.05, "w_fp": 0.02,
                                   "mask_ratio": 0.62}
    assert log.losses[1].iter_time == 0.51
    assert len(log.dropped) == 1 and "line 47" in log.dropped[0]  # the Iters line of epoch 2, cut short
    first, second = log.evals
    assert (first.epoch, first.miou, sorted(first.iou)) == (0, 55.55, [0, 1, 3])  # class 2's line is missing
    assert (second.epoch, second.miou, second.iou[2], second.mode) == (1, 63.75, 30.0, "original")
    assert log.log_step() == 3 and log.iters_per_epoch() == 27.5


def test_the_old_header_maps_to_overrides_and_names_what_it_does_not_record():
    run = join_run([read_release_log(OLD)])
    mapping = map_settings(run.settings, "original")
    assert (mapping.dataset, mapping.split, mapping.gpus) == ("pascal", "92", 4)
    assert mapping.unrecorded == ["feature_scales", "img_scales", "warm_up"]
    assert mapping.overrides["criterion"] == "ce" and mapping.overrides["lr"] == 0.001
    assert "ngpus" not in mapping.overrides and mapping.unmapped == {}
    # The overrides are this codebase's keys with values it accepts.
    cfg = load_config(Path(REPO) / "configs" / "pascal.yaml",
                      [override_text(k, v) for k, v in mapping.overrides.items()] + [f"split={mapping.split}"])
    assert (cfg["split"], cfg["epochs"], cfg["replace_stride_with_dilation"]) == ("92", 3, [False, False, True])
    assert train_command(mapping).startswith("bash scripts/train.sh pascal 92 4 nclass=21 ")


def test_a_resumed_run_is_joined_in_time_order_and_the_later_part_stands():
    run = join_run([read_release_log(PART_2), read_release_log(PART_1)])  # given in the wrong order
    assert [p.name for p in run.parts] == ["u2pl_1_8(1).log", "u2pl_1_8(2).log"]
    assert run.parts[1].resumed_from == 1
    # Part 1's partial epoch 2 (losses 0.9) is redone by part 2 and left out.
    assert run.epochs_by_part() == {"u2pl_1_8(1).log": [0, 1], "u2pl_1_8(2).log": [2, 3]}
    assert all(r.terms["total"] < 0.9 for r in run.losses)
    best = run.best()
    assert (best.miou, best.epoch, best.log) == (71.5, 1, "u2pl_1_8(1).log")
    assert "ngpus: 3 -> 4 (u2pl_1_8(2).log)" in run.differing_settings()
    # Part 2 logs every 4 iterations (4 GPUs), part 1 every 3 (3 GPUs): each part's own iterations per epoch.
    assert run.iters_per_epoch("u2pl_1_8(1).log") == 27.5 and run.iters_per_epoch("u2pl_1_8(2).log") == 35.5
    assert run.fraction(run.losses[-1]) == pytest.approx((3 + 9 / 35.5) / 4)
    mapping = map_settings(run.settings)
    # Part 2's header lacks 'dataset': the merged settings keep part 1's.
    assert (mapping.dataset, mapping.split, mapping.gpus) == ("pascal", "u2pl_1_8", 4)
    assert mapping.overrides["feature_scales"] == [0.75, 1.0, 1.25]
    assert mapping.overrides["feature_scale_rule"] == "paired" and mapping.unrecorded == []


def test_logs_of_two_runs_are_refused():
    with pytest.raises(ReleaseLogError, match="starts from scratch"):
        join_run([read_release_log(PART_1), read_release_log(OLD)])


def test_a_file_without_a_header_is_refused_in_one_line(tmp_path):
    path = tmp_path / "notes.log"
    path.write_text("hello\n")
    with pytest.raises(ReleaseLogError, match="no settings header") as error:
        read_release_log(path)
    assert "\n" not in str(error.value)


def test_scale_rules_criterion_and_dataset_from_the_split_path():
    base = {"labeled_id_path": "splits/cityscapes/1_16/labeled.txt",
            "unlabeled_id_path": "splits/cityscapes/1_16/unlabeled.txt"}
    fixed = map_settings({**base, "feat_s_scales": [1.0], "feat_l_scales": [1.0]})
    assert fixed.overrides["feature_scales"] == [1.0] and fixed.dataset == "cityscapes"
    shipped = map_settings({**base, "feat_s_scales": [0.75], "feat_l_scales": [1.25]})
    assert (shipped.overrides["feature_scales"], shipped.overrides["feature_scale_rule"]) == ([0.75, 1.25], "paired")
    odd = map_settings({**base, "feat_s_scales": [1.25], "feat_l_scales": [0.75]})
    assert "feature_scales" not in odd.overrides and odd.unmapped["feat_s_scales"] == [1.25]
    ohem = map_settings({**base, "criterion": {"name": "OHEM", "kwargs": {"ignore_index": 255, "thresh": 0.7,
                                                                           "min_kept": 200000}}})
    assert {k: ohem.overrides[k] for k in ("criterion", "ohem_thresh", "ohem_min_kept")} == {
        "criterion": "ohem", "ohem_thresh": 0.7, "ohem_min_kept": 200000}
    assert map_settings({**base, "new_key": 3}).unmapped == {"new_key": 3}


def test_csv_columns_and_rows():
    run = join_run([read_release_log(PART_1), read_release_log(PART_2)])
    columns, rows = loss_rows(run)
    assert columns[:5] == ["log", "epoch", "iter", "fraction", "iter_time"]
    assert columns[5:] == ["total", "x", "u_s", "u_scale", "w_fp", "mask_ratio"]
    assert len(rows) == 12 and rows[0][:3] == ["u2pl_1_8(1).log", 0, 0]
    columns, rows = eval_rows(run)
    assert columns == ["log", "epoch", "fraction", "miou", "0 background", "1 aeroplane", "2 bicycle", "3 bird"]
    assert [row[3] for row in rows] == [61.5, 71.5, 70.5, 69.5]


def test_cli_summary_csv_survey_and_a_bad_log(capsys, tmp_path):
    assert main([str(PART_2), str(PART_1)]) == 0
    out = capsys.readouterr().out
    assert "best mIoU 71.50 at epoch 1, in u2pl_1_8(1).log" in out
    assert "  feature_scales=[0.75,1.0,1.25]" in out and "  split=u2pl_1_8" in out
    assert "config check: valid with configs/pascal.yaml" in out
    assert "command: bash scripts/train.sh pascal u2pl_1_8 4 " in out
    assert main([str(OLD)]) == 0
    out = capsys.readouterr().out
    assert "FP loss named Loss w_fp\n" in out and "left out 1 line(s)" in out
    assert "not recorded by the log" in out and "feature_scales, img_scales, warm_up" in out
    assert main([str(OLD), "--csv", "eval"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("92-63.75.log,0,0.33333,55.55,90.0,70.0,,60.0")
    assert main(["--survey", str(LOGS)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 4 and rows[3].startswith("| resumed_1_8 | 2 | u2pl_1_8 | 3/4 |")
    bad = tmp_path / "bad.log"
    bad.write_text("[2024-07-20 10:00:00,1][    INFO] {'lr': 0.001,\n")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cut short" in err
