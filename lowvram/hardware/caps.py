"""What an architecture can run (the capability tables), and ``HardwareInfo``: the decisions made from them.

Decisions come from the architecture, never from torch's own claims: ROCm's ``is_bf16_supported()`` is
always True and pre-Ampere NVIDIA emulates bf16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from .facts import DeviceFacts

GIB = 2**30


@dataclass(frozen=True)
class ArchCaps:
    """What an architecture can run: one row of the tables below."""

    family: str
    bf16: bool
    fp16: bool
    flash: bool  # flash or memory-efficient SDPA kernels exist for it
    bitsandbytes: bool
    xformers: bool
    compile: bool  # torch.compile (Triton) targets it


# AMD (ROCm), first full match wins. bf16: CDNA 2/3/4 and RDNA 3/4 have bf16 math (MFMA/WMMA); RDNA 2
# and older convert bf16 in software. flash: AOTriton targets CDNA 2/3/4 and RDNA 3/4. bitsandbytes
# (>= 0.50): gfx90a/942/950, gfx103x, gfx11xx, gfx120x. Pre-Vega (gfx6/7/8, incl. gfx803 = RX 470-590)
# and Vega (gfx900/906) have none of it; fp16 runs there, on Polaris at fp32 speed.
ROCM_ARCHES: tuple[tuple[str, ArchCaps], ...] = (
    (
        r"gfx[678]\d\w*",
        ArchCaps("GCN 1-4, pre-Vega (gfx803: Polaris RX 470-590)", False, True, False, False, False, False),
    ),
    (
        r"gfx90[02469c]",
        ArchCaps("GCN 5 Vega (dropped by current ROCm)", False, True, False, False, False, False),
    ),
    (r"gfx908", ArchCaps("CDNA 1 (MI100)", False, True, False, False, False, True)),
    (r"gfx90a", ArchCaps("CDNA 2 (MI200)", True, True, True, True, True, True)),
    (r"gfx94\d", ArchCaps("CDNA 3 (MI300)", True, True, True, True, True, True)),
    (r"gfx95\d", ArchCaps("CDNA 4 (MI350)", True, True, True, True, False, True)),
    (r"gfx101\d", ArchCaps("RDNA 1 (RX 5000)", False, True, False, False, False, False)),
    (r"gfx103\d", ArchCaps("RDNA 2 (RX 6000)", False, True, False, True, False, True)),
    (r"gfx11\d\d", ArchCaps("RDNA 3 (RX 7000)", True, True, True, True, False, True)),
    (r"gfx12\d\d", ArchCaps("RDNA 4 (RX 9000)", True, True, True, True, False, True)),
)
# Architectures current ROCm builds no longer support (community builds only).
LEGACY_ROCM = r"gfx[678]\d\w*|gfx90[02469c]"
UNKNOWN_GPU = ArchCaps("unknown", False, True, False, False, False, False)
# CPU: bf16 runs but slowly; torch's CPU SDPA kernel is a flash kernel (no N x N matrix).
CPU_CAPS = ArchCaps("CPU", True, False, True, True, False, True)
MPS_CAPS = ArchCaps("Apple GPU (MPS)", False, True, False, False, False, False)

# NVIDIA (CUDA) by compute capability: bf16 from Ampere (sm_80); memory-efficient SDPA, bitsandbytes
# and xformers from sm_50; torch.compile (Triton) from sm_70. GTX 16xx (TU116/TU117, Turing without
# tensor cores) produce NaNs in fp16: they must train in fp32.
CUDA_FAMILIES = {
    5: "Maxwell",
    6: "Pascal",
    7: "Volta",
    8: "Ampere",
    9: "Hopper",
    10: "Blackwell",
    12: "Blackwell",
}
GTX16_NAMES = re.compile(r"GTX\s*16\d\d|TU11[67]|\bMX\s*450\b", re.IGNORECASE)


def _cuda_family(cc: tuple[int, int]) -> str:
    if cc == (7, 5):
        return "Turing"
    if cc == (8, 9):
        return "Ada Lovelace"
    return CUDA_FAMILIES.get(cc[0], "unknown")


def is_gtx16(name: str, cc: tuple[int, int] | None) -> bool:
    """A GTX 16xx-class card (Turing TU116/TU117): fp16 gives NaNs."""
    return bool(GTX16_NAMES.search(name)) and cc in (None, (7, 5))


def _cuda_caps(cc: tuple[int, int], name: str) -> ArchCaps:
    return ArchCaps(
        family=_cuda_family(cc),
        bf16=cc >= (8, 0),
        fp16=not is_gtx16(name, cc),
        flash=cc >= (5, 0),
        bitsandbytes=cc >= (5, 0),
        xformers=cc >= (5, 0),
        compile=cc >= (7, 0),
    )


def arch_caps(facts: DeviceFacts) -> tuple[str, ArchCaps]:
    """The architecture's short name (``gfx803``, ``sm_75``, ``cpu``) and what it can run."""
    if facts.backend == "rocm":
        arch = (facts.gcn_arch or "").split(":")[0].strip() or "unknown"
        for pattern, caps in ROCM_ARCHES:
            if re.fullmatch(pattern, arch):
                return arch, caps
        return arch, UNKNOWN_GPU
    if facts.backend == "cuda":
        if facts.compute_capability is None:
            return "unknown", UNKNOWN_GPU
        major, minor = facts.compute_capability
        return f"sm_{major}{minor}", _cuda_caps((major, minor), facts.device_name)
    if facts.backend == "mps":
        return "mps", MPS_CAPS
    return "cpu", CPU_CAPS


@dataclass(frozen=True)
class HardwareInfo:
    """What this machine can really run; the planner and the presets decide from it."""

    backend: str
    device_name: str
    arch: str
    family: str
    vram_total: int | None
    vram_free: int | None
    fp16_ok: bool
    bf16_ok: bool
    flash_attention_ok: bool  # flash / memory-efficient SDPA really usable (no N x N attention matrix)
    bitsandbytes_ok: bool
    xformers_ok: bool
    compile_ok: bool
    precision: str  # the precision to train in on this device
    attention: str  # what memory.attention=auto resolves to
    notes: tuple[str, ...] = ()
    facts: DeviceFacts = field(default_factory=DeviceFacts, repr=False, compare=False)

    @cached_property
    def recommended_preset(self) -> str:
        """The preset for this machine (``presets.recommend_preset``), read from the preset files on first use
        only: probing for a run that names its preset reads none."""
        from ..presets import recommend_preset

        return recommend_preset(self)

    @property
    def device(self) -> str:
        """The torch device string (ROCm GPUs are ``cuda`` to torch)."""
        return {"cuda": "cuda", "rocm": "cuda", "mps": "mps"}.get(self.backend, "cpu")

    @property
    def vram_total_gib(self) -> float | None:
        return None if self.vram_total is None else self.vram_total / GIB

    def describe(self) -> str:
        """``NVIDIA GeForce GTX 1650 (sm_75, 4.0 GB)``, or ``CPU``."""
        if self.backend == "cpu":
            return "CPU"
        size = f", {self.vram_total_gib:.1f} GB" if self.vram_total is not None else ""
        return f"{self.device_name} ({self.arch}{size})"
