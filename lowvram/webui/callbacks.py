"""What the panel's widgets call: check a field, resolve the config, plan, start/stop/resume, poll, sample.

Plain functions of their inputs (plus the explicit :class:`PanelState`), returning text, tables and
images, so they are tested without a browser; ``app.py`` only wires them to widgets.
"""

from __future__ import annotations

import html
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import FINETUNE_TASKS, MODEL_SIZES, RunConfig
from ..errors import ConfigError, LowvramError
from .jobs import JobManager, JobStatus
from .tail import JsonlTail

TASK_LABELS: dict[str, str] = {
    "text2img": "From scratch: text-to-image (pixels)",
    "latent": "From scratch: text-to-image (latent)",
    "autoencoder": "From scratch: autoencoder only",
    "lora": "LoRA on a checkpoint (SD 1.x/2.x/SDXL, FLUX.1)",
    "full": "Full fine-tune of a checkpoint",
}
FROM_SCRATCH = ("text2img", "latent", "autoencoder")
PREVIEW_MIN_SIDE = 384  # tiny grids (16 px images) are scaled up, pixel for pixel, to be seen
MAX_PLOT_POINTS = 1500


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


@dataclass
class PanelState:
    """What the server keeps between calls: the job manager and small caches (never per page)."""

    manager: JobManager
    hardware: Any = None  # HardwareInfo, probed once
    _metrics: dict[str, tuple[JsonlTail, list[dict[str, Any]]]] = field(default_factory=dict)
    _model: tuple[tuple[str, str], Any] | None = None
    _model_lock: threading.Lock = field(default_factory=threading.Lock)
    job_form: Form | None = None  # the form the current job was started from (a reloaded page shows it)

    def probe(self) -> Any:
        if self.hardware is None:
            from ..hardware import probe

            self.hardware = probe()
        return self.hardware


# ---- presets ----------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    from ..presets import list_presets

    return list_presets()


def default_preset(state: PanelState) -> str:
    from ..hardware import recommend_preset

    try:
        return recommend_preset(state.probe())
    except LowvramError:
        return "cpu"


def preset_card(name: str, state: PanelState | None = None) -> str:
    """Markdown: the card, its budget, its knobs, its memory table (or that it has none yet)."""
    from ..presets import budget_bytes, load_preset

    try:
        p = load_preset(name)
    except LowvramError as e:
        return f"✗ {_text(e)}"
    c = p.card
    caps = [cap for cap in ("fp16", "bf16", "flash_attention", "bitsandbytes", "xformers") if getattr(c, cap)]
    lines = [
        f"**{html.escape(c.describe(), quote=False)}** — {html.escape(p.description)}",
        "",
        "| card | backend | VRAM | context | margin | budget for tensors |",
        "|---|---|---|---|---|---|",
        f"| {c.name} ({c.arch}) | {c.backend} | {c.vram_gib:g} GiB | {c.context_gib:g} GiB | {c.margin_gib:g} GiB "
        f"| **{budget_bytes(c) / 2**30:.2f} GiB** |",
        "",
        f"Can run: {', '.join(caps) or 'fp32 only'}. Knobs: precision {p.knob('train.precision')}, "
        f"optimizer {p.knob('train.optimizer')}, attention {p.knob('memory.attention')}, "
        f"checkpointing {'on' if p.knob('train.gradient_checkpointing') else 'off'}, "
        f"micro-batch {p.knob('train.batch_size')} × accumulation {p.knob('train.grad_accum')}.",
        "",
    ]
    lines += memory_table(p.memory_profile)
    if state is not None:
        try:
            from ..hardware import warn_if_preset_mismatch

            warning = warn_if_preset_mismatch(p, state.probe())
        except LowvramError:
            warning = None
        if warning:
            lines += ["", f"⚠ {html.escape(warning)}"]
    return "\n".join(lines)


