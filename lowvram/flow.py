"""Rectified-flow (flow matching) training objective and Euler sampler, as FLUX.1 was trained.

x_t = (1 - σ) x0 + σ ε, the model predicts the velocity ε - x0, the loss is its MSE. σ is drawn from a
logit-normal distribution (sigmoid of a normal) and shifted towards noise for large images by the same
resolution-dependent ``mu`` that FLUX.1's inference schedule uses: kohya's ``--timestep_sampling
flux_shift`` (sd-scripts library/flux_train_utils.py). At 1024² it equals a fixed shift of e^1.15 =
3.158, sd-scripts' documented recommendation; diffusers' FLUX LoRA script draws σ uniformly (its
``--weighting_scheme none``). Loss weighting is uniform in both, and here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

SAMPLINGS = ("flux_shift", "shift", "sigmoid", "uniform")
# FLUX.1's scheduler_config.json: mu grows linearly from 0.5 at 256 image tokens to 1.15 at 4096.
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


@dataclass(frozen=True)
class FlowSampling:
    """How training draws σ: ``mode`` (one of SAMPLINGS), the normal's ``scale``, a fixed ``shift``.

    ``flux_shift``: sigmoid(scale·N(0,1)) shifted by the image's ``mu`` (default, see module doc);
    ``shift``: the same with a fixed shift (sd-scripts' ``--discrete_flow_shift``); ``sigmoid``: no
    shift (x-flux, ai-toolkit, sd-scripts' Chroma advice); ``uniform``: U(0,1) (diffusers' script).
    """

    mode: str = "flux_shift"
    scale: float = 1.0
    shift: float = 3.0

    def __post_init__(self) -> None:
        if self.mode not in SAMPLINGS:
            raise ConfigError(f"unknown timestep sampling {self.mode!r}", f"use one of {', '.join(SAMPLINGS)}")
        if self.scale <= 0 or self.shift <= 0:
            raise ConfigError(f"timestep sampling scale {self.scale} and shift {self.shift} must be above 0",
                              "use e.g. scale 1.0, shift 3.0")


def shift_mu(image_seq_len: int, base_seq_len: int = BASE_SEQ_LEN, max_seq_len: int = MAX_SEQ_LEN,
             base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """FLUX.1's resolution-dependent shift exponent for an image of ``image_seq_len`` packed tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """Move σ towards 1 (noise): e^mu / (e^mu + (1/t - 1)), the schedule shift of FLUX.1 and SD3."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def sample_sigmas(batch: int, sampling: FlowSampling, image_seq_len: int, *,
                  generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """σ ∈ (0, 1) for each sample of a batch; drawn from ``generator`` (CPU) when given, else on ``device``."""
    gen_device = "cpu" if generator is not None else device
    if sampling.mode == "uniform":
        sigma = torch.rand(batch, generator=generator, device=gen_device)
    else:
        sigma = torch.sigmoid(sampling.scale * torch.randn(batch, generator=generator, device=gen_device))
        if sampling.mode == "flux_shift":
            sigma = time_shift(shift_mu(image_seq_len), sigma)
        elif sampling.mode == "shift":
            sigma = sampling.shift * sigma / (1 + (sampling.shift - 1) * sigma)
    return sigma.to(device)


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - σ) x0 + σ ε, with σ broadcast over each sample."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: d x_t / dσ = ε - x0."""
    return noise - x0


def flow_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    sampling: FlowSampling,
    image_seq_len: int,
    *,
    generator: torch.Generator | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """MSE between ``predict(x_t, σ)`` and ε - x0 for clean ``x0``; per-sample losses when not ``reduce``.

    Noise and σ come from ``generator`` (a CPU generator: the same seed gives the same run on every
    device); without one (the profiler on ``meta``) they are drawn on ``x0``'s device.
    """
    if generator is not None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    else:
        noise = torch.randn_like(x0)
    sigma = sample_sigmas(x0.shape[0], sampling, image_seq_len, generator=generator, device=x0.device)
    pred = predict(noisy_input(x0, noise, sigma), sigma)
    err = (pred.float() - velocity_target(x0, noise).float()).pow(2)
    return err.mean() if reduce else err.flatten(1).mean(1)


def sampling_scheduler(scheduler_config: dict[str, Any], steps: int, image_seq_len: int,
                       device: str | torch.device = "cpu") -> Any:
    """diffusers' FlowMatchEulerDiscreteScheduler set for ``steps``, with FLUX.1's dynamic shift ``mu``.

    Same σ grid as FluxPipeline (linspace 1 → 1/steps, then shifted), so previews match diffusers.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    cfg = sched.config
    mu = shift_mu(image_seq_len, cfg.get("base_image_seq_len", BASE_SEQ_LEN), cfg.get("max_image_seq_len", MAX_SEQ_LEN),
                  cfg.get("base_shift", BASE_SHIFT), cfg.get("max_shift", MAX_SHIFT))
    sigmas = np.linspace(1.0, 1 / steps, steps)
    kw = {"mu": mu} if cfg.get("use_dynamic_shifting", False) else {}
    sched.set_timesteps(sigmas=sigmas, device=device, **kw)
    return sched


@torch.no_grad()
def euler_sample(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                 scheduler_config: dict[str, Any], steps: int, image_seq_len: int) -> torch.Tensor:
    """Integrate dx/dσ = predict(x, σ) from pure noise (σ = 1) to an image latent (σ = 0) in ``steps`` Euler steps."""
    if steps < 1:
        raise ConfigError(f"{steps} sampling steps", "use 1 or more (FLUX.1-schnell: 4, dev: 20-50)")
    sched = sampling_scheduler(scheduler_config, steps, image_seq_len, noise.device)
    x = noise
    for t in sched.timesteps:
        sigma = (t / sched.config.num_train_timesteps).expand(x.shape[0]).to(x.dtype)
        x = sched.step(predict(x, sigma), t, x, return_dict=False)[0]
    return x


__all__ = ["FlowSampling", "SAMPLINGS", "euler_sample", "flow_loss", "noisy_input", "sample_sigmas",
           "sampling_scheduler", "shift_mu", "time_shift", "velocity_target"]
