"""The fine-tune job, written once for every model family: batches, prior preservation, checkpoints and saves.

What differs between families (loading, text, conditioning, the loss, previews, LoRA files) is a call on the
run's family object (``lowvram/families/``), found by asking the registry which family ``model.pretrained`` is.
The loss is the family's; ``assemble.fit`` runs the job with the Trainer (``loop.py``), which resumes it, writes its
checkpoints and calls the job's hooks (LoRA files at each checkpoint, prior losses in each logged step).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import RunConfig
from ..families import ModelFamily, family_of
from ..run_folder import RunResult
from .assemble import fit
from .events import Event, note, print_notes
from .finetune_data import FinetuneData, build_caches, default_prompts, open_finetune_data
from .finetune_files import keep_step_copy, lora_metadata
from .jobs import JobHooks
from .phases import PhaseClock
from .step import phase_range

if TYPE_CHECKING:
    from .loop import Trainer


def prior_preservation_loss(per_sample: torch.Tensor, n_instance: int,
                            weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, instance, prior) of a batch whose rows from ``n_instance`` on are class images:
    total = mean instance loss + ``weight`` x mean class loss, as diffusers' train_dreambooth_lora."""
    instance, prior = per_sample[:n_instance].mean(), per_sample[n_instance:].mean()
    return instance + weight * prior, instance.detach(), prior.detach()


