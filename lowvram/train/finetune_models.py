"""How a fine-tune's pretrained models are loaded, typed, adapted and placed: frozen dtypes, LoRA, attention, streaming.

The memory profiler (``memory/``) builds its models with the same helpers (``helper_dtypes``), so what it
measures is what the trainer allocates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..errors import ConfigError
from .loop import AUTOCAST

LOAD_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float16}


def compute_dtype(cfg: RunConfig) -> torch.dtype:
    return AUTOCAST.get(cfg.train.precision, torch.float32)


def resolve_prediction(cfg: RunConfig) -> str | None:
    """``model.prediction`` defaults to epsilon, which must not override a detected v-prediction checkpoint:
    for pretrained runs only an explicit v_prediction (or family sd2-v) forces v; otherwise the checkpoint says."""
    if cfg.model.prediction == "v_prediction" or cfg.model.family == "sd2-v":
        return "v_prediction"
    return None


def load_base(cfg: RunConfig) -> Any:
    """The pretrained components, frozen, in the load dtype (fp8 storage starts from fp16 weights)."""
    from ..models.pretrained import load_pretrained

    m = cfg.model
    dtype = torch.float32 if cfg.run.task == "full" else LOAD_DTYPES[cfg.memory.frozen_dtype]
    return load_pretrained(m.pretrained, family=m.family, dtype=dtype, allow_pickle=m.allow_pickle,
                           tokenizer=m.tokenizer, vae=m.vae, config=getattr(m, "config", None),
                           prediction=resolve_prediction(cfg))


def store_frozen_unet(unet: nn.Module, cfg: RunConfig) -> str:
    """Keep the frozen UNet weights in ``memory.frozen_dtype`` exactly as the memory profiler models it."""
    from ..quant import store_frozen_unet as store

    return store(unet, cfg.memory.frozen_dtype, compute_dtype(cfg))


def helper_dtypes(precision: str, sdxl: bool, vae_force_upcast: bool) -> tuple[torch.dtype, torch.dtype]:
    """(text encoders, VAE) dtype of a fine-tune's frozen helpers: the compute dtype, except SDXL's VAE,
    which overflows in fp16 and stays fp32 there. The memory profiler builds them the same way."""
    dt = AUTOCAST.get(precision, torch.float32)
    return dt, torch.float32 if sdxl and dt == torch.float16 and vae_force_upcast else dt


def install_attention(models: list[nn.Module], cfg: RunConfig, device: torch.device) -> str:
    """The plan's attention kernel; ``auto`` asks the hardware probe on a GPU (the CPU has fused SDPA)."""
    from ..attention import set_attention

    card: Any = {"flash_attention": True}
    if cfg.memory.attention == "auto" and device.type == "cuda":
        from ..hardware import probe

        card = probe()
    kind = ""
    for m in models:
        kind = set_attention(m, cfg.memory.attention, cfg.memory.attention_chunk, card=card)
    return kind


def type_helpers(cfg: RunConfig, comps: Any, text_encoders: dict[str, nn.Module], vae_upcast: bool) -> list[str]:
    """Frozen text encoders and VAE in their dtypes (``helper_dtypes``; ``vae_upcast``: the family's VAE
    overflows fp16), VAE tiling when the plan says so; returns notes."""
    dt, vae_dt = helper_dtypes(cfg.train.precision, vae_upcast, bool(comps.vae.config.force_upcast))
    for te in text_encoders.values():
        if te.dtype != dt:
            te.to(dt)
    if comps.vae.dtype != vae_dt:
        nn.Module.to(comps.vae, vae_dt)  # diffusers' own .to(dtype) warns about an empty list of fp32 modules
    if cfg.memory.vae_tiling:  # caching, class images and previews (the pipeline decodes with this VAE)
        from ..models.vae_tiles import tile_vae

        return [tile_vae(comps.vae)]
    return []


def prepare_unet(cfg: RunConfig, comps: Any, text_encoders: dict[str, nn.Module], device: torch.device) -> list[str]:
    """LoRA adapters (fp32) and frozen UNet storage, or a trainable fp32 UNet for full fine-tunes; attention."""
    from ..lora import attach_lora, attach_text_lora
    from ..lora_attach import unet_targets

    notes = []
    torch.manual_seed(cfg.run.seed)  # LoRA's random init: the same run gives the same adapter
    if cfg.run.task == "lora":
        lo = cfg.lora
        attach_lora(comps.unet, lo.rank, lo.alpha, lo.dropout, conv=lo.conv, adapter=lo.type,
                    target_modules=unet_targets(lo.targets))
        if lo.text_encoder:
            for te in text_encoders.values():
                attach_text_lora(te, lo.rank, lo.alpha, lo.dropout, adapter=lo.type)
                te.to(device).train()
        notes.append(f"frozen UNet weights: {store_frozen_unet(comps.unet, cfg)}")
    else:
        if comps.unet.dtype != torch.float32:
            comps.unet.to(torch.float32)
        comps.unet.requires_grad_(True)
    comps.unet.train()
    notes.append(f"attention: {install_attention([comps.unet], cfg, device)}")
    return notes  # the UNet stays where it loaded until the caches are built (denoiser_to_card moves it)


def stream_unet(unet: nn.Module, cfg: RunConfig, device: torch.device) -> str:
    """Keep ``memory.stream_blocks`` of the frozen UNet block weights in host RAM, streamed per block;
    the rest of the UNet (adapters included) goes to ``device``. Returns a note for the log."""
    from ..streaming import stream_frozen_blocks

    if cfg.run.task != "lora":
        raise ConfigError("memory.stream_blocks streams frozen weights, and a full fine-tune trains them all",
                          "use --set memory.stream_blocks=0, or --task lora")
    streamer = stream_frozen_blocks(unet, device, cfg.memory.stream_blocks)
    where = "pinned host RAM" if streamer.pinned else "host RAM"
    return (f"streaming {len(streamer.units)} UNet blocks from {where} "
            f"({streamer.host_bytes / 2**30:.2f} GiB, {cfg.memory.stream_blocks:.0%} of the block weights)")
