"""Plans keyed by content: an unchanged config on an unchanged card is profiled once, not at every run.

Profiling builds the model on the meta device and runs a training step (seconds for SD 1.5, more when the
planner has to try knobs). Its result depends only on what the key holds: the resolved config (less the
fields ``run_plan.MEMORY_NEUTRAL`` declares), the model's shape (the planner's workload, read from the
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
import time
from collections.abc import Callable
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from ..card import CardSpec
from ..config import RunConfig
from ..fsutil import write_text_atomic
from .profiler import MemoryProfile

log = logging.getLogger("lowvram.memory")
PLAN_CACHE_VERSION = 2  # bump when the stored JSON changes shape
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


def key_material(cfg: RunConfig, card: CardSpec | None, processes: int | None, workload: Any = None) -> dict[str, Any]:
    """Everything a plan depends on, as JSON-able values (the key is their sha256): the config less the
    fields ``run_plan.MEMORY_NEUTRAL`` declares (the one list: tests/test_plan_fields.py holds it), the
    job as read from the checkpoint's files and the data folders, the card, host RAM and how it is pinned,
    processes, code, libraries."""
    from ..distributed import process_count
    from ..pinning import round_threshold
    from .run_plan import MEMORY_NEUTRAL
    from .run_workload import workload_for
    from .streaming import host_budget

    config = {f"{section}.{k}": v for section, body in cfg.to_dict().items() for k, v in body.items()
              if f"{section}.{k}" not in MEMORY_NEUTRAL}
    if workload is None and cfg.run.task != "autoencoder":
        workload = workload_for(cfg)
    card_state = dataclasses.asdict(card) if dataclasses.is_dataclass(card) else vars(card) if card is not None else None
    # a cache folder shared by machines (a network home) must not hand a plan checked against one
    # machine's RAM to another with less
    host_ram, _ = host_budget(cfg.memory.ram_gib)
    return {"version": PLAN_CACHE_VERSION, "config": config,
            "workload": dataclasses.asdict(workload) if workload is not None else None, "card": card_state,
            "host_ram": host_ram, "pinned_round_threshold": round_threshold(),
            "processes": processes or process_count(), "code": code_fingerprint(),
            "libraries": library_versions()}


def plan_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def _profile(d: dict[str, Any]) -> MemoryProfile:
    fields = {f.name for f in dataclasses.fields(MemoryProfile)}
    return MemoryProfile(**{k: v for k, v in d.items() if k in fields})


# ---- the cache -------------------------------------------------------------------------------------------
def plan_cache_dir(cfg: RunConfig) -> Path:
    from ..data.cache import default_cache_dir

    return default_cache_dir(cfg.data) / "plans"


def cached_decision(cfg: RunConfig, card: CardSpec | None, processes: int | None, workload: Any,
                    compute: Callable[[], tuple[dict[str, Any], MemoryProfile]],
                    ) -> tuple[dict[str, Any], MemoryProfile, str | None]:
    """``compute()`` (profiling and the planner's search: ``run_plan._decide``) unless a decision with the
    same key is stored; stores what it computes. Returns (decision, profile, where it was reused from or
    None). Errors (nothing fits, an unprofilable model) are not stored: the next run meets them again."""
    material = key_material(cfg, card, processes, workload)
    path = plan_cache_dir(cfg) / f"{plan_key(material)}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        core, prof = stored["decision"], _profile(stored["profile"])
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(stored.get("created", 0)))
        return core, prof, f"plan reused from {path.parent} (profiled {when}; same config, card, code and libraries)"
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as e:  # damaged or foreign: profile again, overwrite
        log.warning("plan cache entry %s unreadable (%s); profiling again", path, e)
    core, prof = compute()
    # stored as the JSON reads back (tuples as lists), so a reused plan's record is the same text
    _store(path, {"created": time.time(), "key": material, "decision": core, "profile": dataclasses.asdict(prof)})
    return json.loads(json.dumps(core, default=str)), prof, None


def _store(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): several runs may plan at once; a cache that cannot be
    written (read-only home) only costs the next run its profiling time."""
    try:
        write_text_atomic(path, json.dumps(data, default=str))
    except OSError as e:
        log.warning("plan cache not written (%s): the next run profiles again", e)
