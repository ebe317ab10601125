import os

import pytest

from util import config
from util.config import ConfigError, Key, Section, SCHEMA, dump_config, load_config, markdown_table, validate

MINIMAL = "dataset: synthetic\ndata_root: data/synthetic\nnclass: 4\n"


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def with_line(line):
    """MINIMAL with `line` replacing the line of its key, or appended."""
    key = line.split(":")[0]
    kept = [kept for kept in MINIMAL.splitlines() if kept.split(":")[0] != key]
    return "\n".join(kept + [line]) + "\n"


def load(tmp_path, text=MINIMAL, overrides=()):
    return load_config(write(tmp_path, text), overrides)


def error_of(tmp_path, text=MINIMAL, overrides=()):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_defaults_fill_a_minimal_file(tmp_path):
    cfg = load(tmp_path)
    assert cfg["nclass"] == 4
    assert cfg["split"] == "1_16"
    assert cfg["epochs"] == 80 and cfg["iters_per_epoch"] is None
    assert cfg["scale_range"] == [0.5, 2.0]
    assert cfg["loss_weights"] == {"strong": 0.25, "isvc": 0.25, "fp": 0.5}
    assert cfg["replace_stride_with_dilation"] == [False, False, True]
    assert set(cfg) == set(SCHEMA)
    assert type(cfg) is dict and type(cfg["loss_weights"]) is dict


def test_network_defaults_are_the_release(tmp_path):
    cfg = load(tmp_path)
    assert (cfg["cif_channels"], cfg["cif_blocks"], cfg["cif_gate_channels"]) == (32, 1, 128)
    assert cfg["cif_gate"] == "release" and cfg["scaled_views_update_bn"] is True
    assert load(tmp_path, overrides=["cif_gate=paper"])["cif_gate"] == "paper"
    message = error_of(tmp_path, overrides=["cif_gate=both"])
    assert "'cif_gate' must be one of release, paper" in message


def test_defaults_are_copies(tmp_path):
    load(tmp_path)["scale_range"].append(9.0)
    assert load(tmp_path)["scale_range"] == [0.5, 2.0]


def test_unknown_key_suggests_the_close_one(tmp_path):
    message = error_of(tmp_path, MINIMAL + "lrr: 0.01\n")
    assert message.startswith(str(tmp_path / "cfg.yaml") + ":")
    assert "unknown key 'lrr'" in message and "did you mean 'lr'?" in message


def test_unknown_nested_key_suggests_the_dotted_name(tmp_path):
    message = error_of(tmp_path, MINIMAL + "loss_weights:\n  strnog: 1.0\n")
    assert "unknown key 'loss_weights.strnog'" in message and "did you mean 'loss_weights.strong'?" in message


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path):
    message = error_of(tmp_path, MINIMAL + "zzzzzz: 1\n")
    assert "unknown key 'zzzzzz'" in message and "did you mean" not in message


@pytest.mark.parametrize("line, key", [
    ("epochs: ten", "epochs"),
    ("epochs: true", "epochs"),
    ("epochs: 2.5", "epochs"),
    ("lr: false", "lr"),
    ("fp: 1", "fp"),
    ("scale_range: 0.5", "scale_range"),
    ("scale_range: [0.5, 1.0, 2.0]", "scale_range"),
    ("replace_stride_with_dilation: [0, 0, 1]", "replace_stride_with_dilation"),
    ("loss_weights: 0.5", "loss_weights"),
])
def test_wrong_type_names_file_and_key(tmp_path, line, key):
    message = error_of(tmp_path, with_line(line))
    assert message.startswith(str(tmp_path / "cfg.yaml") + ": ")
    assert f"'{key}' must be" in message


def test_section_must_be_a_mapping(tmp_path):
    message = error_of(tmp_path, MINIMAL + "loss_weights: 0.5\n")
    assert "'loss_weights' must be a mapping with keys strong, isvc, fp, got float 0.5" in message


def test_number_for_a_string_key_asks_for_quotes(tmp_path):
    message = error_of(tmp_path, MINIMAL + "split: 732\n")
    assert "'split' must be str, got int 732 (quote it)" in message


def test_int_is_accepted_where_a_float_is_expected(tmp_path):
    cfg = load(tmp_path, MINIMAL + "lr: 1\nscale_range: [1, 2]\n")
    assert cfg["lr"] == 1.0 and type(cfg["lr"]) is float
    assert [type(v) for v in cfg["scale_range"]] == [float, float]


@pytest.mark.parametrize("line, key, allowed", [
    ("momentum: 1.0", "momentum", "float in [0, 1)"),
    ("lr: 0", "lr", "float > 0"),
    ("lr: .inf", "lr", "float > 0"),
    ("nclass: 1", "nclass", "int >= 2"),
    ("ohem_thresh: 0", "ohem_thresh", "float in (0, 1]"),
    ("scale_range: [2.0, 0.5]", "scale_range", "non-decreasing"),
    ("scale_range: [0.0, 0.5]", "scale_range", "floats > 0"),
    ("dilations: [6, 0, 18]", "dilations", "ints >= 1"),
])
def test_out_of_range(tmp_path, line, key, allowed):
    message = error_of(tmp_path, with_line(line))
    assert f"'{key}' must be" in message and allowed in message


