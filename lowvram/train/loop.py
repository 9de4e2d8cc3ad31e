"""The training loop for diffusion models: one flat loop, and a Trainer that owns the resumable state.

Everything a resumed run needs — weights, EMA, optimizer, grad scaler, LR schedule, data position,
RNG — lives on the Trainer and goes into every checkpoint, so ``--resume`` continues bit for bit
(``trainer_state.py`` saves and restores it; ``schedule.py`` holds the step's seeds, LR and data order).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..distributed import SINGLE, World, any_process, mean_over_processes, wait, wrap_ddp
from ..ema import EMA
from ..errors import TrainingDiverged
from ..fsutil import atomic_write
from ..optim import FusedBackward, build_optimizer
from ..run_folder import CHECKPOINTS_DIR
from .checkpoint import latest_checkpoint
from .checkpoint_writer import CheckpointWriter
from .events import Event
from .jobs import Job
from .phases import PhaseClock
from .schedule import lr_at, shuffled_batches, step_generator  # noqa: F401 (shuffled_batches: re-exported)
from .step import enable_checkpointing, optimizer_step, phase_range
from .trainer_state import TrainerState

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
NONFINITE_CAUSES = (
    "learning rate too high (try --set train.lr=1e-4); fp16 overflow (try --set train.precision=fp32 or bf16; "
    "GTX 16xx cards produce NaNs in fp16); a broken GPU math library (run `lowvram doctor`, e.g. unpatched "
    "rocBLAS on gfx803)"
)


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """Peak allocated tensor memory on a GPU (reset each call), else the process's peak RSS."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak, "gpu_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_rss"


