"""The process environment the ``lowvram`` command runs in: offline, and quiet about what does not concern it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

# Set only where the user has not: a user who really wants the hub back can say so.
OFFLINE_ENV = {
    # Hub libraries (transformers, diffusers, huggingface_hub) fail at once instead of trying the network:
    # lowvram loads every model from a local path, and a missing one must say so, not look up a repo id.
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # Gradio would send usage analytics and check PyPI for a newer version when the panel starts.
    "GRADIO_ANALYTICS_ENABLED": "False",
}
# bitsandbytes 0.50 logs on import, on CPUs with AVX512-BF16, that it could not fetch a 4-bit *inference*
# kernel from the Hub ("Failed to load CPU gemm_4bit_forward ..."). lowvram never runs 4-bit inference,
# so the line is noise on every command; its 8-bit optimizers are unaffected.
# transformers 5.x warns, when diffusers' FLUX.1 pipeline module is imported, that its CLIP/SigLIP *image*
# processors fall back to PIL without torchvision; lowvram never processes images with them.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "transformers.utils.import_utils")


def quiet_imports() -> None:
    """Silence the import-time lines of dependencies that say nothing about lowvram's work."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def offline_and_quiet() -> None:
    """What the ``lowvram`` command sets up before importing any hub library (they read it at import)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    quiet_imports()


@contextmanager
def no_compile_while_importing() -> Iterator[None]:
    """Import the training libraries without the ``torch.compile`` calls they make at import time.

    bitsandbytes (imported by diffusers and peft whenever it is installed) wraps a few generic fallback
    kernels (4-bit dequantize, LAMB-style preconditioning) in ``torch.compile`` when imported, which loads
    TorchInductor: ~550 modules, 1-2 s of every run's start on a CPU. lowvram never compiles and uses only
    bitsandbytes' 8-bit optimizers, whose CPU and CUDA kernels are not those; with torch's own switch
    ``TORCHDYNAMO_DISABLE`` set for the duration of the imports the wrappers hold the plain functions.
    The variable is removed afterwards (torch reads it per call); a value the user set is left alone.
    """
    if "TORCHDYNAMO_DISABLE" in os.environ:
        yield
        return
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TORCHDYNAMO_DISABLE", None)
