"""The Gradio panel: pick a preset and a job, plan it, start/stop/resume it, watch it learn, sample it.

Only layout and wiring live here; every action is a function in ``callbacks.py`` (gathered from ``forms.py``,
``views.py`` and ``actions.py``). One JobManager is shared by every page, so reloading the page shows the job
that is running.
"""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from ..config import FINETUNE_TASKS, SAMPLERS, field_help
from ..errors import LowvramError
from . import callbacks as cb
from .auth import resolve_auth
from .jobs import JobManager

POLL_SECONDS = 1.0
# Local fonts only: the panel works offline and never fetches from a font service.
THEME = gr.themes.Soft(font=["system-ui", "DejaVu Sans", "sans-serif"],
                       font_mono=["ui-monospace", "DejaVu Sans Mono", "monospace"])

CSS = """
.lv-status { display: grid; grid-template-columns: repeat(auto-fit, minmax(86px, 1fr)); gap: 8px; }
.lv-tile { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px 8px;
           background: var(--background-fill-primary); min-width: 0; }
.lv-label { font-size: 0.7rem; text-transform: uppercase; letter-spacing: 0.05em; opacity: 0.65; }
.lv-value { font-size: 1rem; font-weight: 600; font-variant-numeric: tabular-nums; white-space: nowrap; }
.lv-sub { font-size: 0.7rem; opacity: 0.6; min-height: 0.9rem; }
.lv-bar { height: 6px; border-radius: 3px; background: var(--background-fill-secondary); margin-top: 8px; overflow: hidden; }
.lv-fill { height: 100%; background: var(--color-accent); transition: width 0.5s; }
.lv-fill.lv-failed { background: #d9534f; } .lv-fill.lv-done { background: #3c9a5f; }
.lv-where { font-size: 0.8rem; opacity: 0.75; margin-top: 4px; }
.lv-check p { font-size: 0.85rem; margin: -4px 0 4px 2px; opacity: 0.9; }
#lv-gallery img, #lv-sample img { image-rendering: pixelated; }
footer { display: none !important; }
"""


def default_out() -> str:
    return time.strftime("runs/panel-%Y%m%d-%H%M%S")


