"""Build what a from-scratch run trains: UNet, text encoder, tokenizer, (frozen) VAE, noise schedule.

Decisions about dtypes and devices come from the config and the plan, in one place, not from the loop.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..attention import set_attention
from ..config import RunConfig
from ..diffusion import make_scheduler_config
from ..errors import ConfigError, ModelLoadError
from ..fsutil import write_text_atomic
from ..models import scratch
from ..models.tokenizer import build_tokenizer


@dataclass
class Components:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    vae: torch.nn.Module | None
    scheduler_config: dict[str, Any]
    alphas_cumprod: torch.Tensor
    sample_shape: tuple[int, int, int]
    latent_scale: float
    train_text_encoder: bool

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        mods = {"unet": self.unet}
        if self.train_text_encoder:
            mods["text_encoder"] = self.text_encoder
        return mods


def resolve_device(name: str) -> torch.device:
    """``auto`` → the GPU when torch sees one (CUDA or ROCm), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda' but torch sees no GPU", "use --set run.device=cpu or run `lowvram doctor`")
    return torch.device(name)


def model_spec(cfg: RunConfig) -> scratch.ModelSpec:
    return scratch.get_spec(cfg.model.size)


def resolve_defaults(cfg: RunConfig) -> RunConfig:
    """Fill values that depend on other values (resolution from the model size) in a RunConfig made by
    hand; a built one (ConfigBuilder, lowvram.api.resolve) has them already and is left as it is."""
    if cfg.data.resolution is None:
        from ..config import default_resolution

        cfg.data.resolution = (default_resolution(cfg.run.task, cfg.model.size, cfg.model.pretrained)
                               or model_spec(cfg).resolution)
    return cfg


def unet_shape(cfg: RunConfig, spec: scratch.ModelSpec, latent: bool) -> tuple[int, int, int]:
    """(C, H, W) the UNet denoises: pixels, or the autoencoder's latents."""
    res = cfg.data.resolution or spec.resolution
    if not latent:
        return (3, res, res)
    if spec.vae is None:
        raise ConfigError(f"model size '{cfg.model.size}' has no autoencoder", "use --task text2img or another size")
    side = res // 2 ** (len(spec.vae["block_out_channels"]) - 1)
    return (spec.latent_channels, side, side)


def build_components(
    cfg: RunConfig,
    captions: list[str],
    device: torch.device,
    *,
    vae: torch.nn.Module | None = None,
    latent_scale: float = 1.0,
    tokenizer: Any = None,
) -> Components:
    """Fresh models for a from-scratch run (weights seeded by ``run.seed``)."""
    spec = model_spec(cfg)
    latent = cfg.run.task == "latent"
    shape = unet_shape(cfg, spec, latent)
    torch.manual_seed(cfg.run.seed)
    if cfg.model.text_encoder:
        text_encoder, tokenizer = load_text_encoder(cfg.model.text_encoder)
        train_te = False
    else:
        if tokenizer is None:
            tokenizer = build_tokenizer(captions, spec.text_max_length)
        text_encoder = scratch.build_text_encoder(spec, vocab_size=len(tokenizer))
        train_te = True
    # a pretrained text encoder may be wider than the size's own: cross-attention follows the encoder
    unet_spec = dataclasses.replace(spec, unet={**spec.unet, "cross_attention_dim": text_encoder.config.hidden_size})
    unet = scratch.build_unet(unet_spec, task="latent" if latent else "text2img")
    set_attention(unet, cfg.memory.attention, cfg.memory.attention_chunk, card=attention_card(device))
    # pixel-space samplers may clip x0 to the image range; latents have no fixed range
    sched = make_scheduler_config(cfg.model.schedule, cfg.model.timesteps, cfg.model.prediction,
                                  clip_sample=not latent, zero_terminal_snr=cfg.model.zero_terminal_snr)
    from diffusers import DDPMScheduler

    acp = DDPMScheduler.from_config(sched).alphas_cumprod.float()
    return Components(
        unet=unet.to(device),
        text_encoder=text_encoder.to(device).requires_grad_(train_te),
        tokenizer=tokenizer,
        vae=vae.requires_grad_(False).eval() if vae is not None else None,  # where the caller put it
        scheduler_config=sched,
        alphas_cumprod=acp,
        sample_shape=shape,
        latent_scale=latent_scale,
        train_text_encoder=train_te,
    )


def attention_card(device: torch.device) -> Any:
    """What decides ``memory.attention: auto``: the CPU's SDPA kernel is O(N) memory; a GPU is probed."""
    if device.type == "cpu":
        return {"flash_attention": True}
    from ..hardware import probe

    return probe()


def load_text_encoder(path: str) -> tuple[torch.nn.Module, Any]:
    """A local pretrained CLIP text encoder folder with its tokenizer (frozen)."""
    from transformers import AutoTokenizer, CLIPTextModel

    p = Path(path)
    te_dir = p / "text_encoder" if (p / "text_encoder").is_dir() else p
    tok_dir = p / "tokenizer" if (p / "tokenizer").is_dir() else p
    try:
        te = CLIPTextModel.from_pretrained(te_dir, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load a CLIP text encoder from '{path}': {str(e).splitlines()[0]}",
            "give a local folder with config.json + weights and the tokenizer files (or text_encoder/ and tokenizer/)",
        ) from None
    return te.requires_grad_(False).eval(), tok


def load_vae(path: str) -> torch.nn.Module:
    """A local pretrained AutoencoderKL folder (or a diffusers pipeline folder with vae/)."""
    from diffusers import AutoencoderKL

    p = Path(path)
    vae_dir = p / "vae" if (p / "vae").is_dir() else p
    try:
        return AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load an autoencoder from '{path}': {str(e).splitlines()[0]}",
            "give a local diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)",
        ) from None


def save_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))
