"""Named from-scratch model sizes (a registry used directly as CLI choices) and their builders.

Each size is a ``ModelSpec``: plain config dicts for diffusers' ``UNet2DConditionModel`` /
``AutoencoderKL`` and transformers' ``CLIPTextModel``, so the memory profiler can build the very same
models on the ``meta`` device that training builds on the card.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..errors import ConfigError
from .tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclass(frozen=True)
class ModelSpec:
    """One named size: configs of the three models plus the shapes that tie them together."""

    name: str
    description: str
    resolution: int  # image side in pixels
    default_task: str  # "text2img" (pixel space) or "latent"
    unet: dict[str, Any]  # UNet2DConditionModel kwargs without in/out channels and sample size
    text_encoder: dict[str, Any]  # CLIPTextConfig kwargs without vocab size and special-token ids
    text_max_length: int  # tokens per caption, bos/eos included (= the encoder's positions)
    vae: dict[str, Any] | None = None  # AutoencoderKL kwargs; None: no latent task for this size
    latent_channels: int = 4
    latent_scale: float = 1.0  # multiply VAE latents by this before diffusion (set after training the VAE)
    timesteps: int = 1000

    @property
    def latent_resolution(self) -> int:
        """Side of the latent the VAE makes from a ``resolution`` image (one halving per extra block)."""
        if self.vae is None:
            return self.resolution
        return self.resolution // 2 ** (len(self.vae["block_out_channels"]) - 1)


def _unet(channels: tuple[int, ...], attn: tuple[bool, ...], layers: int, cross_dim: int,
          head_dim: int, groups: int, **extra: Any) -> dict[str, Any]:
    """UNet kwargs: ``attn[i]`` puts cross-attention into stage ``i`` (and its mirror on the way up)."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return dict(block_out_channels=channels, down_block_types=down, up_block_types=up,
                layers_per_block=layers, cross_attention_dim=cross_dim, attention_head_dim=head_dim,
                norm_num_groups=groups, **extra)


def _text(hidden: int, layers: int, heads: int, mlp: int) -> dict[str, Any]:
    return dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=heads, projection_dim=hidden)


MODEL_SIZES: dict[str, ModelSpec] = {
    # CPU default: 32x32 pixel space; cross-attention only at 8x8 (attention at 16x16+ dominates CPU
    # time). The pooled caption is also added to the time embedding ("text" addition embedding), which
    # carries the global attributes (colours) to every resolution for almost no compute.
    "tiny": ModelSpec(
        name="tiny",
        description="CPU demo: 24x24 pixels, UNet 32/64/64 (~1.6 M), text encoder 2x64; minutes on 2 cores",
        resolution=24,
        default_task="text2img",
        unet=_unet((32, 64, 64), (False, True, True), layers=1, cross_dim=64, head_dim=8, groups=8,
                   addition_embed_type="text", addition_embed_type_num_heads=4),
        text_encoder=_text(hidden=64, layers=2, heads=4, mlp=128),
        text_max_length=16,
        vae=dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=16),
        latent_channels=4,
    ),
    # The RX 570 / CelebA recipe: 64x64 images -> 32x32x4 latents, text 77x512. Cross-attention in the
    # 32x32 and 16x16 stages (diffusers' usual layout), plain ResNet stage at 8x8 + cross-attn mid block.
    "celeba64": ModelSpec(
        name="celeba64",
        description="latent text-to-image: VAE 64x64x3 -> 32x32x4, UNet 64/128/256 (cross-attn 512), text 77x512",
        resolution=64,
        default_task="latent",
        unet=_unet((64, 128, 256), (True, True, False), layers=2, cross_dim=512, head_dim=8, groups=32),
        text_encoder=_text(hidden=512, layers=4, heads=8, mlp=2048),
        text_max_length=77,
        vae=dict(block_out_channels=(64, 128), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, norm_num_groups=32),
        latent_channels=4,
    ),
    # The textbook pixel-space DDPM at 64x64 (Ho et al. widths), text-conditioned by cross-attention
    # at 16x16 and 8x8.
    "ddpm64": ModelSpec(
        name="ddpm64",
        description="pixel-space DDPM 64x64: UNet 64/128/256/512, attention at 16x16 and 8x8, text 32x256",
        resolution=64,
        default_task="text2img",
        unet=_unet((64, 128, 256, 512), (False, False, True, True), layers=2, cross_dim=256, head_dim=32,
                   groups=32),
        text_encoder=_text(hidden=256, layers=4, heads=4, mlp=1024),
        text_max_length=32,
    ),
}


