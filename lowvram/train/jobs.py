"""What differs between kinds of training — the loss of a batch, previews, validation, the final save, the hooks.

The Trainer owns the loop and the resumable state; a Job owns the models and knows its task. A
from-scratch run is a :class:`ScratchJob`; a LoRA or full fine-tune brings its own job. The Trainer calls a
job's hooks (:class:`JobHooks`: at each checkpoint, each logged step, after the loop) directly; the defaults
do nothing, so a job overrides only what it needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..config import RunConfig
from ..diffusion import validation_loss
from ..fsutil import atomic_dir
from ..models.tokenizer import encode
from ..pipeline import TextToImage
from ..run_folder import FINAL_DIR
from .setup import Components
from .step import compute_loss

if TYPE_CHECKING:
    from .loop import Trainer


class Job(Protocol):
    unet: torch.nn.Module
    sample_prompts: list[str]
    has_validation: bool

    def trainable_modules(self) -> dict[str, torch.nn.Module]: ...

    def loss(self, batch: dict[str, Any], gen: torch.Generator) -> torch.Tensor: ...

    def validate(self) -> float: ...

    def preview(self) -> Any: ...

    def save_final(self, step: int) -> Path: ...

    def on_checkpoint(self, step: int, trainer: Trainer) -> None: ...

    def step_metrics(self) -> dict[str, float]: ...

    def after_fit(self, status: str) -> None: ...


class JobHooks:
    """The points where the Trainer calls a job besides its loss, previews and saves; every default does nothing."""

    def on_checkpoint(self, step: int, trainer: Trainer) -> None:
        """Checkpoint ``step`` is taken (main process, inside its save: a second Ctrl-C lets both finish; a
        periodic one's files may still be written in the background), before the checkpoint event goes out
        (once they are on disk): files the job keeps per checkpoint. The live weights are in
        place; ``with trainer.ema_weights():`` puts the EMA weights there (what previews and saves use)."""

    def step_metrics(self) -> dict[str, float]:
        """Numbers the logged step event carries beside the loss (read on the host only when a step is logged)."""
        return {}

    def after_fit(self, status: str) -> None:
        """The loop returned ``status`` ('done' or 'stopped'); main process only (``train/assemble.py`` calls it)."""


def drop_captions(captions: list[str], p: float, gen: torch.Generator) -> list[str]:
    """Replace a share ``p`` of captions by the empty prompt: what guidance contrasts against."""
    keep = torch.rand(len(captions), generator=gen) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


class ScratchJob(JobHooks):
    """Text-to-image from scratch (pixels or latents), the text encoder trained jointly or frozen."""

    def __init__(self, cfg: RunConfig, run_dir: Path, comps: Components, device: torch.device,
                 val_batch: dict[str, Any] | None, sample_prompts: list[str]) -> None:
        self.cfg, self.run_dir, self.c, self.device = cfg, run_dir, comps, device
        self.unet = comps.unet
        self.val_batch = val_batch
        self.has_validation = val_batch is not None
        self.sample_prompts = sample_prompts

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return self.c.trainable_modules()

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = encode(self.c.tokenizer, [c.lower() for c in captions]).to(self.device)
        grad = torch.enable_grad() if self.c.train_text_encoder and torch.is_grad_enabled() else torch.no_grad()
        with grad:
            return self.c.text_encoder(ids)[0]

    def loss(self, batch: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        cond = self.encode_text(drop_captions(batch["captions"], self.cfg.data.caption_dropout, gen))
        return compute_loss(self.c.unet, batch["x0"].to(self.device), cond, alphas_cumprod=self.c.alphas_cumprod,
                            prediction=self.cfg.model.prediction, generator=gen, snr_gamma=self.cfg.train.snr_gamma,
                            loss_weights=batch.get("loss_weights"))

    def pipeline(self) -> TextToImage:
        return TextToImage(
            unet=self.c.unet, text_encoder=self.c.text_encoder, tokenizer=self.c.tokenizer,
            scheduler_config=self.c.scheduler_config, sample_shape=self.c.sample_shape, vae=self.c.vae,
            latent_scale=self.c.latent_scale, device=self.device,
        )

    @torch.no_grad()
    def validate(self) -> float:
        """Loss on held-out data at fixed timesteps and noise: comparable across runs."""
        if self.val_batch is None:
            raise RuntimeError("validate() called on a job without held-out data")
        self.c.unet.eval()
        try:
            cond = self.encode_text(self.val_batch["captions"])

            def predict(noisy: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
                return self.c.unet(noisy, t, encoder_hidden_states=c).sample

            return validation_loss(predict, self.val_batch["x0"].to(self.device), cond,
                                   self.c.alphas_cumprod.to(self.device), self.cfg.model.prediction, seed=0,
                                   batch=self.cfg.train.batch_size)
        finally:
            self.c.unet.train()

    @contextmanager
    def vae_on_device(self) -> Iterator[None]:
        """An offloaded autoencoder (memory.offload_frozen) visits the card to decode samples."""
        vae = self.c.vae
        if vae is None or next(vae.parameters()).device == self.device:
            yield
            return
        vae.to(self.device)
        try:
            yield
        finally:
            vae.to("cpu")

    def preview(self) -> Any:
        s = self.cfg.sample
        with self.vae_on_device():
            return self.pipeline().grid(self.sample_prompts, list(s.cfg_scales), steps=s.steps, sampler=s.sampler,
                                        seed=s.seed, negative_prompt=s.negative_prompt,
                                        guidance_rescale=s.guidance_rescale)

    def save_final(self, step: int) -> Path:
        final = self.run_dir / FINAL_DIR
        with atomic_dir(final) as tmp:  # a killed save never leaves a mix of two steps' files
            self.pipeline().save(tmp, {"task": self.cfg.run.task, "step": step, "size": self.cfg.model.size})
        return final
