"""Where every run meets the one Trainer: build it for a job, resume it, train, and say how it ended.

From-scratch runs (``train/run.py``), the fine-tune job of every model family (``train/finetune.py``) and the
LoRA of a from-scratch model (``train/scratch_lora.py``) each prepare their data and their job, then hand both
here; what differs between them lives on the job (its loss, previews, saves and :class:`~.jobs.JobHooks`), so
nothing routes back into the Trainer through events.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..distributed import World
from ..run_folder import RunResult
from .events import Event
from .jobs import Job
from .loop import Trainer
from .phases import PhaseClock


def fit(cfg: RunConfig, run_dir: Path, job: Job, batch: Callable[[list[int]], dict[str, Any]],
        epoch_batches: Callable[[int], list[list[int]]], device: torch.device, emit: Callable[[Event], None], *,
        stop: Callable[[], bool], resume: bool, world: World, clock: PhaseClock) -> RunResult:
    """Train ``job`` with the Trainer on the batches ``batch`` makes of ``epoch_batches``' indices: the run's
    latest checkpoint first with ``resume``; the job's ``after_fit`` on the main process once the loop returns."""
    with clock.phase("load"):  # the optimizer state, the EMA copy and DDP's broadcast
        trainer = Trainer(cfg, run_dir, job, batch, epoch_batches, device, emit, stop=stop, world=world, clock=clock)
    if resume:
        trainer.resume_latest()
    status = trainer.fit()
    if world.is_main:
        job.after_fit(status)
    return RunResult(run_dir, status, trainer.step)
