"""What is installed, and whether it fits together and fits the machine: the doctor's install checks.

Three kinds of problem a user cannot see from a traceback: a package outside lowvram's bounds (a later
``pip install -U`` only warns), a pair of releases known to break each other at run time (declared nowhere,
so pip cannot refuse it), and a torch build for another kind of GPU than the one in the machine.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from .facts import DeviceFacts

OPTIONAL = {"xformers"}  # of facts.PACKAGES

# PCI vendor ids (what /sys/bus/pci/devices/*/vendor holds).
AMD, NVIDIA = "0x1002", "0x10de"
# gfx803 parts by PCI device id, from the Linux amdgpu driver's pciidlist (amdgpu_drv.c): Polaris 10
# (RX 470/480/570/580), Polaris 11 (RX 460/560), Polaris 12 (RX 540/550), Polaris 20 XL (RX 580 2048SP), Fiji.
GFX803_DEVICES = ((0x67C0, 0x67FF), (0x6980, 0x699F), (0x6FDF, 0x6FDF), (0x7300, 0x730F))


@dataclass(frozen=True)
class Finding:
    """One install problem: ``error`` breaks training, ``warning`` works but is likely not what was meant."""

    severity: str  # error | warning
    problem: str
    fix: str


@dataclass(frozen=True)
class BrokenPair:
    """Two releases that break each other at run time although neither declares it."""

    package: str
    versions: str  # specifier on ``package``
    other: str
    needs: str  # what ``other`` must satisfy alongside those versions
    what_breaks: str
    fix: str


KNOWN_BROKEN = (
    BrokenPair(
        "transformers", ">=5.24", "peft", ">=0.22",
        "transformers 5.24 refuses every peft below 0.22, so LoRA on the text encoder fails ('The version of PEFT "
        "you are using is not compatible')",
        "pip install 'transformers<5.24'",
    ),
)


def own_requirements() -> list[str]:
    """lowvram's declared requirements (without extras), or none when it runs from an uninstalled source tree."""
    try:
        reqs = importlib.metadata.requires("lowvram") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [r for r in reqs if "extra ==" not in r]


def torch_build(facts: DeviceFacts) -> str:
    """``CPU``, ``CUDA 12.8`` or ``ROCm 6.4`` (from torch.version.hip), what the wheel was built for."""
    if facts.hip_version:
        return "ROCm " + ".".join(facts.hip_version.split(".")[:2])
    if facts.cuda_version:
        return f"CUDA {facts.cuda_version}"
    return "CPU"


def _version(text: str | None) -> Version | None:
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def _outside_bounds(versions: Mapping[str, str | None], requirements: Sequence[str]) -> list[Finding]:
    found = []
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        have = _version(versions.get(req.name))
        if have is None or not req.specifier or req.specifier.contains(have, prereleases=True):
            continue
        found.append(Finding("error", f"{req.name} {have} is outside the versions lowvram works with ({req.specifier})",
                             f"pip install '{req.name}{req.specifier}'"))
    return found


