"""The card a run plans against (a preset's ``card:``): its memory, what it can run, and the one rule for the
bytes a run's tensors may use on it."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class CardSpec:
    """The card a preset is for: what it is, its memory, and what it can run."""

    name: str
    backend: str
    arch: str
    vram_gib: float
    context_gib: float
    margin_gib: float
    bf16: bool
    fp16: bool
    flash_attention: bool
    bitsandbytes: bool
    xformers: bool

    def describe(self) -> str:
        """``AMD RX 570 (gfx803, 4 GB)``; ``the CPU`` for the CPU preset."""
        if self.backend == "cpu":
            return "the CPU"
        return f"{self.name} ({self.arch}, {self.vram_gib:g} GB)"


def tensor_budget(vram_gib: float, context_gib: float, margin_gib: float) -> int:
    """The budget rule: the card's memory less the runtime's context and a safety margin, in bytes."""
    return int((vram_gib - context_gib - margin_gib) * GIB)


def budget_bytes(card: CardSpec) -> int:
    """Bytes a run may plan for: the card's VRAM minus the runtime context and a safety margin."""
    return tensor_budget(card.vram_gib, card.context_gib, card.margin_gib)
