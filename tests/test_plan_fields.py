"""The plan is derived from the config itself, and is the same whichever door a run comes through.

- every RunConfig field changes what the profile runs (the job or the knobs), or is declared memory-neutral
  in ``run_plan.MEMORY_NEUTRAL`` with its reason (one list; a new field fails here until it is one or the other);
- fields that change real memory change the profile the way they should;
- the web panel and the CLI make the identical plan for the same inputs (prior preservation, the planner,
  a refused knob among them);
- ``lowvram plan`` prints exactly the files ``lowvram train`` saves in the run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sd_fixtures import save_tiny

from lowvram import api
from lowvram.cli import build_parser, main, settings_of, split_plan_output
from lowvram.config import all_fields
from lowvram.errors import LowvramError
from lowvram.memory.profiler import profile_step
from lowvram.memory.run_plan import MEMORY_NEUTRAL, PLAN_SETTINGS, plan_inputs
from lowvram.presets import load_preset
from lowvram.webui import callbacks as cb


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fields")
    sd1 = save_tiny(tmp, "sd1")["folder"]
    sdxl = save_tiny(tmp, "sdxl")["folder"]
    rng = np.random.default_rng(0)
    for name in ("data", "cls"):
        (tmp / name).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp / name / f"{i}.png")
            (tmp / name / f"{i}.txt").write_text(f"a photo, {name} {i}")
    return {"tmp": tmp, "sd1": sd1, "sdxl": sdxl, "data": tmp / "data", "cls": tmp / "cls"}


# ---- every field: planned or declared neutral -----------------------------------------------------------
def contexts(w: dict[str, Any]) -> list[dict[str, Any]]:
    """Jobs in which a field may matter: from scratch (pixels, latents), LoRA and full fine-tunes."""
    ft = {"model.pretrained": str(w["sd1"]), "data.source": str(w["data"])}
    return [{"run.task": "text2img"}, {"run.task": "latent"}, {"run.task": "lora", **ft}, {"run.task": "full", **ft}]


def alternatives(name: str, default: Any, w: dict[str, Any]) -> list[dict[str, Any]]:
    """Other values of a field (with what they need beside them to be valid)."""
    special: dict[str, list[dict[str, Any]]] = {
        "model.pretrained": [{name: str(w["sdxl"])}],
        "model.family": [{name: "sdxl"}],
        "model.config": [{name: str(w["sdxl"])}],
        "model.vae": [{name: str(w["sd1"])}],
        "model.text_encoder": [{name: str(w["sd1"])}],
        "data.source": [{name: str(w["data"])}],
        "data.class_data": [{name: str(w["cls"])}],
        "data.resolution": [{name: 48}],
        "sample.prompts": [{name: ["one prompt --w 64 --h 64"]}],
        "sample.cfg_scales": [{name: [1.0]}],
        "memory.zero_stage": [{name: 2}],
        "memory.offload_optimizer": [{"memory.zero_stage": 2, name: True}],
        "run.val_every": [{name: 0}],
        "run.sample_every": [{"sample.final": False, name: 0}],
        "sample.final": [{"run.sample_every": 0, name: False}],
        "data.num_class_images": [{"data.class_data": str(w["cls"]), "data.class_prompt": "a dog", name: 5}],
    }
    if name in special:
        return special[name]
    field = dict(all_fields())[name]
    choices = field.metadata.get("choices")
    if choices:
        return [{name: c} for c in choices if c != default]
    if isinstance(default, bool):  # both: a preset may have set either
        return [{name: True}, {name: False}]
    if isinstance(default, int):
        return [{name: default * 2 + 1}, {name: 0}]
    if isinstance(default, float):
        return [{name: 0.0 if default else 0.5}, {name: round(default / 2, 6)}]
    return [{name: "x"}]


def inputs(settings: dict[str, Any]) -> Any:
    """What the profile runs for these settings over the cpu preset, or None if they are no valid config."""
    try:
        run = api.resolve("cpu", settings=[api.Setting(k, v, "test") for k, v in settings.items()],
                          probe_hardware=False)
    except LowvramError:
        return None
    return plan_inputs(run.config, load_preset("rx570").card)


def test_every_config_field_is_planned_or_declared_memory_neutral(world):
    declared = set(MEMORY_NEUTRAL) | set(PLAN_SETTINGS)
    names = [name for name, _ in all_fields()]
    assert declared <= set(names), declared - set(names)  # the lists name real fields only
    assert not set(MEMORY_NEUTRAL) & set(PLAN_SETTINGS)
    defaults = {name: getattr(getattr(api.RunConfig(), name.split(".")[0]), name.split(".")[1]) for name in names}
    unplanned = []
    for name in names:
        if name in declared:
            continue
        changed = False
        for ctx in contexts(world):
            for alt in alternatives(name, defaults[name], world):
                before = inputs({**ctx, **{k: v for k, v in alt.items() if k != name}})
                after = inputs({**ctx, **alt})
                if before is not None and after is not None and before != after:
                    changed = True
                    break
            if changed:
                break
        if not changed:
            unplanned.append(name)
    assert not unplanned, (f"{unplanned}: the plan ignores them; reflect them in run_workload.workload_for / "
                           "knobs_from_config, or declare them in run_plan.MEMORY_NEUTRAL with the reason")


# ---- ... and change the profile the way they should -----------------------------------------------------
def test_fields_that_change_real_memory_change_the_profile(world):
    card = load_preset("rx570").card  # a card: EMA and offloaded models can leave it
    base = {"run.task": "lora", "model.pretrained": str(world["sd1"]), "data.source": str(world["data"]),
            "data.resolution": 32, "train.batch_size": 2, "lora.rank": 4, "train.ema_on_cpu": False,
            "memory.offload_frozen": True}

    def profile(**changes: Any) -> Any:
        wl, knobs = inputs({**base, **{k.replace("__", "."): v for k, v in changes.items()}})
        return profile_step(wl, knobs, card=card)

    plain = profile()
    cat = plain.by_category
    text = profile(lora__text_encoder=True)  # the text encoder trains on the card
    assert text.by_category["trainable_weights"] > cat["trainable_weights"]
    assert text.by_category["frozen_weights"] > cat["frozen_weights"]
    attention = profile(lora__targets="attention")  # the attention projections only: fewer adapter weights
    assert attention.by_category["trainable_weights"] < cat["trainable_weights"]
    conv = profile(lora__conv=True)  # LoCon: the 3x3 convolutions get adapters too
    assert conv.by_category["trainable_weights"] > cat["trainable_weights"]
    dropout = profile(lora__dropout=0.1)  # a dropped copy of every adapted layer's input is kept for backward
    assert dropout.by_category["activations"] > cat["activations"]
    shuffle = profile(data__shuffle_tags=True)  # new captions every draw: the text encoder stays on the card
    assert shuffle.by_category["frozen_weights"] > cat["frozen_weights"]
    assert cat["ema"] > 0 and profile(train__ema_decay=0.0).by_category["ema"] == 0
    on_cpu = profile(train__ema_on_cpu=True)
    assert on_cpu.by_category["ema"] == 0 and on_cpu.host_bytes["ema"] == cat["ema"]
    big = profile(sample__prompts=["a photo --w 64 --h 64"])  # previews at 4x the pixels
    assert big.stages["preview"] > plain.stages["preview"]
    streamed = profile(memory__stream_blocks=0.5)  # half the frozen block bytes wait in host RAM
    moved = streamed.host_bytes["streamed_weights"]
    assert moved > 0 and streamed.by_category["frozen_weights"] == cat["frozen_weights"] - moved
    assert streamed.bus_bytes >= moved  # each streamed block is copied in at least once per micro-batch


# ---- one plan, whichever door ---------------------------------------------------------------------------
def cli_plan(argv: list[str]) -> Any:
    args = build_parser().parse_args(["plan", *argv])
    return api.plan(api.resolve(args.preset, config_file=args.config, settings=settings_of(args)))


def panel_plan(form: cb.Form) -> Any:
    return api.plan(cb.resolve_form(form), processes=1)


def door_cases(w: dict[str, Any]) -> dict[str, tuple[list[str], cb.Form]]:
    out = str(w["tmp"] / "door")
    lora = (["--preset", "cpu", "--task", "lora", "--model", str(w["sd1"]), "--data", str(w["data"]), "--out", out,
             "--steps", "2", "--set", "train.lr=0.001", "--set", "lora.rank=4", "--set", "data.resolution=32",
             "--set", "train.batch_size=2", "--set", "train.grad_accum=1"],
            cb.Form(preset="cpu", task="lora", data=str(w["data"]), model=str(w["sd1"]), out=out, steps=2, lr="1e-3",
                    rank=4, resolution=32, batch_size=2, grad_accum=1))
    prior_sets = [f"data.class_data={w['cls']}", "memory.vram_gib=2.0111"]  # 11.4 MiB after the cpu card's 2 GiB: frozen bf16 fits
    return {
        "from scratch": (["--preset", "cpu", "--out", out, "--steps", "2", "--set", "train.lr=0.002", "--set",
                          "data.resolution=16", "--set", "train.batch_size=4", "--set", "train.grad_accum=1"],
                         cb.Form(preset="cpu", out=out, steps=2, lr="2e-3", resolution=16, batch_size=4,
                                 grad_accum=1)),
        "prior preservation, planned": (lora[0] + [x for s in prior_sets for x in ("--set", s)],
                                        dataclasses.replace(lora[1], extra="\n".join(prior_sets))),
        "refused knob": (lora[0] + ["--set", "memory.trainable_dtype=bf16"],
                         dataclasses.replace(lora[1], extra="memory.trainable_dtype=bf16")),
    }


@pytest.mark.parametrize("case", ["from scratch", "prior preservation, planned", "refused knob"])
def test_panel_and_cli_make_the_identical_plan(world, case):
    argv, form = door_cases(world)[case]
    cli, panel = cli_plan(argv), panel_plan(form)
    assert cli.config.to_dict() == panel.config.to_dict()
    assert cli.record == panel.record
    assert cli.sources.keys() == panel.sources.keys()
    if case == "prior preservation, planned":
        assert cli.verdict == "planned" and cli.record["job"]["prior"]
        assert cli.sources["train.batch_size"].startswith("planner:") or cli.record["changed"]
    if case == "refused knob":
        assert cli.refusal is not None and cli.refusal == panel.refusal
        state = cb.PanelState(manager=_NoLaunch())
        shown = cb.start_job(state, form)
        assert shown.startswith("### Not started") and "trainable_dtype" in shown
        code = main(["train", *argv, "--no-progress"])
        assert code == 2 and not (Path(form.out) / "checkpoints").exists()


class _NoLaunch:
    """A job manager that must not be asked to start anything."""

    def start(self, planned: Any) -> Any:
        raise AssertionError("the panel started a job the trainer refuses")

    def status(self) -> Any:
        from lowvram.webui.jobs import JobStatus

        return JobStatus()


# ---- lowvram plan prints what lowvram train saves -------------------------------------------------------
def test_plan_prints_exactly_what_train_saves(world, capsys):
    out = world["tmp"] / "saved"
    # a budget the configured run exceeds: the saved config is the planner's, with its sources
    argv = ["--preset", "cpu", "--out", str(out), "--steps", "2", "--vram", "2.035", "--set", "data.resolution=16",
            "--set", "data.num_images=8", "--set", "train.batch_size=4", "--set", "run.checkpoint_every=0",
            "--set", "sample.steps=1", "--set", "sample.cfg_scales=1", "--set", "run.val_every=0",
            "--set", "run.tensorboard=false", "--set", "sample.prompts=a red circle"]
    assert main(["plan", *argv]) == 0
    printed = split_plan_output(capsys.readouterr().out)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", *argv, "--no-progress"]) == 0
    saved = {name: (out / name).read_text() for name in printed}
    assert set(printed) == {"config.yaml", "plan.yaml", "config_sources.yaml"}
    assert printed == saved
    plan = api.read_plan(out)
    assert plan.verdict == "planned" and plan.record["changed"]
    for key, value in plan.record["changed"].items():
        section, field = key.split(".")
        assert getattr(getattr(plan.config, section), field) == value
        assert plan.sources[key].startswith("planner: ")
    assert plan.sources["data.resolution"] == "--set data.resolution=16"
    assert plan.sources["run.steps"] == "--steps"


# ---- one figure per job: lowvram profile, the preset's table, the panel, lowvram plan -----------------
@pytest.mark.slow
def test_a_standard_job_has_one_figure_on_a_card(tmp_path, capsys):
    """W1 (SD 1.5 LoRA r16, 512², 1 image per step) on the rx570: the preset's stored table, `lowvram profile
    --preset`, the panel's memory table and `lowvram plan` for the same job agree to the byte."""
    import json

    from lowvram.memory.profiler import GIB
    from lowvram.memory.report import preset_table

    preset = load_preset("rx570")
    table = preset_table(preset)["workloads"]["W1"]
    figure = table.get("planned_peak_gib", table["peak_gib"])
    assert main(["profile", "--preset", "rx570", "--workload", "W1", "--json"]) == 0
    profiled = json.loads(capsys.readouterr().out)
    assert round(profiled["peak_bytes"] / GIB, 3) == figure
    assert f"{figure:.2f} GiB" in "\n".join(cb.memory_table({"budget_gib": 3.2, "workloads": {"W1": table}}))
    data = tmp_path / "data"  # a folder of 64+ images: the text cache encodes a full batch, as W1 assumes
    data.mkdir()
    for i in range(64):
        Image.new("RGB", (8, 8)).save(data / f"{i}.png")
    argv = ["--preset", "rx570", "--task", "lora", "--model", str(tmp_path / "sd15.safetensors"), "--data", str(data),
            "--set", "model.family=sd1", "--set", "data.resolution=512", "--set", "lora.rank=16",
            "--set", "train.batch_size=1", "--set", "train.grad_accum=1", "--out", str(tmp_path / "run")]
    planned = cli_plan(argv)
    assert planned.peak_bytes == profiled["peak_bytes"]
