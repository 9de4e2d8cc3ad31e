"""The panel's run form: its fields, the check of each field as it is typed, and the config the form resolves to."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import FINETUNE_TASKS, MODEL_SIZES, RunConfig
from ..errors import ConfigError, LowvramError

TASK_LABELS: dict[str, str] = {
    "text2img": "From scratch: text-to-image (pixels)",
    "latent": "From scratch: text-to-image (latent)",
    "autoencoder": "From scratch: autoencoder only",
    "lora": "LoRA on a checkpoint (SD 1.x/2.x/SDXL, FLUX.1)",
    "full": "Full fine-tune of a checkpoint",
}


FROM_SCRATCH = ("text2img", "latent", "autoencoder")


@dataclass
class Form:
    """The panel's run form, as the widgets hold it (numbers may be None or text while being typed)."""

    preset: str
    task: str = "text2img"
    data: str = "builtin"
    model: str = "tiny"
    out: str = "runs/panel"
    steps: Any = 1200
    lr: Any = "2e-4"
    rank: Any = 16
    resolution: Any = None
    batch_size: Any = 32
    grad_accum: Any = 1
    extra: str = ""  # section.key=value lines, as --set


@dataclass
class Check:
    """The verdict on one field: ``ok`` and a line to show under it."""

    ok: bool
    message: str

    def markdown(self) -> str:
        return ("✓ " if self.ok else "✗ ") + self.message


# ---- checking fields as they are entered --------------------------------------------------------------
def check_data(source: str) -> Check:
    """The data folder (or builtin): the CLI's message when it cannot be used, else what it holds."""
    from ..data.report import DataReport
    from ..data.sources import list_source

    source = (source or "").strip()
    if source in ("", "builtin"):
        return Check(True, "built-in generated shapes (no files needed)")
    report = DataReport(source=source)
    try:
        fmt, candidates = list_source(Path(source).expanduser(), "auto", report)
    except LowvramError as e:
        return Check(False, str(e))
    return Check(True, f"{len(candidates)} image files found (format {fmt}); they are checked when the job starts")


def check_model(model: str, task: str) -> Check:
    """A named size for from-scratch jobs, a local checkpoint for LoRA / full fine-tunes."""
    model = (model or "").strip()
    if task in FROM_SCRATCH:
        if model in MODEL_SIZES:
            from ..models.scratch import get_spec

            return Check(True, get_spec(model).description)
        return Check(False, f"model '{model}': {TASK_LABELS.get(task, task)} trains a named size — "
                            f"use one of {', '.join(MODEL_SIZES)}")
    if not model or model in MODEL_SIZES:
        return Check(False, f"model.pretrained: task '{task}' needs a local checkpoint path "
                            "(a diffusers folder or an A1111/ComfyUI .safetensors file)")
    from ..families import detect

    try:  # the registry says which family it is; the family says what it is and what it trains
        family = detect(model)
        line = family.describe(Path(model).expanduser())
    except LowvramError as e:
        return Check(False, str(e))
    if task not in family.tasks:
        return Check(False, f"{line.split(' (')[0]}: {family.label} trains as "
                            f"{' or '.join(repr(TASK_LABELS.get(t, t)) for t in family.tasks)} only — choose "
                            f"{TASK_LABELS.get(family.tasks[0], family.tasks[0])!r}")
    return Check(True, line)


def check_out(out: str) -> Check:
    """The output folder: empty or new is fine; one that holds a run is resumed, not overwritten."""
    from ..train.checkpoint import latest_checkpoint

    out = (out or "").strip()
    if not out:
        return Check(False, "run.out: give an output folder for the run")
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        return Check(False, f"run.out = '{out}' is a file: choose a folder")
    ckpt = latest_checkpoint(p / "checkpoints")
    if ckpt is not None:
        return Check(False, f"run folder '{out}' already holds a run — continue it with Resume "
                            f"(`lowvram train --resume {out}`), or choose another output folder")
    if p.is_dir():
        return Check(True, "existing folder; the run writes config, metrics, samples and checkpoints into it")
    return Check(True, "new folder")


# ---- config -------------------------------------------------------------------------------------------
def preset_knobs(name: str, task: str, model: str) -> dict[str, Any]:
    """Form values the preset implies: learning rate, micro-batch, accumulation, rank, resolution."""
    from ..presets import load_preset

    p = load_preset(name)
    return {
        "lr": f"{p.knob('train.lr'):g}",
        "batch_size": int(p.knob("train.batch_size")),
        "grad_accum": int(p.knob("train.grad_accum")),
        "rank": int(p.knob("lora.rank")),
        "resolution": default_resolution(task, model, name),
    }


def default_resolution(task: str, model: str, preset: str = "cpu") -> int | None:
    """The resolution the front door resolves for this task and model under ``preset`` (a blank field)."""
    from ..config import default_resolution as default_of
    from ..presets import load_preset

    configured = load_preset(preset).knob("data.resolution")
    if configured:
        return int(configured)
    # a fine-tune's model field names its checkpoint (a from-scratch model: its own side)
    return default_of(task, model if model in MODEL_SIZES else "tiny", None if model in MODEL_SIZES else model)


