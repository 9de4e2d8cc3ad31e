"""FLUX.1 conditioning and one prediction: T5 + CLIP text, 2×2 latent packing, position ids, guidance.

What a FLUX.1 step feeds the transformer: the T5-XXL hidden states (B, L, 4096) as the sequence, CLIP-L's
pooled output (B, 768) as the vector, zero text ids and (row, column) ids for the 2×2-packed latent
patches, the timestep σ and, for the guidance-distilled dev model only, the guidance scale (sd-scripts
and the diffusers script feed it during training too: 1.0 here, as sd-scripts' FLUX guide advises).
Packing, ids and prompt encoding are diffusers' own (FluxPipeline), so training sees what inference does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..flow import FlowSampling, euler_sample, flow_loss

TRAIN_GUIDANCE = 1.0  # sd-scripts docs/flux_train_network.md: "--guidance_scale 1.0" for dev LoRA training
PREVIEW_GUIDANCE = 3.5  # FluxPipeline's default for dev (distilled guidance: one pass, no CFG)


@dataclass
class FluxText:
    """One batch of encoded captions: what the text-embedding cache stores for FLUX.1."""

    t5: torch.Tensor  # (B, L, 4096) T5-XXL last hidden state
    pooled: torch.Tensor  # (B, 768) CLIP-L pooled output

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> FluxText:
        return FluxText(self.t5.to(device, dtype), self.pooled.to(device, dtype))


def encode_prompts(text_encoder: nn.Module, tokenizer: Any, text_encoder_2: nn.Module, tokenizer_2: Any,
                   prompts: list[str], max_sequence_length: int = 512,
                   device: str | torch.device = "cpu") -> FluxText:
    """Encode captions exactly as FluxPipeline does (CLIP pooled + T5 sequence, T5 padded to the length)."""
    from diffusers import FluxPipeline

    encoder = FluxPipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                           text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=None)
    with torch.no_grad():
        t5, pooled, _ = encoder.encode_prompt(prompts, prompt_2=None, device=torch.device(device),
                                              max_sequence_length=max_sequence_length)
    return FluxText(t5, pooled)


def normalize_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """VAE latent → what the transformer sees: (z - shift_factor) · scaling_factor (0.1159, 0.3611 for FLUX.1)."""
    return (latents - _cfg(vae_config, "shift_factor", 0.0)) * _cfg(vae_config, "scaling_factor", 1.0)


def denormalize_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """Inverse of ``normalize_latents``, before ``vae.decode``."""
    return latents / _cfg(vae_config, "scaling_factor", 1.0) + _cfg(vae_config, "shift_factor", 0.0)


def _cfg(config: Any, key: str, default: float) -> float:
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return float(default if value is None else value)


def encode_images(vae: nn.Module, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels in [-1, 1] → normalized 16-channel latents (a sample of the VAE posterior, as the reference trainers)."""
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        z = dist.sample(generator) if generator is not None else dist.sample()
    return normalize_latents(z.float(), vae.config)


def decode_images(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Normalized latents → images in [0, 1] (B, 3, H, W), as FluxPipeline's ``output_type="pt"``."""
    with torch.no_grad():
        pixels = vae.decode(denormalize_latents(latents, vae.config).to(vae.dtype)).sample
    return (pixels.float() / 2 + 0.5).clamp(0, 1)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2 · W/2, 4C): FLUX.1 attends over 2×2 latent patches."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack`` for a latent of ``height`` × ``width``."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, height, width, 1)  # scale factor 1: sizes are latent sizes


def image_ids(height: int, width: int, device: str | torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(H/2 · W/2, 3) ids (0, row, column) of the packed patches: FLUX.1's rotary positions."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)


def text_ids(length: int, device: str | torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(L, 3) zeros: text tokens all sit at position 0 of the rotary embedding."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def packed_seq_len(height: int, width: int) -> int:
    """Image tokens of a latent of ``height`` × ``width`` (what FLUX.1's shift ``mu`` is a function of)."""
    return (height // 2) * (width // 2)


def predict(transformer: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor, text: FluxText,
            guidance: float | None) -> torch.Tensor:
    """The transformer's velocity for unpacked latents ``x_t`` (B, C, H, W) at noise level σ (B,)."""
    b, _, h, w = x_t.shape
    device = x_t.device
    g = None
    if transformer.config.guidance_embeds:
        g = torch.full((b,), TRAIN_GUIDANCE if guidance is None else guidance, device=device, dtype=torch.float32)
    out = transformer(
        hidden_states=pack(x_t),
        timestep=sigma.to(device),  # diffusers' FluxTransformer2DModel multiplies by 1000 itself
        guidance=g,
        pooled_projections=text.pooled.to(device),
        encoder_hidden_states=text.t5.to(device),
        txt_ids=text_ids(text.t5.shape[1], device),
        img_ids=image_ids(h, w, device),
        return_dict=False,
    )[0]
    return unpack(out, h, w)


def training_loss(transformer: nn.Module, x0: torch.Tensor, text: FluxText, *, sampling: FlowSampling | None = None,
                  guidance: float = TRAIN_GUIDANCE, generator: torch.Generator | None = None,
                  reduce: bool = True) -> torch.Tensor:
    """The flow-matching loss of one FLUX.1 step on normalized latents ``x0``: what training and the profiler run."""
    seq = packed_seq_len(x0.shape[-2], x0.shape[-1])
    return flow_loss(lambda x, s: predict(transformer, x, s, text, guidance), x0, sampling or FlowSampling(), seq,
                     generator=generator, reduce=reduce)


def sample_latents(transformer: nn.Module, text: FluxText, scheduler_config: dict[str, Any], *, height: int,
                   width: int, steps: int, guidance: float = PREVIEW_GUIDANCE,
                   generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Preview latents (normalized, B × 16 × height × width) for encoded captions: Euler, no CFG.

    FLUX.1-dev is guidance-distilled: the guidance scale is an input of one pass, not a second
    unconditional pass; schnell ignores it. The noise is drawn on the CPU like FluxPipeline's.
    """
    b = text.t5.shape[0]
    channels = transformer.config.in_channels // 4
    noise = torch.randn((b, channels, height, width), generator=generator, dtype=dtype)
    device = next(transformer.parameters()).device
    seq = packed_seq_len(height, width)
    return euler_sample(lambda x, s: predict(transformer, x, s, text, guidance).to(x.dtype),
                        noise.to(device), scheduler_config, steps, seq)
