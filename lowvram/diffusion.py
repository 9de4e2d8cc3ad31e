"""Noise schedules, forward noising, training targets (epsilon / v) and losses: small pure functions.

Betas come from diffusers' own ``DDPMScheduler`` so that training and the diffusers samplers in
``lowvram.sample`` see bit-identical schedules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError

# Our schedule names → diffusers' ``beta_schedule`` names.
_DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}
PREDICTIONS = ("epsilon", "v_prediction")
_PREDICTION_ALIASES = {
    "eps": "epsilon",
    "epsilon": "epsilon",
    "v": "v_prediction",
    "v_prediction": "v_prediction",
}


def _check_prediction(prediction: str) -> str:
    try:
        return _PREDICTION_ALIASES[prediction]
    except KeyError:
        raise ConfigError(
            f"unknown prediction type {prediction!r}",
            f"use one of {', '.join(PREDICTIONS)} (model.prediction)",
        ) from None


def make_scheduler_config(
    schedule: str, timesteps: int = 1000, prediction: str = "epsilon", *, clip_sample: bool = False,
    zero_terminal_snr: bool = False,
) -> dict[str, Any]:
    """The diffusers scheduler config (kwargs) for a schedule; shared by training and every sampler.

    ``linear`` keeps DDPM's 1e-4→0.02 at T=1000 and scales both ends by 1000/T otherwise (improved-DDPM
    rule, so short chains still reach pure noise); ``scaled_linear`` is Stable Diffusion's 0.00085→0.012.
    ``clip_sample`` clips predicted x0 to [-1, 1] in DDPM/DDIM: right for pixels, wrong for latents.
    ``zero_terminal_snr`` rescales the betas so the last step is pure noise (Lin et al. 2024): with
    v-prediction the model must then produce the image's mean colour itself (no gray backgrounds);
    samplers start at t = T ("trailing" spacing).
    """
    if zero_terminal_snr and _check_prediction(prediction) != "v_prediction":
        raise ConfigError("model.zero_terminal_snr needs v-prediction (epsilon is undefined at zero SNR)",
                          "set model.prediction=v_prediction")
    if schedule not in _DIFFUSERS_SCHEDULE:
        raise ConfigError(
            f"unknown noise schedule {schedule!r}",
            f"use one of {', '.join(_DIFFUSERS_SCHEDULE)} (model.schedule)",
        )
    if not isinstance(timesteps, int) or timesteps < 2:
        raise ConfigError(f"model.timesteps must be an integer >= 2, got {timesteps!r}", "use e.g. 1000")
    prediction = _check_prediction(prediction)
    if schedule == "linear":
        scale = 1000.0 / timesteps
        # Capped below 1 so a very short chain (T < 50) still has valid betas.
        beta_start, beta_end = min(1e-4 * scale, 0.999), min(0.02 * scale, 0.999)
    elif schedule == "scaled_linear":
        beta_start, beta_end = 0.00085, 0.012
    else:  # cosine ignores beta_start/beta_end; diffusers' defaults are kept for a complete config
        beta_start, beta_end = 0.0001, 0.02
    config = {
        "num_train_timesteps": timesteps,
        "beta_schedule": _DIFFUSERS_SCHEDULE[schedule],
        "beta_start": beta_start,
        "beta_end": beta_end,
        "prediction_type": prediction,
        "clip_sample": clip_sample,
    }
    if zero_terminal_snr:
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


def betas_for(schedule: str, timesteps: int = 1000) -> torch.Tensor:
    """The float32 betas of a schedule, exactly as diffusers' DDPMScheduler computes them."""
    from diffusers import DDPMScheduler

    cfg = make_scheduler_config(schedule, timesteps)
    return DDPMScheduler(**cfg).betas.clone()


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏(1-β): computed in the betas' dtype the way diffusers does, so both agree bitwise."""
    return torch.cumprod(1.0 - betas, dim=0)


def _gather(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t per batch element, shaped to broadcast against ``like`` ([B, 1, 1, ...])."""
    ab = alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.to(like.device)].flatten()
    return ab.view(-1, *([1] * (like.dim() - 1)))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Noising/targets in at least fp32 even when cached latents are fp16.
    return torch.promote_types(x.dtype, torch.float32)


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε (closed form, same op order as diffusers' add_noise), in fp32+."""
    dtype = _compute_dtype(x0)
    x0, noise = x0.to(dtype), noise.to(dtype)
    ab = _gather(alphas_cumprod, t, x0)
    return ab**0.5 * x0 + (1 - ab) ** 0.5 * noise


def target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str
) -> torch.Tensor:
    """What the model should output: ε, or v = sqrt(ᾱ)·ε − sqrt(1-ᾱ)·x0 (Salimans & Ho)."""
    prediction = _check_prediction(prediction)
    dtype = _compute_dtype(x0)
    if prediction == "epsilon":
        return noise.to(dtype)
    x0, noise = x0.to(dtype), noise.to(dtype)
    ab = _gather(alphas_cumprod, t, x0)
    return ab**0.5 * noise - (1 - ab) ** 0.5 * x0


