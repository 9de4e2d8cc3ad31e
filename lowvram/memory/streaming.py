"""Host memory and bus time of a plan: what streaming and offloading keep in RAM, and what streaming costs.

The profiler measures the card's side of a streamed step exactly: the engine (``lowvram.streaming``) runs
on ``meta``, its device copies are ordinary tensors to the tracker, and it counts the bytes it copied.
This module adds the host side — the streamed weights (pinned on CUDA/ROCm), the VAE and text encoders
parked in RAM after caching — checks it against the machine's RAM, and turns bytes copied into seconds
at a nominal bus speed: an estimate, stated as one.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..card import CardSpec
from ..errors import MemoryPlanError
from .workloads import Knobs, Workload

GIB = 2**30
# Practical host->device copy speed from pinned memory, GB/s: PCIe 3.0 x16 moves ~12 of its nominal 15.8.
# A card in an x8/x4 slot (common for RX 570s on old or mining boards) gets half or a quarter; a preset's
# card may say its own (``pcie_gb_s``).
NOMINAL_PCIE_GB_S = 12.0
# What the OS, a desktop, and this process itself (Python, torch, the GPU runtime, the data loader) take
# of the RAM before any tensor: not available to the plan.
HOST_RESERVE_GIB = 3.0


def pinned(card: CardSpec | None = None) -> bool:
    """Whether streamed weights are pinned (page-locked) for the card: CUDA and ROCm, not the CPU."""
    return getattr(card, "backend", "cuda") in ("cuda", "rocm")


def pinned_overhead(tensors: list[torch.Tensor], threshold: int | None = None) -> int:
    """Bytes torch's pinned-memory allocator adds to ``tensors``: each block up to ``threshold`` bytes
    (None: every block) is rounded up to a power of two."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    return sum((1 << (n - 1).bit_length()) - n for n in sizes
               if n > 0 and (threshold is None or n <= threshold))


def bus_gb_s(card: CardSpec | None = None) -> float:
    """The card's host->device copy speed in GB/s (its preset's ``pcie_gb_s``, else the nominal one)."""
    return float(getattr(card, "pcie_gb_s", None) or NOMINAL_PCIE_GB_S)


def machine_ram_bytes() -> int | None:
    """This machine's physical RAM, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def host_budget(ram_gib: float | None = None) -> tuple[int | None, int | None]:
    """(RAM, what tensors may use of it) in bytes: ``--ram`` if given, else this machine's RAM."""
    ram = int(ram_gib * GIB) if ram_gib is not None else machine_ram_bytes()
    if ram is None:
        return None, None
    return ram, max(0, ram - int(HOST_RESERVE_GIB * GIB))


def host_need(profile: Any) -> int:
    """Bytes a plan keeps in host RAM (streamed weights, parked models, offloaded optimizer state)."""
    return sum(profile.host_bytes.values())


def streamable_bytes(workload: Workload, knobs: Knobs, fractions: tuple[float, ...]) -> dict[float, int]:
    """Host bytes each streaming fraction would move off the card (a meta build, no step: cheap)."""
    from ..streaming import select_units, stream_units, unit_bytes
    from .workloads import build

    unet = build(workload, knobs.with_(stream_blocks=0.0), "meta").unet
    units = stream_units(unet)
    return {f: sum(unit_bytes(m) for _, m in select_units(units, f)) for f in fractions}


def stream_note(streamer: Any, moved: int, knobs: Knobs, card: CardSpec | None = None) -> str:
    """One line for the profile: what is streamed, from where, and its bus time per optimizer step."""
    gb_s = bus_gb_s(card)
    per_step = moved * max(1, knobs.grad_accum)
    where = "pinned host RAM" if pinned(card) else "host RAM"
    return (f"streaming {len(streamer.units)} blocks ({streamer.host_bytes / GIB:.2f} GiB in {where}, "
            f"{knobs.stream_blocks:.0%} of the block bytes): {moved / GIB:.2f} GiB copied to the card per "
            f"micro-batch, ~{per_step / (gb_s * 1e9):.2f} s of bus time per optimizer step at a nominal "
            f"{gb_s:g} GB/s (an estimate; hidden behind compute where a block computes longer than it copies)")


def check_host(profile: Any, ram_gib: float | None = None, card: CardSpec | None = None) -> None:
    """Raise MemoryPlanError when ``profile`` keeps more in host RAM than the machine has to spare
    (not for the CPU, whose card budget is host RAM already)."""
    if getattr(card, "backend", None) == "cpu":
        return
    ram, budget = host_budget(ram_gib)
    need = host_need(profile)
    if budget is None or need <= budget:
        return
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in profile.host_bytes.items() if v)
    raise MemoryPlanError(
        f"{profile.workload} needs {need / GIB:.2f} GiB of host RAM ({parts} GiB) and this machine has "
        f"{ram / GIB:.1f} GiB, {budget / GIB:.1f} after {HOST_RESERVE_GIB:g} GiB for the system and this process",
        "close other programs or add RAM; if the detected size is wrong, give it with --ram GiB; "
        "or lower the resolution / LoRA rank so that fewer blocks must be streamed",
    )
