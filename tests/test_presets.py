"""Every shipped preset validates; malformed presets fail naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lowvram.config import ConfigBuilder
from lowvram.errors import PresetError
from lowvram.preset_tables import presets_markdown, presets_table
from lowvram.presets import budget_bytes, list_presets, load_preset, preset_dir

SHIPPED = sorted(preset_dir().glob("*.yaml"))
GIB = 2**30


def test_the_shipped_set():
    assert {"cpu", "rx570", "rx570-8gb", "gtx1650-4gb", "rtx2060-6gb", "rtx3070-8gb", "rx6600-8gb"} <= set(
        list_presets()
    )


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_preset_validates(path: Path):
    preset = load_preset(path.stem)
    assert preset.name == path.stem and preset.path == path
    text = path.read_text()
    assert text.startswith("#"), "a comment at the top says what the preset is for"
    assert "memory_profile" in yaml.safe_load(text), "keep the key for `lowvram profile --update-presets`"
    cfg = ConfigBuilder().apply(preset.config, preset.source).build()
    assert cfg.train.precision == preset.knob("train.precision")
    assert "steps" not in preset.config.get("run", {}) and "task" not in preset.config.get("run", {})
    assert 0 < budget_bytes(preset.card) < preset.card.vram_gib * GIB


@pytest.mark.parametrize(
    "name,precision,optimizer,attention",
    [
        ("rx570", "fp16", "adamw8bit_portable", "chunked"),
        ("rx570-8gb", "fp16", "adamw8bit_portable", "chunked"),
        ("gtx1650-4gb", "fp32", "adamw8bit", "sdpa"),
        ("rtx2060-6gb", "fp16", "adamw8bit", "sdpa"),
        ("rtx3070-8gb", "bf16", "adamw8bit", "sdpa"),
        ("rx6600-8gb", "fp16", "adamw8bit", "chunked"),
        ("cpu", "fp32", "adamw", "sdpa"),
    ],
)
def test_knobs_respect_the_card(name, precision, optimizer, attention):
    p = load_preset(name)
    assert (p.knob("train.precision"), p.knob("train.optimizer"), p.knob("memory.attention")) == (
        precision,
        optimizer,
        attention,
    )
    for cap in p.needs():
        assert getattr(p.card, cap), f"{name} uses {cap} but its card lacks it"


def test_cpu_preset_suits_the_tiny_default_job():
    assert load_preset("cpu").knob("train.batch_size") == 16


def test_budget_bytes():
    card = load_preset("rx570").card
    assert budget_bytes(card) == int((card.vram_gib - card.context_gib - card.margin_gib) * GIB)


def test_presets_ship_inside_the_package():
    """The repository's presets/ installs as lowvram.preset_files (tests/test_packaging.py builds the wheel)."""
    import lowvram.preset_files

    assert preset_dir() == Path(lowvram.preset_files.__file__).parent
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["lowvram.preset_files"]
    assert pyproject["tool"]["setuptools"]["package-dir"]["lowvram.preset_files"] == "presets"


