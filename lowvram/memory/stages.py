"""The stages of a training run that load, encode, train and validate, replayed under the storage tracker.

Each stage holds what the trainer keeps on the card at that moment and runs the training code itself: the
autoencoder stage of a latent job, the cache encoding, a steady-state step (the trainer's optimizer or
``FusedBackward``, the EMA) and validation; the stages that draw images are in ``drawing``.
``profiler.profile_step`` runs them in the order a run does and takes the peak.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .drawing import ema_swapped
from .encoding import cached_prompt, encode_placed, encode_prompt, latents_of, scratch_text, text_place
from .optimizer_state import state_tensors, steady_optimizers
from .timeline import Timeline, empty
from .workloads import Built, Knobs, Workload

STEP_RANGE = "lowvram.profile_step"


def _step_inputs(built: Built, wl: Workload, knobs: Knobs, tl: Timeline, batch: int) -> tuple[Any, Any]:
    """(x0, conditioning thunk) of one micro-batch as the job's ``batch`` and ``loss`` make them."""
    device = tl.device
    if wl.from_scratch:
        x0 = empty((batch, *built.latent_shape), device)
        tl.tracker.mark(x0, "inputs")
        return x0, lambda: (scratch_text(built, batch, device), None)
    if knobs.cache_latents:
        x0 = empty((batch, *built.latent_shape), device)
    else:  # encoded from the images every step, outside autocast, before the loss
        x0 = latents_of(built, batch, wl.resolution, device).float()
    tl.tracker.mark(x0, "inputs")
    cached_text = knobs.cache_text and not built.text_trained and not wl.text_every_step

    def cond() -> tuple[torch.Tensor, dict[str, Any] | None]:
        if cached_text:
            c = cached_prompt(built, batch, device)
            for t in c.values():
                tl.tracker.mark(t, "inputs")
        else:
            grad = torch.enable_grad() if built.text_trained else torch.no_grad()
            with grad:
                c = encode_prompt(built, batch, device)
        kwargs = None
        if built.sdxl:
            mask = torch.ones(batch, device=device)
            c = {k: v * mask.view(-1, *([1] * (v.dim() - 1))).to(v.dtype) for k, v in c.items()}
            kwargs = {"added_cond_kwargs": {"text_embeds": c["pooled"],
                                            "time_ids": empty((batch, 6), device).to(c["pooled"].dtype)}}
        return c["embeds"], kwargs

    return x0, cond


def autoencoder_stage(wl: Workload, knobs: Knobs, tl: Timeline) -> None:
    """The latent job's first stage: an AutoencoderKL trained with AdamW, as ``train_autoencoder`` does."""
    from ..models import scratch
    from ..optim import build_optimizer

    spec = scratch.get_spec(wl.model)
    spec = scratch.ModelSpec(**{**spec.__dict__, "resolution": wl.resolution})
    vae = scratch.build_vae(spec, device=tl.device)
    params = list(vae.parameters())
    for p in params:
        tl.tracker.register(p, "trainable_weights")
    opt = build_optimizer(params, "adamw", lr=1e-3, foreach=False)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for t in state_tensors([opt]):
        tl.tracker.mark(t, "optimizer_state")
    with tl.stage("autoencoder"):
        x = empty((knobs.batch_size, 3, wl.resolution, wl.resolution), tl.device)
        tl.tracker.mark(x, "inputs")
        posterior = vae.encode(x).latent_dist
        z = posterior.sample()
        recon = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(recon.float(), x.float())
        loss = loss + 1e-6 * 0.5 * (posterior.mean.pow(2) + posterior.logvar.exp() - 1.0 - posterior.logvar).mean()
        del posterior, z, recon
        tl.tracker.phase = "backward"
        loss.backward()
        del loss
        tl.tracker.phase = "optimizer"
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    del opt, vae, params


def host_data(wl: Workload, built_shape: tuple[int, int, int] | None, tl: Timeline) -> list[torch.Tensor]:
    """The builtin dataset the run keeps in memory (pixels; a latent job its latents too)."""
    if not wl.host_images:
        return []
    n, r = wl.host_images, wl.resolution
    val = 64 if wl.validation_items else 0
    data = [empty((n + val, 3, r, r), tl.device)]
    if wl.task == "text2img" and val:
        data.append(empty((val, 3, r, r), tl.device))  # the validation batch, indexed out of them
    if wl.task == "latent" and built_shape is not None:
        data.append(empty((n + val, *built_shape), tl.device))
    for t in data:
        tl.tracker.register(t, "inputs", host=True)
    return data


def cache_stage(built: Built, wl: Workload, knobs: Knobs, tl: Timeline) -> None:
    """Encoding the caches, before the optimizer exists: the VAE on one micro-batch of images, the text
    encoders on a batch of captions (fine-tunes); the latent job's encoding of its images (from scratch).
    Not for FLUX.1 (``built.step_loss``): ``flux_stages.flux_cache_stage`` replays its caching pass."""
    if built.step_loss is not None:
        return
    with tl.stage("cache"), torch.no_grad():
        if built.vae is not None and (knobs.cache_latents or wl.from_scratch):
            z = latents_of(built, knobs.batch_size, wl.resolution, tl.device)
            del z
        if not wl.from_scratch and knobs.cache_text and not built.text_trained:
            c = encode_placed(built, wl.text_cache_batch, tl, text_place(built, wl, knobs))
            del c


