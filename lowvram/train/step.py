"""One training step's math: noise the batch, predict, MSE against the target, step the optimizer.

The memory profiler runs exactly these functions on the meta device, so what it measures is what
training does. Keep them free of logging and bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..diffusion import add_noise, diffusion_loss, min_snr_weights, target

RANGE_PREFIX = "lowvram.run."


def compute_loss(
    unet: torch.nn.Module,
    x0: torch.Tensor,
    cond: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    prediction: str,
    generator: torch.Generator | None = None,
    unet_kwargs: dict[str, Any] | None = None,
    snr_gamma: float = 0.0,
    reduce: bool = True,
    loss_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Diffusion loss of ``unet`` on clean inputs ``x0`` (pixels or latents) with conditioning ``cond``.

    Noise and timesteps come from ``generator`` (a CPU generator, so a seed gives the same run on
    every device); without one (the profiler on ``meta``) they are drawn on ``x0``'s device.
    ``snr_gamma`` > 0 weights each sample by min-SNR-gamma (faster convergence; 5 is the paper's value).
    ``reduce=False`` returns the per-sample (weighted) losses [B] instead of their mean (prior preservation
    weights the instance and class halves of a batch apart). ``loss_weights`` [B, 1, h, w] at the output's
    size weight each element's squared error (masked loss, ``data/masks.py``): the mean then runs over every
    element, so a weight-0 element neither counts nor reaches the gradient.
    """
    batch = x0.shape[0]
    timesteps = alphas_cumprod.shape[0]
    if generator is not None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        t = torch.randint(0, timesteps, (batch,), generator=generator).to(x0.device)
    else:
        noise = torch.randn_like(x0)
        t = torch.randint(0, timesteps, (batch,), device=x0.device)
    acp = alphas_cumprod.to(x0.device)
    noisy = add_noise(x0, noise, t, acp)
    out = unet(noisy, t, encoder_hidden_states=cond, **(unet_kwargs or {})).sample
    weights = min_snr_weights(t, acp, prediction, snr_gamma) if snr_gamma > 0 else None
    goal = target(x0, noise, t, acp, prediction)
    if reduce and loss_weights is None:
        return diffusion_loss(out, goal, weights)
    err = (out.float() - goal.float()).pow(2)
    if loss_weights is not None:
        err = err * loss_weights.to(out.device, torch.float32)
    per_sample = err.flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights.float()
    return per_sample.mean() if reduce else per_sample


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.nn.Parameter],
    *,
    grad_clip: float,
    scaler: torch.amp.GradScaler | None = None,
) -> bool:
    """Unscale, clip and step; returns False when the step was skipped (fp16 overflow)."""
    params = [p for p in params if p.grad is not None]
    if scaler is not None and scaler.is_enabled():
        scaler.unscale_(optimizer)
    if grad_clip > 0 and params:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    stepped = True
    if scaler is not None and scaler.is_enabled():
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale_before
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stepped


def phase_range(name: str) -> Any:
    """A ``torch.profiler`` range around a part of the run that holds memory on the card (a training step,
    previews, validation, cache encoding): the memory fidelity check reads the allocator's peak inside them.
    Costs next to nothing when no profiler is running."""
    return torch.profiler.record_function(f"{RANGE_PREFIX}{name}")


def enable_checkpointing(modules: Iterable[torch.nn.Module],
                         context_fn: Callable[[], tuple[Any, Any]] | None = None) -> None:
    """Gradient checkpointing (non-reentrant) on every trained module that has it: diffusers UNets and
    transformers text encoders. ``context_fn`` is torch.utils.checkpoint's (the memory profiler re-enters
    its autocast emulation during recomputation, as torch re-enters real autocast)."""
    from torch.utils.checkpoint import checkpoint

    kw: dict[str, Any] = {"use_reentrant": False}
    if context_fn is not None:
        kw["context_fn"] = context_fn
    for module in modules:
        if hasattr(module, "enable_gradient_checkpointing"):  # diffusers
            func = None if context_fn is None else (lambda m, *args: checkpoint(m.__call__, *args, **kw))
            module.enable_gradient_checkpointing(func)
        elif hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        elif hasattr(module, "gradient_checkpointing_enable"):  # transformers 4.x
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