def build_app(state: cb.PanelState | None = None, *, extra_default: str = "") -> tuple[gr.Blocks, cb.PanelState]:
    """The panel's Blocks and the state it shares between pages (one job manager)."""
    state = state or cb.PanelState(JobManager())
    presets = cb.preset_names()
    first = cb.default_preset(state)
    knobs = cb.preset_knobs(first, "text2img", "tiny")
    task_choices = [(label, task) for task, label in cb.TASK_LABELS.items()]

    # analytics_enabled=False: Gradio would otherwise report usage and check PyPI for updates (nothing online)
    with gr.Blocks(title="lowvram training panel", analytics_enabled=False) as demo:
        gr.Markdown("## lowvram — training panel\nPlan a job against your card, train it in its own process, "
                    "watch it learn and sample it with classifier-free guidance.")
        with gr.Row(equal_height=False):
            # ---------------------------------------------------------------- the job
            with gr.Column(scale=5, min_width=420):
                preset = gr.Dropdown(presets, value=first, label="Preset (card)", elem_id="lv-preset",
                                     info="The card the job is planned for; its knobs fill the settings below.")
                with gr.Accordion("Card and memory table", open=False):
                    card = gr.Markdown(cb.preset_card(first, state))
                task = gr.Radio(task_choices, value="text2img", label="Job", elem_id="lv-task",
                                info="From scratch trains a named model size; LoRA / full fine-tune start from "
                                     "a local Stable Diffusion checkpoint.")
                data = gr.Textbox("builtin", label="Data folder", elem_id="lv-data",
                                  info="A folder of images with .txt captions (or kohya / metadata / CelebA), "
                                       "or 'builtin' (generated shapes).")
                data_check = gr.Markdown(cb.check_data("builtin").markdown(), elem_classes="lv-check")
                model = gr.Textbox("tiny", label="Model", elem_id="lv-model",
                                   info="A size (tiny, celeba64, ddpm64) from scratch, or a local checkpoint "
                                        "path for LoRA / full fine-tunes.")
                model_check = gr.Markdown(cb.check_model("tiny", "text2img").markdown(), elem_classes="lv-check")
                out = gr.Textbox(label="Output folder", elem_id="lv-out", info=field_help("run.out"))
                out_check = gr.Markdown(elem_classes="lv-check")
                with gr.Row():
                    steps = gr.Number(1200, label="Steps", precision=0, elem_id="lv-steps", min_width=90)
                    lr = gr.Textbox(knobs["lr"], label="Learning rate", elem_id="lv-lr", min_width=90)
                    rank = gr.Number(knobs["rank"], label="LoRA rank", precision=0, elem_id="lv-rank", min_width=90)
                with gr.Row():
                    resolution = gr.Number(knobs["resolution"], label="Resolution", precision=0,
                                           elem_id="lv-resolution", min_width=90)
                    batch = gr.Number(knobs["batch_size"], label="Micro-batch", precision=0,
                                      elem_id="lv-batch", min_width=90)
                    accum = gr.Number(knobs["grad_accum"], label="Accumulation", precision=0,
                                      elem_id="lv-accum", min_width=90)
                settings_check = gr.Markdown(elem_classes="lv-check")
                with gr.Accordion("Extra settings", open=bool(extra_default), elem_id="lv-extra-acc"):
                    extra = gr.Textbox(extra_default, lines=4, show_label=False, elem_id="lv-extra",
                                       placeholder="section.key=value per line, as --set; e.g.\n"
                                                   "run.sample_every=200\nsample.cfg_scales=1,3,5,7")
                with gr.Row():
                    plan_btn = gr.Button("Plan", elem_id="lv-plan")
                    start_btn = gr.Button("Start", variant="primary", elem_id="lv-start")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="lv-stop", interactive=False)
                    resume_btn = gr.Button("Resume", elem_id="lv-resume")
                message = gr.Markdown(elem_id="lv-message")
                plan_out = gr.Markdown(elem_id="lv-plan-out")

            # ---------------------------------------------------------------- the run, live
            with gr.Column(scale=7, min_width=480):
                status = gr.HTML(cb.status_html(state.manager.status()), elem_id="lv-status")
                error = gr.Markdown(elem_id="lv-error")
                plot = gr.LinePlot(None, x="step", y="loss", color="series", title="Loss",
                                   height=260, elem_id="lv-plot",
                                   color_map={"train": "#3b82f6", "validation": "#f97316", "autoencoder": "#9ca3af"})
                gallery = gr.Gallery(label="Preview grids (newest first)", columns=3, height=300, format="png",
                                     object_fit="contain", elem_id="lv-gallery")
                legend = gr.Markdown(elem_classes="lv-check")
                with gr.Group():
                    gr.Markdown("&nbsp;**Sample now** — the latest checkpoint's EMA weights, on the CPU, while "
                                "training goes on")
                    with gr.Row():
                        prompt = gr.Textbox("a red circle on a blue background", label="Prompt",
                                            elem_id="lv-prompt", scale=3)
                        negative = gr.Textbox("", label="Negative prompt", elem_id="lv-negative", scale=2)
                    with gr.Row():
                        guidance = gr.Slider(0, 15, value=3.0, step=0.5, label="Guidance", elem_id="lv-guidance",
                                             scale=3)
                        s_steps = gr.Number(25, label="Steps", precision=0, elem_id="lv-sample-steps", min_width=70)
                        seed = gr.Number(0, label="Seed", precision=0, elem_id="lv-seed", min_width=70)
                        sampler = gr.Dropdown(list(SAMPLERS), value="ddim", label="Sampler", min_width=90)
                    sample_btn = gr.Button("Sample now", elem_id="lv-sample-btn")
                    sample_img = gr.Image(label="Sample", type="pil", format="png", height=260,
                                          elem_id="lv-sample", interactive=False)
                sample_info = gr.Markdown(elem_id="lv-sample-info", elem_classes="lv-check")

        seen = gr.State({"version": -1, "rows": -1, "samples": None, "active": None, "run": None})
        timer = gr.Timer(POLL_SECONDS)

        form_inputs = [preset, task, data, model, out, steps, lr, rank, resolution, batch, accum, extra]

        def form_of(*values: Any) -> cb.Form:
            return cb.Form(*values)

        # ---- checks as fields are entered
        def on_preset(name: str, task_v: str, model_v: str) -> tuple[Any, ...]:
            try:
                k = cb.preset_knobs(name, task_v, model_v)
            except LowvramError as e:
                return (f"✗ {e}", *(gr.skip(),) * 4)
            return cb.preset_card(name, state), k["lr"], k["batch_size"], k["grad_accum"], k["rank"]

        # .input (a person's change), not .change: restoring a running job's form must not reset its knobs
        preset.input(on_preset, [preset, task, model], [card, lr, batch, accum, rank])

        def on_task(task_v: str, model_v: str, data_v: str, preset_v: str) -> tuple[Any, ...]:
            if task_v in FINETUNE_TASKS and model_v in cb.MODEL_SIZES:
                model_v = ""
            elif task_v in cb.FROM_SCRATCH and model_v not in cb.MODEL_SIZES:
                model_v = "tiny"
            try:
                res = cb.default_resolution(task_v, model_v, preset_v)
            except LowvramError:
                res = gr.skip()
            return model_v, cb.check_model(model_v, task_v).markdown(), res, gr.update(
                interactive=task_v == "lora")

        task.input(on_task, [task, model, data, preset], [model, model_check, resolution, rank])
        data.change(lambda v: cb.check_data(v).markdown(), data, data_check)
        model.change(lambda v, t: cb.check_model(v, t).markdown(), [model, task], model_check)
        out.change(lambda v: cb.check_out_live(state, v).markdown(), out, out_check)
        for w in (steps, lr, rank, resolution, batch, accum, extra):
            w.change(lambda *v: cb.check_settings(form_of(*v)), form_inputs, settings_check)

        # ---- actions
        plan_btn.click(lambda *v: cb.plan_report(form_of(*v)), form_inputs, plan_out)
        start_btn.click(lambda *v: cb.start_job(state, form_of(*v)), form_inputs, message)
        stop_btn.click(lambda: cb.stop_job(state), None, message)
        resume_btn.click(lambda o, s: cb.resume_job(state, o, s), [out, steps], message)

        def run_dir_now(out_v: str) -> str | None:
            s = state.manager.status()
            return s.run_dir if s.run_dir else (out_v or None)

        sample_btn.click(
            lambda o, *a: cb.sample_now(state, run_dir_now(o), *a),
            [out, prompt, negative, guidance, s_steps, seed, sampler], [sample_img, sample_info],
        )

        # ---- live view
        def poll(seen_v: dict[str, Any], out_v: str) -> tuple[Any, ...]:
            s = state.manager.status()
            run = s.run_dir or ((out_v or "").strip() or None)
            if run != seen_v.get("run"):
                seen_v = {"version": -1, "rows": -1, "samples": None, "active": None, "run": run}
            rows = cb.read_metrics(state, run)
            files = cb.sample_files(run)
            signature = [(str(p), p.stat().st_mtime_ns) for p in files if p.exists()]
            changed = s.version != seen_v["version"] or s.state != seen_v.get("state")
            outs: list[Any] = [
                cb.status_html(s) if changed or seen_v["version"] < 0 else gr.skip(),
                cb.error_markdown(s) if changed or seen_v["version"] < 0 else gr.skip(),
                cb.grid_legend(s.grid_scales, s.grid_prompts) if changed or seen_v["version"] < 0 else gr.skip(),
                cb.loss_frame(rows) if len(rows) != seen_v["rows"] else gr.skip(),
                cb.gallery_items(files) if signature != seen_v["samples"] else gr.skip(),
            ]
            if s.active != seen_v["active"]:
                outs += [gr.update(interactive=not s.active), gr.update(interactive=s.active),
                         gr.update(interactive=not s.active)]
            else:
                outs += [gr.skip()] * 3
            seen_v = {"version": s.version, "state": s.state, "rows": len(rows), "samples": signature,
                      "active": s.active, "run": run}
            return (*outs, seen_v)

        timer.tick(poll, [seen, out], [status, error, legend, plot, gallery, start_btn, stop_btn, resume_btn, seen],
                   show_progress="hidden")

        def on_load() -> tuple[Any, ...]:
            """A new or reloaded page: show the running job's form, else a fresh output folder."""
            s = state.manager.status()
            form = state.job_form if s.active and state.job_form is not None else None
            if form is None:  # only the output folder: a fresh one, so Start does not meet an old run
                return tuple(default_out() if w is out else gr.skip() for w in form_inputs) + (gr.skip(),)
            values = [form.preset, form.task, form.data, form.model, form.out, form.steps, form.lr, form.rank,
                      form.resolution, form.batch_size, form.grad_accum, form.extra]
            return (*values, cb.preset_card(form.preset, state))

        demo.load(on_load, None, [*form_inputs, card])
        demo.load(lambda *v: cb.check_settings(form_of(*v)), form_inputs, settings_check)
    return demo, state