def memory_table(profile: dict[str, Any] | None) -> list[str]:
    """The preset's measured memory profile as a table of workloads, or why there is none."""
    from ..presets import profile_verdict

    if not profile:
        return ["*Memory table: not profiled yet for this preset* (`lowvram profile --update-presets` writes it)."]
    workloads = profile.get("workloads")
    if not isinstance(workloads, dict) or not workloads:
        return [f"Memory profile: {profile_verdict(profile)}"]
    try:
        from ..memory.workloads import WORKLOADS
    except ImportError:
        WORKLOADS = {}
    budget = profile.get("budget_gib")
    rows = ["| workload | job | peak | verdict |", "|---|---|---|---|"]
    for wid, row in workloads.items():
        row = row if isinstance(row, dict) else {}
        job = getattr(WORKLOADS.get(wid), "description", "")
        peak = f"{row['peak_gib']:.2f} GiB" if isinstance(row.get("peak_gib"), int | float) else "?"
        fits = row.get("fits")
        verdict = "✓ fits" if fits else "✗ does not fit" if fits is False else "?"
        if fits is False and isinstance(row.get("planned_peak_gib"), int | float):
            # the figure lowvram train / plan / profile give this job: the planner's plan from the preset's knobs
            planned = f"{row['planned_peak_gib']:.2f} GiB"
            verdict = (f"✓ fits with the planner's knobs ({planned})" if row.get("fits_with_planner")
                       else f"✗ does not fit (leanest plan {planned})")
        rows.append(f"| {wid} | {job} | {peak} | {verdict} |")
    head = f"Memory table (budget {budget:.2f} GiB):" if isinstance(budget, int | float) else "Memory table:"
    return [head, "", *rows]


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


# ---- checking fields as they are entered --------------------------------------------------------------
def _text(e: LowvramError) -> str:
    return str(e)


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
        return Check(False, _text(e))
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
        return Check(False, _text(e))
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
FORM_FIELDS = {  # form attribute -> (config key, label shown as the source of a bad value)
    "steps": ("run.steps", "Steps"),
    "lr": ("train.lr", "Learning rate"),
    "batch_size": ("train.batch_size", "Micro-batch"),
    "grad_accum": ("train.grad_accum", "Accumulation"),
    "resolution": ("data.resolution", "Resolution"),
}


def _whole(value: Any) -> Any:
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
        value = _whole(getattr(form, attr))
        if key == "data.resolution" and value in (None, ""):
            continue  # blank: the model's own resolution
        out.append(Setting(key, value, f"panel: {label}"))
    if form.task == "lora":
        out.append(Setting("lora.rank", _whole(form.rank), "panel: LoRA rank"))
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
        problems.append(_text(e))
    except LowvramError as e:
        problems.append(_text(e))
    task = cfg.run.task if cfg else form.task
    checks = [check_data(cfg.data.source if cfg else form.data)]
    model_value = (cfg.model.pretrained or cfg.model.size) if cfg else form.model
    if cfg is None or task in FINETUNE_TASKS or (form.model or "").strip():
        checks.append(check_model(model_value or "", task))
    if not for_resume:
        checks.append(check_out(form.out))
    problems += [c.message for c in checks if not c.ok]
    return (cfg if not problems else None), problems


def check_out_live(state: PanelState, out: str) -> Check:
    """``check_out``, except that the running job's own folder is fine (the page is attached to it)."""
    s = state.manager.status()
    if s.active and s.run_dir and (out or "").strip() == s.run_dir:
        return Check(True, "the running job's folder")
    return check_out(out)


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
        return _problem_list([_text(e)])
    t = cfg.train
    return (f"✓ settings valid: {t.batch_size} × {t.grad_accum} = {t.batch_size * t.grad_accum} images per step, "
            f"{cfg.run.steps} steps, learning rate {t.lr:g}")


def config_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip()


# ---- plan ---------------------------------------------------------------------------------------------
def plan_report(form: Form) -> str:
    """Markdown: the memory plan for the form's job on the preset's card, then the config it would train."""
    cfg, problems = validate_form(form, for_resume=True)
    if cfg is None:
        return "### Cannot plan yet\n\n" + _problem_list(problems)
    from .. import api

    run = resolve_form(form)
    parts = [f"### Plan for {TASK_LABELS[cfg.run.task].lower()} on {html.escape(run.preset.card.describe())}", ""]
    try:
        planned = api.plan(run, processes=1)
    except LowvramError as e:
        return "\n".join(parts + [f"✗ {html.escape(_text(e))}", "", "<details><summary>Resolved config</summary>",
                                   "", "```yaml", config_yaml(cfg), "```", "</details>"])
    parts += plan_markdown(planned)
    parts += ["", "<details><summary>Resolved config (what the job will run)</summary>", "",
              "```yaml", config_yaml(planned.config), "```", "</details>"]
    return "\n".join(parts)


