"""Typed errors that carry the fix: the CLI prints them as one line and exits non-zero.

Every error a user can cause (bad flag, bad file, unsupported card) is one of these, never a bare
traceback and never an ``assert``.
"""

from __future__ import annotations


class LowvramError(Exception):
    """Base class: ``problem`` says what is wrong, ``fix`` what to do about it."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} — {fix}")


class ConfigError(LowvramError):
    """A configuration value (preset, config file, flag or --set) is invalid."""


class PresetError(ConfigError):
    """A preset is missing or malformed."""


class DataError(LowvramError):
    """The data source cannot be used."""


class ModelLoadError(LowvramError):
    """A model path is missing, of an unknown family, or refused (pickle)."""


class HardwareError(LowvramError):
    """The device failed its self-test or cannot run the requested job."""


class CheckpointError(LowvramError):
    """A checkpoint or run folder cannot be resumed."""


class TrainingDiverged(LowvramError):
    """Too many non-finite losses in a row; the last good checkpoint is kept."""

    exit_code = 3


class MemoryPlanError(LowvramError):
    """No plan fits the card's memory budget."""
