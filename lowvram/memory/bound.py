"""The lower bound: the least memory any plan could train a workload in (definition in docs/memory.md).

    bound = frozen weights at 1 byte/param (fp8); for a LoRA only those outside streamable blocks plus
            the largest block (the other blocks can stream from host RAM)
          + trainable weights at 2 bytes (bf16, if the card has bf16) else 4
          + one gradient: the largest trainable tensor (fused backward frees each as it arrives)
          + the smallest optimizer state per tensor (factored Adafactor or 8-bit, whichever is less)
          + the activation floor: what the leanest plan's peak holds beyond those (measured)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..card import CardSpec
from .profiler import MemoryProfile
from .workloads import Knobs, Workload, build

STATIC = ("frozen_weights", "streamed_weights", "trainable_weights", "gradients", "optimizer_state", "ema")


def _state_bytes_min(shape: tuple[int, ...]) -> int:
    """Least optimizer-state bytes for one tensor: factored second moment or 8-bit block-wise moments."""
    n = 1
    for s in shape:
        n *= s
    eight_bit = 2 * n + 2 * 4 * ((n + 255) // 256) if n >= 4096 else 8 * n
    if len(shape) >= 2:
        rows = n // shape[-1]
        cols = n // shape[-2]
        factored = 4 * (rows + cols)
    else:
        factored = 4 * n
    return min(eight_bit, factored)


@dataclass
class LowerBound:
    """The bound and its terms in bytes."""

    total_bytes: int
    terms: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total_bytes, "terms": dict(self.terms)}


def lower_bound(workload: Workload, leanest: MemoryProfile, card: CardSpec | None = None) -> LowerBound:
    """The bound for ``workload``; ``leanest`` is the profile of its leanest plan (its activation floor)."""
    built = build(workload, Knobs(attention="math"), "meta")
    trainable = built.trainable
    ids = {id(p) for p in trainable}
    frozen = sum(p.numel() for p in built.unet.parameters() if id(p) not in ids)
    if workload.mode == "lora":  # every block can stream: one on the card at a time
        from ..streaming import stream_units

        blocks = [sum(p.numel() for p in m.parameters() if id(p) not in ids) for _, m in stream_units(built.unet)]
        frozen -= sum(blocks) - max(blocks, default=0)
    train_bytes = 2 if getattr(card, "bf16", False) else 4
    largest = max((p.numel() for p in trainable), default=0)
    terms = {
        "frozen_weights": frozen * 1,
        "trainable_weights": sum(p.numel() for p in trainable) * train_bytes,
        "gradients": largest * train_bytes,
        "optimizer_state": sum(_state_bytes_min(tuple(p.shape)) for p in trainable),
        "activations": max(0, leanest.peak_bytes - sum(leanest.by_category.get(k, 0) for k in STATIC)),
    }
    del built
    return LowerBound(sum(terms.values()), terms)
