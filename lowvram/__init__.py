"""lowvram: train diffusion models on 4-8 GB consumer GPUs, planned against the card's memory."""

from .config import ConfigBuilder, RunConfig
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    HardwareError,
    LowvramError,
    MemoryPlanError,
    ModelLoadError,
    PresetError,
    TrainingDiverged,
)
from .runtime_env import quiet_imports

quiet_imports()  # library users see no dependency noise either; the command also goes offline (cli.main)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigBuilder",
    "ConfigError",
    "DataError",
    "HardwareError",
    "LowvramError",
    "MemoryPlanError",
    "ModelLoadError",
    "PresetError",
    "RunConfig",
    "TrainingDiverged",
    "__version__",
]