def _step_loss(built: Built, wl: Workload, knobs: Knobs, tl: Timeline) -> Callable[[], torch.Tensor]:
    """The loss of one micro-batch as the job computes it (its inputs made first, marked as inputs)."""
    from ..train.finetune import prior_preservation_loss
    from ..train.step import compute_loss

    batch = knobs.batch_size * (2 if wl.prior else 1)
    acp = torch.linspace(0.9999, 0.005, 1000, device=tl.device)
    tl.tracker.mark(acp, "inputs")

    def step_loss() -> torch.Tensor:
        if built.step_loss is not None:  # a family with its own objective (FLUX.1: flow matching)
            from .flux_workload import step_inputs

            inp = step_inputs(built, knobs, wl.resolution, batch, tl.device)
            for t in inp.values():
                tl.tracker.mark(t, "inputs")
            with tl.autocast():
                return built.step_loss(built, inp)
        x0, cond_of = _step_inputs(built, wl, knobs, tl, batch)
        # Like the training loop: autocast around the loss only (checkpoint recomputation re-enters it)
        with tl.autocast():
            cond, kwargs = cond_of()
            loss = compute_loss(built.unet, x0, cond, alphas_cumprod=acp, prediction=built.prediction,
                                unet_kwargs=kwargs, snr_gamma=wl.snr_gamma, reduce=not wl.prior)
            if wl.prior:
                loss = prior_preservation_loss(loss, knobs.batch_size, 1.0)[0]
        return loss

    return step_loss


def _ema_of(model: nn.Module, wl: Workload, knobs: Knobs, tl: Timeline, notes: list[str]) -> Any:
    """The trainer's EMA of the trained weights (in host memory with memory.ema_on_cpu), or None."""
    from ..ema import EMA

    if not wl.ema:
        return None
    ema = EMA(model, decay=0.999)
    for t in ema.shadow.values():
        tl.tracker.mark(t, "ema")
    if knobs.ema_on_cpu:
        tl.tracker.place(list(ema.shadow.values()), host=True)
        notes.append("EMA kept in CPU memory: not on the card")
    return ema


def train_stage(built: Built, wl: Workload, knobs: Knobs, tl: Timeline, notes: list[str]) -> tuple[Any, list]:
    """One steady-state training step (accumulated gradients alive for the last micro-batch), the EMA update."""
    from ..train.step import optimizer_step

    tracker = tl.tracker
    trainable = built.trainable

    def on_grad(p: torch.Tensor) -> None:
        if p.grad is not None:
            tracker.mark(p.grad, "gradients")

    # registered before FusedBackward's own hooks, which step and free each gradient
    hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in trainable]
    optimizer, optimizers = steady_optimizers(built, wl, knobs, tl)
    model = nn.ModuleDict(built.trained)
    ema = _ema_of(model, wl, knobs, tl, notes)
    if knobs.grad_accum > 1:  # the last micro-batch runs with the earlier ones' gradients alive
        for p in trainable:
            p.grad = torch.zeros_like(p)
            tracker.mark(p.grad, "gradients")
    step_loss = _step_loss(built, wl, knobs, tl)
    streamer = built.streamer
    fetched = 0
    if streamer is not None:  # the steady state: a first forward teaches the streamer the blocks' order
        with tl.stage("setup", counting=False), torch.no_grad():
            step_loss()
        fetched = streamer.stats.fetched_bytes
    window = torch.profiler.record_function(STEP_RANGE)  # lets the fidelity check find the step
    window.__enter__()
    try:
        with tl.stage("train"):
            tracker.phase = "forward"
            loss = step_loss()
            tracker.phase = "backward"
            loss.backward()
            del loss
            if streamer is not None:
                tl.bus_bytes = streamer.stats.fetched_bytes - fetched
            tracker.phase = "optimizer"
            if not knobs.fused_backward:
                optimizer_step(optimizer, trainable, grad_clip=wl.grad_clip)
            for p in trainable:  # what zero_grad(set_to_none) does to the tensors not stepped here
                p.grad = None
            if ema is not None:
                ema.update(model)
    finally:
        window.__exit__(None, None, None)
        for h in hooks:
            h.remove()
        if knobs.fused_backward:
            optimizer.remove()
    return ema, optimizers


def validation_stage(built: Built, wl: Workload, knobs: Knobs, tl: Timeline, ema: Any) -> None:
    """``ScratchJob.validate``: the held-out batch at fixed timesteps, the UNet in micro-batches, EMA weights.

    ``diffusion.validation_loss`` allocates the same tensors for every chunk and timestep; the profile runs
    the UNet once, on the last chunk of the second timestep, with what is alive then: the batch's x0, noise,
    noisy, the first timestep's output and the earlier chunks' outputs."""
    v, b = wl.validation_items, min(knobs.batch_size, wl.validation_items)
    device = tl.device
    with tl.stage("validation"), torch.no_grad(), ema_swapped(ema, built, tl):
        x0 = empty((v, *built.latent_shape), device)
        cond = scratch_text(built, v, device)
        out_shape = (v, *built.latent_shape)
        previous = empty(out_shape, device)  # the first timestep's output, alive until reassigned
        noise = torch.randn(out_shape, dtype=torch.float32).to(device)
        t = torch.full((v,), 1, dtype=torch.long, device=device)
        noisy = x0 * 1.0 + noise * 1.0
        parts = [empty((b, *built.latent_shape), device) for _ in range(-(-v // b) - 1)]
        parts.append(built.unet(noisy[-b:], t[-b:], encoder_hidden_states=cond[-b:]).sample)
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        del parts
        loss = ((out.float() - noise.float()) ** 2).mean()
        del loss, out, previous, noisy, noise, t, x0, cond


