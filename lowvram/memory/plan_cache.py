"""Plans keyed by content: an unchanged config on an unchanged card is profiled once, not at every run.

Profiling builds the model on the meta device and runs a training step (seconds for SD 1.5, more when the
planner has to try knobs). Its result depends only on what the key holds: the resolved config (less the
fields that cannot change memory, below), the model's shape (the planner's workload, read from the
checkpoint's config), the card, the host RAM the plan was checked against (``memory.ram_gib`` or this
machine's: a plan that streams weights keeps them there), the process count, lowvram's own code, and the
versions of the libraries whose kernels and modules are profiled. Anything else changes the key, so a stale plan is never reused.
Plans live in ``<cache dir>/plans/<key>.json`` (``data.cache_dir`` / ``$LOWVRAM_CACHE`` /
``~/.cache/lowvram``); deleting the folder forces profiling again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from ..config import RunConfig
from .planner import Plan, Step
from .profiler import MemoryProfile
from .workloads import Knobs

log = logging.getLogger("lowvram.memory")
PLAN_CACHE_VERSION = 1  # bump when the stored JSON changes shape
# Fields that decide nothing about one training step's memory: where and how long a run goes, its cadence
# of logs/checkpoints/previews, and what previews draw. Everything else is part of the key.
MEMORY_NEUTRAL = ("run.out", "run.steps", "run.seed", "run.checkpoint_every", "run.keep_checkpoints",
                  "run.sample_every", "run.val_every", "run.log_every", "run.max_nonfinite", "run.tensorboard",
                  "sample.*")
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "bitsandbytes", "accelerate")


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of lowvram's own Python sources (the profiler, the training step, LoRA, optimizers...):
    any code change makes new plans. Computed once per process (a few milliseconds)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _neutral(dotted: str) -> bool:
    section = dotted.split(".", 1)[0]
    return dotted in MEMORY_NEUTRAL or f"{section}.*" in MEMORY_NEUTRAL


def key_material(cfg: RunConfig, card: Any, processes: int | None) -> dict[str, Any]:
    """Everything a plan depends on, as JSON-able values (the key is their sha256)."""
    from ..distributed import process_count
    from .run_plan import workload_for
    from .streaming import host_budget

    config = {f"{section}.{k}": v for section, body in cfg.to_dict().items() for k, v in body.items()
              if not _neutral(f"{section}.{k}")}
    workload = dataclasses.asdict(workload_for(cfg)) if cfg.run.task != "autoencoder" else None
    card_state = dataclasses.asdict(card) if dataclasses.is_dataclass(card) else vars(card) if card is not None else None
    # a cache folder shared by machines (a network home) must not hand a plan checked against one
    # machine's RAM to another with less
    host_ram, _ = host_budget(cfg.memory.ram_gib)
    return {"version": PLAN_CACHE_VERSION, "config": config, "workload": workload, "card": card_state,
            "host_ram": host_ram, "processes": processes or process_count(), "code": code_fingerprint(), "libraries": library_versions()}


def plan_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


# ---- RunPlan <-> JSON ------------------------------------------------------------------------------------
def _profile(d: dict[str, Any] | None) -> MemoryProfile | None:
    if d is None:
        return None
    fields = {f.name for f in dataclasses.fields(MemoryProfile)}
    return MemoryProfile(**{k: v for k, v in d.items() if k in fields})


def to_json(rp: Any) -> dict[str, Any]:
    plan = rp.plan
    return {
        "profile": dataclasses.asdict(rp.profile) if rp.profile is not None else None,
        "plan": None if plan is None else {"knobs": dataclasses.asdict(plan.knobs),
                                           "profile": dataclasses.asdict(plan.profile),
                                           "steps": [dataclasses.asdict(s) for s in plan.steps]},
        "overrides": rp.overrides,
        "notes": rp.notes,
    }


def from_json(d: dict[str, Any]) -> Any:
    from .run_plan import RunPlan

    p = d["plan"]
    plan = None if p is None else Plan(Knobs(**p["knobs"]), _profile(p["profile"]), [Step(**s) for s in p["steps"]])
    return RunPlan(_profile(d["profile"]), plan, d["overrides"], list(d["notes"]))


# ---- the cache -------------------------------------------------------------------------------------------
def plan_cache_dir(cfg: RunConfig) -> Path:
    from ..data.cache import default_cache_dir

    return default_cache_dir(cfg.data) / "plans"


def cached_plan(cfg: RunConfig, card: Any, processes: int | None, compute: Callable[[], Any]) -> Any:
    """``compute()`` (the profiling ``plan_run``) unless a plan with the same key is stored; stores what
    it computes. A plan that could not be profiled (no profile) is not stored; errors are not cached."""
    material = key_material(cfg, card, processes)
    key = plan_key(material)
    path = plan_cache_dir(cfg) / f"{key}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        rp = from_json(stored["run_plan"])
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(stored.get("created", 0)))
        rp.notes.append(f"plan reused from {path.parent} (profiled {when}; same config, card, code and libraries)")
        return rp
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as e:  # damaged or foreign: profile again, overwrite
        log.warning("plan cache entry %s unreadable (%s); profiling again", path, e)
    rp = compute()
    if rp.profile is not None:
        _store(path, {"created": time.time(), "key": material, "run_plan": to_json(rp)})
    return rp


def _store(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): several runs may plan at once; a cache that cannot be
    written (read-only home) only costs the next run its profiling time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(data, default=str), encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        log.warning("plan cache not written (%s): the next run profiles again", e)
