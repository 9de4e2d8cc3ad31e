"""Sampling with classifier-free guidance on diffusers schedulers, and CFG preview grids.

The model is any ``denoise_fn(x, t, cond) -> output`` (ε or v, as the scheduler config says), so the
same code samples pixel-space DDPMs, latent models and pretrained UNets.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .diffusion import cfg_combine, fixed_noise
from .errors import ConfigError

SAMPLERS = ("ddpm", "ddim", "dpm++")
# DPM-Solver on squaredcos_cap_v2 starts where ᾱ ≈ 2e-9 (λ ≈ −10) and amplifies ε errors ~10⁴×; diffusers
# advises clipping λ for cosine schedules (see docs REFERENCE "Samplers"). DDPM/DDIM keep their default
# "leading" spacing, which never visits the capped last step and stays stable on cosine.
_COSINE_LAMBDA_MIN = -5.1

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def make_sampler(name: str, scheduler_config: dict[str, Any], **overrides: Any):
    """A fresh diffusers scheduler for ``ddpm``, ``ddim`` or ``dpm++`` (DPM-Solver++ multistep).

    ``scheduler_config`` comes from ``diffusion.make_scheduler_config`` (or a pretrained model's
    scheduler config); ``overrides`` go straight to the scheduler (e.g. ``timestep_spacing``).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
    if name not in classes:
        raise ConfigError(f"unknown sampler {name!r}", f"use one of {', '.join(SAMPLERS)} (sample.sampler)")
    cls = classes[name]
    config = dict(scheduler_config)
    if name == "dpm++":
        config["algorithm_type"] = "dpmsolver++"
        if config.get("beta_schedule") == "squaredcos_cap_v2":
            config["lambda_min_clipped"] = _COSINE_LAMBDA_MIN
    config.update(overrides)
    # Keep only what this scheduler accepts: DPM-Solver has no clip_sample, pretrained configs carry extras.
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls(**{k: v for k, v in config.items() if k in accepted})


def _batched(cond: torch.Tensor, batch: int) -> torch.Tensor:
    """A condition with batch ``batch``: a single condition ([1, ...]) is expanded."""
    if cond.shape[0] == batch:
        return cond
    if cond.shape[0] == 1:
        return cond.expand(batch, *cond.shape[1:])
    raise ValueError(f"condition batch {cond.shape[0]} does not match the sample batch {batch}")