def _write(tmp_path: Path, mutate, name: str = "mine.yaml") -> Path:
    data = yaml.safe_load((preset_dir() / "rx570.yaml").read_text())
    mutate(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _error(path: Path) -> str:
    with pytest.raises(PresetError) as e:
        load_preset(path)
    assert str(path) in e.value.problem
    return e.value.problem


def test_load_by_path(tmp_path):
    path = _write(tmp_path, lambda d: d.update(name="my-rx570"))
    assert load_preset(str(path)).name == "my-rx570"


def test_bad_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [rx570\ncard: {")
    assert "not valid YAML" in _error(path)


def test_unknown_top_level_key_suggests(tmp_path):
    problem = _error(_write(tmp_path, lambda d: d.update(cardd=d["card"])))
    assert "cardd" in problem and "did you mean 'card'" in problem


def test_unknown_card_key_suggests(tmp_path):
    def mutate(d):
        d["card"]["vram_gb"] = d["card"].pop("vram_gib")

    problem = _error(_write(tmp_path, mutate))
    assert "card.vram_gb" in problem and "did you mean 'vram_gib'" in problem
    assert "missing field 'card.vram_gib'" in problem


def test_wrong_types(tmp_path):
    def mutate(d):
        d["card"]["vram_gib"] = "four"
        d["card"]["fp16"] = "yes"

    problem = _error(_write(tmp_path, mutate))
    assert "card.vram_gib = 'four': expected a number" in problem
    assert "card.fp16 = 'yes': expected true or false" in problem


def test_missing_card_field(tmp_path):
    problem = _error(_write(tmp_path, lambda d: d["card"].pop("arch")))
    assert "missing field 'card.arch'" in problem


def test_bad_backend_and_sizes(tmp_path):
    def mutate(d):
        d["card"]["backend"] = "directml"
        d["card"]["context_gib"] = 4.0

    problem = _error(_write(tmp_path, mutate))
    assert "card.backend = 'directml'" in problem and "no memory to train in" in problem


def test_unknown_config_key_is_caught_by_the_config_builder(tmp_path):
    problem = _error(_write(tmp_path, lambda d: d["config"]["train"].update(lrr=1e-4)))
    assert "train.lrr" in problem and "did you mean 'train.lr'" in problem.lower()
    problem = _error(_write(tmp_path, lambda d: d["config"]["train"].update(precision="fp12")))
    assert "train.precision" in problem


def test_knobs_the_card_cannot_run(tmp_path):
    problem = _error(_write(tmp_path, lambda d: d["config"]["train"].update(optimizer="adamw8bit")))
    assert "train.optimizer = adamw8bit but card.bitsandbytes is false" in problem
    problem = _error(_write(tmp_path, lambda d: d["config"]["train"].update(precision="bf16")))
    assert "card.bf16 is false" in problem


def test_job_keys_are_refused(tmp_path):
    problem = _error(_write(tmp_path, lambda d: d["config"].update(run={"steps": 10})))
    assert "run.steps" in problem


def test_every_problem_at_once(tmp_path):
    def mutate(d):
        d.pop("description")
        d["card"].pop("xformers")
        d["extra"] = 1

    problem = _error(_write(tmp_path, mutate))
    assert "'description'" in problem and "card.xformers" in problem and "'extra'" in problem


def test_unknown_preset_name_lists_the_choices():
    with pytest.raises(PresetError) as e:
        load_preset("rx57")
    assert "unknown preset 'rx57'" in e.value.problem
    assert "did you mean 'rx570'" in e.value.fix and "gtx1650-4gb" in e.value.fix
    with pytest.raises(PresetError, match="does not exist"):
        load_preset("nowhere/missing.yaml")


def test_presets_table(tmp_path):
    table = presets_table()
    for name in list_presets():
        assert name in table
    profiled = load_preset(
        _write(
            tmp_path,
            lambda d: d.update(
                name="profiled",
                memory_profile={"workloads": {
                    "W1": {"peak_gib": 1.23, "host_gib": 0.0, "fits": True},
                    "W2": {"peak_gib": 6.1, "host_gib": 0.5, "fits": False, "planned_peak_gib": 3.36,
                           "planned_host_gib": 7.25, "fits_with_planner": True, "stream_blocks": 0.5},
                    "W3": {"peak_gib": 9.0, "fits": False, "planned_peak_gib": 5.0, "fits_with_planner": False},
                    "W5": {"peak_gib": 2.46, "host_gib": 17.55, "fits": True, "stream_blocks": 1.0},
                }},
            ),
        )
    )
    table = presets_table([load_preset("rx570"), profiled])
    # card bytes, and host bytes where a plan keeps some there (an old table without them: card only)
    assert "memory profile" in table and "W1 1.2G, W2 planned 3.4G+7.2G host, W3 no, W5 2.5G+17.6G host" in table
    md = presets_markdown([profiled])
    assert "| W2 SDXL LoRA r16, 1024² | 6.1 | 0.5 | fits with the planner | 3.36 | 7.25 | 50% |" in md
    assert "| W5 FLUX.1-dev LoRA r16, 512² | 2.46 | 17.55 | fits |  |  | 100% |" in md
    assert "adamw8bit_portable" in table and "chunked" in table
