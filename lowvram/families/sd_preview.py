"""Previews and class images of the SD families, drawn by the diffusers pipeline over the run's own models.

A preview is what diffusers gives with the saved file: the same pipeline, the run's frozen dtype and attention.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from ..errors import ConfigError
from ..train.loop import AUTOCAST
from ..train.prompts import PromptSpec, parse_prompt_line

SAMPLER_CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm++": "DPMSolverMultistepScheduler"}


def scheduler(name: str, scheduler_config: dict[str, Any]) -> Any:
    import diffusers

    if name not in SAMPLER_CLASSES:
        raise ConfigError(f"unknown sampler {name!r}", f"use one of {', '.join(SAMPLER_CLASSES)} (sample.sampler)")
    return getattr(diffusers, SAMPLER_CLASSES[name]).from_config(scheduler_config)


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents → pixels in [-1, 1] as the pipelines decode them (outside autocast: SDXL's VAE overflows)."""
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    latents = latents.to(vae.dtype)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std_t / cfg.scaling_factor + mean_t
    else:
        latents = latents / cfg.scaling_factor
    with torch.no_grad():
        return vae.decode(latents).sample.float().cpu()


def generate(job: Any, family: Any, specs: list[PromptSpec], guidance: float) -> list[torch.Tensor]:
    """Images [3, H, W] in [-1, 1] of prompts that share size, steps and guidance, in one pipeline call:
    ``pipe(prompts, negative_prompts, guidance_scale, steps, one generator per prompt)`` draws each image
    as its own call would (the initial noise comes from each prompt's own seed)."""
    s = job.cfg.sample
    res = job.cfg.data.resolution or 512
    first = specs[0]
    width, height = first.width or res, first.height or res
    negatives = [spec.negative if spec.negative is not None else s.negative_prompt for spec in specs]
    pipe = family.pipe
    pipe.scheduler = scheduler(s.sampler, job.c.scheduler_config)
    precision = job.cfg.train.precision
    autocast = torch.autocast(job.device.type, dtype=AUTOCAST[precision]) if precision in AUTOCAST else nullcontext()
    with autocast:
        latents = pipe(
            **_prompt_kwargs(job, family, [spec.prompt for spec in specs], negatives), height=height, width=width, num_inference_steps=first.steps or s.steps, guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(s.seed if spec.seed is None else spec.seed) for spec in specs],
            output_type="latent", **family.pipeline_kwargs(height, width),
        ).images
    # one image at a time through the VAE: decoding is the memory peak of sampling at full size
    return [decode(job.c.vae, latents[i : i + 1])[0] for i in range(len(specs))]


def _prompt_kwargs(job: Any, family: Any, prompts: list[str], negatives: list[str]) -> dict[str, Any]:
    """The pipeline's text arguments: the strings, or their embeddings from the text cache (or encoded off the
    card now) when the frozen text encoders are not on the card (``memory.text_encoders``, train/text_cache.py)."""
    known = getattr(family, "preview_text", None)
    if known is None and getattr(family, "text_place", "card") == "card":
        return {"prompt": prompts, "negative_prompt": negatives if any(negatives) else None}
    from ..train.text_cache import PreviewText

    if known is None or not set(prompts + negatives) <= known.rows.keys():
        known = PreviewText.from_cache(lambda texts: family.encode_text(job, texts), prompts + negatives, family.pooled_text,
                                       family.zero_negative())
    return known.pipe_kwargs(prompts, negatives)


def preview_batches(cfg: Any, specs: list[PromptSpec], scales: list[float]) -> list[list[tuple[int, int]]]:
    """(row, column) cells drawn together: same size, steps, guidance and negative-or-not, at most
    ``train.batch_size`` prompts (a guided pass keeps no activations for backward, so it stays within
    what a training step of that batch held)."""
    res = cfg.data.resolution or 512
    groups: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
    for r, spec in enumerate(specs):
        negative = spec.negative if spec.negative is not None else cfg.sample.negative_prompt
        for c, w in enumerate([spec.cfg] if spec.cfg is not None else scales):
            key = (spec.width or res, spec.height or res, spec.steps or cfg.sample.steps, w, bool(negative))
            groups.setdefault(key, []).append((r, c))
    size = max(1, cfg.train.batch_size)
    return [cells[i : i + size] for cells in groups.values() for i in range(0, len(cells), size)]


@contextmanager
def sampling(job: Any, adapters: bool = True) -> Iterator[None]:
    """Trained models in eval mode and the frozen ones on the device for a block; ``adapters=False``
    switches the adapters off too (the base model's own output, whatever the adapter type)."""
    modules = [job.unet, *job.text_encoders().values()]
    modes = [m.training for m in modules]
    off = [m for m in modules if not adapters and getattr(m, "peft_config", None)]
    for m in modules:
        m.eval()
    for m in off:
        m.disable_adapters()
    try:
        with job.frozen_models_on_device():
            yield
    finally:
        for m in off:
            m.enable_adapters()
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


@torch.no_grad()
def draw_base(job: Any, family: Any, prompt: str, seed: int) -> torch.Tensor:
    """One image of the base model (adapters off) with the run's frozen dtype, attention kernel and
    sample.* settings (sampler, steps, guidance, negative prompt) at data.resolution: a class image."""
    with sampling(job, adapters=False):
        return generate(job, family, [PromptSpec(prompt, seed=seed)], job.cfg.sample.guidance)[0]


def grid_of(rows: list[list[torch.Tensor]], columns: int) -> torch.Tensor:
    """Cells [n, 3, H, W] of rows of images: white where a row has fewer images or smaller ones."""
    height = max(img.shape[1] for row in rows for img in row)
    width = max(img.shape[2] for row in rows for img in row)
    cells = []
    for row in rows:
        for j in range(columns):
            cell = torch.ones(3, height, width)
            if j < len(row):
                cell[:, : row[j].shape[1], : row[j].shape[2]] = row[j]
            cells.append(cell)
    return torch.stack(cells)


@torch.no_grad()
def preview(job: Any, family: Any) -> Any:
    """Rows: prompts (kohya options honoured); columns: sample.cfg_scales (a row with --l has one image)."""
    from ..sample import make_grid

    specs = [parse_prompt_line(p) for p in job.sample_prompts]
    scales = list(job.cfg.sample.cfg_scales)
    drawn: dict[tuple[int, int], torch.Tensor] = {}
    with sampling(job):
        for cells in preview_batches(job.cfg, specs, scales):
            r, c = cells[0]
            spec = specs[r]
            images = generate(job, family, [specs[i] for i, _ in cells], spec.cfg if spec.cfg is not None else scales[c])
            drawn.update(zip(cells, images, strict=True))
    rows = [[drawn[(r, c)] for c in range(1 if spec.cfg is not None else len(scales))]
            for r, spec in enumerate(specs)]
    return make_grid(grid_of(rows, len(scales)), nrow=len(scales), labels=[f"cfg {w:g}" for w in scales])
