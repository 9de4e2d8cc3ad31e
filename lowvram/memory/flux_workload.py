"""A FLUX.1 workload's models and one step's loss for the profiler: the published configs, no weights.

The transformer, and when the plan does not cache their outputs the VAE, CLIP-L and T5-XXL, are built
from the configs lowvram ships (``single_file_configs/flux-*``); the step runs FLUX.1's own training
loss (``lowvram.models.flux_cond.training_loss``), the function training calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models import flux
from ..models.flux_lora_keys import lora_target_names
from ..models.pretrained import CONFIGS_DIR


def build_vae(variant: str, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    from diffusers import AutoencoderKL

    cfg = dict(AutoencoderKL.load_config(CONFIGS_DIR / variant / "vae"))
    with torch.device(device):
        vae = AutoencoderKL.from_config(cfg)
    # nn.Module.to: diffusers' own .to(dtype) warns about an empty list of fp32 modules on every cast
    return nn.Module.to(vae, dtype).requires_grad_(False)


def _text_encoders(variant: str, device: str | torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = CONFIGS_DIR / variant
    with torch.device(device):
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
        t5 = T5EncoderModel(T5Config.from_pretrained(root / "text_encoder_2"))
    return {"text_encoder": clip.to(dtype).requires_grad_(False), "text_encoder_2": t5.to(dtype).requires_grad_(False)}


def step_inputs(built: Any, knobs: Any, resolution: int, batch: int, device: str | torch.device) -> dict[str, torch.Tensor]:
    """One micro-batch as a FLUX.1 step reads it: cached latents/text, or pixels and token ids for the
    helpers still on the card, and the pooled CLIP embedding."""
    inp: dict[str, torch.Tensor] = {}
    if built.vae is not None and not knobs.cache_latents:
        inp["pixels"] = torch.empty(batch, 3, resolution, resolution, device=device)
    else:
        inp["x0"] = torch.empty(batch, *built.latent_shape, device=device)
    if built.text_encoders and not knobs.cache_text:
        inp["ids"] = torch.zeros(batch, built.text_tokens, dtype=torch.long, device=device)
    else:
        inp["cond"] = torch.empty(batch, built.text_tokens, int(built.unet.config.joint_attention_dim), device=device)
    inp["pooled"] = torch.zeros(batch, int(built.unet.config.pooled_projection_dim), device=device)
    return inp


def step_loss(built: Any, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    """One FLUX.1 training step's loss from cached latents/text, or from pixels and token ids."""
    from ..models import flux_cond

    with torch.no_grad():
        x0 = flux_cond.encode_images(built.vae, inp["pixels"]) if "pixels" in inp else inp["x0"]
        if "cond" in inp:
            text = flux_cond.FluxText(inp["cond"], inp["pooled"])
        else:  # CLIP reads its first 77 tokens, T5 the whole sequence
            clip, t5 = built.text_encoders
            ids = inp["ids"]
            clip_len = clip.config.max_position_embeddings
            text = flux_cond.FluxText(t5(ids)[0].float(), clip(ids[:, :clip_len]).pooler_output.float())
    return flux_cond.training_loss(built.unet, x0, text)


def build_flux(workload: Any, knobs: Any, device: str | torch.device, compute: torch.dtype) -> Any:
    """The transformer with its LoRA, the VAE (kept for previews) and, unless their outputs are cached and
    the helpers offloaded (then they are dropped after caching), CLIP-L and T5-XXL."""
    from ..quant import store_frozen_unet
    from .workloads import Built, attach_lora

    helper_dtype = compute  # the VAE and text encoders load in the compute dtype, as a fine-tune's do

    variant = workload.model
    model = flux.build_transformer(variant, device, workload.unet_overrides)
    vae = build_vae(variant, device, helper_dtype)
    encoders = [] if (knobs.cache_text and knobs.offload_frozen) else list(
        _text_encoders(variant, device, helper_dtype).values())
    side = workload.resolution // 8  # FLUX.1's VAE: 8x down, 16 channels
    latent = (model.config.in_channels // 4, side, side)
    targets = tuple(n for n in lora_target_names(model, modulation=True) if n.split(".", 2)[2] in workload.lora_targets)
    trainable = attach_lora(model, workload.lora_rank, targets, workload.lora_dropout, adapter=workload.adapter)
    stored = store_frozen_unet(model, knobs.frozen_dtype, compute)
    return Built(model, trainable, {"unet": model}, vae, encoders, False, latent, flux.MAX_SEQUENCE_LENGTH[variant],
                 prediction="flow", notes=[f"frozen transformer weights: {stored}"], step_loss=step_loss)
