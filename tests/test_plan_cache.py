"""Plans keyed by content: reused while nothing that decides memory changed, profiled again otherwise."""

from __future__ import annotations

import json

import pytest

from lowvram.memory import plan_cache, run_plan
from lowvram.presets import load_preset
from lowvram.train.setup import resolve_defaults


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """plan_run on the tiny from-scratch model, counting how often it really profiles."""
    calls = {"n": 0}
    real = run_plan._decide

    def decide(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(run_plan, "_decide", decide)
    card = load_preset("cpu").card

    def plan(cfg):
        return run_plan.plan_run(cfg, card)

    return plan, calls


def test_an_unchanged_config_is_profiled_once(counted, tiny_cfg, tmp_path):
    plan, calls = counted
    first = plan(tiny_cfg(data__cache_dir=str(tmp_path / "c")))
    # another run folder, more steps, another seed: nothing that changes memory
    again = plan(tiny_cfg(data__cache_dir=str(tmp_path / "c"), run__out=str(tmp_path / "other"), run__steps=99,
                          run__seed=7))
    assert calls["n"] == 1
    assert again.profile == first.profile and again.record == first.record
    assert first.reused is None and "plan reused" in again.reused
    assert [line for line in again.lines() if "plan reused" not in line] == first.lines()
    # what the run folder keeps is the same text, reused or not (lowvram plan prints what train saves)
    assert again.files()["plan.yaml"] == first.files()["plan.yaml"]
    stored = list((tmp_path / "c" / "plans").glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["profile"]["peak_bytes"] > 0


def test_what_decides_memory_makes_a_new_plan(counted, tiny_cfg, tmp_path, monkeypatch):
    plan, calls = counted
    cache = str(tmp_path / "c")
    plan(tiny_cfg(data__cache_dir=cache))
    plan(tiny_cfg(data__cache_dir=cache, train__batch_size=8))  # memory knob
    plan(tiny_cfg(data__cache_dir=cache, data__resolution=24))  # the workload
    assert calls["n"] == 3
    monkeypatch.setattr(plan_cache, "code_fingerprint", lambda: "changed code")
    plan(tiny_cfg(data__cache_dir=cache))
    monkeypatch.setattr(plan_cache, "library_versions", lambda: {"torch": "9.9"})
    plan(tiny_cfg(data__cache_dir=cache))
    assert calls["n"] == 5


def test_a_damaged_entry_is_profiled_again_and_replaced(counted, tiny_cfg, tmp_path):
    plan, calls = counted
    cfg = tiny_cfg(data__cache_dir=str(tmp_path / "c"))
    plan(cfg)
    (entry,) = (tmp_path / "c" / "plans").glob("*.json")
    entry.write_text("{not json")
    rp = plan(tiny_cfg(data__cache_dir=str(tmp_path / "c")))
    assert calls["n"] == 2 and rp.profile is not None and rp.reused is None
    assert json.loads(entry.read_text())["profile"] is not None


def test_the_key_ignores_only_memory_neutral_fields(tiny_cfg):
    card = load_preset("cpu").card
    base = tiny_cfg()
    resolve_defaults(base)
    key = plan_cache.plan_key(plan_cache.key_material(base, card, 1))
    neutral = tiny_cfg(run__out="/elsewhere", sample__steps=3, run__log_every=5)
    assert plan_cache.plan_key(plan_cache.key_material(neutral, card, 1)) == key
    for changed in (tiny_cfg(train__gradient_checkpointing=True), tiny_cfg(memory__attention="math"),
                    tiny_cfg(memory__stream_blocks=0.5), tiny_cfg(memory__ram_gib=3.0)):
        assert plan_cache.plan_key(plan_cache.key_material(changed, card, 1)) != key
    assert plan_cache.plan_key(plan_cache.key_material(base, card, 2)) != key  # processes


def test_the_key_holds_this_machines_ram_when_none_is_given(tiny_cfg, monkeypatch):
    """The plan's host-RAM check used this machine's RAM: another machine sharing the cache folder gets its own."""
    from lowvram.memory import streaming

    card = load_preset("cpu").card
    cfg = tiny_cfg()
    monkeypatch.setattr(streaming, "machine_ram_bytes", lambda: 64 * 2**30)
    big = plan_cache.plan_key(plan_cache.key_material(cfg, card, 1))
    monkeypatch.setattr(streaming, "machine_ram_bytes", lambda: 8 * 2**30)
    assert plan_cache.plan_key(plan_cache.key_material(cfg, card, 1)) != big
    given = tiny_cfg(memory__ram_gib=16.0)  # --ram wins over the machine's
    key = plan_cache.plan_key(plan_cache.key_material(given, card, 1))
    monkeypatch.setattr(streaming, "machine_ram_bytes", lambda: 64 * 2**30)
    assert plan_cache.plan_key(plan_cache.key_material(given, card, 1)) == key
