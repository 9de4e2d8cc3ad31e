"""The process environment the ``lowvram`` command runs in: offline, and quiet about what does not concern it."""

from __future__ import annotations

import logging
import os

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
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def quiet_imports() -> None:
    """Silence the import-time lines of dependencies that say nothing about lowvram's work."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def offline_and_quiet() -> None:
    """What the ``lowvram`` command sets up before importing any hub library (they read it at import)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    quiet_imports()
