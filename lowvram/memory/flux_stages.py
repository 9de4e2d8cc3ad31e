"""FLUX.1's caching pass and flow-matching previews in the replayed run, as the FLUX.1 trainer runs them.

Caching (``families/flux.py`` bind, ``train/finetune_data.build_caches``, ``after_caching``): the VAE and CLIP-L +
T5-XXL are loaded, the transformer is not; the VAE encodes a micro-batch of images on the card; the text encoders
encode a batch of captions where ``families.flux.text_device`` puts them (on the card when they fit in its free
memory, else on the CPU; ``memory.text_encoders=cpu`` puts them there); then they are dropped and the transformer
loads. Previews (``FluxFamily.preview``): the VAE back on the card, one image at a time from the cached prompt,
one Euler step of the transformer (every step is the same step) and the decode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .drawing import ema_swapped
from .timeline import Timeline, empty, token_ids
from .workloads import Built, Knobs, Workload


def text_place(built: Built, knobs: Knobs, tl: Timeline) -> str:
    """Where FLUX.1's text encoders encode the cache (``families.flux.text_device``): ``card`` on a CPU card or
    when they fit in 90 % of the card's free memory (or the card's size is unknown), else ``cpu``."""
    if tl.free_bytes is None:  # the CPU is the card (or no card was given): they encode where everything runs
        return "card"
    if knobs.text_encoders == "cpu":
        return "cpu"
    need = sum(p.numel() * p.element_size() for m in built.cache_encoders for p in m.parameters())
    return "card" if need < 0.9 * tl.free_bytes else "cpu"


def _encode_captions(built: Built, batch: int, tl: Timeline) -> list[torch.Tensor]:
    """``FluxPipeline.encode_prompt`` of ``batch`` captions (CLIP-L pooled, T5 sequence, text ids) and the rows the
    text cache copies to the CPU (``TextEmbeddingCache._encode``)."""
    clip, t5 = built.cache_encoders
    device = tl.device
    out = clip(token_ids(batch, int(clip.config.max_position_embeddings), device), output_hidden_states=False)
    pooled = out.pooler_output.to(dtype=clip.dtype)
    del out
    pooled = pooled.repeat(1, 1).view(batch, -1)
    seq = t5(token_ids(batch, built.text_tokens, device), output_hidden_states=False)[0]
    seq = seq.to(dtype=t5.dtype).repeat(1, 1, 1).view(batch, built.text_tokens, -1)
    text_ids = torch.zeros(built.text_tokens, 3, device=device).to(dtype=clip.dtype)
    tl.tracker.host_births = True  # each caption's rows, cloned into host memory
    try:
        rows = [t[i].clone() for t in (seq, pooled) for i in range(batch)]
    finally:
        tl.tracker.host_births = False
    del seq, pooled, text_ids
    return rows


def flux_cache_stage(built: Built, wl: Workload, knobs: Knobs, tl: Timeline, place: str) -> None:
    """``build_caches`` of a FLUX.1 run: a micro-batch of latents (``data.cache.encode_latents``, the VAE on the
    card), then a batch of captions through CLIP-L and T5 on the card or (``place`` ``cpu``) in host memory."""
    from ..data.cache import encode_latents

    with tl.stage("cache"), torch.no_grad():
        if built.vae is not None and knobs.cache_latents:
            z = encode_latents(built.vae, empty((knobs.batch_size, 3, wl.resolution, wl.resolution), tl.device))
            del z
        if built.cache_encoders:
            tl.tracker.host_births = place == "cpu"
            try:
                rows = _encode_captions(built, wl.text_cache_batch, tl)
            finally:
                tl.tracker.host_births = False
            del rows


def _register_all(register: Callable[..., None], modules: list[nn.Module], host: bool) -> None:
    for mod in modules:  # a loop variable of the caller would keep the last module alive past its drop
        register(mod, host=host)


def flux_load_and_cache(built: Built, wl: Workload, knobs: Knobs, tl: Timeline,
                        register: Callable[..., None], unet_to_card: Callable[[], None]) -> list[nn.Module]:
    """The FLUX.1 trainer's order: the VAE and text encoders loaded, the caches built, the text encoders dropped,
    the VAE offloaded (unless it stays), then the transformer loaded and brought to the card; returns what left
    the card after caching (previews bring it back)."""
    from ..train.finetune_data import frozen_stay_on_device

    place = text_place(built, knobs, tl)
    _register_all(register, built.cache_encoders, host=place != "card")
    # the text encoders here only when a profile runs with memory.cache_text off (the trainer refuses it)
    _register_all(register, [*built.text_encoders, *([built.vae] if built.vae is not None else [])], host=False)
    if wl.caching_pass:
        flux_cache_stage(built, wl, knobs, tl, place)
    built.cache_encoders = []  # FluxFamily.after_caching: CLIP-L and T5-XXL are dropped
    stay = frozen_stay_on_device(knobs.offload_frozen, knobs.cache_latents, knobs.cache_text, False, wl.text_every_step)
    offloaded = [] if stay else [m for m in (built.vae, *built.text_encoders) if m is not None]
    tl.place(offloaded, host=True)
    register(built.unet, host=True)  # FluxFamily.denoiser_to_card: loaded after caching, then to the card
    unet_to_card()
    return offloaded


def flux_preview_stage(built: Built, wl: Workload, tl: Timeline, ema: Any, offloaded: list[nn.Module]) -> None:
    """``FluxFamily.preview``: EMA weights swapped in, the VAE back on the card, the largest preview image drawn
    from its cached prompt (fp32 on the card) by one Euler step under autocast, decoded outside it."""
    from ..models.flux_cond import PREVIEW_GUIDANCE, FluxText, decode_images, predict

    h, w = wl.preview.size or (wl.resolution, wl.resolution)
    shape = (1, int(built.unet.config.in_channels) // 4, h // built.vae_factor, w // built.vae_factor)
    device = tl.device
    tl.place(offloaded, host=False)
    built.unet.eval()  # the trainer samples in eval mode (no LoRA dropout)
    try:
        with tl.stage("preview"), torch.no_grad(), ema_swapped(ema, built, tl):
            text = FluxText(empty((1, built.text_tokens, int(built.unet.config.joint_attention_dim)), device),
                            empty((1, int(built.unet.config.pooled_projection_dim)), device))
            with tl.autocast():  # flux_cond.sample_latents: CPU noise, then euler_sample's step
                x = torch.randn(shape, dtype=torch.float32).to(device)
                sigma = torch.ones((), device=device).expand(1).to(x.dtype)
                v = predict(built.unet, x, sigma, text, PREVIEW_GUIDANCE).to(x.dtype)
                x = (x.to(torch.float32) + torch.ones((), device=device) * v).to(v.dtype)  # the scheduler's step
                del v, sigma, text
            images = decode_images(built.vae, x)
            del x
            tl.tracker.host_births = True  # the grid's cell, in host memory
            try:
                cell = images[0] * 2 - 1
            finally:
                tl.tracker.host_births = False
            del images, cell
    finally:
        built.unet.train()
        tl.place(offloaded, host=True)
