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
        return AutoencoderKL.from_config(cfg).to(dtype).requires_grad_(False)


def _text_encoders(variant: str, device: str | torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = CONFIGS_DIR / variant
    with torch.device(device):
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
        t5 = T5EncoderModel(T5Config.from_pretrained(root / "text_encoder_2"))
    return {"text_encoder": clip.to(dtype).requires_grad_(False), "text_encoder_2": t5.to(dtype).requires_grad_(False)}


def step_loss(built: Any, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    """One FLUX.1 training step's loss from cached latents/text, or from pixels and token ids."""
    from ..models import flux_cond

    frozen = built.frozen_modules
    with torch.no_grad():
        x0 = flux_cond.encode_images(frozen["vae"], inp["pixels"]) if "pixels" in inp else inp["x0"]
        if "cond" in inp:
            text = flux_cond.FluxText(inp["cond"], built.unet_kwargs["pooled"])
        else:  # CLIP reads its first 77 tokens, T5 the whole sequence
            ids = inp["ids"]
            clip_len = frozen["text_encoder"].config.max_position_embeddings
            text = flux_cond.FluxText(frozen["text_encoder_2"](ids)[0].float(),
                                      frozen["text_encoder"](ids[:, :clip_len]).pooler_output.float())
    return flux_cond.training_loss(built.unet, x0, text)


def build_flux(workload: Any, knobs: Any, device: str | torch.device, helper_dtype: torch.dtype) -> tuple:
    """(transformer, frozen helpers, latent shape, text shape, extra inputs, LoRA target names, step loss)."""
    variant = workload.model
    model = flux.build_transformer(variant, device, workload.unet_overrides)
    frozen: dict[str, nn.Module] = {}
    if not (knobs.cache_latents and knobs.offload_frozen):
        frozen["vae"] = build_vae(variant, device, helper_dtype)
    if not knobs.cache_text:  # the FLUX.1 job drops CLIP-L and T5 once their outputs are cached, offloaded or not
        frozen.update(_text_encoders(variant, device, helper_dtype))
    side = workload.resolution // 8  # FLUX.1's VAE: 8x down, 16 channels
    latent = (model.config.in_channels // 4, side, side)
    text = (flux.MAX_SEQUENCE_LENGTH[variant], int(model.config.joint_attention_dim))
    pooled = torch.zeros(knobs.batch_size, int(model.config.pooled_projection_dim), device=device)
    targets = tuple(n for n in lora_target_names(model, modulation=True) if n.split(".", 2)[2] in workload.lora_targets)
    return model, frozen, latent, text, {"pooled": pooled}, targets, step_loss


def workload_of_run(cfg: Any, batch: int, prior: str = "") -> Any:
    """The planner's Workload for a FLUX.1 LoRA run: the model's own transformer config (a diffusers folder's,
    or ``model.config``'s for a single file, else the published one), its rank and resolution."""
    import json
    from pathlib import Path

    from ..train.flux_lora import check_flux_config
    from .workloads import FLUX_LORA_TARGETS, Workload

    check_flux_config(cfg)  # what FLUX.1 cannot train is refused before any profiling
    variant = flux.detect_variant(cfg.model.pretrained)
    overrides: dict[str, Any] = {}
    for folder in (cfg.model.pretrained, cfg.model.config):
        if folder and (Path(folder) / "transformer" / "config.json").is_file():
            data = json.loads((Path(folder) / "transformer" / "config.json").read_text())
            overrides = {k: v for k, v in data.items() if not k.startswith("_")}
            break
    res = int(cfg.data.resolution)
    return Workload("this job", f"{variant} LoRA rank {cfg.lora.rank}, {res}²{prior}", variant, "lora", res, batch,
                    lora_rank=cfg.lora.rank, lora_targets=FLUX_LORA_TARGETS, unet_overrides=overrides)


def safe_precision(cfg: Any, card: Any) -> list[str]:
    """FLUX.1's activations overflow fp16: compute in bf16 where the card has it, else fp32 (gfx803, GTX 16xx,
    where fp16 is no faster). Changes ``cfg.train.precision`` in place; returns the note saying so."""
    if cfg.train.precision != "fp16" or card is None:
        return []
    cfg.train.precision = "bf16" if getattr(card, "bf16", False) else "fp32"
    return [f"compute in {cfg.train.precision}, not fp16: FLUX.1's activations overflow fp16"
            + ("" if cfg.train.precision == "bf16" else " and this card has no bf16")]
