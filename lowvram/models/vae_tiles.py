"""``memory.vae_tiling``: the VAE encodes and decodes in overlapping tiles (diffusers' own AutoencoderKL tiling).

diffusers tiles only above ``tile_sample_min_size``, which ``enable_tiling()`` leaves at the VAE config's
``sample_size`` (512 for SD 1.x, 1024 for SDXL): at the training resolutions nothing would tile. The tile is
set here to 32 latent cells (256 px on SD's 8x VAE), so that 512² and 1024² do tile: a tile's decoder
temporaries are 1/4 (512²) and 1/16 (1024²) of the whole image's, and the mid block's attention sees 1,024
tokens instead of 4,096 or 16,384. diffusers' overlap (a quarter of a tile, blended) is kept: tiled latents
and images differ a little from untiled ones, and the VAE runs on about twice the pixels (the overlaps).
The trainer (train/finetune_models.py, families/flux.py) and the profiler (memory/workloads.py) both call
``tile_vae``, so the plan replays the same tiles the run computes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

TILE_LATENTS = 32  # latent cells per tile side


def vae_factor(vae: nn.Module) -> int:
    """Pixels per latent cell: 2 ** (number of down blocks - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def tile_vae(vae: nn.Module) -> str:
    """Switch ``vae``'s tiled encode/decode on, with tiles of ``TILE_LATENTS`` latent cells; returns a note."""
    if not hasattr(vae, "enable_tiling") or not hasattr(vae, "tile_latent_min_size"):
        raise TypeError(f"{type(vae).__name__} has no AutoencoderKL tiling")
    factor = vae_factor(vae)
    vae.enable_tiling()
    vae.tile_latent_min_size = TILE_LATENTS
    vae.tile_sample_min_size = TILE_LATENTS * factor
    return f"VAE tiled: {TILE_LATENTS * factor} px tiles, a quarter overlapping (images larger than that)"


def tiling_identity(vae: Any) -> dict[str, Any] | None:
    """What the tiling adds to a latent's cache key (None when the VAE is not tiled: keys unchanged)."""
    if not getattr(vae, "use_tiling", False):
        return None
    return {"tile_px": int(vae.tile_sample_min_size), "tile_latents": int(vae.tile_latent_min_size),
            "overlap": float(vae.tile_overlap_factor)}
