"""What the panel shows: the preset's card, the plan, the live status tiles, the loss plot and the preview gallery."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from ..errors import LowvramError
from .jobs import JobStatus
from .state import PanelState
from .tail import JsonlTail

PREVIEW_MIN_SIDE = 384  # tiny grids (16 px images) are scaled up, pixel for pixel, to be seen
MAX_PLOT_POINTS = 1500


# ---- presets ----------------------------------------------------------------------------------------
def preset_card(name: str, state: PanelState | None = None) -> str:
    """Markdown: the card, its budget, its knobs, its memory table (or that it has none yet)."""
    from ..presets import budget_bytes, load_preset

    try:
        p = load_preset(name)
    except LowvramError as e:
        return f"✗ {str(e)}"
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
    from ..preset_tables import profile_verdict

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


# ---- plan ---------------------------------------------------------------------------------------------
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
