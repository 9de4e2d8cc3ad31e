"""Public Stable Diffusion architectures (SD 1.5, SD 2.x, SDXL) written into code: no weights, no hub.

The configs are those published with the checkpoints (unet/vae/text_encoder ``config.json``); the memory
profiler builds these models on the ``meta`` device to plan LoRA and fine-tune runs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError

_SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)

_CLIP_L = dict(  # openai/clip-vit-large-patch14 text tower (SD 1.x, SDXL's first encoder)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
_OPENCLIP_H = dict(  # SD 2.x text encoder (OpenCLIP ViT-H/14; 23 layers, the last one is dropped)
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
)
_OPENCLIP_BIGG = dict(  # SDXL's second text encoder (OpenCLIP ViT-bigG/14, with projection)
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)


@dataclass(frozen=True)
class SDFamily:
    """One published architecture: UNet, VAE and text-encoder configs, plus how they fit together."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]
    resolution: int  # native training resolution in pixels
    prediction: str = "epsilon"
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention context (the text encoders' hidden states, concatenated)."""
        return int(self.unet["cross_attention_dim"])

    @property
    def text_tokens(self) -> int:
        return int(self.text_encoders[0]["max_position_embeddings"])

    @property
    def is_sdxl(self) -> bool:
        return self.unet.get("addition_embed_type") == "text_time"

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        side = (resolution or self.resolution) // 8
        return (int(self.unet["in_channels"]), side, side)

    def unet_kwargs(self, batch: int, device: str | torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Extra UNet inputs: SDXL's pooled text embedding and size/crop ids (``added_cond_kwargs``)."""
        if not self.is_sdxl:
            return {}
        pooled = int(self.unet["projection_class_embeddings_input_dim"]) - 6 * int(self.unet["addition_time_embed_dim"])
        return {"added_cond_kwargs": {
            "text_embeds": torch.zeros(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype),
        }}


SD_FAMILIES: dict[str, SDFamily] = {
    "sd15": SDFamily(
        name="sd15",
        unet=dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
        ),
        vae=dict(_SD_VAE, sample_size=512, scaling_factor=0.18215),
        text_encoders=(_CLIP_L,),
        resolution=512,
    ),
    "sd2": SDFamily(  # stable-diffusion-2-1 (768-v): v-prediction, linear projections, upcast attention
        name="sd2",
        unet=dict(
            sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            use_linear_projection=True, upcast_attention=True,
            act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
        ),
        vae=dict(_SD_VAE, sample_size=768, scaling_factor=0.18215),
        text_encoders=(_OPENCLIP_H,),
        resolution=768,
        prediction="v_prediction",
    ),
    "sdxl": SDFamily(
        name="sdxl",
        unet=dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
        ),
        vae=dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025),
        text_encoders=(_CLIP_L, _OPENCLIP_BIGG),
        resolution=1024,
    ),
}


def get_family(name: str) -> SDFamily:
    """The published architecture ``name`` (sd15, sd2, sdxl)."""
    if name not in SD_FAMILIES:
        raise ConfigError(f"unknown Stable Diffusion family '{name}'", f"use one of: {', '.join(SD_FAMILIES)}")
    return SD_FAMILIES[name]


def build_sd_unet(family: SDFamily | str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32):
    """The family's ``UNet2DConditionModel``, created directly on ``device`` (``meta``: no bytes)."""
    from diffusers import UNet2DConditionModel

    fam = get_family(family) if isinstance(family, str) else family
    with torch.device(device):
        unet = UNet2DConditionModel(**fam.unet)
    return unet if dtype == torch.float32 else unet.to(dtype=dtype)


def build_sd_vae(family: SDFamily | str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32):
    """The family's ``AutoencoderKL`` on ``device``."""
    from diffusers import AutoencoderKL

    fam = get_family(family) if isinstance(family, str) else family
    with torch.device(device):
        vae = AutoencoderKL(**fam.vae)
    return vae if dtype == torch.float32 else vae.to(dtype=dtype)


def build_sd_text_encoders(family: SDFamily | str, device: str | torch.device = "meta",
                           dtype: torch.dtype = torch.float32) -> list[torch.nn.Module]:
    """The family's CLIP text encoder(s) on ``device`` (SDXL's second one with its projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    fam = get_family(family) if isinstance(family, str) else family
    models = []
    for i, cfg in enumerate(fam.text_encoders):
        cls = CLIPTextModelWithProjection if (fam.is_sdxl and i == 1) else CLIPTextModel
        with torch.device(device):
            model = cls(CLIPTextConfig(**cfg))
        models.append(model if dtype == torch.float32 else model.to(dtype=dtype))
    return models
