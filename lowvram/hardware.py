"""Probe the accelerator, decide what it can really run, self-test it, and write the `doctor` report.

Decisions come from the architecture, never from torch's own claims: ROCm's ``is_bf16_supported()`` is
always True and pre-Ampere NVIDIA emulates bf16. Read-only: nothing here changes torch's global state.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import HardwareError
from .presets import Preset, list_presets, load_preset

GIB = 2**30
# A card reports a little less than its nominal size (e.g. 3.8 of 4 GB); within this it still "is" 4 GB.
VRAM_TOLERANCE_GIB = 0.5
PRECISION_RANK = {"fp32": 0, "fp16": 1, "bf16": 2}


@dataclass(frozen=True)
class DeviceFacts:
    """What a probe reads from the machine, before any decision (tests build these by hand)."""

    backend: str = "cpu"  # "cuda" | "rocm" | "mps" | "cpu"
    device_name: str = "CPU"
    gcn_arch: str | None = None  # ROCm gcnArchName, e.g. "gfx803:sramecc-:xnack-"
    compute_capability: tuple[int, int] | None = None  # CUDA, e.g. (7, 5)
    vram_total: int | None = None  # bytes; on the CPU: system RAM
    vram_free: int | None = None
    torch_version: str = ""
    hip_version: str | None = None  # torch.version.hip (set for a ROCm build even without a GPU)
    cuda_version: str | None = None  # torch.version.cuda
    bitsandbytes_importable: bool = False
    bitsandbytes_version: str | None = None
    bitsandbytes_error: str | None = None
    xformers_importable: bool = False
    xformers_version: str | None = None
    # A tiny SDPA forward+backward ran with only the flash/mem-efficient kernels allowed; None: not tried.
    sdpa_efficient_ok: bool | None = None
    hsa_override_gfx_version: str | None = None  # env HSA_OVERRIDE_GFX_VERSION
    roc_enable_pre_vega: str | None = None  # env ROC_ENABLE_PRE_VEGA
    platform: str = sys.platform


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
    recommended_preset: str = "cpu"
    facts: DeviceFacts = field(default_factory=DeviceFacts, repr=False, compare=False)

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


# ---------------------------------------------------------------------------------------------- reading


def _optional_module(name: str, do_import: bool) -> tuple[bool, str | None, str | None]:
    """(importable, version, error) of an optional package; importing is the only honest check."""
    if importlib.util.find_spec(name) is None:
        return False, None, "not installed"
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if not do_import:
        return True, version, None
    try:
        module = importlib.import_module(name)
    except Exception as e:  # broken native libraries raise anything from OSError to RuntimeError
        return False, version, f"{type(e).__name__}: {e}".splitlines()[0]
    return True, getattr(module, "__version__", None) or version, None


def _efficient_sdpa_runs(torch: Any, device: str, dtype: Any) -> bool | None:
    """Run a tiny attention forward+backward allowing only the flash / memory-efficient kernels."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    try:
        q = torch.randn(1, 2, 64, 64, device=device, dtype=dtype, requires_grad=True)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            out.float().sum().backward()
        return bool(torch.isfinite(out).all())
    except RuntimeError:
        return False


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def _system_ram() -> tuple[int | None, int | None]:
    """(total, available) system RAM in bytes, where the OS tells."""
    total = avail = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (ValueError, OSError, AttributeError):
        pass
    return total, avail