def plan_markdown(planned: Any) -> list[str]:
    """The front door's plan as the panel shows it: verdict, peak, parts, the planner's knobs, notes."""
    from ..memory.profiler import GIB

    r = planned.record
    if r.get("peak_bytes") is None:
        return [f"note: {html.escape(n, quote=False)}" for n in r.get("notes", [])]
    budget = r.get("budget_bytes")
    verdict = {"fits": "✓ fits", "planned": "✓ fits with the planner's knobs", "forced": "✗ does not fit (forced)",
               "refused": "✗ refused"}.get(r["verdict"], r["verdict"])
    lines = [f"**{verdict}**: the run peaks at **{r['peak_bytes'] / GIB:.2f} GiB** of tensors "
             f"(during {r['peak_stage']})"
             + (f"; budget {budget / GIB:.2f} GiB, headroom {(budget - r['peak_bytes']) / GIB:+.2f} GiB."
                if budget is not None else "."), "",
             "| part | GiB |", "|---|---|"]
    lines += [f"| {cat} | {b / GIB:.3f} |" for cat, b in r["by_category"].items() if b]
    lines += [f"| {cat} (host memory) | {b / GIB:.3f} |" for cat, b in r.get("host_bytes", {}).items() if b]
    if r.get("planner_steps"):
        lines += ["", "**The planner switched on** (fastest plan that fits):", ""]
        lines += [f"- {s['knob']}: {s['peak_bytes'] / GIB:.2f} GiB" for s in r["planner_steps"]]
        lines += ["", "settings the job will run with: `" + "`, `".join(f"{k}={v}" for k, v in r["changed"].items())
                  + "`"]
    if r.get("refused"):
        lines += ["", f"✗ {html.escape(r['refused'])}"]
    lines += [f"\nnote: {html.escape(n, quote=False)}" for n in r.get("notes", [])]
    return lines


def _problem_list(problems: list[str]) -> str:
    return "\n".join(f"✗ {html.escape(p)}".replace("\n", "  \n") for p in problems)


# ---- job control --------------------------------------------------------------------------------------
def start_job(state: PanelState, form: Form) -> str:
    """Validate the form, plan it (the front door: fit the run to the card or refuse it, as ``lowvram train``
    does) and start exactly that plan in a new process; the message says what happened (or every problem)."""
    cfg, problems = validate_form(form)
    if cfg is None:
        return "### Not started\n\n" + _problem_list(problems)
    from .. import api

    try:
        planned = api.plan(resolve_form(form), processes=1)
        if planned.refusal is not None:
            raise ConfigError(*planned.refusal)
    except LowvramError as e:
        return "### Not started\n\n" + _problem_list([_text(e)])
    try:
        job = state.manager.start(planned)
    except LowvramError as e:
        return f"✗ {html.escape(_text(e))}"
    state.job_form = form
    return f"Started: {TASK_LABELS[cfg.run.task].lower()}, {cfg.run.steps} steps, run folder `{cfg.run.out}` (pid {job.proc.pid})."


def resume_job(state: PanelState, out: str, steps: Any = None) -> str:
    """Continue the run in ``out`` from its latest checkpoint (``steps``: the new total, if larger)."""
    from ..run_folder import load_run_config
    from ..train.checkpoint import latest_checkpoint

    out = (out or "").strip()
    try:
        cfg = load_run_config(out)
    except LowvramError as e:
        return f"✗ {html.escape(_text(e))}"
    ckpt = latest_checkpoint(Path(out) / "checkpoints")
    if ckpt is None:
        return f"✗ run folder '{html.escape(out)}' has no checkpoint to resume from — start it again instead"
    total = _whole(steps)
    new_total = total if isinstance(total, int) and total > 0 else None
    try:
        state.manager.resume(out, new_total)
    except LowvramError as e:
        return f"✗ {html.escape(_text(e))}"
    preset = state.job_form.preset if state.job_form else default_preset(state)
    if new_total:
        cfg.run.steps = new_total
    state.job_form = form_from_config(cfg, preset)
    return (f"Resuming `{out}` from {ckpt.name} to {new_total or cfg.run.steps} steps.")


def stop_job(state: PanelState) -> str:
    return html.escape(state.manager.stop())


# ---- live status ------------------------------------------------------------------------------------
def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


STATE_LABEL = {"idle": "no job", "starting": "starting…", "running": "training", "stopping": "stopping…",
               "stopped": "stopped", "done": "finished", "failed": "failed"}


