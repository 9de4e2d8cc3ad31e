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
from .source_layout import install_checkout_finder

# The panel and the preset files live at the repository's top level (webui/, presets/); an install maps them
# into this package, a source checkout (PYTHONPATH, tests) needs this finder to import them the same way.
install_checkout_finder(__file__, __name__)

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