FORM_FIELDS = {  # form attribute -> (config key, label shown as the source of a bad value)
    "steps": ("run.steps", "Steps"),
    "lr": ("train.lr", "Learning rate"),
    "batch_size": ("train.batch_size", "Micro-batch"),
    "grad_accum": ("train.grad_accum", "Accumulation"),
    "resolution": ("data.resolution", "Resolution"),
}


def whole(value: Any) -> Any:
    """A number widget's value as the config builder takes it."""
    # Number widgets send floats (6.0): whole ones become ints, anything else goes to the builder as is.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return value.strip()
    return value


def form_settings(form: Form) -> tuple[list[Any], list[str]]:
    """The form as the front door's settings (each field named as its source), and the lines of the extra
    settings box that cannot be read."""
    from ..api import Setting

    out = [Setting("run.task", form.task, "panel: Job"),
           Setting("data.source", (form.data or "").strip() or "builtin", "panel: Data"),
           Setting("run.out", (form.out or "").strip(), "panel: Output folder")]
    model = (form.model or "").strip()
    if model:
        out.append(Setting("model.size" if model in MODEL_SIZES else "model.pretrained", model, "panel: Model"))
    for attr, (key, label) in FORM_FIELDS.items():
        value = whole(getattr(form, attr))
        if key == "data.resolution" and value in (None, ""):
            continue  # blank: the model's own resolution
        out.append(Setting(key, value, f"panel: {label}"))
    if form.task == "lora":
        out.append(Setting("lora.rank", whole(form.rank), "panel: LoRA rank"))
    problems = []
    for n, line in enumerate((form.extra or "").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            problems.append(f"panel: extra settings line {n} '{line}' must be written section.key=value "
                            "(e.g. train.lr=1e-4)")
            continue
        key, value = line.split("=", 1)
        out.append(Setting(key.strip(), value.strip(), f"panel: extra settings line {n}"))
    return out, problems


def resolve_form(form: Form) -> Any:
    """preset → form fields → extra ``section.key=value`` lines, through the front door ``lowvram.api.resolve``
    (like ``lowvram train``); ConfigError lists every bad field."""
    from ..api import resolve

    settings, problems = form_settings(form)
    return resolve(form.preset, settings=settings, problems=problems, probe_hardware=False)


def build_config(form: Form) -> RunConfig:
    """The resolved config of the form (see ``resolve_form``)."""
    return resolve_form(form).config


def validate_form(form: Form, *, for_resume: bool = False) -> tuple[RunConfig | None, list[str]]:
    """The config and every problem with the form (config fields, data, model, output folder)."""
    problems: list[str] = []
    cfg = None
    try:
        cfg = build_config(form)
    except ConfigError as e:
        problems.append(str(e))
    except LowvramError as e:
        problems.append(str(e))
    task = cfg.run.task if cfg else form.task
    checks = [check_data(cfg.data.source if cfg else form.data)]
    model_value = (cfg.model.pretrained or cfg.model.size) if cfg else form.model
    if cfg is None or task in FINETUNE_TASKS or (form.model or "").strip():
        checks.append(check_model(model_value or "", task))
    if not for_resume:
        checks.append(check_out(form.out))
    problems += [c.message for c in checks if not c.ok]
    return (cfg if not problems else None), problems


def form_from_config(cfg: RunConfig, preset: str) -> Form:
    """The form that reproduces ``cfg`` over ``preset``: the main fields, the rest as extra lines."""
    model = cfg.model.pretrained if cfg.run.task in FINETUNE_TASKS else cfg.model.size
    form = Form(preset=preset, task=cfg.run.task, data=cfg.data.source, model=model or "", out=cfg.run.out,
                steps=cfg.run.steps, lr=f"{cfg.train.lr:g}", rank=cfg.lora.rank, resolution=cfg.data.resolution,
                batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum)
    try:
        base = build_config(form).to_dict()
    except LowvramError:
        return form
    lines = []
    for section, body in cfg.to_dict().items():
        for key, value in body.items():
            if base[section][key] != value and value is not None:
                text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) \
                    if isinstance(value, list) else value
                lines.append(f"{section}.{key}={text}")
    form.extra = "\n".join(lines)
    return form


def check_settings(form: Form) -> str:
    """The config problems of the form (each naming its field and where the value came from), or ✓."""
    try:
        cfg = build_config(form)
    except LowvramError as e:
        return problem_list([str(e)])
    t = cfg.train
    return (f"✓ settings valid: {t.batch_size} × {t.grad_accum} = {t.batch_size * t.grad_accum} images per step, "
            f"{cfg.run.steps} steps, learning rate {t.lr:g}")


def config_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip()


def problem_list(problems: list[str]) -> str:
    """Each problem as a ✗ line of markdown."""
    return "\n".join(f"✗ {html.escape(p)}".replace("\n", "  \n") for p in problems)
