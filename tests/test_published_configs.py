"""configs/published/: every config validates, says what it reproduces, matches its row of the README table
("Reproducing a published number") and the settings scripts/release_log.py read from its release log
(tests/data/published_log_settings.json, pinned from the release at 445cde83; docs/published.md)."""
import json
import re
from pathlib import Path

import pytest

from conftest import REPO, run
from util.config import load_config

PUBLISHED = sorted((Path(REPO) / "configs" / "published").glob("*.yaml"))
LOG_SETTINGS = json.loads((Path(REPO) / "tests" / "data" / "published_log_settings.json").read_text())
# The release README's Pascal numbers (as its log folders give them, U2PL 1/4 as its logs' best) and the paper's
# crop-321 original-protocol numbers.
NUMBERS = {"76.71", "78.64", "80.53", "82.02", "83.01", "78.56", "79.50", "80.19", "81.49", "82.75", "81.14",
           "76.13", "78.56", "79.55", "80.72", "81.80"}
# The settings in which a published run departs from configs/pascal.yaml; everything else must be equal.
LOGGED_DEPARTURES = {"split", "crop_size", "batch_size", "lr", "warm_up", "img_scales", "feature_scales",
                     "feature_scale_rule"}


def header(path: Path) -> dict:
    fields = {}
    for line in path.read_text().splitlines():
        found = re.match(r"^# (Published|Log|Log parts \(epochs\)|Log best|Release|GPUs|Command): (.*)$", line)
        if found:
            fields[found.group(1)] = found.group(2)
    return fields


def readme_rows() -> dict:
    readme = (Path(REPO) / "README.md").read_text()
    section = readme.split("### Reproducing a published number", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        found = re.search(r"`bash scripts/train\.sh published/(\w+) (\d+)`", line)
        if found and line.startswith("| "):
            rows[found.group(1)] = [cell.strip() for cell in line.strip("|").split("|")]
    return rows


def scales(text: str) -> list[float]:
    return [float(value) for value in text.strip("[]").split(",")]


def test_sixteen_configs_one_per_published_number():
    assert len(PUBLISHED) == 16
    numbers = [header(path)["Published"].split()[0] for path in PUBLISHED]
    assert sorted(numbers) == sorted(["76.71", "78.64", "80.53", "82.02", "83.01", "78.56", "79.50", "80.19",
                                      "81.49", "82.75", "81.14", "76.13", "78.56", "79.55", "80.72", "81.80"])
    assert set(numbers) == NUMBERS
    assert set(readme_rows()) == {path.stem for path in PUBLISHED}


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda path: path.stem)
def test_config_validates_and_matches_its_readme_row(path):
    cfg = load_config(path)
    fields = header(path)
    gpus = int(fields["GPUs"].split()[0])
    assert "445cde83" in fields["Release"]
    assert fields["Command"] == f"bash scripts/train.sh published/{path.stem} {gpus}"
    number, protocol, log, command, row_gpus, crop, batch, lr, warm_up, img_scales, t, clock = readme_rows()[path.stem]
    assert number == fields["Published"].split()[0]
    assert protocol.split()[-1] == cfg["split"]
    assert (int(row_gpus), int(crop), int(batch), float(lr), int(warm_up)) == (
        gpus, cfg["crop_size"], cfg["batch_size"], cfg["lr"], cfg["warm_up"])
    assert scales(img_scales) == cfg["img_scales"]
    assert scales(t.split("]")[0] + "]") == cfg["feature_scales"] and t.endswith(cfg["feature_scale_rule"])
    if fields["Log"].startswith("NONE"):
        assert "not backed by a log" in log and clock == "-" and "Not backed by a log" in path.read_text()
    else:
        assert log.startswith("`" + fields["Log"].removeprefix("train_logs/pascal/"))
        assert re.match(r"^\d+\.\d h \(", clock)


@pytest.mark.parametrize("path", [p for p in PUBLISHED if not header(p)["Log"].startswith("NONE")],
                         ids=lambda path: path.stem)
def test_config_holds_what_its_log_records(path):
    cfg, fields, text = load_config(path), header(path), path.read_text()
    logged = LOG_SETTINGS[fields["Log"].removeprefix("train_logs/").rstrip("/")]
    assert (cfg["dataset"], cfg["split"]) == (logged["dataset"], logged["split"])
    assert int(fields["GPUs"].split()[0]) == logged["gpus"]
    assert fields["Log best"].startswith(f"{logged['best']:.2f} at epoch {logged['best_epoch']} ({logged['best_log']})")
    for key, value in logged["overrides"].items():
        assert cfg[key] == pytest.approx(value) if isinstance(value, float) else cfg[key] == value, key
    # A value the log does not record says it was inferred (and the header says from what).
    for key in logged["unrecorded"]:
        line = next(line for line in text.splitlines() if line.startswith(f"{key}:"))
        assert "inferred" in line, key
    if logged["unrecorded"]:
        assert "# Inferred:" in text


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda path: path.stem)
def test_config_departs_from_configs_pascal_only_where_the_logs_do(path):
    cfg = load_config(path)
    base = load_config(Path(REPO) / "configs" / "pascal.yaml", [f"split={cfg['split']}"])
    assert {key for key in cfg if cfg[key] != base[key]} <= LOGGED_DEPARTURES


def published_config_runs(folder, tiny_voc):
    """train.sh given a published config that does not exist, then one that does with an empty data root."""
    return (run(["bash", "scripts/train.sh", "published/pascal_original_93", "0"], check=False),
            run(["bash", "scripts/train.sh", "published/pascal_original_92", "0", f"data_root={folder}",
                 f"exp_dir={folder / 'exp'}"], check=False))


SESSION_RUNS = {"test_train_sh_names_a_published_config_and_refuses_a_missing_one": published_config_runs}


def test_train_sh_names_a_published_config_and_refuses_a_missing_one(session_run):
    missing, started = session_run
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "no config file published/pascal_original_93" in missing.stderr
    assert "published/pascal_original_92" in missing.stderr
    # The config is found and its split (92) taken: the run stops at the images missing under an empty data root.
    assert started.returncode == 2 and started.stderr.startswith("error: splits/pascal/92/labeled.txt: ")
    assert started.stderr.count("\n") == 1
