"""Warnings and advice for a machine, most important first: what the doctor prints under "notes"."""

from __future__ import annotations

import re

from .caps import GIB, LEGACY_ROCM, ArchCaps, HardwareInfo, is_gtx16


def notes_for(info: HardwareInfo, caps: ArchCaps) -> list[str]:
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
