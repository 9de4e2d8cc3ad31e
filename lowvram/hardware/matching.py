"""Which preset suits this machine, and the warning when the chosen one is for another kind of machine."""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..presets import Preset, list_presets, load_preset
from .caps import HardwareInfo

# A card reports a little less than its nominal size (e.g. 3.8 of 4 GB); within this it still "is" 4 GB.
VRAM_TOLERANCE_GIB = 0.5
PRECISION_RANK = {"fp32": 0, "fp16": 1, "bf16": 2}


def _capability(info: HardwareInfo, cap: str) -> bool:
    return {
        "bf16": info.bf16_ok,
        "fp16": info.fp16_ok,
        "flash_attention": info.flash_attention_ok,
        "bitsandbytes": info.bitsandbytes_ok,
        "xformers": info.xformers_ok,
    }[cap]


def _preset_backend(info: HardwareInfo) -> str:
    return "cpu" if info.backend in ("cpu", "mps") else info.backend


def _missing(preset: Preset, info: HardwareInfo) -> list[str]:
    """Capabilities the preset's knobs use that this machine lacks."""
    return [cap for cap in preset.needs() if not _capability(info, cap)]


def _fits_vram(preset: Preset, info: HardwareInfo) -> bool:
    gib = info.vram_total_gib
    return gib is None or preset.card.vram_gib <= gib + VRAM_TOLERANCE_GIB


def recommend_preset(info: HardwareInfo, presets: Iterable[Preset] | None = None) -> str:
    """The preset for this card: same backend, knobs the card can run, the largest VRAM not above its own.

    Ties go to the preset for the same architecture, then to the better precision. CPU and MPS get ``cpu``.
    """
    backend = _preset_backend(info)
    if backend == "cpu":
        return "cpu"
    pool = list(presets) if presets is not None else [load_preset(n) for n in list_presets()]
    usable = [p for p in pool if p.card.backend == backend and not _missing(p, info)]
    fitting = [p for p in usable if _fits_vram(p, info)]

    def rank(p: Preset) -> tuple[float, bool, int]:
        return (p.card.vram_gib, p.card.arch == info.arch, PRECISION_RANK[p.knob("train.precision")])

    if fitting:
        return max(fitting, key=rank).name
    if usable:  # a card smaller than every preset: the smallest one, the planner will say what fits
        return min(usable, key=lambda p: p.card.vram_gib).name
    return "cpu"


def warn_if_preset_mismatch(preset: Preset, info: HardwareInfo) -> str | None:
    """One clear warning when ``preset`` is for another kind of machine than this one; else None."""
    card = preset.card
    here = _preset_backend(info)
    head = f"preset {preset.name} is for {_article(card.describe())} but this machine has: {info.describe()}"
    if card.backend == "cpu":
        if here == "cpu":
            return None
        return f"{head}; the GPU will train with the CPU preset's knobs (recommended preset: {info.recommended_preset})"
    if here == "cpu":
        return f"{head}; training on the CPU with the preset's memory knobs (--preset cpu suits this machine)"
    if card.backend != here:
        return f"{head}; recommended preset: {info.recommended_preset}"
    missing = _missing(preset, info)
    if missing:
        return f"{head}; this card lacks {', '.join(missing)}, which the preset's knobs use; recommended preset: {info.recommended_preset}"
    if not _fits_vram(preset, info):
        return (
            f"{head}; the preset plans for {card.vram_gib:g} GB, more than this card has; "
            f"recommended preset: {info.recommended_preset}"
        )
    return None


def _article(text: str) -> str:
    """'an AMD RX 570 ...', 'a GeForce ...'; 'the CPU' stays as it is."""
    if text.startswith("the "):
        return text
    # Vowel sounds, including initialisms read letter by letter (AMD, NVIDIA, RX).
    vowel = text[:1].upper() in "AEIOU" or re.match(r"(NVIDIA|RX|RTX|MX|FX|HD)\b", text)
    return f"{'an' if vowel else 'a'} {text}"