def read_facts(import_optional: bool = True) -> DeviceFacts:
    """Read the real machine (GPU 0). Calls ``torch.cuda.mem_get_info`` once: it creates a context.

    ``import_optional=False`` only checks that bitsandbytes/xformers are installed (importing
    bitsandbytes takes seconds), which is less honest: a broken native library looks fine.
    """
    import torch

    bnb = _optional_module("bitsandbytes", import_optional)
    xf = _optional_module("xformers", import_optional)
    common: dict[str, Any] = dict(
        torch_version=str(torch.__version__),
        hip_version=getattr(torch.version, "hip", None),
        cuda_version=getattr(torch.version, "cuda", None),
        bitsandbytes_importable=bnb[0],
        bitsandbytes_version=bnb[1],
        bitsandbytes_error=bnb[2],
        xformers_importable=xf[0],
        xformers_version=xf[1],
        hsa_override_gfx_version=os.environ.get("HSA_OVERRIDE_GFX_VERSION"),
        roc_enable_pre_vega=os.environ.get("ROC_ENABLE_PRE_VEGA"),
        platform=sys.platform,
    )
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rocm = bool(common["hip_version"])
        try:
            free, total = torch.cuda.mem_get_info(0)
        except RuntimeError:
            free, total = None, props.total_memory
        return DeviceFacts(
            backend="rocm" if rocm else "cuda",
            device_name=props.name,
            gcn_arch=getattr(props, "gcnArchName", None) if rocm else None,
            compute_capability=None if rocm else (props.major, props.minor),
            vram_total=int(total),
            vram_free=None if free is None else int(free),
            sdpa_efficient_ok=_efficient_sdpa_runs(torch, "cuda", torch.float16),
            **common,
        )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        total = getattr(torch.mps, "recommended_max_memory", lambda: None)()
        return DeviceFacts(backend="mps", device_name="Apple GPU", vram_total=total, **common)
    total, avail = _system_ram()
    return DeviceFacts(
        backend="cpu",
        device_name=_cpu_name(),
        vram_total=total,
        vram_free=avail,
        sdpa_efficient_ok=_efficient_sdpa_runs(torch, "cpu", torch.float32),
        **common,
    )


# ---------------------------------------------------------------------------------------------- deciding


def _version_at_least(version: str | None, minimum: tuple[int, ...]) -> bool:
    nums = tuple(int(n) for n in re.findall(r"\d+", version or "")[: len(minimum)])
    return bool(nums) and nums >= minimum


def probe(facts: DeviceFacts | None = None) -> HardwareInfo:
    """Decide what this machine can really run (from ``facts``, or from a fresh ``read_facts()``)."""
    facts = facts if facts is not None else read_facts()
    arch, caps = arch_caps(facts)
    gpu = facts.backend in ("cuda", "rocm")
    # A measured failure overrides the table; a measured success cannot add what the table lacks.
    flash_ok = caps.flash and facts.sdpa_efficient_ok is not False
    bnb_needs_050 = facts.backend in ("rocm", "cpu")
    bnb_ok = (
        caps.bitsandbytes
        and facts.bitsandbytes_importable
        and (not bnb_needs_050 or _version_at_least(facts.bitsandbytes_version, (0, 50)))
    )
    if gpu:
        precision = "bf16" if caps.bf16 else "fp16" if caps.fp16 else "fp32"
        attention = "sdpa" if flash_ok else "chunked"
    else:
        precision, attention = "fp32", "sdpa"
    info = HardwareInfo(
        backend=facts.backend,
        device_name=facts.device_name,
        arch=arch,
        family=caps.family,
        vram_total=facts.vram_total,
        vram_free=facts.vram_free,
        fp16_ok=caps.fp16,
        bf16_ok=caps.bf16,
        flash_attention_ok=flash_ok,
        bitsandbytes_ok=bnb_ok,
        xformers_ok=caps.xformers and facts.xformers_importable,
        compile_ok=caps.compile,
        precision=precision,
        attention=attention,
        facts=facts,
    )
    notes = _notes(info, caps)
    return dataclasses.replace(info, notes=tuple(notes), recommended_preset=recommend_preset(info))


def _notes(info: HardwareInfo, caps: ArchCaps) -> list[str]:
    """Warnings and advice for this machine, most important first."""
    facts = info.facts
    notes: list[str] = []
    if info.backend == "rocm":
        notes += _rocm_notes(info, caps)
    elif info.backend == "cuda":
        notes += _cuda_notes(info)
    elif info.backend == "mps":
        notes.append(
            "Apple GPU (MPS): no bitsandbytes, xformers or flash SDPA; the cpu preset's knobs apply (fp32)."
        )
    else:
        notes += _cpu_notes(info)
    if info.backend in ("cuda", "rocm"):
        if caps.flash and facts.sdpa_efficient_ok is False:
            extra = (
                " (on RDNA 3/4 try TORCH_ROCM_AOTRITON_ENABLE_EXPERIMENTAL=1)"
                if info.backend == "rocm"
                else ""
            )
            notes.append(
                f"flash / memory-efficient SDPA did not run on this card with this PyTorch{extra}: using chunked attention."
            )
        if caps.bitsandbytes and not info.bitsandbytes_ok:
            why = facts.bitsandbytes_error or f"version {facts.bitsandbytes_version}"
            notes.append(
                f"bitsandbytes is not usable ({why}): pip install 'bitsandbytes>=0.50' for 8-bit AdamW, "
                "or use train.optimizer=adamw8bit_portable (plain PyTorch)."
            )
        if facts.vram_total and facts.vram_free is not None:
            used = (facts.vram_total - facts.vram_free) / GIB
            if used > 0.5:
                notes.append(
                    f"{used:.1f} GB of the card's {facts.vram_total / GIB:.1f} GB is already in use (desktop, other "
                    "processes): plans use the free memory; close them, or run the desktop on another GPU."
                )
    return notes