def status_html(s: JobStatus) -> str:
    """Stat tiles: state, step, loss, it/s, ETA, peak memory (ids for the browser test)."""
    def tile(label: str, value: str, ident: str, sub: str = "") -> str:
        return (f'<div class="lv-tile"><div class="lv-label">{label}</div>'
                f'<div class="lv-value" id="lv-{ident}">{html.escape(value)}</div>'
                f'<div class="lv-sub">{html.escape(sub)}</div></div>')

    stage = " (autoencoder)" if s.stage == "autoencoder" and s.active else ""
    total = f" / {s.total}" if s.total else ""
    mem = "—" if s.peak_mem_mib is None else f"{s.peak_mem_mib:,.0f} MiB"
    mem_kind = {"process_rss": "process RSS", "gpu_allocated": "GPU tensors"}.get(s.mem_kind or "", s.mem_kind or "")
    tiles = [
        tile("status", STATE_LABEL.get(s.state, s.state) + stage, "state", f"phase: {s.phase}" if s.active and s.phase else ""),
        tile("step", f"{s.step}{total}", "step"),
        tile("loss", "—" if s.loss is None else f"{s.loss:.4f}", "loss"),
        tile("val loss", "—" if s.val_loss is None else f"{s.val_loss:.4f}", "val-loss"),
        tile("speed", "—" if not s.it_s else f"{s.it_s:.2f} it/s", "speed"),
        tile("ETA", fmt_duration(s.eta_s) if s.active else "—", "eta"),
        tile("peak memory", mem, "mem", mem_kind),
    ]
    pct = 100.0 * s.step / s.total if s.total else 0.0
    bar = f'<div class="lv-bar"><div class="lv-fill lv-{s.state}" style="width:{min(pct, 100):.1f}%"></div></div>'
    where = f'<div class="lv-where">run folder <code>{html.escape(s.run_dir)}</code></div>' if s.run_dir else ""
    return f'<div class="lv-status" data-state="{s.state}">{"".join(tiles)}</div>{bar}{where}'


def error_markdown(s: JobStatus) -> str:
    """The failure (message, exit, last output lines) or the latest warnings; empty when all is well."""
    if s.state == "failed" and s.error:
        return "### ✗ The training process failed\n\n```text\n" + s.error + "\n```\n\nThe panel keeps running; " \
               "fix the problem and Start again (or Resume from the last checkpoint)."
    parts = []
    if s.error:  # e.g. ended at once on request
        parts.append(f"ℹ {html.escape(s.error)}")
    parts += [f"⚠ {html.escape(w)}" for w in s.warnings]
    return "\n\n".join(parts)


# ---- metrics and previews -----------------------------------------------------------------------------
def read_metrics(state: PanelState, run_dir: str | None) -> list[dict[str, Any]]:
    """All rows of ``run_dir/metrics.jsonl`` so far (read incrementally between calls)."""
    if not run_dir:
        return []
    path = str(Path(run_dir) / "metrics.jsonl")
    tail, rows = state._metrics.get(path, (None, []))
    if tail is None:
        tail = JsonlTail(path)
        state._metrics[path] = (tail, rows)
    new = tail.read()
    if tail.restarted:  # the run folder was started afresh
        rows.clear()
    rows.extend(new)
    return rows


def loss_frame(rows: list[dict[str, Any]]) -> Any:
    """A long-format DataFrame (step, loss, series) for the plot: train, validation, autoencoder.

    None while there is nothing to draw: Gradio's plot keeps no lines after it was given an empty frame.
    """
    import pandas as pd

    points: list[tuple[int, float, str]] = []
    for r in rows:
        kind = r.get("kind")
        value = r.get("val_loss") if kind == "val" else r.get("loss") if kind == "step" else None
        if not isinstance(value, int | float) or not math.isfinite(value):
            continue
        series = "validation" if kind == "val" else "autoencoder" if r.get("stage") == "autoencoder" else "train"
        points.append((int(r.get("step", 0)), float(value), series))
    # explicit dtypes: a frame of objects would be "nominal" and the plot would draw a category axis
    if not points:
        return None
    df = pd.DataFrame(points, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64",
                                                                          "series": "str"})
    if len(df) > MAX_PLOT_POINTS:  # keep the browser fast on long runs: every k-th train point
        train = df[df.series == "train"]
        k = math.ceil(len(train) / MAX_PLOT_POINTS)
        df = pd.concat([train.iloc[::k], df[df.series != "train"]]).sort_values("step")
    return df


