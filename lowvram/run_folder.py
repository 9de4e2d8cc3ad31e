"""The run-folder layout: the names of a run's files, how its config reads back, and what a run returns.

Below the trainer, the exporter and the planner alike (it imports only ``config`` and ``errors``), so each of
them can name a run's files without importing another: that import was a cycle (train.run → finetune →
export → train.run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigBuilder, RunConfig, load_yaml
from .errors import CheckpointError

CONFIG_NAME = "config.yaml"  # the resolved config: ``--config`` on it reproduces the run
PLAN_NAME = "plan.yaml"  # the plan's record (memory, speed, the knobs it chose)
SOURCES_NAME = "config_sources.yaml"  # where each config value came from
CHECKPOINTS_DIR = "checkpoints"  # step-NNNNNNNN/ folders (train/checkpoint.py)
FINAL_DIR = "final"  # the finished model (from-scratch and full fine-tunes)
MODEL_JSON = "lowvram_model.json"  # what marks a from-scratch model folder (``pipeline.TextToImage`` writes it)
LORA_FILE = Path("lora") / "pytorch_lora_weights.safetensors"  # a LoRA run's adapter, diffusers/peft keys
STEP_LORA_DIR = Path("lora") / "steps"  # a kohya copy of the LoRA per checkpoint, to pick an earlier one


@dataclass
class RunResult:
    """Where a run's files are and how its training ended."""

    run_dir: Path
    status: str  # done | stopped
    step: int
    phases: dict[str, Any] | None = None  # the time account: seconds per phase, wall_s, first_step_s


def load_run_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The saved config of a run folder, with ``overrides`` (e.g. more steps) applied on top."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"'{run_dir}' is not a lowvram run folder (no {CONFIG_NAME})", "point --resume at a run's --out folder")
    b = ConfigBuilder().apply(load_yaml(path, "run config"), f"run config {path}")
    b.set("run.out", str(run_dir), "the run folder resumed")  # the folder may have moved since
    for key, value in (overrides or {}).items():
        b.set(key, value, f"{key} given with --resume")
    return b.build()
