"""The stages of the replayed run that sample images: the preview grid (EMA weights swapped in, the frozen
helpers back on the card) and the class images drawn with the base model, each one sampling step and the decode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .encoding import cached_prompt, encode_placed, encode_prompt, scratch_text, text_place
from .timeline import Timeline, empty
from .workloads import Built, Knobs, Preview, Workload


@contextlib.contextmanager
def ema_swapped(ema: Any, built: Built, tl: Timeline) -> Iterator[None]:
    """``EMA.swapped``: the trained weights wait in host memory while samples are drawn from the EMA."""
    if ema is None:
        yield
        return
    tl.tracker.host_births = True  # made in host memory: `.to("cpu", copy=True)` never touches the card
    try:
        backup = [torch.empty_like(p) for p in built.trainable]
    finally:
        tl.tracker.host_births = False
    try:
        yield
    finally:
        del backup


def preview_stage(built: Built, wl: Workload, knobs: Knobs, tl: Timeline, ema: Any,
                   offloaded: list[nn.Module], cached_text: bool = False) -> None:
    """The sample grid: EMA weights swapped in, the frozen helpers back on the card, one image (fine-tune:
    one prompt at a time, under autocast) or every prompt at once (from scratch, fp32) sampled and decoded;
    ``cached_text``: the prompts come from the text cache (``offloaded`` then holds no text encoder)."""
    tl.place(offloaded, host=False)
    try:
        with tl.stage("preview"), torch.no_grad(), ema_swapped(ema, built, tl):
            _draw(built, wl, tl, wl.preview, "cached" if cached_text else "card")
    finally:
        tl.place(offloaded, host=True)


def class_image_stage(built: Built, wl: Workload, knobs: Knobs, tl: Timeline) -> None:
    """Drawing the missing class images (data.num_class_images) with the base model before caching: every
    frozen weight on the card, one image at a time with guidance, decoded by the VAE (``FinetuneJob.draw_base``)."""
    with tl.stage("class images"), torch.no_grad():
        _draw(built, wl, tl, Preview(prompts=1, guided=True, size=None), text_place(built, wl, knobs))


def _draw(built: Built, wl: Workload, tl: Timeline, pv: Preview, text: str = "card") -> None:
    """One sampling step of ``pv``'s images (every step is the same; the previous output alive) + the decode.
    ``text``: the prompt encoded by the pipeline on the card (``card``), read from the cache (``cached``), or
    encoded first under ``memory.text_encoders`` (``sequential``, ``cpu``) and handed over as embeddings."""
    from ..diffusion import make_scheduler_config
    from ..sample import make_sampler, sample

    h, w = pv.size or (wl.resolution, wl.resolution)
    n = pv.prompts if wl.from_scratch else 1
    factor = built.vae_factor
    shape = (n, built.latent_shape[0], h // factor, w // factor)
    scheduler = make_sampler("ddim", make_scheduler_config("linear", 1000, built.prediction))
    if text in ("sequential", "cpu") and not wl.from_scratch:
        # FinetuneJob.generate encodes the prompt and its negative first, outside autocast, off the card or
        # one encoder at a time; the pipeline then gets the embeddings
        encoded = encode_placed(built, 2, tl, text)
        del encoded
    with tl.autocast(not wl.from_scratch):
        if wl.from_scratch:
            cond = scratch_text(built, n, tl.device)
            uncond = scratch_text(built, n, tl.device)
            kwargs: dict[str, Any] = {}
            dtype = torch.float32
        else:
            encode = encode_prompt if text == "card" else cached_prompt
            c, u = encode(built, 1, tl.device), encode(built, 1, tl.device)
            cond, uncond, dtype = c["embeds"], u["embeds"], c["embeds"].dtype
            kwargs = built.unet_kwargs(2 if pv.guided else 1, tl.device, dtype)

        # every sampling step is the same: one is run, with the previous step's output alive
        previous = empty(((2 if pv.guided else 1) * n, *shape[1:]), tl.device)

        def denoise(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return built.unet(x, t, encoder_hidden_states=c, **kwargs).sample

        x = sample(denoise, shape, scheduler=scheduler, cond=cond, uncond=uncond,
                   guidance_scale=3.0 if pv.guided else 1.0, steps=1, device=tl.device, dtype=dtype)
        del cond, uncond, previous
    if built.vae is not None:  # decoded outside autocast, in the VAE's dtype
        images = built.vae.decode(x.to(built.vae.dtype)).sample.float()
        del images
