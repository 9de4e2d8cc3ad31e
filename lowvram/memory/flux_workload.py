"""A FLUX.1 workload's models and one step's loss for the profiler: the published configs, no weights.

The transformer, and when the plan does not cache their outputs the VAE, CLIP-L and T5-XXL, are built
from the configs lowvram ships (``single_file_configs/flux-*``); the step runs FLUX.1's own training
loss (``lowvram.models.flux_cond.training_loss``), the function training calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..card import CardSpec
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
    # the FLUX.1 job drops CLIP-L and T5 once their outputs are cached, offloaded or not (families/flux.py)
    encoders = [] if knobs.cache_text else list(_text_encoders(variant, device, helper_dtype).values())
    side = workload.resolution // 8  # FLUX.1's VAE: 8x down, 16 channels
    latent = (model.config.in_channels // 4, side, side)
    targets = tuple(n for n in lora_target_names(model, modulation=True) if n.split(".", 2)[2] in workload.lora_targets)
    trainable = attach_lora(model, workload.lora_rank, targets, workload.lora_dropout, adapter=workload.adapter)
    stored = store_frozen_unet(model, knobs.frozen_dtype, compute)
    return Built(model, trainable, {"unet": model}, vae, encoders, False, latent, flux.MAX_SEQUENCE_LENGTH[variant],
                 prediction="flow", notes=[f"frozen transformer weights: {stored}"], step_loss=step_loss)


def flux_targets(kind: str) -> tuple[str, ...]:
    """The block layers a FLUX.1 LoRA adapts for ``lora.targets``: all, or the ``attn.*`` projections only
    (``models.flux_lora_keys.lora_target_names``' rule)."""
    from .workloads import FLUX_LORA_TARGETS

    return tuple(t for t in FLUX_LORA_TARGETS if t.startswith("attn.")) if kind == "attention" else FLUX_LORA_TARGETS


def workload_of_run(cfg: Any, batch: int, prior: str = "", **common: Any) -> Any:
    """The planner's Workload for a FLUX.1 LoRA run: the model's own transformer config (a diffusers folder's,
    or ``model.config``'s for a single file, else the published one), its rank and resolution; ``common``: the
    Workload fields every job carries (EMA, gradient clipping...)."""
    import json
    from pathlib import Path

    from ..families.flux_rules import check_flux_config
    from .workloads import Workload

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
                    lora_rank=cfg.lora.rank, lora_targets=flux_targets(cfg.lora.targets), unet_overrides=overrides, **common)


def safe_precision(cfg: Any, card: CardSpec | None) -> list[str]:
    """FLUX.1's activations overflow fp16: compute in bf16 where the card has it, else fp32 (gfx803, GTX 16xx,
    where fp16 is no faster). Changes ``cfg.train.precision`` in place (the plan's copy of the config);
    returns the note saying so."""
    if cfg.train.precision != "fp16" or card is None:
        return []
    cfg.train.precision = "bf16" if getattr(card, "bf16", False) else "fp32"
    return [f"compute in {cfg.train.precision}, not fp16: FLUX.1's activations overflow fp16"
            + ("" if cfg.train.precision == "bf16" else " and this card has no bf16")]