def _env_note(facts_value: str | None, name: str, expected: str) -> str | None:
    if facts_value is None:
        return f"{name} is not set: export {name}={expected} before starting Python."
    if facts_value.strip() != expected:
        return f"{name}={facts_value}, expected {expected} for this card."
    return None


def _rocm_notes(info: HardwareInfo, caps: ArchCaps) -> list[str]:
    facts, arch = info.facts, info.arch
    notes: list[str] = []
    if arch == "unknown":
        notes.append("Could not read the GPU architecture (gcnArchName): assuming the fewest features.")
    legacy = bool(re.fullmatch(LEGACY_ROCM, arch))
    if re.fullmatch(r"gfx8\d\d", arch):
        notes += [
            f"{arch} (Polaris: RX 470/480/570/580/590) has no official ROCm support since ROCm 4.0: use a community "
            "PyTorch + ROCm 5.x-6.x build rebuilt for gfx803 with a patched rocBLAS (docs/hardware.md).",
            "gfx803 needs HSA_OVERRIDE_GFX_VERSION=8.0.3 and ROC_ENABLE_PRE_VEGA=1 in the environment.",
            "ROCm needs PCIe atomics on gfx803: the card must sit in a CPU-attached PCIe 3.0+ slot (not a chipset "
            "slot, riser or Thunderbolt); 'dmesg | grep kfd' shows 'PCI rejects atomics' otherwise.",
            "Works on gfx803: fp32 and fp16 training (fp16 at fp32 speed: it only saves memory), chunked attention, "
            "adamw8bit_portable, gradient checkpointing, fp16/fp8 frozen weights.",
            "Does not work on gfx803: bitsandbytes, xformers, flash/memory-efficient SDPA (use memory.attention="
            "chunked), torch.compile, bf16.",
            "Unpatched rocBLAS on gfx803 returns NaN or wrong GEMMs: 'lowvram doctor' runs a GEMM/conv self-test "
            "against the CPU; trust a long run only after it passes.",
        ]
        for value, name, expected in (
            (facts.hsa_override_gfx_version, "HSA_OVERRIDE_GFX_VERSION", "8.0.3"),
            (facts.roc_enable_pre_vega, "ROC_ENABLE_PRE_VEGA", "1"),
        ):
            note = _env_note(value, name, expected)
            if note:
                notes.insert(0, "WARNING: " + note)
    elif legacy:
        notes.append(
            f"{arch} ({info.family}) is not supported by current ROCm builds: expect a community build; no "
            "bitsandbytes, xformers, flash SDPA, torch.compile or bf16. Use chunked attention and adamw8bit_portable."
        )
    elif re.fullmatch(r"gfx103[1-6]", arch):
        notes.append(
            f"{arch} is not in the official ROCm PyTorch builds; they run it as gfx1030 with "
            "HSA_OVERRIDE_GFX_VERSION=10.3.0."
        )
        note = _env_note(facts.hsa_override_gfx_version, "HSA_OVERRIDE_GFX_VERSION", "10.3.0")
        if note:
            notes.insert(0, "WARNING: " + note)
    if legacy:
        return notes  # the advice above already says what is missing
    if not info.bf16_ok:
        notes.append(
            f"bf16: not on {arch} (ROCm's torch.cuda.is_bf16_supported() says True regardless): fp16 is used."
        )
    if not caps.bitsandbytes:
        notes.append(f"bitsandbytes has no ROCm build for {arch}: use train.optimizer=adamw8bit_portable.")
    return notes


