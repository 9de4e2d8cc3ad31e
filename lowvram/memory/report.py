"""``lowvram profile``: profile or plan the standard workloads against a card; keep presets' tables fresh.

``profile_command`` is what the CLI calls; ``update_preset_profile`` writes a preset's ``memory_profile``
table and ``check_preset_profile`` says where a stored table no longer matches a fresh profile.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from ..card import CardSpec
from ..errors import ConfigError, MemoryPlanError
from ..fsutil import write_text_atomic
from .bound import lower_bound
from .flux_workload import safe_precision
from .planner import baseline, candidates
from .profiler import GIB, MemoryProfile, card_budget, profile_step
from .run_plan import knobs_from_config, plan_job
from .workloads import FLUX_MODELS, TABLE_WORKLOADS, WORKLOADS, Knobs, Workload, get_workload

PROFILE_TOLERANCE = 0.01  # a stored peak may differ from a fresh one by 1 % (library updates move bytes)
# A stored table must not depend on the RAM of the machine that wrote it: it shows the host bytes for the
# reader to hold against theirs (a run checks its own machine's RAM), so it plans as if RAM were plentiful.
TABLE_RAM_GIB = 1024.0


def leanest(workload: Workload, card: CardSpec | None = None) -> Knobs:
    """The last planner candidate: every knob the card allows switched on."""
    steps = list(candidates(workload, card))
    return steps[-1][1] if steps else baseline(workload, card)


def _summary(p: MemoryProfile, bound: int | None = None) -> dict[str, Any]:
    return {
        "workload": p.workload,
        "peak_bytes": p.peak_bytes,
        "budget_bytes": p.budget_bytes,
        "fits": p.fits,
        "headroom_bytes": p.headroom_bytes,
        "lower_bound_bytes": bound,
        "by_category": p.by_category,
        "context_bytes": p.context_bytes,
        "margin_bytes": p.margin_bytes,
        "peak_phase": p.peak_phase,
        "knobs": p.knobs,
        "host_bytes": p.host_bytes,
        "bus_bytes": p.bus_bytes,
        "notes": p.notes,
        "seconds": round(p.seconds, 2),
    }


def preset_start(workload: Workload, preset: Any) -> tuple[Workload, Knobs]:
    """A standard workload under a preset: the preset's knobs (its micro-batch, accumulation up to the
    workload's images per step) and its EMA setting; every saving off for a preset without knobs."""
    if preset is None or not preset.config:
        return workload, baseline(workload, getattr(preset, "card", None))
    from ..config import ConfigBuilder

    cfg = ConfigBuilder().apply(preset.config, preset.source).build()
    if workload.model in FLUX_MODELS:  # as `lowvram train` plans a FLUX.1 run: never in fp16
        safe_precision(cfg, preset.card)
    wl = workload.with_(ema=workload.ema and cfg.train.ema_decay > 0)
    return wl, knobs_from_config(cfg, wl, preset.card)


_PROFILES: dict[tuple, MemoryProfile] = {}


def shared_profile(workload: Workload, knobs: Knobs, card: CardSpec | None = None, vram_gib: float | None = None,
                   **kw: Any) -> MemoryProfile:
    """``profile_step``, kept for this process and reused for the same job and knobs on any card with the same
    kernels, autocast rules and bus (the profile reads nothing else of a card; only the budget is the card's):
    the presets' tables plan the same candidates on several cards."""
    key = (repr(workload), knobs, getattr(card, "backend", None), getattr(card, "flash_attention", False),
           getattr(card, "xformers", False), getattr(card, "pcie_gb_s", None), tuple(sorted(kw.items())))
    if key not in _PROFILES:
        _PROFILES[key] = profile_step(workload, knobs, card=card, vram_gib=vram_gib, **kw)
    vram, context, margin, budget = card_budget(card, vram_gib)
    return dataclasses.replace(_PROFILES[key], vram_bytes=vram, context_bytes=context, margin_bytes=margin,
                               budget_bytes=budget)


