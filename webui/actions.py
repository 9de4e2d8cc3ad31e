"""What the panel's buttons do: pick a preset, plan the form's job, start, resume and stop it, sample now."""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LowvramError
from .forms import (
    TASK_LABELS,
    Check,
    Form,
    check_out,
    config_yaml,
    form_from_config,
    problem_list,
    resolve_form,
    validate_form,
    whole,
)
from .state import PanelState
from .views import plan_markdown, scaled


def preset_names() -> list[str]:
    from ..presets import list_presets

    return list_presets()


def default_preset(state: PanelState) -> str:
    from ..hardware import recommend_preset

    try:
        return recommend_preset(state.probe())
    except LowvramError:
        return "cpu"


def check_out_live(state: PanelState, out: str) -> Check:
    """``check_out``, except that the running job's own folder is fine (the page is attached to it)."""
    s = state.manager.status()
    if s.active and s.run_dir and (out or "").strip() == s.run_dir:
        return Check(True, "the running job's folder")
    return check_out(out)


# ---- plan ---------------------------------------------------------------------------------------------
def plan_report(form: Form) -> str:
    """Markdown: the memory plan for the form's job on the preset's card, then the config it would train."""
    cfg, problems = validate_form(form, for_resume=True)
    if cfg is None:
        return "### Cannot plan yet\n\n" + problem_list(problems)
    from .. import api

    run = resolve_form(form)
    parts = [f"### Plan for {TASK_LABELS[cfg.run.task].lower()} on {html.escape(run.preset.card.describe())}", ""]
    try:
        planned = api.plan(run, processes=1)
    except LowvramError as e:
        return "\n".join(parts + [f"✗ {html.escape(str(e))}", "", "<details><summary>Resolved config</summary>",
                                   "", "```yaml", config_yaml(cfg), "```", "</details>"])
    parts += plan_markdown(planned)
    parts += ["", "<details><summary>Resolved config (what the job will run)</summary>", "",
              "```yaml", config_yaml(planned.config), "```", "</details>"]
    return "\n".join(parts)


# ---- job control --------------------------------------------------------------------------------------
def start_job(state: PanelState, form: Form) -> str:
    """Validate the form, plan it (the front door: fit the run to the card or refuse it, as ``lowvram train``
    does) and start exactly that plan in a new process; the message says what happened (or every problem)."""
    cfg, problems = validate_form(form)
    if cfg is None:
        return "### Not started\n\n" + problem_list(problems)
    from .. import api

    try:
        planned = api.plan(resolve_form(form), processes=1)
        if planned.refusal is not None:
            raise ConfigError(*planned.refusal)
    except LowvramError as e:
        return "### Not started\n\n" + problem_list([str(e)])
    try:
        job = state.manager.start(planned)
    except LowvramError as e:
        return f"✗ {html.escape(str(e))}"
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
        return f"✗ {html.escape(str(e))}"
    ckpt = latest_checkpoint(Path(out) / "checkpoints")
    if ckpt is None:
        return f"✗ run folder '{html.escape(out)}' has no checkpoint to resume from — start it again instead"
    total = whole(steps)
    new_total = total if isinstance(total, int) and total > 0 else None
    try:
        state.manager.resume(out, new_total)
    except LowvramError as e:
        return f"✗ {html.escape(str(e))}"
    preset = state.job_form.preset if state.job_form else default_preset(state)
    if new_total:
        cfg.run.steps = new_total
    state.job_form = form_from_config(cfg, preset)
    return (f"Resuming `{out}` from {ckpt.name} to {new_total or cfg.run.steps} steps.")


def stop_job(state: PanelState) -> str:
    return html.escape(state.manager.stop())


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
                    return None, f"✗ {html.escape(str(e))}"
        images = model.generate([prompt], cfg_scale=float(guidance), steps=n_steps, sampler=sampler,
                                seed=n_seed, negative_prompt=negative or "")
    image = scaled(make_grid(images, nrow=1, padding=0))
    source = "final model" if key[1].startswith("final") else f"EMA weights of checkpoint {key[1]}"
    return image, (f"guidance {float(guidance):g}, {sampler} {n_steps} steps, seed {n_seed} — {source} "
                   f"({time.perf_counter() - t0:.1f} s on the CPU)")
