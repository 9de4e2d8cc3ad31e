"""Profile drawing an image with the base model (DreamBooth class images) under a plan, on the ``meta`` device.

A fine-tune that fills its class folder (``data.num_class_images``) samples before it trains, with the
same frozen dtype and attention kernel, and with the VAE and text encoders on the card (they leave it
only after caching). One sampling step holds: every frozen weight (UNet, VAE, text encoders) and the
adapters, the text encoders' pass, one UNet forward without gradients on the guidance batch (2: the
prompt and the negative one) and the VAE decode of the image. The denoising loop repeats that step,
so its peak is the sampling peak.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from typing import Any

import torch

from .autocast import MetaAutocast
from .profiler import MemoryProfile, card_budget, effective_attention, register_weights
from .tracker import StorageTracker
from .workloads import PRECISIONS, Knobs, Workload, build


def profile_sampling(workload: Workload, knobs: Knobs, *, card: Any = None, vram_gib: float | None = None) -> MemoryProfile:
    """The memory of one sampling step (+ the VAE decode) of ``workload``'s model under ``knobs``."""
    notes: list[str] = []
    kernel, why = effective_attention(knobs.attention, card)
    if why:
        notes.append(why)
    # sampling: the guidance batch, no gradients, the frozen helpers resident
    knobs = knobs.with_(attention=kernel, batch_size=2, grad_accum=1, gradient_checkpointing=False,
                        cache_latents=False, cache_text=False, offload_frozen=False)
    compute = PRECISIONS[knobs.precision]
    emulate = MetaAutocast(compute, "cuda") if compute != torch.float32 else contextlib.nullcontext()
    tracker = StorageTracker()
    with tracker:
        built = build(workload, knobs, "meta")
        notes += built.notes
        register_weights(tracker, built, {id(p) for p in built.trainable})
        tokens, width = built.text_shape
        ids = torch.zeros(2, tokens, dtype=torch.long, device="meta")
        latents = torch.empty(2, *built.latent_shape, device="meta")
        t = torch.zeros(2, dtype=torch.long, device="meta")
        for x in (ids, latents, t):
            tracker.mark(x, "inputs")

        def denoise() -> torch.Tensor:
            with emulate:
                encoders = [m for k, m in built.frozen_modules.items() if k.startswith("text_encoder")]
                cond = torch.cat([m(ids, output_hidden_states=True).hidden_states[-2] for m in encoders], dim=-1)
                if cond.shape[-1] != width:  # a checkpoint narrower than its family (tests): the UNet's width
                    cond = torch.empty(2, tokens, width, device="meta", dtype=cond.dtype)
                return built.unet(latents, t, encoder_hidden_states=cond, **(built.unet_kwargs or {})).sample

        with torch.no_grad():
            if built.streamer is not None:  # the steady state: a first step teaches the streamer the blocks' order
                denoise()
            tracker.reset_peak()
            tracker.phase = "forward"
            out = denoise()
            vae = built.frozen_modules.get("vae")
            if vae is not None:  # decoded outside autocast, one image, in the VAE's own dtype
                vae.decode(out[:1].to(next(vae.parameters()).dtype))
            del out
        result = tracker.result()
    host: dict[str, int] = {}
    if built.streamer is not None:
        host["streamed_weights"] = built.streamer.host_bytes
        built.streamer.close()
    vram, context, margin, budget = card_budget(card, vram_gib)
    return MemoryProfile(
        workload=f"{workload.id} (drawing class images)", knobs=asdict(knobs), peak_bytes=result.peak_bytes,
        by_category=result.by_category, peak_phase="sampling", context_bytes=context, margin_bytes=margin,
        vram_bytes=vram, budget_bytes=budget, notes=notes, host_bytes=host,
    )