def standard_plan(workload: Workload, card: CardSpec | None, start: Knobs, vram_gib: float | None = None,
                  ram_gib: float | None = None, profile: Any = profile_step) -> dict[str, Any]:
    """The one figure of a standard job on a card: its knobs' profile and, over budget, the planner's first
    plan that fits from there (``lowvram profile``, the presets' tables and the panel all show this)."""
    try:
        prof, chosen = plan_job(workload, start, card, vram_gib, ram_gib, profile=profile)
    except MemoryPlanError as e:
        first = profile(workload, start, card=card, vram_gib=vram_gib)
        return {"start": first, "chosen": None, "steps": [{"error": str(e)}],
                "leanest_bytes": getattr(e, "leanest_bytes", None), "leanest": getattr(e, "leanest", None)}
    steps = [{"knob": s.knob, "peak_bytes": s.peak_after, "saved_bytes": s.saved} for s in chosen.steps] \
        if chosen else []
    return {"start": prof, "chosen": chosen.profile if chosen else prof, "steps": steps, "leanest_bytes": None,
            "leanest": None}


def profile_workload(workload: Workload, card: CardSpec | None = None, vram_gib: float | None = None,
                     knobs: Knobs | None = None, with_plan: bool = True, start: Knobs | None = None,
                     ram_gib: float | None = None) -> dict[str, Any]:
    """Plan (or profile ``knobs``) for one workload, with its lower bound; a JSON-ready dict.

    ``start``: the knobs to plan from (a preset's); default every saving off."""
    lean_knobs = leanest(workload, card)
    lean = profile_step(workload, lean_knobs, card=card, vram_gib=vram_gib)
    bound = lower_bound(workload, lean, card).total_bytes
    steps: list[dict[str, Any]] = []
    if knobs is not None:
        prof = profile_step(workload, knobs, card=card, vram_gib=vram_gib)
    elif with_plan:
        planned = standard_plan(workload, card, start or baseline(workload, card), vram_gib, ram_gib)
        prof = planned["chosen"] or lean
        steps = planned["steps"]
    else:
        prof = lean
    out = _summary(prof, bound)
    out["plan_steps"] = steps
    out["leanest_peak_bytes"] = lean.peak_bytes
    return out