def test_bad_choice_lists_the_choices(tmp_path):
    message = error_of(tmp_path, with_line("dataset: voc"))
    assert "'dataset' must be one of pascal, cityscapes, synthetic, folder, got str 'voc'" in message


def test_missing_required_key(tmp_path):
    message = error_of(tmp_path, "dataset: pascal\ndata_root: d\n")
    assert message.startswith(str(tmp_path / "cfg.yaml") + ": missing required key 'nclass'")


def test_required_key_may_come_from_the_command_line(tmp_path):
    cfg = load(tmp_path, "dataset: pascal\ndata_root: d\n", ["nclass=21"])
    assert cfg["nclass"] == 21


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    message = error_of(tmp_path, MINIMAL + "lr: [0.1\nepochs: 3\n")
    assert message.startswith(str(tmp_path / "cfg.yaml") + ": invalid YAML at line")


def test_top_level_must_be_a_mapping(tmp_path):
    message = error_of(tmp_path, "- lr\n- 0.1\n")
    assert message.startswith(str(tmp_path / "cfg.yaml") + ": the top level must be a mapping")


def test_duplicate_key_is_an_error(tmp_path):
    message = error_of(tmp_path, MINIMAL + "lr: 0.1\nlr: 0.2\n")
    assert "duplicate key 'lr'" in message and "line 5" in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("encoding, expected", [
    ("utf-16", "line 1: not UTF-8 text (byte 0xff); save the config as UTF-8"),
    ("latin-1", "line 4: not UTF-8 text (byte 0xe9); save the config as UTF-8")])
def test_a_config_that_is_not_utf8_is_one_line(tmp_path, encoding, expected):
    """Before: a UnicodeDecodeError traceback."""
    path = tmp_path / "exp.yaml"
    path.write_text(MINIMAL.replace("nclass: 4", "nclass: 4\nrun_name: caf\u00e9"), encoding=encoding)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: {expected}"


def test_a_config_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(MINIMAL, encoding="utf-8-sig")
    assert load_config(path)["nclass"] == 4


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load(tmp_path, overrides=["amp=false", "epochs=3", "scale_range=[0.75, 1.5]", "pretrained=null",
                                    "run_name=try 1"])
    assert cfg["amp"] is False and cfg["epochs"] == 3 and cfg["scale_range"] == [0.75, 1.5]
    assert cfg["pretrained"] is None and cfg["run_name"] == "try 1"


@pytest.mark.parametrize("text, value", [("2e-3", 0.002), ("1E3", 1000.0), ("5.0e-4", 5e-4), ("-1e+2", -100.0),
                                         (".5", 0.5), ("3", 3.0)])
def test_scientific_notation_is_a_float(tmp_path, text, value):
    cfg = load(tmp_path, MINIMAL + f"weight_decay: {abs(value)}\n", [f"lr={text.lstrip('-')}"])
    assert cfg["lr"] == pytest.approx(abs(value)) and type(cfg["lr"]) is float
    assert config.yaml.load(text, Loader=config._ConfigLoader) == pytest.approx(value)


def test_scientific_notation_in_the_file(tmp_path):
    assert load(tmp_path, MINIMAL + "weight_decay: 5e-4\n")["weight_decay"] == pytest.approx(5e-4)


def test_underscored_numbers_stay_strings(tmp_path):
    assert load(tmp_path, MINIMAL + "split: 1_16\n")["split"] == "1_16"
    assert load(tmp_path, overrides=["split=1_8"])["split"] == "1_8"
    assert load(tmp_path, overrides=["split=732"])["split"] == "732"


def test_later_override_wins_and_beats_the_file(tmp_path):
    cfg = load(tmp_path, MINIMAL + "epochs: 5\n", ["epochs=6", "epochs=7"])
    assert cfg["epochs"] == 7


def test_nested_dotted_override_keeps_the_sibling(tmp_path):
    cfg = load(tmp_path, MINIMAL + "loss_weights:\n  fp: 0.3\n", ["loss_weights.strong=0.25"])
    assert cfg["loss_weights"] == {"strong": 0.25, "isvc": 0.25, "fp": 0.3}


def test_section_override_with_a_mapping(tmp_path):
    cfg = load(tmp_path, overrides=["loss_weights={fp: 1}"])
    assert cfg["loss_weights"] == {"strong": 0.25, "isvc": 0.25, "fp": 1.0}


