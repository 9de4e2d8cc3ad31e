"""Pinned host memory without waste: torch's pinned-memory allocator, told not to round streamed weights up."""

from __future__ import annotations

import os

import torch

# torch's pinned-memory allocator rounds every block up to a power of two (to reuse freed blocks), unless
# the block is larger than ``pinned_max_round_threshold_mb``. Streamed weights are pinned once and live as
# long as the run, so the rounding buys nothing and costs up to half of them again (6.2 GiB of FLUX.1's
# 11 GiB): lowvram sets the threshold to 0 before it pins (``exact_pinning``), unless the user set one.
ROUND_KEY = "pinned_max_round_threshold_mb"


def _user_round_threshold() -> int | None:
    """The threshold in bytes the user set in ``PYTORCH_ALLOC_CONF`` / ``PYTORCH_CUDA_ALLOC_CONF``, if any."""
    for var in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        for item in os.environ.get(var, "").split(","):
            key, _, value = item.partition(":")
            if key.strip() == ROUND_KEY:
                try:
                    return int(value) * 2**20
                except ValueError:
                    return None  # torch itself refuses the malformed value when it reads it
    return None


def exact_pinning() -> bool:
    """Switch torch's power-of-two rounding of pinned blocks off for this process (before anything is
    pinned); False where this torch cannot, or the user chose a threshold of their own."""
    if _user_round_threshold() is not None:
        return False
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # torch before 2.8: the threshold can only come from the environment
        return False
    setter(f"{ROUND_KEY}:0")
    return True


def round_threshold() -> int | None:
    """Up to which block size (bytes) pinned blocks are rounded when lowvram pins: None = every block."""
    user = _user_round_threshold()
    if user is not None:
        return user
    return 0 if hasattr(torch._C, "_accelerator_setAllocatorSettings") else None