# ---- serving ------------------------------------------------------------------------------------------
def serve(host: str = "127.0.0.1", port: int = 7860, auth: str | None = None, *, block: bool = True,
          state: cb.PanelState | None = None, warm_start: bool = True) -> tuple[gr.Blocks, cb.PanelState]:
    """Build and launch the panel (never ``share=True``); with ``block`` wait until Ctrl-C, then stop the job.

    ``warm_start`` keeps a spare training process with the libraries imported, so Start skips their import
    (it holds their memory while idle: see docs/webui.md); ignored when ``state`` brings its own manager.
    """
    creds = resolve_auth(host, auth)
    demo, state = build_app(state or cb.PanelState(JobManager(warm_start=warm_start)))
    demo.queue(default_concurrency_limit=4)
    try:
        demo.launch(server_name=host, server_port=port, auth=creds, share=False, inbrowser=False,
                    prevent_thread_lock=True, quiet=True, css=CSS, theme=THEME, footer_links=[],
                    ssr_mode=False)
    except OSError as e:  # Gradio says "Cannot find empty port" when the port is taken
        state.manager.shutdown()  # the spare, if one was started, goes with the panel
        raise LowvramError(f"cannot serve the panel on {host}:{port}: {e}".splitlines()[0],
                           "choose another --port, or stop the program that uses this one") from None
    if not block:
        return demo, state
    print(f"lowvram panel on http://{'[' + host + ']' if ':' in host else host}:{port}  (Ctrl-C to quit; "
          "a running job is stopped with a checkpoint)")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        if state.manager.status().active:
            print("stopping: the running job saves a checkpoint…")
    finally:
        state.manager.shutdown()
        demo.close()
    return demo, state