@pytest.mark.parametrize("override, expected", [
    ("lr", "command line: malformed override 'lr' (expected key=value"),
    ("=3", "command line: malformed override '=3'"),
    ("lr_mult=2", "command line: unknown key 'lr_mult' (did you mean 'lr_multi'?)"),
    ("loss_weights.strnog=1", "command line: unknown key 'loss_weights.strnog' (did you mean 'loss_weights.strong'?)"),
    ("loss_weight.strong=1", "command line: unknown key 'loss_weight' (did you mean 'loss_weights'?)"),
    ("lr.x=1", "command line: 'lr' has no keys, so 'lr.x' does not exist"),
    ("lr=0", "command line: 'lr' must be float > 0, got int 0"),
    ("amp=maybe", "command line: 'amp' must be bool, got str 'maybe'"),
    ("loss_weights.fp=-1", "command line: 'loss_weights.fp' must be float >= 0"),
    ("scale_range=[0.5, 2.0", "command line: 'scale_range': cannot parse '[0.5, 2.0'"),
])
def test_bad_override(tmp_path, override, expected):
    message = error_of(tmp_path, overrides=[override])
    assert message.startswith(expected), message


def test_tilde_is_expanded_in_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load(tmp_path, MINIMAL.replace("data/synthetic", "~/data"), ["pretrained=~/r101.pth", "exp_dir=~/exp"])
    assert cfg["data_root"] == str(tmp_path / "home" / "data")
    assert cfg["pretrained"] == str(tmp_path / "home" / "r101.pth")
    assert cfg["exp_dir"] == str(tmp_path / "home" / "exp")
    assert load(tmp_path, overrides=["run_name=~x"])["run_name"] == "~x"


def test_dump_then_load_gives_the_same_config(tmp_path):
    cfg = load(tmp_path, overrides=["lr=2e-7", "split=1_16", "run_name=0123"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_validate_checks_a_dict_and_fills_defaults():
    cfg = validate({"dataset": "pascal", "data_root": "d", "nclass": 21}, "checkpoint")
    assert cfg["lr"] == 0.001
    with pytest.raises(ConfigError, match=r"^checkpoint: unknown key 'lrr'"):
        validate({"dataset": "pascal", "data_root": "d", "nclass": 21, "lrr": 1}, "checkpoint")


def test_markdown_table_has_a_row_per_key():
    rows = markdown_table().splitlines()
    assert rows[0] == "| key | default | allowed | meaning |"
    names = [row.split("|")[1].strip().strip("`") for row in rows[2:]]
    assert names == [name for key, entry in SCHEMA.items()
                     for name in [key, *(f"{key}.{sub}" for sub in getattr(entry, "keys", {}))]]
    assert "| `momentum` | `0.9` | float in [0, 1) | SGD momentum. |" in rows
    assert "| `nclass` | required | int >= 2 |" in markdown_table()
    assert all(row.count("|") == 5 for row in rows)


def test_a_new_section_is_validated_and_documented(tmp_path, monkeypatch):
    section = Section("Test section.", {"depth": Key(int, "Depth.", default=2, ge=1),
                                        "inner": Section("Inner.", {"on": Key(bool, "Switch.", default=False)})})
    monkeypatch.setitem(SCHEMA, "extra", section)
    cfg = load(tmp_path, overrides=["extra.inner.on=true"])
    assert cfg["extra"] == {"depth": 2, "inner": {"on": True}}
    assert "| `extra.inner.on` | `false` | bool | Switch. |" in markdown_table()
    assert "'extra.depth' must be int >= 1" in error_of(tmp_path, overrides=["extra.depth=0"])


def test_relative_path_stays_relative(tmp_path):
    assert load(tmp_path)["data_root"] == os.path.join("data", "synthetic")


def test_method_switch_combinations(tmp_path):
    assert load(tmp_path)["fusion"] == "cif"
    assert load(tmp_path, overrides=["cif=false"])["fusion"] == "none"
    assert load(tmp_path, overrides=["cif=false", "fusion=average"])["fusion"] == "average"
    with pytest.raises(ConfigError, match=r"'fusion: cif' needs cif: true"):
        load(tmp_path, overrides=["cif=false", "fusion=cif"])
    with pytest.raises(ConfigError, match=r"'fsvc' .* needs fp: true"):
        load(tmp_path, overrides=["fp=false"])
    with pytest.raises(ConfigError, match=r"'img_scales' must be list of 1 or more floats > 0, got list \[\]"):
        load(tmp_path, overrides=["img_scales=[]"])
    assert load(tmp_path, overrides=["img_scales=[2]"])["img_scales"] == [2.0]


def test_keys_that_name_a_run_and_keys_a_resume_may_change_are_schema_properties():
    from util.config import keys_added_since, operational_keys, resumable_keys
    assert set(operational_keys()) == {"workers", "log_interval", "image_log_interval", "checkpoint_interval",
                                       "on_nonfinite_loss", "exp_dir", "run_name"}
    assert set(operational_keys()) < set(resumable_keys())
    assert {"epochs", "eval_mode", "data_root", "splits_dir", "amp"} <= set(resumable_keys())
    assert not {"lr", "seed", "data_order", "loss_weights", "backbone"} & set(resumable_keys())
    # A run whose config predates the release's sampling trained with the old one.
    assert keys_added_since({"lr": 0.001}) == {"data_order": "independent", "cutmix_partner": "other_image",
                                               "truncate_labeled": False}
    assert keys_added_since({"data_order": "release", "cutmix_partner": "same_image", "truncate_labeled": True}) == {}
