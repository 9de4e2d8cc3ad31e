"""What encoding allocates in the replayed run: the prompts through the text encoders (on the card, visiting it
one encoder at a time, or on the CPU), a cached prompt handed to the model, and the VAE's latents of a batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .timeline import Timeline, empty, token_ids
from .workloads import Built, Knobs, Workload


def encode_prompt(built: Built, batch: int, device: Any,
                  visit: Callable[[nn.Module], Any] | None = None) -> dict[str, torch.Tensor]:
    """What ``pipe.encode_prompt`` allocates: each text encoder's hidden states (SDXL: the penultimate
    ones, concatenated, and the pooled embedding of the second), in the text encoders' dtype; ``visit(te)``:
    a context each encoder runs in (memory.text_encoders=sequential brings it to the card for its forward)."""
    visit = visit or (lambda _te: contextlib.nullcontext())
    if built.sdxl:
        states, pooled = [], None
        for te in built.text_encoders:
            with visit(te):
                out = te(token_ids(batch, built.text_tokens, device), output_hidden_states=True)
            pooled = out[0]
            states.append(out.hidden_states[-2])
            del out
        embeds = torch.concat(states, dim=-1).to(built.text_encoders[-1].dtype)
        return {"embeds": embeds.repeat(1, 1, 1), "pooled": pooled.repeat(1, 1)}
    with visit(built.text_encoders[0]):
        embeds = built.text_encoders[0](token_ids(batch, built.text_tokens, device))[0]
    return {"embeds": embeds.to(built.text_encoders[0].dtype).repeat(1, 1, 1)}


def text_place(built: Built, wl: Workload, knobs: Knobs) -> str:
    """Where the run's frozen text encoders encode (``memory.text_encoders``; card where the setting does not
    apply: trained or every-step text encoders, from-scratch jobs)."""
    from .workloads import text_placement_applies

    return knobs.text_encoders if not built.text_trained and text_placement_applies(wl, knobs) else "card"


def encode_placed(built: Built, batch: int, tl: Timeline, place: str) -> dict[str, torch.Tensor]:
    """``FinetuneJob.encode_text`` under ``memory.text_encoders``: both encoders on the card, each visiting it
    for its own forward (``text_cache.visit_device``), or on the CPU (all of it in host memory)."""
    if place == "cpu":
        tl.tracker.host_births = True
        try:
            return encode_prompt(built, batch, tl.device)
        finally:
            tl.tracker.host_births = False
    if place == "sequential":
        @contextlib.contextmanager
        def visiting(te: nn.Module) -> Iterator[None]:
            tl.place([te], host=False)
            try:
                yield
            finally:
                tl.place([te], host=True)

        return encode_prompt(built, batch, tl.device, visit=visiting)
    return encode_prompt(built, batch, tl.device)


def cached_prompt(built: Built, batch: int, device: Any) -> dict[str, torch.Tensor]:
    """A prompt's cached encoding handed to the pipeline (``text_cache.PreviewText``): copied to the card."""
    te = built.text_encoders[-1]
    width = sum(int(t.config.hidden_size) for t in built.text_encoders) if built.sdxl else int(te.config.hidden_size)
    c = {"embeds": empty((batch, built.text_tokens, width), device, te.dtype)}
    if built.sdxl:
        c["pooled"] = empty((batch, int(te.config.projection_dim)), device, te.dtype)
    return c


def scratch_text(built: Built, batch: int, device: Any) -> torch.Tensor:
    """``ScratchJob.encode_text``: the text encoder's last hidden states (with grad when it trains)."""
    grad = torch.enable_grad() if built.text_trained and torch.is_grad_enabled() else torch.no_grad()
    with grad:
        return built.text_encoders[0](token_ids(batch, built.text_tokens, device))[0]


def latents_of(built: Built, batch: int, resolution: int, device: Any) -> torch.Tensor:
    """``data.cache.encode_latents`` of a batch of fp32 pixels (no autocast; the VAE's own dtype)."""
    pixels = empty((batch, 3, resolution, resolution), device)
    with torch.no_grad():
        z = built.vae.encode(pixels.to(built.vae.dtype)).latent_dist.mode()
    return z * 1.0