class FinetuneJob(JobHooks):
    """A LoRA (denoiser, optionally text encoders) or full fine-tune of a pretrained checkpoint of any family.

    ``emit`` takes the notes the job and its family give while loading and caching (the run's listeners)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, family: ModelFamily, comps: Any, device: torch.device,
                 data: FinetuneData, sample_prompts: list[str], emit: Callable[[Event], None] = print_notes) -> None:
        self.cfg, self.run_dir, self.family, self.c, self.device, self.data = cfg, run_dir, family, comps, device, data
        self.emit = emit
        self.unet = family.denoiser(comps)  # None until the family loads it late (FLUX.1: after caching)
        self.lora = cfg.run.task == "lora"
        self.train_text = self.lora and cfg.lora.text_encoder
        self.sample_prompts = sample_prompts
        self.has_validation = False
        self.prediction = ""  # the family's objective: epsilon, v_prediction or flow (set by bind)
        self.lora_name = run_dir.resolve().name or "lora"
        self.prior_losses: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=cfg.train.grad_accum)  # the last step's
        # the frozen VAE (and text encoders), on the device until build_caches offloads them
        self.frozen = family.bind(self)
        self.frozen_on_device = True

    # -- models --------------------------------------------------------------------------------------
    def text_encoders(self) -> dict[str, nn.Module]:
        return self.family.text_encoders(self.c)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return self.family.trainable_modules(self)

    @contextmanager
    def frozen_models_on_device(self) -> Iterator[None]:
        """Bring offloaded VAE/text encoders to the device for a block (previews, uncached encoding)."""
        if self.frozen_on_device:
            yield
            return
        for m in self.frozen:
            m.to(self.device)
        try:
            yield
        finally:
            for m in self.frozen:
                m.to("cpu")

    # -- batches -------------------------------------------------------------------------------------
    def batch(self, idx: list[int]) -> dict[str, Any]:
        """Latents, captions and the family's extras (SDXL: size conditioning) for stream indices ``idx``; with
        prior preservation each instance image's class partner (same bucket) follows, from row ``n_instance`` on.

        One micro-batch holds both halves (diffusers' DreamBooth layout) rather than alternating instance
        and class micro-batches: every optimizer step then sees instance + weight x prior exactly, also
        at grad_accum 1, and the memory planner profiles the doubled micro-batch (Workload.prior);
        with gradient checkpointing the second image adds little to a LoRA step's peak.
        """
        out = self.images(self.data.dataset, self.data.latents, idx)
        if self.data.prior is not None:
            extra = self.images(self.data.prior.dataset, self.data.prior_latents, self.data.prior.pairs(idx))
            if "loss_weights" in out or "loss_weights" in extra:  # an unmasked half weighs 1 everywhere
                for part in (out, extra):
                    part.setdefault("loss_weights", torch.ones(len(part["captions"]), 1, *part["x0"].shape[-2:]))
            out = {k: torch.cat([v, extra[k]]) if isinstance(v, torch.Tensor) else v + extra[k] for k, v in out.items()}
        out["n_instance"] = len(idx)
        return out

    def images(self, ds: Any, latents: Any, idx: list[int]) -> dict[str, Any]:
        """Latents (cached or encoded now), captions and the family's extras of ``ds``'s stream indices."""
        from ..data.masks import batch_weights

        plans = [ds.plan(i) for i in idx]
        if latents is not None:
            items = [latents[i] for i in idx]
            x0 = torch.stack([it["latents"] for it in items]).float()
        else:
            from ..data.cache import encode_latents

            items = [ds[i] for i in idx]
            with self.frozen_models_on_device():
                x0 = encode_latents(self.c.vae, torch.stack([it["pixel_values"] for it in items])).float()
        out: dict[str, Any] = {"x0": x0, "captions": [p.caption for p in plans]}
        weights = batch_weights([it.get("mask") for it in items], x0.shape[-2:], self.cfg.data.unmasked_weight)
        if weights is not None:  # masked loss: at least one image of the batch has a loss mask
            out["loss_weights"] = weights
        out.update(self.family.batch_extras(self, ds, plans, x0))
        return out

    def vae_factor(self) -> int:
        return 2 ** (len(self.c.vae.config.block_out_channels) - 1)

    # -- text ----------------------------------------------------------------------------------------
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """What the family feeds its denoiser for ``captions`` (the text cache stores it)."""
        return self.family.encode_text(self, captions)

    def text_identity(self) -> str:
        return self.family.text_identity(self)

    # -- the loss ------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        n = batch.get("n_instance", len(batch["captions"]))
        prior = n < len(batch["captions"])
        loss = self.family.loss(self, batch, gen, reduce=not prior)
        if not prior:
            return loss
        total, instance, prior_loss = prior_preservation_loss(loss, n, self.cfg.train.prior_loss_weight)
        self.prior_losses.append((instance, prior_loss))  # read on the host only when a step is logged
        return total

    def step_metrics(self) -> dict[str, float]:
        """Prior preservation: instance and prior (class) loss, averaged like ``loss`` over the last step's
        micro-batches, beside the total in each logged step."""
        if not self.prior_losses:
            return {}
        n = len(self.prior_losses)
        return {"instance_loss": sum(float(i) for i, _ in self.prior_losses) / n,
                "prior_loss": sum(float(p) for _, p in self.prior_losses) / n}

    def validate(self) -> float:
        raise RuntimeError("fine-tune jobs have no held-out validation set")

    # -- previews ------------------------------------------------------------------------------------
    @torch.no_grad()
    def draw_base(self, prompt: str, seed: int) -> torch.Tensor:
        """One image of the base model (adapters off) with the run's settings: a class image."""
        return self.family.draw_base(self, prompt, seed)

    @torch.no_grad()
    def preview(self) -> Any:
        return self.family.preview(self)

    # -- saving --------------------------------------------------------------------------------------
    def metadata(self, step: int) -> dict[str, Any]:
        """kohya ``ss_*`` keys (A1111/ComfyUI LoRA browsers show them), lowvram's own and the family's."""
        return self.family.metadata(self, lora_metadata(self, step))

    def save_lora(self, step: int, kohya_path: Path | None = None) -> dict[str, Path]:
        """The LoRA files (``lora/pytorch_lora_weights.safetensors`` and the kohya file) in the family's formats."""
        return self.family.save_lora(self, step, kohya_path)

    def on_checkpoint(self, step: int, trainer: Trainer) -> None:
        """Every checkpoint: the current LoRA files (the EMA weights, as the final save), plus a kohya copy named
        by step (to pick an earlier one)."""
        if self.lora:
            with trainer.ema_weights():
                keep_step_copy(self.run_dir, self.lora_name, self.save_lora(step)["kohya"], step)

    def after_fit(self, status: str) -> None:
        self.data.dataset.write_report(self.run_dir)  # what was trained on: buckets, skipped files, captions

    def save_final(self, step: int) -> Path:
        if self.lora:
            return self.save_lora(step)["diffusers"].parent
        return self.family.save_model(self, step)


# ---- putting it together ------------------------------------------------------------------------------
def draw_class_images(cfg: RunConfig, run_dir: Path, job: FinetuneJob, to_draw: list[int], stop: Callable[[], bool],
                      world: Any, clock: PhaseClock) -> bool:
    """Draw the missing class images with the base model (already on the card), then open them; False when
    stopped while drawing (nothing trained yet: the next run draws the rest)."""
    from ..data import class_images
    from ..data.prior import open_class_images, scan_class_images
    from ..distributed import main_first

    # one process alone: Ctrl-C/SIGTERM stops between images (the others of a multi-process run would
    # wait for a folder that never fills, so there the drawing finishes and the first step stops)
    halt = stop if not world.distributed else (lambda: False)
    with clock.phase("class images"), main_first(world), phase_range("class images"):
        if world.is_main:  # one process draws; the others then read the folder
            class_images.generate(cfg.data.class_data, to_draw, cfg.data.class_prompt, cfg.run.seed,
                                  job.draw_base, stop=halt)
    if halt():
        return False
    with clock.phase("data check"):
        job.data.prior = open_class_images(cfg, job.data.dataset, run_dir, scan=scan_class_images(cfg, run_dir))
    return True


def train_finetune(cfg: RunConfig, run_dir: Path, device: torch.device, emit: Callable[[Event], None], *,
                   stop: Callable[[], bool] = lambda: False, resume: bool = False, cache_only: bool = False,
                   world: Any = None, clock: PhaseClock | None = None) -> RunResult:
    """Fine-tune ``model.pretrained`` (of whichever registered family it is) on the folder ``data.source``;
    returns a ``RunResult``.

    ``cache_only`` stops after the latent/text caches are built (``lowvram cache``); ``world``: the
    processes of a multi-process run (the main one builds the caches, the others then read them);
    ``clock`` times the phases (data check, load, caching, then the loop's)."""
    from ..data.class_images import missing_numbers
    from ..distributed import SINGLE, main_first

    world = world or SINGLE
    family = family_of(cfg.model)(cfg, device)
    family.check_config(cfg, world)
    clock = clock or PhaseClock(emit)
    # class images to draw first (data.num_class_images): validated after they exist, with the base loaded
    to_draw = missing_numbers(cfg.data.class_data, cfg.data.num_class_images) if cfg.data.num_class_images else []
    with clock.phase("data check"):
        data = open_finetune_data(cfg, run_dir, cache_only, scan_class=not to_draw)
    with clock.phase("load"):
        comps = family.load()
        for text in comps.notes:
            emit(note(f"note: {text}"))
        notes = family.prepare(comps)
        job = FinetuneJob(cfg, run_dir, family, comps, device, data, cfg.sample.prompts or default_prompts(data.dataset),
                          emit)
    if to_draw:
        # drawing needs the whole base model on the card (memory/drawing.py class_image_stage profiles it so);
        # it stays there through caching
        notes += family.denoiser_to_card(job)
        if not draw_class_images(cfg, run_dir, job, to_draw, stop, world, clock):
            return RunResult(run_dir, "stopped", 0)
    with clock.phase("caching"):
        with main_first(world), phase_range("cache"):
            build_caches(cfg, job)  # without class images to draw the denoiser is not on the card yet
        family.after_caching(job)
    if cache_only:
        data.dataset.write_report(run_dir)
        return RunResult(run_dir, "cached", 0)
    if not to_draw:
        with clock.phase("load"):
            notes += family.denoiser_to_card(job)
    emit(note(family.summary(job, notes)))
    return fit_job(cfg, run_dir, job, data.epoch_batches, device, emit, stop=stop, resume=resume, world=world,
                   clock=clock)


def fit_job(cfg: RunConfig, run_dir: Path, job: FinetuneJob, epoch_batches: Callable[[int], list[list[int]]],
            device: torch.device, emit: Callable[[Event], None], *, stop: Callable[[], bool], resume: bool,
            world: Any, clock: PhaseClock) -> RunResult:
    """Train a fine-tune job (``assemble.fit``: the Trainer calls its hooks); returns a ``RunResult``."""
    return fit(cfg, run_dir, job, job.batch, epoch_batches, device, emit, stop=stop, resume=resume, world=world,
               clock=clock)