def _cuda_notes(info: HardwareInfo) -> list[str]:
    facts = info.facts
    cc = facts.compute_capability or (0, 0)
    notes: list[str] = []
    if is_gtx16(info.device_name, facts.compute_capability):
        notes.append(
            "GTX 16xx (Turing TU116/TU117, no tensor cores) produces NaNs in fp16: train in fp32 "
            "(train.precision=fp32); frozen weights can still be stored in fp16 to save memory."
        )
    elif not info.bf16_ok:
        notes.append(
            f"No bf16 on {info.family} ({info.arch}; torch would emulate it, slowly): fp16 with GradScaler."
        )
    if cc < (7, 0):
        notes.append(
            f"{info.family} ({info.arch}): fp16 saves memory but is not faster; no torch.compile (needs sm_70+). "
            "PyTorch's CUDA 12.8+ wheels dropped sm_50-sm_70: on 'no kernel image is available' install a cu126 wheel."
        )
    if facts.platform.startswith("win"):
        notes.append(
            "Windows: when VRAM is full the NVIDIA driver silently spills to system RAM (many times slower); set "
            "'CUDA - Sysmem Fallback Policy' to 'Prefer No Sysmem Fallback' in the NVIDIA Control Panel."
        )
    return notes


def _cpu_notes(info: HardwareInfo) -> list[str]:
    facts = info.facts
    notes: list[str] = []
    if facts.hip_version:
        notes.append(
            f"This PyTorch is a ROCm build (HIP {facts.hip_version}) but sees no GPU: check /dev/kfd and that your "
            "user is in the 'video' and 'render' groups; gfx803 also needs HSA_OVERRIDE_GFX_VERSION=8.0.3 and "
            "ROC_ENABLE_PRE_VEGA=1 (docs/hardware.md)."
        )
    elif facts.cuda_version:
        notes.append(
            f"This PyTorch is a CUDA {facts.cuda_version} build but sees no GPU: check 'nvidia-smi', the driver "
            "and CUDA_VISIBLE_DEVICES."
        )
    else:
        notes.append(
            "This PyTorch has no GPU support (a CPU wheel): training runs on the CPU. For a GPU install the CUDA "
            "or ROCm wheel (docs/hardware.md)."
        )
    notes.append(
        "CPU: trains in fp32. bf16 autocast runs on the CPU but is slower than fp32 on most CPUs (without "
        "AMX / AVX512-BF16), so the cpu preset keeps fp32."
    )
    return notes


# ---------------------------------------------------------------------------------------------- presets


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


# ---------------------------------------------------------------------------------------------- self-test

# Relative (Frobenius) error allowed against a float64 CPU reference computed from the same rounded
# inputs. fp32 allows TF32 convolutions (cuDNN's default on Ampere); a NaN or a broken kernel is ~1.
SELF_TEST_TOLERANCE = {"fp32": 2e-3, "fp16": 1e-2, "bf16": 5e-2}


@dataclass(frozen=True)
class SelfTestResult:
    """One op at one dtype on one device, compared with the CPU."""

    op: str
    dtype: str
    device: str
    status: str  # ok | nan | mismatch | error | skipped
    rel_error: float | None
    tolerance: float
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")


def _default_ops() -> dict[str, tuple[Callable[..., Any], Callable[[Any], tuple[Any, Any]]]]:
    """Each op with the inputs it is tested on: a GEMM of SD's attention sizes and a 3x3 convolution."""
    import torch

    def gemm_inputs(g: Any) -> tuple[Any, Any]:
        return torch.randn(256, 320, generator=g), torch.randn(320, 384, generator=g)

    def conv_inputs(g: Any) -> tuple[Any, Any]:
        return torch.randn(2, 32, 24, 24, generator=g), torch.randn(64, 32, 3, 3, generator=g)

    conv = lambda x, w: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
    return {"gemm": (torch.matmul, gemm_inputs), "conv2d": (conv, conv_inputs)}