@torch.no_grad()
def sample(
    denoise_fn: DenoiseFn,
    shape: Sequence[int],
    *,
    scheduler: Any,
    cond: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    steps: int = 25,
    seed: int = 0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Draw ``shape`` samples (fp32, on ``device``): deterministic for a given seed (or generator/noise).

    With ``guidance_scale != 1`` and an ``uncond``, [uncond, cond] run as one batch per step and are
    combined by CFG; with scale 1 the unconditional pass is skipped. The model sees inputs in ``dtype``;
    the scheduler arithmetic stays in fp32. ``scheduler`` is copied, so it can be reused.
    """
    shape = tuple(shape)
    batch = shape[0]
    sched = scheduler.__class__.from_config(scheduler.config)
    sched.set_timesteps(steps, device=device)
    if generator is None:
        # The initial noise and DDPM's per-step noise come from a CPU generator: same on every device.
        generator = torch.Generator(device="cpu").manual_seed(seed)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    x = noise.to(device=device, dtype=torch.float32) * sched.init_noise_sigma
    guided = guidance_scale != 1.0 and uncond is not None and cond is not None
    if cond is not None:
        cond = _batched(cond.to(device), batch)
        if guided:
            cond = torch.cat([_batched(uncond.to(device=device, dtype=cond.dtype), batch), cond])
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        if guided:
            x_in = torch.cat([x_in, x_in])
        t_batch = torch.full((x_in.shape[0],), int(t), dtype=torch.long, device=device)
        out = denoise_fn(x_in.to(dtype), t_batch, cond).float()
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = cfg_combine(out_uncond, out_cond, guidance_scale)
            if guidance_rescale > 0:
                out = rescale_guidance(out, out_cond, guidance_rescale)
        x = sched.step(out, t, x, generator=generator).prev_sample
    return x


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Pull the guided prediction's per-sample std back to the conditional one's (Lin et al. 2024, eq. 16).

    Strong guidance with a zero-terminal-SNR schedule over-exposes images; ``phi`` blends the rescaled
    prediction with the plain guided one (0.7 in the paper).
    """
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8))
    return phi * rescaled + (1 - phi) * guided


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, labels: Sequence[str] | None = None):
    """Tile images [N, 3, H, W] in [-1, 1] into a PIL image with ``nrow`` images per row.

    ``labels`` (one per column) are written in a strip above the grid: the guidance scales in a CFG grid.
    """
    from PIL import Image, ImageDraw

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"make_grid wants [N, 1|3, H, W] images, got {tuple(images.shape)}")
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, _, h, w = images.shape
    ncol = max(1, min(nrow, n))
    rows = (n + ncol - 1) // ncol
    header = 12 if labels else 0
    canvas = torch.zeros(3, header + rows * (h + padding) + padding, ncol * (w + padding) + padding)
    canvas[:, :header] = 1.0  # white strip behind the labels
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = header + padding + r * (h + padding), padding + c * (w + padding)
        canvas[:, y : y + h, x : x + w] = (images[i].clamp(-1, 1) + 1) / 2
    array = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array)
    if labels:
        draw = ImageDraw.Draw(image)
        for c, label in enumerate(list(labels)[:ncol]):
            draw.text((padding + c * (w + padding), 0), str(label), fill=(0, 0, 0))
    return image


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, labels: Sequence[str] | None = None) -> Path:
    """Write ``make_grid(images, nrow)`` as PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, nrow, labels=labels).save(path)
    return path


def sample_grid(
    denoise_fn: DenoiseFn,
    encode_prompts: Callable[[list[str]], torch.Tensor],
    prompts: Sequence[str],
    cfg_scales: Sequence[float],
    *,
    shape: Sequence[int],
    scheduler: Any,
    steps: int = 25,
    seed: int = 0,
    negative_prompt: str = "",
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    labels: bool = True,
):
    """A CFG preview: rows are prompts, columns guidance scales, one noise per row shared by its columns.

    ``shape`` is one sample's (C, H, W). ``decode`` maps samples to pixels in [-1, 1] (latent models).
    Returns (PIL image, images [rows·columns, C, H, W] in row-major order). ``batch_size`` caps the
    prompts sampled together (CFG doubles it); DDIM/DPM++ grids do not depend on it (DDPM's step noise does).
    """
    prompts = list(prompts)
    if not prompts or not cfg_scales:
        raise ConfigError(
            "a sample grid needs at least one prompt and one guidance scale", "set sample.prompts"
        )
    cond_all = encode_prompts(prompts)
    uncond = encode_prompts([negative_prompt])
    chunk = batch_size or len(prompts)
    columns: list[torch.Tensor] = []
    for scale in cfg_scales:
        parts = []
        for start in range(0, len(prompts), chunk):
            rows = range(start, min(start + chunk, len(prompts)))
            # Per-row initial noise (seed + row) and a per-chunk step generator: identical in every column.
            noise = torch.cat([fixed_noise((1, *shape), seed + r) for r in rows])
            gen = torch.Generator(device="cpu").manual_seed(seed + 7919 * (start + 1))
            x = sample(
                denoise_fn,
                (len(rows), *shape),
                scheduler=scheduler,
                cond=cond_all[rows.start : rows.stop],
                uncond=uncond,
                guidance_scale=float(scale),
                steps=steps,
                generator=gen,
                noise=noise,
                device=device,
                dtype=dtype,
            )
            parts.append(decode(x) if decode is not None else x)
        columns.append(torch.cat(parts).float().cpu())
    images = torch.stack(columns, dim=1).flatten(0, 1)  # [rows, cols, ...] → row-major
    grid_labels = [f"cfg {s:g}" for s in cfg_scales] if labels else None
    return make_grid(images, nrow=len(cfg_scales), labels=grid_labels), images
