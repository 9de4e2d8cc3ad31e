"""``probe()``: from the facts read off the machine to what it can really run, with advice."""

from __future__ import annotations

import dataclasses
import re

from .advice import notes_for
from .caps import HardwareInfo, arch_caps
from .facts import DeviceFacts, read_facts


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
    notes = notes_for(info, caps)
    return dataclasses.replace(info, notes=tuple(notes))
