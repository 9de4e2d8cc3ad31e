"""The optimizer state of a steady-state step in the replayed run: the trainer's optimizer (or ``FusedBackward``)
with the state it holds after its first step, and what that state weighs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .timeline import Timeline
from .workloads import Built, Knobs, Workload


def state_tensors(optimizers: list[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """Every tensor of the optimizers' per-parameter state."""
    return [t for o in optimizers for s in o.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def _shared_state(optimizer: torch.optim.Optimizer) -> set[int]:
    """Storages an optimizer shares between its parameters (bitsandbytes' quantisation maps)."""
    maps = getattr(optimizer, "name2qmap", {}) or {}
    return {id(t.untyped_storage()) for t in maps.values() if isinstance(t, torch.Tensor)}


def _copy_state(state: dict[str, Any], shared: set[int]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) and id(v.untyped_storage()) not in shared else v
            for k, v in state.items()}


def steady_optimizers(built: Built, wl: Workload, knobs: Knobs, tl: Timeline) -> tuple[Any, list[torch.optim.Optimizer]]:
    """The trainer's optimizer (or ``FusedBackward``), with the state a steady-state step has.

    Per-tensor optimizers give every tensor of one shape the same state, so only one tensor per (shape,
    dtype) is stepped to create it; the others get copies (exact bytes, much faster on SD-size models).
    """
    from ..optim import FusedBackward, build_optimizer

    trainable = built.trainable
    reps: dict[tuple, nn.Parameter] = {}
    for p in trainable:
        reps.setdefault((tuple(p.shape), p.dtype), p)
    rep_ids = {id(p) for p in reps.values()}
    if knobs.fused_backward:
        fused = FusedBackward(trainable, knobs.optimizer, lr=1e-4, clip_per_param=wl.grad_clip)
        per_param = dict(zip(map(id, fused.params), fused.optimizers, strict=True))
        optimizers = [per_param[id(p)] for p in reps.values()]
    else:
        fused = build_optimizer(list(reps.values()), knobs.optimizer, lr=1e-4, foreach=False)
        optimizers = [fused]
    for p in reps.values():
        p.grad = torch.zeros_like(p)
    with torch.no_grad():
        for o in optimizers:
            o.step()
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    shared = set().union(*(_shared_state(o) for o in optimizers))
    rep_state = {id(p): o.state[p] for o in optimizers for p in o.state}
    copies = []
    for p in trainable:
        if id(p) in rep_ids:
            continue
        state = _copy_state(rep_state[id(reps[(tuple(p.shape), p.dtype)])], shared)
        if knobs.fused_backward:
            per_param[id(p)].state[p] = state
        copies.append(state)
    for t in state_tensors(optimizers) + [v for st in copies for v in st.values() if isinstance(v, torch.Tensor)]:
        tl.tracker.mark(t, "optimizer_state")
    everything = list(fused.optimizers) if knobs.fused_backward else optimizers
    # the copies stand for the state of the tensors not stepped here: they live as long as the run
    tl.keep.extend(copies)
    return fused, everything


def state_bytes(optimizers: list[torch.optim.Optimizer], copies: list[dict[str, Any]]) -> int:
    """Bytes of optimizer state: the stepped tensors' and the copies standing for the others'."""
    seen: set[int] = set()
    total = 0
    for t in state_tensors(optimizers) + [v for st in copies for v in st.values() if isinstance(v, torch.Tensor)]:
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            total += st.nbytes()
    return total