class JobLoss(torch.nn.Module):
    """The job's loss as a module over what trains: what DDP wraps, so the job's own forward (UNet, text
    encoder) runs through DDP while the job keeps the plain modules for previews and saving."""

    def __init__(self, model: torch.nn.ModuleDict, job: Job) -> None:
        super().__init__()
        self.model = model
        self.loss_of = job.loss

    def forward(self, batch: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        return self.loss_of(batch, gen)


def _ignore(event: Event) -> None:
    """Events of processes other than the main one: only the main process logs and writes."""


class Trainer(TrainerState):
    """Owns the state that must be saved and resumed; ``fit`` is the loop.

    With several processes (``world``), each optimizer step consumes ``processes x grad_accum``
    consecutive batches of the one global order: micro-batch ``m`` of rank ``r`` is global micro-batch
    ``m * processes + r`` (its batch and its noise), so 2 processes x accumulation 1 take the very
    batches and noise of 1 process x accumulation 2. DDP averages the gradients over the processes.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        job: Job,
        data: Callable[[list[int]], dict[str, Any]],
        epoch_batches: Callable[[int], list[list[int]]],
        device: torch.device,
        emit: Callable[[Event], None],
        stop: Callable[[], bool] = lambda: False,
        world: World = SINGLE,
        clock: PhaseClock | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.job, self.device, self.world = cfg, run_dir, job, device, world
        self.data, self.epoch_batches, self.stop = data, epoch_batches, stop
        self.emit = emit if world.is_main else _ignore
        self.clock = clock or PhaseClock(self.emit)
        t = cfg.train
        self.model = torch.nn.ModuleDict(job.trainable_modules())
        if t.gradient_checkpointing:  # everything trained: the UNet and a jointly trained text encoder
            enable_checkpointing(self.model.values())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        from ..memory.run_plan import refuse_untrained

        refuse_untrained(cfg, world.num_processes)  # what lowvram profiles but does not train: one list
        self.fused = cfg.memory.fused_backward
        # DDP broadcasts the main process's trainable weights, so every process (and its EMA) starts equal
        self.ddp = wrap_ddp(JobLoss(self.model, job), world) if world.distributed else None
        # fp16 trains with loss scaling; with fused backward each tensor is checked before it steps (optim.py)
        self.scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
        if self.fused:
            # the optimizer steps inside backward, one parameter at a time, and frees each gradient at once
            self.optimizer: Any = FusedBackward(self.params, t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                                                clip_per_param=t.grad_clip, scaler=self.scaler)
        else:
            # fused: one in-place kernel per tensor (no temporaries beyond the per-tensor loop the profiler
            # measures); else foreach=False: the multi-tensor path keeps a temporary copy of the state
            self.optimizer = build_optimizer(self.params, t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                                             foreach=False, fused=True)
        ema_device = "cpu" if t.ema_on_cpu else device
        self.ema = EMA(self.model, decay=t.ema_decay, device=ema_device) if t.ema_decay > 0 else None
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.nonfinite_streak = 0
        self.saved_step: int | None = None  # the step of the checkpoint on disk (or being written) of this state
        self.ckpt_dir = run_dir / CHECKPOINTS_DIR
        self.writer = CheckpointWriter()  # periodic checkpoints are written beside the next steps

    @property
    def effective_batch(self) -> int:
        """Images per optimizer step: micro-batch x accumulation x processes."""
        t = self.cfg.train
        return t.batch_size * t.grad_accum * self.world.num_processes

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step``: a function of the step, so nothing to resume."""
        return lr_at(self.cfg.train.lr, step, self.cfg.train.warmup_steps, self.cfg.run.steps,
                     self.cfg.train.lr_schedule)

    def set_lr(self, lr: float) -> None:
        if self.fused:
            self.optimizer.set_lr(lr)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    # ---- data ------------------------------------------------------------------------------
    def batch_indices(self) -> Iterator[list[int]]:
        """Global micro-batch indices from the saved data position onwards, epoch after epoch
        (the same on every process: the data position is global)."""
        while True:
            order = self.epoch_batches(self.epoch)
            while self.batch_in_epoch < len(order):
                idx = order[self.batch_in_epoch]
                self.batch_in_epoch += 1
                yield idx
            self.epoch += 1
            self.batch_in_epoch = 0

    def take(self, positions: Iterator[list[int]]) -> list[int]:
        """This process's share of the next ``processes`` global micro-batches: the ``index``-th."""
        group = [next(positions) for _ in range(self.world.num_processes)]
        return group[self.world.index]

    # ---- one optimizer step ----------------------------------------------------------------
    def train_step(self, positions: Iterator[list[int]]) -> float:
        """Accumulate ``grad_accum`` micro-batches and step; returns the mean loss over all processes'
        micro-batches (may be non-finite: then every process skips the step)."""
        with phase_range("train_step"):
            return self._train_step(positions)

    def _train_step(self, positions: Iterator[list[int]]) -> float:
        t = self.cfg.train
        w = self.world
        autocast = (
            torch.autocast(self.device.type, dtype=AUTOCAST[t.precision]) if t.precision in AUTOCAST else nullcontext()
        )
        total = 0.0
        finite = True
        parts: list[torch.Tensor] = []
        self.set_lr(self.lr_at(self.step))
        if self.fused:
            self.optimizer.begin_step()
        for micro in range(t.grad_accum):
            if self.fused:  # accumulate the first micro-batches' gradients, step on the last one's
                self.optimizer.stepping = micro == t.grad_accum - 1
            batch = self.data(self.take(positions))
            gen = step_generator(self.cfg.run.seed, self.step, micro * w.num_processes + w.index)
            # DDP averages gradients on the last micro-batch only; the others accumulate locally
            last = micro == t.grad_accum - 1
            with nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                with autocast:
                    loss = self.ddp(batch, gen) if self.ddp is not None else self.job.loss(batch, gen)
                parts.append(loss.detach().float())
                if last:
                    # One host read per optimizer step (not per micro-batch): the non-finite guard must know
                    # before the weights change (a fused backward steps inside it). The mean over processes
                    # is what is logged, and non-finite on one process skips the step everywhere. Summed on
                    # the host in float64 as l0/k + l1/k + ...: the same number as N processes' mean of
                    # their losses, so a multi-process run logs what one process accumulating logs.
                    values = torch.stack(parts).tolist()
                    total = mean_over_processes(w, sum(v / t.grad_accum for v in values))
                    if not math.isfinite(total):
                        finite = False
                        break
                self.scaler.scale(loss / t.grad_accum).backward()
        if finite:
            if not self.fused:
                optimizer_step(self.optimizer, self.params, grad_clip=t.grad_clip, scaler=self.scaler)
            elif self.scaler.is_enabled():
                self.scaler.update()  # an overflow in any tensor halves the scale for the next step
                if self.optimizer.skipped:
                    self.emit(Event("warning", self.step, {"message": (
                        f"fp16 overflow in {self.optimizer.skipped} gradient tensor(s) at step {self.step}: "
                        f"they did not step; loss scale now {self.scaler.get_scale():g}")}))
            if self.ema is not None:
                self.ema.update(self.model)
        else:
            for p in self.params:  # drop what earlier micro-batches of this step accumulated
                p.grad = None
        self.step += 1
        return total

    # ---- evaluation (always on the EMA weights) ---------------------------------------------
    def ema_weights(self) -> Any:
        return self.ema.swapped(self.model) if self.ema is not None else nullcontext()

    def validate(self) -> float | None:
        with self.clock.phase("validation", self.step), phase_range("validation"), self.ema_weights():
            return self.job.validate()

    def write_samples(self, name: str) -> Path:
        out = self.run_dir / "samples" / f"{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        with self.clock.phase("previews", self.step), phase_range("preview"), self.ema_weights():
            grid = self.job.preview()
        atomic_write(out, lambda tmp: grid.save(tmp, format="PNG"))  # the panel never shows half a grid
        s = self.cfg.sample
        self.emit(Event("sample", self.step, {"path": str(out), "prompts": self.job.sample_prompts,
                                              "cfg_scales": list(s.cfg_scales)}))
        return out

    def save_final(self) -> Path:
        with self.clock.phase("final saves", self.step), self.ema_weights():
            return self.job.save_final(self.step)

    # ---- the loop --------------------------------------------------------------------------
    def fit(self) -> str:
        """Train to ``run.steps``; returns 'done' or 'stopped' (graceful stop, checkpoint saved)."""
        r = self.cfg.run
        main = self.world.is_main
        positions = self.batch_indices()
        self.emit(Event("start", self.step, {"total": r.steps}))
        window_start, window_steps = time.perf_counter(), 0
        self.clock.step = self.step
        self.clock.enter("steps")
        # A stop (Ctrl-C, SIGTERM, the panel's Stop) is honoured only at the top of the loop, between steps:
        # the state saved is then one step's weights, EMA, optimizer, data position and RNG.
        try:
            while self.step < r.steps:
                if any_process(self.world, self.stop()):  # all processes stop together, or none
                    return self.stop_and_save()
                self.clock.mark_first_step()
                loss = self.train_step(positions)
                window_steps += 1
                self.settle_write(wait_for_it=False)  # a background write that finished: its event, or its error
                if not math.isfinite(loss):
                    self.count_nonfinite(loss)
                    continue
                self.nonfinite_streak = 0
                if self.step % r.log_every == 0 or self.step == r.steps:
                    self.log_step(loss, window_steps, time.perf_counter() - window_start)
                    window_start, window_steps = time.perf_counter(), 0
                # validation and samples: the main process only (the others wait in the next step's all-reduce)
                if main and r.val_every and self.job.has_validation and self.step % r.val_every == 0:
                    self.emit(Event("val", self.step, {"val_loss": self.validate()}))
                if r.checkpoint_every and self.step % r.checkpoint_every == 0 and self.step < r.steps:
                    self.save(overlap=True)
                if main and r.sample_every and self.step % r.sample_every == 0 and self.step < r.steps:
                    self.write_samples(f"step-{self.step:08d}")
                if window_steps == 0:  # it/s measures training only, not the val/sample/checkpoint pauses
                    window_start = time.perf_counter()
        except BaseException as e:
            self.settle_after(e)  # an earlier step's checkpoint in flight completes before the process ends
            if not isinstance(e, KeyboardInterrupt):
                raise
            # a hard stop inside a step (a second Ctrl-C): the state is mid-step, so nothing is saved and the
            # newest checkpoint on disk stays the resume point
            self.emit(Event("warning", self.step, {"message": "interrupted inside a step: nothing saved; newest "
                                                          f"checkpoint {latest_checkpoint(self.ckpt_dir)}"}))
            raise
        finally:
            self.clock.step = self.step
            self.clock.leave()
        return self.finish()

    def count_nonfinite(self, loss: float) -> None:
        """A skipped step: reported, and after ``run.max_nonfinite`` in a row the run stops as diverged."""
        self.nonfinite_streak += 1
        self.emit(Event("nonfinite", self.step, {"loss": loss, "streak": self.nonfinite_streak,
                                                 "message": f"non-finite loss at step {self.step}; step skipped"}))
        if self.nonfinite_streak >= self.cfg.run.max_nonfinite:
            self.settle_write()  # the newest checkpoint named is one on disk
            last = latest_checkpoint(self.ckpt_dir)
            raise TrainingDiverged(
                f"{self.nonfinite_streak} non-finite losses in a row at step {self.step}; "
                f"last good checkpoint: {last or 'none'}",
                f"likely causes: {NONFINITE_CAUSES}; fix and resume with --resume {self.run_dir}",
            )

    def log_step(self, loss: float, steps: int, elapsed: float) -> None:
        """The step event: loss, learning rate, speed over the last ``steps`` steps, peak memory."""
        peak, kind = peak_memory_mib(self.device)
        self.emit(Event("step", self.step, {
            "loss": loss,
            "lr": self.lr_at(self.step - 1),
            "it_s": steps / elapsed if elapsed > 0 else 0.0,
            "peak_mem_mib": peak,
            "mem_kind": kind,
            "effective_batch": self.effective_batch,
            **self.job.step_metrics(),  # the job's own numbers (prior preservation: instance and class losses)
        }))

    def finish(self) -> str:
        """After the last step: its checkpoint, then (main process) validation, final samples and the model."""
        r = self.cfg.run
        self.settle_write()
        if self.saved_step != self.step:
            self.save()
        if any_process(self.world, self.stop()):  # the last step is saved; resuming writes samples and model
            return "stopped"
        if self.world.is_main:
            if self.job.has_validation and r.val_every and self.step % r.val_every:
                self.emit(Event("val", self.step, {"val_loss": self.validate()}))
            if self.cfg.sample.final:
                self.write_samples("final")
            final = self.save_final()
            self.emit(Event("end", self.step, {"final": str(final)}))
        wait(self.world)  # nobody exits (and tears down the process group) while the main process writes
        return "done"
