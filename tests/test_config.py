"""The typed run config: layering, sources in error messages, closest-name hints, round trip."""

from __future__ import annotations

import pytest

from lowvram.config import ConfigBuilder, RunConfig, all_fields, field_help, load_yaml
from lowvram.errors import ConfigError


def test_layers_apply_in_order_and_remember_their_source():
    b = (ConfigBuilder()
         .apply({"train": {"lr": 1e-3, "batch_size": 8}}, "preset cpu")
         .apply({"train": {"lr": 5e-4}}, "config file a.yaml")
         .set("train.lr", "2e-5", "--set train.lr=2e-5"))
    cfg = b.build()
    assert cfg.train.lr == pytest.approx(2e-5) and cfg.train.batch_size == 8
    assert b.source_of("train.lr") == "--set train.lr=2e-5"
    assert b.source_of("train.batch_size") == "preset cpu"
    assert b.source_of("run.seed") == "default"


def test_bad_value_names_field_expectation_and_source():
    with pytest.raises(ConfigError) as e:
        ConfigBuilder().apply({"train": {"batch_size": "two"}}, "config file my.yaml").build()
    msg = str(e.value)
    assert "train.batch_size" in msg and "whole number" in msg and "config file my.yaml" in msg


def test_range_errors_name_the_flag_that_set_them():
    with pytest.raises(ConfigError) as e:
        ConfigBuilder().set("run.steps", -3, "--steps").set("train.lr", 2, "--set train.lr=2").build()
    msg = str(e.value)
    assert "run.steps = -3 (from --steps)" in msg
    assert "train.lr = 2.0 (from --set train.lr=2)" in msg


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        ConfigBuilder().apply({"train": {"lr": "x", "optimizr": "adamw"}, "sampel": {}}, "preset p").build()
    msg = str(e.value)
    assert "train.lr" in msg
    assert "unknown key 'train.optimizr'. Did you mean 'train.optimizer'?" in msg
    assert "unknown section 'sampel'. Did you mean 'sample'?" in msg


def test_unknown_choice_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'adamw8bit'"):
        ConfigBuilder().set("train.optimizer", "adam8bit", "--set").build()


def test_lora_task_needs_a_pretrained_model():
    with pytest.raises(ConfigError, match="model.pretrained"):
        ConfigBuilder().set("run.task", "lora", "--task").build()


def test_saved_config_reproduces_the_run_config(tmp_path):
    cfg = ConfigBuilder().set("train.lr", 3e-4, "t").set("sample.cfg_scales", "1,2.5", "t").build()
    cfg.save(tmp_path / "config.yaml")
    again = ConfigBuilder().apply(load_yaml(tmp_path / "config.yaml"), "config file").build()
    assert again == cfg and again.sample.cfg_scales == [1.0, 2.5]


def test_bad_yaml_and_missing_file_are_config_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [lr: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")


def test_every_field_is_documented():
    for dotted, _ in all_fields():
        assert len(field_help(dotted)) > 10, dotted
    assert RunConfig().run.task == "text2img"


def test_docs_configuration_reference_is_current():
    from pathlib import Path

    from lowvram.config_reference import markdown_reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text().rstrip("\n") == markdown_reference().rstrip("\n"), (
        "docs/configuration.md is stale: regenerate it with "
        "python -m lowvram.config_reference > docs/configuration.md"
    )


def test_the_size_recipe_fills_only_unset_values_of_from_scratch_runs():
    b = ConfigBuilder().set("train.lr", 5e-4, "--set train.lr=5e-4")
    cfg = b.build()
    assert cfg.train.lr == pytest.approx(5e-4)  # the user's value wins over the recipe
    assert cfg.model.prediction == "v_prediction" and b.source_of("model.prediction") == "recipe of model size tiny"
    lora = ConfigBuilder().set("run.task", "lora", "--task").set("model.pretrained", "x", "--model").build()
    assert lora.model.prediction == "epsilon" and not lora.model.zero_terminal_snr