def self_test(
    device: str,
    dtypes: Iterable[str] = ("fp32", "fp16"),
    ops: Mapping[str, Callable[..., Any]] | None = None,
) -> list[SelfTestResult]:
    """Run a GEMM and a conv2d on ``device`` and compare with a float64 CPU reference.

    Catches what no flag reveals: the unpatched rocBLAS on gfx803 returns NaN. ``ops`` replaces the
    functions under test by name (``gemm``, ``conv2d``), so tests can inject a broken kernel.
    """
    import torch

    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    results: list[SelfTestResult] = []
    for name, (default_fn, make_inputs) in _default_ops().items():
        fn = (ops or {}).get(name, default_fn)
        for dtype in dtypes:
            tol = SELF_TEST_TOLERANCE[dtype]
            a, b = make_inputs(torch.Generator().manual_seed(0))
            a, b = a.to(dt[dtype]), b.to(dt[dtype])
            # The reference sees the same rounded inputs: only the device's arithmetic is judged.
            ref = default_fn(a.double(), b.double())
            try:
                out = fn(a.to(device), b.to(device)).to("cpu", torch.float64)
            except (RuntimeError, NotImplementedError) as e:
                text = str(e).splitlines()[0] if str(e) else type(e).__name__
                status = "skipped" if "not implemented" in text.lower() else "error"
                results.append(SelfTestResult(name, dtype, device, status, None, tol, text))
                continue
            if out.shape != ref.shape:
                results.append(
                    SelfTestResult(name, dtype, device, "mismatch", None, tol, f"shape {tuple(out.shape)}")
                )
            elif not torch.isfinite(out).all():
                bad = int((~torch.isfinite(out)).sum())
                results.append(
                    SelfTestResult(name, dtype, device, "nan", None, tol, f"{bad} non-finite values")
                )
            else:
                err = float((out - ref).norm() / ref.norm())
                status = "ok" if err <= tol else "mismatch"
                results.append(SelfTestResult(name, dtype, device, status, err, tol))
    return results


def default_self_test_dtypes(info: HardwareInfo) -> tuple[str, ...]:
    """fp32 always, plus each reduced precision the device claims to run."""
    if info.backend in ("cpu", "mps"):
        return ("fp32",)
    return ("fp32",) + (("fp16",) if info.fp16_ok else ()) + (("bf16",) if info.bf16_ok else ())


def self_test_fix(failed: list[SelfTestResult], info: HardwareInfo | None) -> str:
    """What to do about failed self-test results, in the user's terms."""
    if failed and all(r.dtype != "fp32" for r in failed):
        bad = sorted({r.dtype for r in failed})
        return f"do not train in {'/'.join(bad)} on this device: --set train.precision=fp32 (and memory.frozen_dtype=fp32)"
    if info is not None and info.backend == "rocm" and re.fullmatch(r"gfx8\d\d", info.arch):
        return (
            "install a community PyTorch/ROCm build for gfx803 with a patched rocBLAS and set "
            "HSA_OVERRIDE_GFX_VERSION=8.0.3 ROC_ENABLE_PRE_VEGA=1 (docs/hardware.md); meanwhile train with "
            "--device cpu --preset cpu"
        )
    return "update the GPU driver and the PyTorch build for this card (docs/hardware.md); meanwhile train with --device cpu --preset cpu"


def run_self_test_or_raise(
    device: str,
    dtypes: Iterable[str] = ("fp32", "fp16"),
    info: HardwareInfo | None = None,
    ops: Mapping[str, Callable[..., Any]] | None = None,
) -> list[SelfTestResult]:
    """``self_test`` that raises HardwareError naming the failures and the fix."""
    results = self_test(device, dtypes, ops)
    failed = [r for r in results if not r.ok]
    if failed:
        what = "; ".join(f"{r.op} {r.dtype}: {_result_text(r)}" for r in failed)
        raise HardwareError(
            f"the {device} device failed its self-test against the CPU ({what})", self_test_fix(failed, info)
        )
    return results


def _result_text(r: SelfTestResult) -> str:
    if r.status == "ok":
        return f"ok (rel. error {r.rel_error:.1e})"
    if r.status == "mismatch" and r.rel_error is not None:
        return f"WRONG (rel. error {r.rel_error:.1e} > {r.tolerance:.0e})"
    return f"{r.status.upper() if r.status != 'skipped' else 'skipped'}: {r.message}"


# ---------------------------------------------------------------------------------------------- doctor


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GIB:.2f} GB"


