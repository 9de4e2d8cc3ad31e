"""Imported by Python at start-up when this folder is on PYTHONPATH: the signal tests' hook (see
tests/signal_points.py). Without LOWVRAM_SIGNAL_POINT it does nothing."""

import os

if os.environ.get("LOWVRAM_SIGNAL_POINT"):
    import signal_points

    signal_points.install()