def predicted_x0(
    x_t: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str
) -> torch.Tensor:
    """Invert the target: the clean sample implied by a model output at x_t (for previews and tests)."""
    prediction = _check_prediction(prediction)
    dtype = _compute_dtype(x_t)
    x_t, model_out = x_t.to(dtype), model_out.to(dtype)
    ab = _gather(alphas_cumprod, t, x_t)
    if prediction == "epsilon":
        return (x_t - (1 - ab) ** 0.5 * model_out) / ab**0.5
    return ab**0.5 * x_t - (1 - ab) ** 0.5 * model_out


def sample_timesteps(
    batch: int, timesteps: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Uniform training timesteps in [0, T) as int64; drawn on the generator's device, then moved."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randint(0, timesteps, (batch,), generator=generator, device=gen_device).to(device)


def diffusion_loss(model_out: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32 (fp16 model outputs are upcast before squaring, so no overflow).

    ``weights`` [B] weight each sample's error (min-SNR weighting); None is the plain mean.
    """
    if weights is None:
        return F.mse_loss(model_out.float(), target.float())
    per_sample = (model_out.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_sample * weights.float()).mean()


def min_snr_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): stop easy low-noise steps from dominating training.

    In units of the epsilon loss the weight is min(SNR, gamma) / SNR; for v-prediction, whose loss is
    (SNR + 1) times the epsilon loss, it is min(SNR, gamma) / (SNR + 1).
    """
    ab = alphas_cumprod.to(t.device)[t].float()
    snr = ab / (1 - ab).clamp_min(1e-12)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if _check_prediction(prediction) == "v_prediction" else clipped / snr.clamp_min(1e-12)


def drop_conditions(
    cond: torch.Tensor, empty: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each batch element's condition by ``empty`` with probability p (classifier-free guidance).

    Works for embeddings [B, L, D] and token ids [B, L]; ``empty`` is one condition, with or without a
    leading batch dimension of 1. Returns (conditions, dropped mask [B] bool).
    """
    batch = cond.shape[0]
    gen_device = generator.device if generator is not None else "cpu"
    mask = torch.rand(batch, generator=generator, device=gen_device).to(cond.device) < p
    if empty.dim() == cond.dim():
        empty = empty[0]
    empty = empty.to(device=cond.device, dtype=cond.dtype).expand_as(cond)
    return torch.where(mask.view(batch, *([1] * (cond.dim() - 1))), empty, cond), mask


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale·(cond − uncond); scale 1 is the conditional output."""
    return uncond + scale * (cond - uncond)


def validation_timesteps(timesteps: int, n: int) -> torch.Tensor:
    """n evenly spaced timesteps (bin centres of [0, T)), the same for every run with the same T."""
    n = max(1, min(n, timesteps))
    return ((torch.arange(n, dtype=torch.float64) + 0.5) * timesteps / n).long()


def fixed_noise(
    shape: tuple[int, ...] | torch.Size,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian noise that depends only on (shape, seed): drawn on the CPU, so every device sees the same."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _rows(cond: Any, start: int, stop: int, n: int) -> Any:
    """Rows ``start:stop`` of a per-item condition (a shared one, or None, is passed whole)."""
    return cond[start:stop] if isinstance(cond, torch.Tensor) and cond.shape[0] == n else cond


@torch.no_grad()
def validation_loss(
    predict_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    x0_batch: torch.Tensor,
    cond: Any,
    alphas_cumprod: torch.Tensor,
    prediction: str,
    seed: int = 0,
    n_timesteps: int = 8,
    batch: int | None = None,
) -> float:
    """Held-out loss at fixed timesteps with fixed noise, so its value is comparable between runs.

    ``predict_fn(noisy, t, cond)`` returns the model output; the whole batch is noised at each of the
    ``n_timesteps`` evenly spaced timesteps and the MSE is averaged over them. ``batch``: the model sees
    at most this many items at once (the training micro-batch: validation never needs more memory).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x0 = x0_batch.to(_compute_dtype(x0_batch))
    total = 0.0
    steps = validation_timesteps(len(alphas_cumprod), n_timesteps)
    for t_value in steps.tolist():
        noise = torch.randn(tuple(x0.shape), generator=gen, dtype=torch.float32).to(x0.device, x0.dtype)
        t = torch.full((x0.shape[0],), t_value, dtype=torch.long, device=x0.device)
        noisy = add_noise(x0, noise, t, alphas_cumprod)
        n = x0.shape[0]
        step = batch or n
        if step >= n:
            out = predict_fn(noisy, t, cond)
        else:
            parts = [predict_fn(noisy[i:i + step], t[i:i + step], _rows(cond, i, i + step, n))
                     for i in range(0, n, step)]
            out = torch.cat(parts)
            del parts
        total += diffusion_loss(out, target(x0, noise, t, alphas_cumprod, prediction)).item()
    return total / len(steps)
