"""Read the machine: GPU 0's properties, system RAM, optional native packages. Facts only, no decisions;
tests build ``DeviceFacts`` by hand."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The packages the doctor lists, in the order a user thinks of them (xformers is optional).
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "gradio", "xformers")


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
    # (name, version or None) of the packages lowvram runs on: what the doctor checks fit together
    packages: tuple[tuple[str, str | None], ...] = ()
    # (vendor id, device id) of the display controllers on the PCI bus: the GPU torch may not see
    pci_gpus: tuple[tuple[str, str], ...] = ()



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


def system_ram() -> tuple[int | None, int | None]:
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
        packages=installed_versions(),
        pci_gpus=pci_display_devices(),
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
    total, avail = system_ram()
    return DeviceFacts(
        backend="cpu",
        device_name=_cpu_name(),
        vram_total=total,
        vram_free=avail,
        sdpa_efficient_ok=_efficient_sdpa_runs(torch, "cpu", torch.float32),
        **common,
    )


def installed_versions(names: Sequence[str] = PACKAGES) -> tuple[tuple[str, str | None], ...]:
    """(name, version or None) for each package, from the installed distributions' metadata."""
    out = []
    for name in names:
        try:
            out.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            out.append((name, None))
    return tuple(out)


def pci_display_devices(root: str = "/sys/bus/pci/devices") -> tuple[tuple[str, str], ...]:
    """(vendor id, device id) of each display controller on the PCI bus (Linux sysfs; elsewhere none)."""
    found = []
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return ()
    for entry in entries:
        try:
            with open(os.path.join(root, entry, "class"), encoding="ascii") as f:
                if not re.match(r"0x03", f.read().strip()):
                    continue
            with open(os.path.join(root, entry, "vendor"), encoding="ascii") as f:
                vendor = f.read().strip().lower()
            with open(os.path.join(root, entry, "device"), encoding="ascii") as f:
                device = f.read().strip().lower()
        except OSError:
            continue
        found.append((vendor, device))
    return tuple(found)
