"""The planner: knobs in speed order, the first plan that fits, a useful error when none does."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from sd_fixtures import tiny_workload

from lowvram.errors import MemoryPlanError
from lowvram.memory.bound import lower_bound
from lowvram.memory.planner import baseline, candidates, plan
from lowvram.memory.profiler import GIB, profile_step
from lowvram.memory.report import leanest

WL = tiny_workload(Path(tempfile.mkdtemp()), "lora", batch=2, ema=True)


def card(vram_bytes: float, **caps) -> SimpleNamespace:
    """A gfx803-like card (fp16, no flash, no bitsandbytes) with no context or margin, sized in bytes."""
    return SimpleNamespace(backend="rocm", vram_gib=vram_bytes / GIB, context_gib=0.0, margin_gib=0.0,
                           **{"bf16": False, "fp16": True, "flash_attention": False, "bitsandbytes": False,
                              "xformers": False, **caps})


class Recorder:
    """Wraps profile_step, remembering every candidate it was asked about (and its peak)."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, int]] = []

    def __call__(self, workload, knobs, **kw):
        prof = profile_step(workload, knobs, **kw)
        self.calls.append((knobs, prof.peak_bytes))
        return prof


@pytest.fixture(scope="module")
def extremes() -> tuple[int, int]:
    """Peaks of the baseline (every saving off) and of the leanest plan, on the test card."""
    c = card(GIB)
    return profile_step(WL, baseline(WL, c), card=c).peak_bytes, profile_step(WL, leanest(WL, c), card=c).peak_bytes


def test_candidates_are_cumulative_and_keep_the_job():
    steps = list(candidates(WL, card(GIB)))
    names = [n for n, _ in steps]
    assert names[0].startswith("cache latents")
    assert names.index("gradient checkpointing") < names.index(next(n for n in names if n.startswith("micro-batch")))
    for _, k in steps:  # accumulation keeps the images per optimizer step
        assert k.batch_size * k.grad_accum == WL.batch_size
    last = steps[-1][1]
    assert last.cache_latents and last.gradient_checkpointing and last.frozen_dtype == "fp8"
    assert last.optimizer == "adamw8bit_portable"  # no bitsandbytes on this card
    assert last.attention == "chunked"


def test_planner_picks_the_first_candidate_that_fits(extremes):
    full, lean = extremes
    budget = (full + lean) // 2
    rec = Recorder()
    chosen = plan(WL, card(budget), profile=rec)
    assert chosen.fits and chosen.profile.peak_bytes <= budget
    peaks = [p for _, p in rec.calls]
    assert all(p > budget for p in peaks[:-1])  # every faster plan was profiled and did not fit
    assert chosen.steps and chosen.steps[-1].peak_after == peaks[-1]
    assert sum(s.saved for s in chosen.steps) == peaks[0] - peaks[-1]
    assert "switched on" in chosen.format()


def test_planner_keeps_a_plan_that_already_fits(extremes):
    full, _ = extremes
    chosen = plan(WL, card(full * 2))
    assert chosen.steps == [] and chosen.knobs == baseline(WL, card(full * 2))


def test_nothing_fits_says_how_close_and_what_would_help(extremes):
    _, lean = extremes
    with pytest.raises(MemoryPlanError) as err:
        plan(WL, card(lean * 0.5))
    message = str(err.value)
    assert "short by" in message and "resolution" in message and "GiB" in message
    assert "streaming every frozen block would remove at most" in message  # skipped: it could not have helped


def test_lower_bound_is_below_every_plan(extremes):
    _, lean_peak = extremes
    c = card(GIB)
    lean = profile_step(WL, leanest(WL, c), card=c)
    bound = lower_bound(WL, lean, c)
    assert 0 < bound.total_bytes <= lean_peak
    assert bound.terms["frozen_weights"] > 0 and bound.terms["activations"] > 0


@pytest.mark.parametrize("wid", ["W1", "W3", "W4"])
@pytest.mark.parametrize("preset", ["rtx3070-8gb", "rx570", "cpu"])
def test_planner_never_switches_on_what_the_trainer_refuses(wid, preset, monkeypatch):
    """Every plan the planner can reach (its candidates, in order) is a config `lowvram train` runs: no bf16
    trainable weights, no ZeRO (profiled on request, refused by the trainer), even on a bf16 CUDA card with
    DeepSpeed installed. A preset's table can then only say "fits" for a plan that trains."""
    from lowvram import distributed
    from lowvram.config import RunConfig
    from lowvram.memory.run_plan import untrained_knobs
    from lowvram.memory.workloads import WORKLOADS
    from lowvram.presets import load_preset

    monkeypatch.setattr(distributed, "deepspeed_available", lambda: True)
    card = load_preset(preset).card
    steps = list(candidates(WORKLOADS[wid], card))
    assert steps  # the planner has something to switch on for every job
    for name, knobs in steps:
        cfg = RunConfig()
        for section, body in knobs.as_config().items():
            for key, value in body.items():
                setattr(getattr(cfg, section), key, value)
        assert untrained_knobs(cfg) == [], name