def _declared_conflicts(versions: Mapping[str, str | None],
                        requires_of: Callable[[str], Sequence[str] | None]) -> list[Finding]:
    """What the listed packages declare about each other and the installed set violates (``pip check``'s
    finding for these packages: e.g. an xformers built for another torch)."""
    found = []
    for name, version in versions.items():
        if version is None:
            continue
        try:
            declared = requires_of(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in declared:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = _version(versions.get(req.name))
            if have is None or req.specifier.contains(have, prereleases=True):
                continue
            found.append(Finding("error", f"{name} {version} requires {req.name}{req.specifier}, but {req.name} {have} "
                                          "is installed", f"pip install '{req.name}{req.specifier}'"))
    return found


def _known_broken(versions: Mapping[str, str | None]) -> list[Finding]:
    found = []
    for pair in KNOWN_BROKEN:
        have, other = _version(versions.get(pair.package)), _version(versions.get(pair.other))
        if have is None or not SpecifierSet(pair.versions).contains(have, prereleases=True):
            continue
        if other is None or SpecifierSet(pair.needs).contains(other, prereleases=True):
            continue
        found.append(Finding("error", f"{pair.package} {have} with {pair.other} {other}: {pair.what_breaks}", pair.fix))
    return found


def is_gfx803(device_id: str) -> bool:
    try:
        n = int(device_id, 16)
    except ValueError:
        return False
    return any(lo <= n <= hi for lo, hi in GFX803_DEVICES)


def _platform_findings(facts: DeviceFacts) -> list[Finding]:
    """A torch build for another kind of GPU than the machine has, or a GPU build missing its environment."""
    vendors = {vendor for vendor, _ in facts.pci_gpus}
    polaris = any(v == AMD and is_gfx803(d) for v, d in facts.pci_gpus)
    found = []
    version = (facts.torch_version or "").split("+")[0]
    pin = f"=={version}" if version else ""
    if facts.cuda_version and not facts.hip_version and AMD in vendors and NVIDIA not in vendors:
        fix = ("install a community PyTorch build for gfx803 (docs/hardware.md, 'AMD RX 570'), not PyPI's"
               if polaris else
               f"pip install --force-reinstall 'torch{pin}' --index-url https://download.pytorch.org/whl/rocm6.4 "
               "(the ROCm version pytorch.org lists for your torch)")
        found.append(Finding("error", f"this PyTorch is a CUDA {facts.cuda_version} build, but the machine's GPU is AMD: "
                                      "it cannot use the card", fix))
    if not facts.cuda_version and not facts.hip_version:
        if NVIDIA in vendors:
            found.append(Finding("warning", "this PyTorch is a CPU-only build, but the machine has an NVIDIA GPU: "
                                            "training will run on the CPU",
                                 f"pip install --force-reinstall 'torch{pin}' --index-url "
                                 "https://download.pytorch.org/whl/cu126 (or the CUDA version pytorch.org lists)"))
        elif AMD in vendors and facts.platform.startswith("linux"):
            fix = ("install a community PyTorch build for gfx803 (docs/hardware.md, 'AMD RX 570')" if polaris else
                   f"pip install --force-reinstall 'torch{pin}' --index-url https://download.pytorch.org/whl/rocm6.4")
            found.append(Finding("warning", "this PyTorch is a CPU-only build, but the machine has an AMD GPU: "
                                            "training will run on the CPU", fix))
    if facts.hip_version and polaris and (facts.hsa_override_gfx_version or "").strip() != "8.0.3":
        found.append(Finding("error", "this is a ROCm build and the GPU is gfx803 (Polaris), but "
                                      f"HSA_OVERRIDE_GFX_VERSION is {facts.hsa_override_gfx_version or 'unset'}: "
                                      "ROCm will not run on the card",
                             "export HSA_OVERRIDE_GFX_VERSION=8.0.3 ROC_ENABLE_PRE_VEGA=1 (before starting Python)"))
    return found


def install_findings(
    facts: DeviceFacts,
    requirements: Sequence[str] | None = None,
    requires_of: Callable[[str], Sequence[str] | None] = importlib.metadata.requires,
) -> list[Finding]:
    """Every install problem of this machine, errors first. ``requirements`` default to lowvram's own."""
    versions = dict(facts.packages)
    found = (_outside_bounds(versions, own_requirements() if requirements is None else requirements)
             + _declared_conflicts(versions, requires_of)
             + _known_broken(versions)
             + _platform_findings(facts))
    unique = list(dict.fromkeys(found))  # a bound and a declared requirement can name the same problem
    return sorted(unique, key=lambda f: f.severity != "error")


def package_lines(facts: DeviceFacts) -> list[str]:
    """``torch 2.13.0+cpu (CPU build)``-style lines for the report: the torch this process imported, then
    each other listed package."""
    lines = [f"torch {facts.torch_version or '?'} ({torch_build(facts)} build)"]
    for name, version in facts.packages:
        if name == "torch":
            continue
        if version is None:
            lines.append(f"{name} not installed" + (" (optional)" if name in OPTIONAL else ""))
        else:
            lines.append(f"{name} {version}")
    return lines
