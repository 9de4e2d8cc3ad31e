"""What a checkpoint of the Trainer holds (trainable weights, EMA, optimizer, grad scaler, data position, RNG)
and how it is written, found and restored: the part of the Trainer a resume depends on."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import RunConfig
from ..distributed import World, wait
from ..ema import EMA
from ..errors import CheckpointError
from ..optim import optimizer_from_tensors, optimizer_to_tensors
from .checkpoint import (
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    snapshot,
    snapshot_bytes,
)
from .checkpoint_writer import CheckpointWriter, Written, room_for_snapshot
from .events import Event
from .phases import PhaseClock
from .signals import critical

if TYPE_CHECKING:
    from .jobs import Job


class TrainerState:
    """The Trainer's save and resume (``loop.Trainer`` sets these attributes in its ``__init__``)."""

    cfg: RunConfig
    job: Job
    model: torch.nn.ModuleDict
    optimizer: Any
    scaler: torch.amp.GradScaler
    ema: EMA | None
    fused: bool
    device: torch.device
    world: World
    clock: PhaseClock
    emit: Callable[[Event], None]
    stop: Callable[[], bool]
    ckpt_dir: Path
    step: int
    epoch: int
    batch_in_epoch: int
    nonfinite_streak: int
    saved_step: int | None
    writer: CheckpointWriter

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only what training changes: a LoRA checkpoint must not carry the frozen base model."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        opt_tensors, opt_meta = self.optimizer.to_tensors() if self.fused else optimizer_to_tensors(self.optimizer)
        tensors: dict[str, dict[str, torch.Tensor]] = {
            "model": self.trainable_state(),
            "optimizer": opt_tensors,
            "rng": {"torch_cpu": torch.get_rng_state()},
        }
        if self.device.type == "cuda":
            tensors["rng"]["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        meta = {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "nonfinite_streak": self.nonfinite_streak,
            "scaler": self.scaler.state_dict(),
            "optimizer": opt_meta,
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        if self.ema is not None and "ema" not in tensors:
            raise CheckpointError("checkpoint has no ema.safetensors but the run keeps an EMA",
                                  "resume from another checkpoint (--from-checkpoint step-N)")
        saved = tensors["model"]
        missing = sorted(set(self.trainable_state()) - set(saved))
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]})",
                                  "resume with the same task, model and LoRA settings as the run")
        self.model.load_state_dict(saved, strict=False)
        if self.fused:
            self.optimizer.from_tensors(tensors["optimizer"], meta["optimizer"])
        else:
            optimizer_from_tensors(self.optimizer, tensors["optimizer"], meta["optimizer"])
        if self.ema is not None and "ema" in tensors:
            self.ema.load_state_dict(tensors["ema"])
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        torch.set_rng_state(tensors["rng"]["torch_cpu"])
        if self.device.type == "cuda" and "torch_cuda" in tensors["rng"]:
            torch.cuda.set_rng_state(tensors["rng"]["torch_cuda"], self.device)
        self.step = int(meta["step"])
        self.epoch = int(meta["epoch"])
        self.batch_in_epoch = int(meta["batch_in_epoch"])
        self.nonfinite_streak = int(meta.get("nonfinite_streak", 0))

    def save(self, barrier: bool = True, overlap: bool = False) -> Path:
        """The main process writes the checkpoint; the others wait for it (``barrier``) so that a kill
        right after leaves a complete checkpoint that every process resumes from.

        ``overlap``: the tensors are copied here (the next step changes them in place) and written by the
        background writer while the steps go on; its ``checkpoint`` event goes out once the folder is on
        disk (``settle_write``). A single process only: with several, the others' barrier must mean "on
        disk", so the write stays in the pause. The ``checkpoints`` phase times what the steps wait for."""
        path = self.ckpt_dir / f"step-{self.step:08d}"
        with self.clock.phase("checkpoints", self.step):
            if self.world.is_main:
                with critical(self.stop):  # a second Ctrl-C lets this write (and the one in flight) finish
                    self.join_write()  # at most one write in flight, so at most one snapshot in host RAM
                    tensors, meta = self.state()
                    done = None
                    if overlap and not self.world.distributed and room_for_snapshot(snapshot_bytes(tensors)):
                        self.submit_write(tensors, meta)
                    else:
                        start = time.perf_counter()
                        path = save_checkpoint(self.ckpt_dir, self.step, tensors, meta, keep=self.cfg.run.keep_checkpoints)
                        done = Written(self.step, path, time.perf_counter() - start)
                    # the job's files of this checkpoint (a LoRA's), from the live weights of this step: here,
                    # while the background write (if any) runs on its copy
                    self.job.on_checkpoint(self.step, self)
                    if done is not None:
                        self.written(done)
            if barrier:
                wait(self.world)
        self.saved_step = self.step
        return path

    def submit_write(self, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        """Hand a copy of this step's state to the background writer. The copy is the one extra snapshot
        in host RAM: the write in the pause copies one group at a time instead, freed after its file (the
        memory plan counts neither: ``room_for_snapshot`` checks the RAM is there before it is taken)."""
        snap = snapshot(tensors)
        state = json.loads(json.dumps(meta))  # plain values of this step, not objects the next step changes
        self.writer.submit(self.step, partial(save_checkpoint, self.ckpt_dir, self.step, snap, state,
                                              keep=self.cfg.run.keep_checkpoints, copied=True))

    def written(self, done: Written) -> None:
        """A checkpoint is on disk: tell the listeners (the panel and the CLI read the event as "on disk")."""
        self.emit(Event("checkpoint", done.step, {"path": str(done.path), "write_s": done.seconds}))

    def join_write(self) -> None:
        """Wait for the background write (if any) and announce it; its error is raised here."""
        done = self.writer.join()
        if done is not None:
            self.written(done)

    def settle_write(self, wait_for_it: bool = True) -> None:
        """At a step boundary: announce a finished background write (``wait_for_it``: wait for one in flight,
        as checkpoint time, before anything that needs it on disk: the end, a stop, an error's message)."""
        if self.writer.finished():
            self.join_write()  # no wait: not checkpoint time
        elif wait_for_it and self.writer.in_flight:
            with self.clock.phase("checkpoints", self.step), critical(self.stop):
                self.join_write()

    def settle_after(self, error: BaseException) -> None:
        """``settle_write`` while ``error`` ends the run: the write of a consistent earlier step completes
        (and is named as the newest checkpoint); its own failure is reported without hiding ``error``."""
        try:
            self.settle_write()
        except Exception as e:
            self.emit(Event("warning", self.step, {"message": f"the checkpoint written in the background failed "
                                                              f"too ({type(e).__name__}: {e}) while the run ended "
                                                              f"with {type(error).__name__}"}))

    def resume_latest(self, from_checkpoint: str | None = None) -> bool:
        """Load the newest checkpoint (or the one named ``from_checkpoint``); False when there is none."""
        ckpt = find_checkpoint(self.ckpt_dir, from_checkpoint) if from_checkpoint else latest_checkpoint(self.ckpt_dir)
        if ckpt is None:
            return False
        with self.clock.phase("load"):
            tensors, meta = load_checkpoint(ckpt)
            try:
                self.load_state(tensors, meta)
            except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
                raise CheckpointError(f"checkpoint '{ckpt}' does not fit this run: {type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''}",
                                      "resume with the run's own settings, or from another checkpoint "
                                      "(--from-checkpoint step-N)") from None
        self.saved_step = self.step
        self.emit(Event("resume", self.step, {"path": str(ckpt)}))
        return True

    def stop_and_save(self) -> str:
        """A requested stop at a step boundary: checkpoint this step (unless it is on disk already); the
        process does not go on (and exit) before that checkpoint is complete."""
        self.settle_write()
        if self.saved_step != self.step:
            self.save()
        return "stopped"