def profile_command(preset: str | None = None, workloads: list[str] | None = None, vram_gib: float | None = None,
                    as_json: bool = False, update_presets: bool = False, ram_gib: float | None = None) -> str:
    """What ``lowvram profile`` prints: a table (or one JSON object per workload) for a card.

    With ``--preset`` each workload is planned from the preset's own knobs, so the figure is the one its
    memory table and ``lowvram plan`` show for the same job; with only ``--vram``, from every saving off."""
    from ..presets import list_presets, load_preset

    if update_presets:
        names = [preset] if preset else list_presets()
        lines = [f"{n}: {update_preset_profile(n, workloads)}" for n in names]
        return "\n".join(lines)
    loaded = load_preset(preset) if preset else None
    card = loaded.card if loaded else None
    if card is None and vram_gib is None:
        raise ConfigError("lowvram profile needs a card to plan against", "give --preset NAME or --vram GiB")
    ids = workloads or list(WORKLOADS)
    rows = []
    for w in ids:
        wl, start = preset_start(get_workload(w), loaded)
        rows.append(profile_workload(wl, card, vram_gib, start=start, ram_gib=ram_gib))
    if as_json:
        return json.dumps(rows[0] if len(rows) == 1 else rows, indent=2)
    return format_rows(rows)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A people table: peak, lower bound, budget, verdict per workload, then the knobs switched on."""
    out = [f"{'workload':<9}{'peak GiB':>10}{'bound GiB':>11}{'budget GiB':>12}{'host GiB':>10}  verdict"]
    for r in rows:
        budget = f"{r['budget_bytes'] / GIB:.2f}" if r["budget_bytes"] else "-"
        verdict = "fits" if r["fits"] else "does not fit" if r["fits"] is False else "-"
        host = sum(r.get("host_bytes", {}).values()) / GIB
        out.append(f"{r['workload']:<9}{r['peak_bytes'] / GIB:>10.2f}{r['lower_bound_bytes'] / GIB:>11.2f}"
                   f"{budget:>12}{host:>10.2f}  {verdict}")
    for r in rows:
        if r["plan_steps"]:
            out.append(f"{r['workload']} plan:")
            for s in r["plan_steps"]:
                out.append(f"  {s['error']}" if "error" in s else
                           f"  + {s['knob']:<48} {s['peak_bytes'] / GIB:6.2f} GiB (saved {s['saved_bytes'] / GIB:+.2f})")
    return "\n".join(out)


# ---- presets' memory tables ----------------------------------------------------------------------

def _gib(n: int | float) -> float:
    return round(n / GIB, 3)


def preset_table(preset: Any, workloads: list[str] | None = None) -> dict[str, Any]:
    """The ``memory_profile`` of a loaded preset: W1–W6 profiled with the preset's own knobs, and where they
    do not fit, the planner's first plan that fits from there (what ``lowvram train`` would run), or its
    leanest plan. Each with the bytes on the card and in host memory (streamed weights, parked models,
    the EMA on the CPU ...) at the card's peak, and the streamed share of the frozen block weights.
    ``workloads``: only these rows (default: all of ``TABLE_WORKLOADS``)."""
    table: dict[str, Any] = {"generated_by": "lowvram profile --update-presets",
                             "budget_gib": None, "workloads": {}}
    for wid in workloads or TABLE_WORKLOADS:
        workload = WORKLOADS[wid]
        wl, start = preset_start(workload, preset)
        planned = standard_plan(wl, preset.card, start, ram_gib=TABLE_RAM_GIB, profile=shared_profile)
        p = planned["start"]
        table["budget_gib"] = _gib(p.budget_bytes)
        row: dict[str, Any] = {"peak_gib": _gib(p.peak_bytes), "host_gib": _gib(sum(p.host_bytes.values())),
                               "fits": bool(p.fits)}
        shown = p
        if not p.fits:
            chosen = planned["chosen"]
            shown = chosen if chosen is not None else planned["leanest"]
            peak = chosen.peak_bytes if chosen is not None else planned["leanest_bytes"]
            row.update(planned_peak_gib=_gib(peak), fits_with_planner=chosen is not None)
            if shown is not None:
                row["planned_host_gib"] = _gib(sum(shown.host_bytes.values()))
        if shown is not None and shown.knobs.get("stream_blocks"):
            row["stream_blocks"] = shown.knobs["stream_blocks"]
        table["workloads"][wid] = row
    return table


def _write_profile(path: Path, table: dict[str, Any]) -> None:
    """Replace the ``memory_profile:`` block (the file's last key) and keep the comments above it."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    cut = next((i for i, line in enumerate(lines) if line.startswith("memory_profile:")), len(lines))
    body = yaml.safe_dump({"memory_profile": table}, sort_keys=False, default_flow_style=False)
    write_text_atomic(path, "\n".join(lines[:cut]) + "\n" + body)


def update_preset_profile(name: str, workloads: list[str] | None = None) -> str:
    """Profile W1–W6 (or only ``workloads``, keeping the other stored rows) with preset ``name``'s knobs and
    write its ``memory_profile``; returns the verdicts of the rows profiled."""
    from ..presets import load_preset

    preset = load_preset(name)
    table = preset_table(preset, workloads)
    if workloads:  # a change that moves some rows need not re-profile the others
        stored = dict((preset.memory_profile or {}).get("workloads") or {})
        stored.update(table["workloads"])
        table["workloads"] = {w: stored[w] for w in TABLE_WORKLOADS if w in stored}
    _write_profile(preset.path, table)
    return ", ".join(f"{w} {r['peak_gib']:.2f} GiB (host {r['host_gib']:.2f}) {'fits' if r['fits'] else 'no'}"
                     for w, r in table["workloads"].items() if not workloads or w in workloads)


def check_preset_profile(name: str) -> list[str]:
    """Differences between preset ``name``'s stored table and a fresh profile (empty: it matches)."""
    from ..presets import load_preset

    preset = load_preset(name)
    stored = (preset.memory_profile or {}).get("workloads") or {}
    if not stored:
        return [f"{name}: no memory_profile stored (run `lowvram profile --update-presets`)"]
    fresh = preset_table(preset)["workloads"]
    problems = []
    for wid, row in fresh.items():
        old = stored.get(wid)
        if not isinstance(old, dict):
            problems.append(f"{name} {wid}: missing from the stored table")
            continue
        for key, what in (("peak_gib", "peak"), ("host_gib", "host bytes")):
            if abs(float(old.get(key, -1)) - row[key]) > PROFILE_TOLERANCE * row[key] + 0.001:
                problems.append(f"{name} {wid}: stored {what} {old.get(key)} GiB, fresh {row[key]} GiB")
        if old.get("fits") != row["fits"]:
            problems.append(f"{name} {wid}: stored fits={old.get('fits')}, fresh fits={row['fits']}")
    return problems
