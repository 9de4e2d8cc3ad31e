"""Memory of W1–W6 side by side: our leanest plan, the lower bound, every saving off, today's trainers.

    PYTHONPATH=. python bench/memory_table.py [--workloads W1 W3] [--json]
    PYTHONPATH=. python bench/memory_table.py --presets [rx570 ...] [--workloads W5 W6] [--ram 32]

``--presets``: for each preset's card, the plan ``lowvram train`` would choose for each workload (the fastest
that fits; else the leanest, and by how much it misses) with its device bytes, host bytes, the streamed
fraction of the frozen block weights and the bytes streamed per step. Profiles with the same knobs on cards
whose kernels and bus are the same are reused across presets (only the budget differs).

Profiles run on the meta device (no GPU needed); each SD-size profile takes ~5-60 s on 2 cores. Every
figure is the peak of the whole run (caching, steps, validation, the sample previews), and counts the
EMA the jobs keep (train.ema_decay 0.999 by default): on the card, except where a plan moves it to the
CPU. "ours" is the leanest plan the trainer runs (bf16 trainable weights and ZeRO are profiled on request
but never planned). "today's trainers" = the small-card settings of sd-scripts/diffusers: fp16 frozen
weights, gradient checkpointing, cached latents (and text), 8-bit AdamW, SDPA (the math kernel where the
card has no fused one), full batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from lowvram.errors import MemoryPlanError
from lowvram.memory.bound import lower_bound
from lowvram.memory.planner import baseline, plan
from lowvram.memory.profiler import GIB, profile_step
from lowvram.memory.report import leanest, preset_start, shared_profile
from lowvram.memory.workloads import WORKLOADS, Knobs
from lowvram.presets import load_preset

# The card each workload is judged on (the targets: W1/W4/W5 on an RX 570; W2/W3/W6 tensor bytes on a
# flash-capable card, W3 on one with bf16).
CARDS = {"W1": "rx570", "W2": "rtx2060-6gb", "W3": "rtx3070-8gb", "W4": "rx570", "W5": "rx570", "W6": "rtx2060-6gb"}


def todays_trainers(wl, card) -> Knobs:
    base = baseline(wl, card)
    frozen = "fp32" if wl.mode != "lora" else "fp8" if wl.model.startswith("flux") else "fp16"  # sd-scripts --fp8_base
    return base.with_(frozen_dtype=frozen, gradient_checkpointing=True,
                      cache_latents=True, cache_text=True, offload_frozen=True,
                      optimizer="adamw8bit" if card.bitsandbytes else "adamw8bit_portable", attention="sdpa")


def row(wid: str, card_name: str | None = None) -> dict:
    wl = WORKLOADS[wid]
    card_name = card_name or CARDS[wid]
    card = load_preset(card_name).card
    t = time.perf_counter()
    lean_knobs = leanest(wl, card)
    lean = profile_step(wl, lean_knobs, card=card)
    off = profile_step(wl, baseline(wl, card), card=card)
    today = profile_step(wl, todays_trainers(wl, card), card=card)
    bound = lower_bound(wl, lean, card)
    return {"workload": wid, "card": card_name, "ours_bytes": lean.peak_bytes, "bound_bytes": bound.total_bytes,
            "all_off_bytes": off.peak_bytes, "today_bytes": today.peak_bytes, "ours_knobs": lean.knobs,
            "ours_stage": lean.peak_phase, "ours_stages": lean.stages, "ours_by_category": lean.by_category,
            "ours_host_bytes": lean.host_bytes, "ours_bus_bytes": lean.bus_bytes, "off_ema_bytes": off.by_category.get("ema", 0),
            "bound_terms": bound.terms, "notes": lean.notes, "seconds": round(time.perf_counter() - t, 1)}


def preset_row(name: str, wid: str, ram_gib: float) -> dict:
    """The plan ``lowvram train`` would choose for workload ``wid`` with preset ``name`` (its config's knobs
    first, then the planner's), or the leanest plan when none fits."""
    preset = load_preset(name)
    wl, start = preset_start(WORKLOADS[wid], preset)
    card = preset.card
    t = time.perf_counter()
    try:
        chosen = plan(wl, card, ram_gib=ram_gib, start=start, profile=shared_profile)
        prof, knobs, error = chosen.profile, chosen.knobs, ""
    except MemoryPlanError as e:
        knobs = leanest(wl, card)
        prof, error = shared_profile(wl, knobs, card=card), str(e).split(":")[0]
    host = sum(prof.host_bytes.values())
    return {"preset": name, "workload": wid, "fits": error == "" and prof.fits is not False, "error": error,
            "device_bytes": prof.peak_bytes, "budget_bytes": prof.budget_bytes, "host_bytes": host,
            "host_by_kind": prof.host_bytes, "stream_blocks": knobs.stream_blocks, "bus_bytes": prof.bus_bytes,
            "precision": knobs.precision, "frozen_dtype": knobs.frozen_dtype, "knobs": prof.knobs,
            "seconds": round(time.perf_counter() - t, 1)}


def preset_table(presets: list[str], workloads: list[str], ram_gib: float) -> list[dict]:
    rows = []
    for name in presets:
        for wid in workloads:
            rows.append(preset_row(name, wid.upper(), ram_gib))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def format_preset_table(rows: list[dict], ram_gib: float) -> str:
    out = ["| preset | workload | plan | device GiB (budget) | host GiB | streamed | bus GiB/step | compute, frozen |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = f" ({r['budget_bytes'] / GIB:.2f})" if r["budget_bytes"] else ""
        verdict = "fits" if r["fits"] else "no plan fits (leanest shown)" if r["error"] else "no budget"
        out.append(f"| {r['preset']} | {r['workload']} | {verdict} | {r['device_bytes'] / GIB:.2f}{budget} | "
                   f"{r['host_bytes'] / GIB:.2f} | {r['stream_blocks']:.0%} | {r['bus_bytes'] / GIB:.2f} | "
                   f"{r['precision']}, {r['frozen_dtype']} |")
    out.append(f"host RAM checked against {ram_gib:g} GiB (--ram); bus: bytes copied host→card per micro-batch")
    return "\n".join(out)


def stored_table(presets: list[str], workloads: list[str]) -> str:
    """The presets' stored W1–W6 tables (what ``lowvram profile --update-presets`` wrote; nothing is profiled) as
    one Markdown table: the preset's knobs, the verdict, the planned (or closest) plan and its streaming."""
    from lowvram.preset_tables import row_verdict

    out = ["| preset (budget GiB) | workload | preset's knobs: card / host GiB | verdict | planned or closest: card / "
           "host GiB | streamed |", "|---|---|---|---|---|---|"]
    for name in presets:
        profile = load_preset(name).memory_profile or {}
        for wid, r in (profile.get("workloads") or {}).items():
            if wid not in workloads:
                continue
            planned = f"{r['planned_peak_gib']} / {r.get('planned_host_gib', 0.0)}" if "planned_peak_gib" in r else ""
            streamed = f"{r['stream_blocks']:.0%}" if r.get("stream_blocks") else ""
            out.append(f"| {name} ({profile.get('budget_gib')}) | {wid} | {r['peak_gib']} / {r.get('host_gib', 0.0)} | "
                       f"{row_verdict(r)} | {planned} | {streamed} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--card", help="judge every workload on this preset's card (default: each workload's own, CARDS)")
    ap.add_argument("--presets", nargs="*", default=None, help="plan each workload on these presets' cards (none named: all)")
    ap.add_argument("--ram", type=float, default=32.0, help="host RAM in GiB the plans are checked against")
    ap.add_argument("--stored", action="store_true",
                    help="with --presets: print the presets' stored tables (lowvram profile --update-presets), "
                         "profiling nothing")
    args = ap.parse_args(argv)
    if args.presets is not None and args.stored:
        from lowvram.presets import list_presets

        print(stored_table(args.presets or list_presets(), [w.upper() for w in args.workloads]))
        return 0
    if args.presets is not None:
        from lowvram.presets import list_presets

        table = preset_table(args.presets or list_presets(), args.workloads, args.ram)
        print(json.dumps(table, indent=2) if args.json else format_preset_table(table, args.ram))
        return 0
    rows = []
    for wid in args.workloads:
        rows.append(row(wid.upper(), args.card))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'':4}{'card':<13}{'ours':>8}{'bound':>8}{'all off':>9}{'today':>8}{'ours host':>11}  ours peaks in"
          "   (GiB of tensors at the peak; host: RAM the leanest plan keeps)")
    for r in rows:
        print(f"{r['workload']:<4}{r['card']:<13}{r['ours_bytes'] / GIB:>8.2f}{r['bound_bytes'] / GIB:>8.2f}"
              f"{r['all_off_bytes'] / GIB:>9.2f}{r['today_bytes'] / GIB:>8.2f}"
              f"{sum(r['ours_host_bytes'].values()) / GIB:>11.2f}  {r['ours_stage']}")
    for r in rows:
        k = r["ours_knobs"]
        on = [f"{key}={k[key]}" for key in ("precision", "frozen_dtype", "trainable_dtype", "optimizer", "attention",
                                            "attention_chunk", "batch_size", "grad_accum", "gradient_checkpointing",
                                            "fused_backward", "ema_on_cpu", "stream_blocks")]
        print(f"{r['workload']} ours: " + ", ".join(on))
        print("    stages: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in r["ours_stages"].items())
              + f"; EMA {r['off_ema_bytes'] / GIB:.2f} GiB on the card when every saving is off")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