def get_spec(name: str) -> ModelSpec:
    """The registered size ``name``; a ConfigError lists the valid names otherwise."""
    if name not in MODEL_SIZES:
        raise ConfigError(f"unknown model size '{name}'", f"use one of: {', '.join(MODEL_SIZES)}")
    return MODEL_SIZES[name]


def _placement(device: str | torch.device) -> contextlib.AbstractContextManager:
    # On "meta" the modules must be *created* there: no bytes are allocated, shapes stay exact.
    return torch.device("meta") if str(device) == "meta" else contextlib.nullcontext()


def _finish(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if str(device) != "meta" and torch.device(device) != torch.device("cpu"):
        module = module.to(device=device)
    # Built in fp32; cast only when asked (diffusers warns on every .to(dtype) call).
    return module if dtype == torch.float32 else module.to(dtype=dtype)


def unet_config(spec: ModelSpec, task: str | None = None) -> dict[str, Any]:
    """Full UNet kwargs for ``task`` (``text2img``: RGB pixels; ``latent``: the VAE's latents)."""
    task = task or spec.default_task
    if task == "latent":
        if spec.vae is None:
            raise ConfigError(f"model size '{spec.name}' has no autoencoder, so it cannot train the latent task",
                              "use --task text2img, or a size with a VAE (tiny, celeba64)")
        channels, side = spec.latent_channels, spec.latent_resolution
    elif task == "text2img":
        channels, side = 3, spec.resolution
    else:
        raise ConfigError(f"task '{task}' has no from-scratch UNet", "use text2img or latent")
    cfg = dict(spec.unet)
    cfg.update(in_channels=channels, out_channels=channels, sample_size=side)
    if cfg.get("addition_embed_type") == "text":
        cfg.setdefault("encoder_hid_dim", None)
    return cfg


def build_unet(spec: ModelSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               task: str | None = None) -> UNet2DConditionModel:
    """A freshly initialised UNet of ``spec`` for ``task`` (default: the size's default task)."""
    cfg = unet_config(spec, task)
    with _placement(device):
        unet = UNet2DConditionModel(**cfg)
    return _finish(unet, device, dtype)


def build_vae(spec: ModelSpec, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A freshly initialised autoencoder of ``spec`` (RGB in/out, ``latent_channels`` latents)."""
    if spec.vae is None:
        raise ConfigError(f"model size '{spec.name}' has no autoencoder", "use --task text2img, or size tiny/celeba64")
    cfg = dict(spec.vae)
    cfg.update(in_channels=3, out_channels=3, latent_channels=spec.latent_channels,
               sample_size=spec.resolution, scaling_factor=spec.latent_scale)
    with _placement(device):
        vae = AutoencoderKL(**cfg)
    return _finish(vae, device, dtype)


def text_encoder_config(spec: ModelSpec, vocab_size: int) -> CLIPTextConfig:
    """The CLIPTextConfig of ``spec`` for a tokenizer of ``vocab_size`` words (ids from tokenizer.py)."""
    return CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=spec.text_max_length,
                          pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                          **spec.text_encoder)


def build_text_encoder(spec: ModelSpec, vocab_size: int, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> CLIPTextModel:
    """A freshly initialised CLIP text encoder; its output [B, text_max_length, hidden] feeds cross-attention."""
    cfg = text_encoder_config(spec, vocab_size)
    with _placement(device):
        model = CLIPTextModel(cfg)
    return _finish(model, device, dtype)


def param_count(module: torch.nn.Module) -> int:
    """Number of parameters (works on meta modules too)."""
    return sum(p.numel() for p in module.parameters())