def doctor_report(info: HardwareInfo, self_test_results: list[SelfTestResult] | None = None) -> str:
    """The human ``lowvram doctor`` text: what the machine is, what it can run, what to do."""
    f = info.facts
    runtime = (
        f"HIP {f.hip_version}"
        if info.backend == "rocm"
        else f"CUDA {f.cuda_version}"
        if info.backend == "cuda"
        else ""
    )
    mem_label = "RAM" if info.backend == "cpu" else "VRAM"
    bnb = f"{_yes(info.bitsandbytes_ok)}" + (f" ({f.bitsandbytes_version})" if f.bitsandbytes_version else "")
    if not info.bitsandbytes_ok and f.bitsandbytes_error:
        bnb += f" - {f.bitsandbytes_error}"
    rows = [
        ("backend", f"{info.backend}" + (f" ({runtime})" if runtime else "")),
        ("device", info.device_name),
        ("arch", info.family if info.arch in ("cpu", "mps") else f"{info.arch} - {info.family}"),
        (mem_label, f"{_gib(info.vram_total)} total, {_gib(info.vram_free)} free"),
        (
            "precision",
            f"fp32 yes, fp16 {_yes(info.fp16_ok)}, bf16 {_yes(info.bf16_ok)} -> trains in {info.precision}",
        ),
        (
            "attention",
            f"flash/mem-efficient SDPA {_yes(info.flash_attention_ok)}, xformers {_yes(info.xformers_ok)}"
            f" -> memory.attention=auto uses {info.attention}",
        ),
        ("bitsandbytes", bnb),
        ("torch.compile", _yes(info.compile_ok)),
        (
            "versions",
            f"torch {f.torch_version}, bitsandbytes {f.bitsandbytes_version or '-'}, "
            f"xformers {f.xformers_version or '-'}",
        ),
    ]
    if info.backend == "rocm" or f.hip_version:
        rows.append(
            (
                "environment",
                f"HSA_OVERRIDE_GFX_VERSION={f.hsa_override_gfx_version or '(unset)'}, "
                f"ROC_ENABLE_PRE_VEGA={f.roc_enable_pre_vega or '(unset)'}",
            )
        )
    width = max(len(k) for k, _ in rows)
    lines = ["lowvram doctor", ""] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
    if self_test_results is not None:
        verdict = "passed" if all(r.ok for r in self_test_results) else "FAILED"
        where = self_test_results[0].device if self_test_results else info.device
        lines += ["", f"self-test on {where} against the CPU: {verdict}"]
        lines += [f"  {r.op:<7} {r.dtype:<5} {_result_text(r)}" for r in self_test_results]
        failed = [r for r in self_test_results if not r.ok]
        if failed:
            lines.append(f"  fix: {self_test_fix(failed, info)}")
    if info.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in info.notes]
    lines += [
        "",
        f"recommended preset: {info.recommended_preset}   (lowvram train --preset {info.recommended_preset})",
    ]
    return "\n".join(lines)


def doctor_dict(info: HardwareInfo, self_test_results: list[SelfTestResult] | None = None) -> dict[str, Any]:
    """The same as ``doctor_report`` as plain JSON-ready data (``lowvram doctor --json``)."""
    data = {f.name: getattr(info, f.name) for f in dataclasses.fields(info) if f.name != "facts"}
    data["notes"] = list(info.notes)
    data["device"] = info.device
    data["facts"] = dataclasses.asdict(info.facts)
    if self_test_results is not None:
        data["self_test"] = [dataclasses.asdict(r) | {"ok": r.ok} for r in self_test_results]
        data["self_test_passed"] = all(r.ok for r in self_test_results)
    return json.loads(json.dumps(data))  # tuples -> lists: what a reader of the JSON gets


def doctor(as_json: bool = False, with_self_test: bool = True) -> tuple[str, int]:
    """Probe, self-test and report: the whole ``lowvram doctor`` command; returns (text, exit code)."""
    info = probe()
    results = self_test(info.device, default_self_test_dtypes(info)) if with_self_test else None
    code = 0 if results is None or all(r.ok for r in results) else HardwareError.exit_code
    text = json.dumps(doctor_dict(info, results), indent=2) if as_json else doctor_report(info, results)
    return text, code