def sample_files(run_dir: str | None) -> list[Path]:
    """The run's sample grids, newest first."""
    if not run_dir:
        return []
    folder = Path(run_dir) / "samples"
    if not folder.is_dir():
        return []
    files = [p for p in folder.glob("*.png") if not p.name.endswith(".tmp.png")]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def scaled(image: Any, min_side: int = PREVIEW_MIN_SIDE) -> Any:
    """Scale a small image up by a whole factor, pixel for pixel (no blur), so it can be seen."""
    from PIL import Image

    factor = max(1, math.ceil(min_side / max(image.size)))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def gallery_items(files: list[Path]) -> list[tuple[Any, str]]:
    from PIL import Image

    items = []
    for p in files:
        try:
            with Image.open(p) as im:
                items.append((scaled(im.convert("RGB")), _sample_caption(p)))
        except OSError:
            continue  # being replaced right now: shown on the next poll
    return items


def _sample_caption(p: Path) -> str:
    stem = p.stem
    if stem.startswith("step-"):
        return f"step {int(stem[5:])}"
    return stem


def grid_legend(cfg_scales: list[float] | None, prompts: list[str] | None) -> str:
    """What the preview grids show: rows = prompts, columns = guidance scales."""
    if not cfg_scales:
        return "Grids: one row per prompt, one column per guidance scale."
    cols = ", ".join(f"{s:g}" for s in cfg_scales)
    text = f"Grids: columns = guidance {cols}"
    if prompts:
        text += "; rows = " + "; ".join(f"“{html.escape(p)}”" for p in prompts)
    return text


# ---- sample now ---------------------------------------------------------------------------------------
def _model_key(run_dir: Path, which: str) -> str:
    from ..pipeline import MODEL_JSON
    from ..train.checkpoint import latest_checkpoint

    if which == "auto" and (run_dir / "final" / MODEL_JSON).is_file():
        return f"final@{(run_dir / 'final' / MODEL_JSON).stat().st_mtime_ns}"
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    return ckpt.name if ckpt is not None else "none"


def sample_now(state: PanelState, run_dir: str | None, prompt: str, negative: str, guidance: float,
               steps: Any, seed: Any, sampler: str) -> tuple[Any, str]:
    """One image from the latest checkpoint's EMA weights (or the final model), on the CPU, in this process.

    Training goes on in its own process; the model is cached until a newer checkpoint appears.
    """
    from ..runs import load_run_model
    from ..sample import make_grid

    if not run_dir:
        return None, "✗ no run yet: start a job (or type a run folder as the output folder)"
    run = Path(run_dir)
    prompt = (prompt or "").strip()
    if not prompt:
        return None, "✗ type a prompt"
    try:
        n_steps, n_seed = int(steps), int(seed)
    except (TypeError, ValueError):
        return None, "✗ steps and seed must be whole numbers"
    if n_steps < 1:
        return None, "✗ sampling steps must be 1 or more"
    running = state.manager.status().active and state.manager.status().run_dir == run_dir
    which = "latest" if running else "auto"
    t0 = time.perf_counter()
    with state._model_lock:
        for attempt in range(2):  # the newest checkpoint may be pruned between listing and loading
            try:
                key = (str(run.resolve()), _model_key(run, which))
                if key[1] == "none":
                    return None, (f"✗ run '{run_dir}' has no checkpoint yet: the first one is written after "
                                  "run.checkpoint_every steps")
                if state._model is None or state._model[0] != key:
                    state._model = (key, load_run_model(run, device="cpu", which=which))
                model = state._model[1]
                break
            except LowvramError as e:
                if attempt:
                    return None, f"✗ {html.escape(_text(e))}"
        images = model.generate([prompt], cfg_scale=float(guidance), steps=n_steps, sampler=sampler,
                                seed=n_seed, negative_prompt=negative or "")
    image = scaled(make_grid(images, nrow=1, padding=0))
    source = "final model" if key[1].startswith("final") else f"EMA weights of checkpoint {key[1]}"
    return image, (f"guidance {float(guidance):g}, {sampler} {n_steps} steps, seed {n_seed} — {source} "
                   f"({time.perf_counter() - t0:.1f} s on the CPU)")
