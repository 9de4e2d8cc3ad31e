"""A FLUX.1 workload's models and one step's loss for the profiler: the published configs, no weights.

The transformer, and when the plan does not cache their outputs the VAE, CLIP-L and T5-XXL, are built
from the configs lowvram ships (``single_file_configs/flux-*``); the step runs FLUX.1's own training
loss (``lowvram.models.flux_cond.training_loss``), the function training calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..card import CardSpec
from ..models import flux
from ..models.flux_lora_keys import lora_target_names
from ..models.pretrained import CONFIGS_DIR


def build_vae(variant: str, device: str | torch.device, dtype: torch.dtype,
              overrides: dict[str, Any] | None = None) -> nn.Module:
    """The published VAE (or a checkpoint's own config, ``overrides``) in the dtype ``models.flux.load_vae`` gives
    it: ``dtype``, or fp32 over fp16 when its config asks (``force_upcast``)."""
    from diffusers import AutoencoderKL

    cfg = {**dict(AutoencoderKL.load_config(CONFIGS_DIR / variant / "vae")), **(overrides or {})}
    with torch.device(device):
        vae = AutoencoderKL.from_config(cfg)
    if dtype == torch.float16 and cfg.get("force_upcast", False):
        dtype = torch.float32
    # nn.Module.to: diffusers' own .to(dtype) warns about an empty list of fp32 modules on every cast
    return nn.Module.to(vae, dtype).requires_grad_(False)


def _text_encoders(variant: str, device: str | torch.device, dtype: torch.dtype,
                   overrides: tuple[dict[str, Any], ...] = ()) -> dict[str, nn.Module]:
    """CLIP-L and T5-XXL from the published configs, or a checkpoint's own (``overrides``: CLIP's, T5's)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = CONFIGS_DIR / variant
    if overrides:
        clip_cfg, t5_cfg = CLIPTextConfig(**overrides[0]), T5Config(**overrides[1])
    else:
        clip_cfg, t5_cfg = CLIPTextConfig.from_pretrained(root / "text_encoder"), T5Config.from_pretrained(root / "text_encoder_2")
    with torch.device(device):
        clip = CLIPTextModel(clip_cfg)
        t5 = T5EncoderModel(t5_cfg)
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
    """The transformer with its LoRA, the VAE (kept for previews) and CLIP-L and T5-XXL: for the caching pass
    (``cache_encoders``, dropped after it), or beside the transformer when a profile runs with memory.cache_text
    off. The helpers load in the frozen dtype, as ``families.flux`` loads them (fp8 stores them in fp16)."""
    from ..quant import store_frozen_unet
    from ..train.finetune_models import LOAD_DTYPES
    from .workloads import Built, attach_lora

    helper_dtype = LOAD_DTYPES[knobs.frozen_dtype]
    variant = workload.model
    model = flux.build_transformer(variant, device, workload.unet_overrides)
    vae = build_vae(variant, device, helper_dtype, workload.vae_overrides)
    no_text = knobs.cache_text and not workload.caching_pass  # nothing encodes text: no text encoder is built
    encoders = [] if no_text else list(_text_encoders(variant, device, helper_dtype,
                                                      workload.text_encoder_overrides).values())
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # FLUX.1's VAE: 8x down, 16 channels
    side = workload.resolution // factor
    latent = (model.config.in_channels // 4, side, side)
    targets = tuple(n for n in lora_target_names(model, modulation=True) if n.split(".", 2)[2] in workload.lora_targets)
    trainable = attach_lora(model, workload.lora_rank, targets, workload.lora_dropout, adapter=workload.adapter)
    stored = store_frozen_unet(model, knobs.frozen_dtype, compute)
    tokens = workload.text_tokens or flux.MAX_SEQUENCE_LENGTH[variant]
    cached = knobs.cache_text  # the FLUX.1 job drops CLIP-L and T5 once their outputs are cached
    return Built(model, trainable, {"unet": model}, vae, [] if cached else encoders, False, latent, tokens,
                 prediction="flow", vae_factor=factor, notes=[f"frozen transformer weights: {stored}"],
                 step_loss=step_loss, cache_encoders=encoders if cached else [])


def _own_configs(cfg: Any) -> tuple[dict[str, Any], dict[str, Any], tuple[dict[str, Any], ...]]:
    """The checkpoint's own transformer, VAE and (CLIP, T5) configs where a diffusers folder (``model.pretrained``
    or ``model.config``) has them; {} / () where the published ones apply."""
    from .run_workload import _folder_config

    for folder in (cfg.model.pretrained, cfg.model.config):
        if folder and (Path(folder) / "transformer" / "config.json").is_file():
            tes = (_folder_config(folder, "text_encoder"), _folder_config(folder, "text_encoder_2"))
            return (_folder_config(folder, "transformer"), _folder_config(folder, "vae"),
                    tes if all((Path(folder) / sub / "config.json").is_file() for sub in ("text_encoder", "text_encoder_2"))
                    else ())
    return {}, {}, ()


def _t5_tokens(cfg: Any, variant: str) -> int:
    """The T5 sequence the run encodes (``FluxFamily.bind``): the variant's length, or the tokenizer's own limit
    where it is shorter (a tokenizer folder's ``model_max_length``)."""
    length = flux.MAX_SEQUENCE_LENGTH[variant]
    m = cfg.model
    for path in (Path(m.t5_tokenizer) if m.t5_tokenizer else None,
                 *(Path(f) / "tokenizer_2" for f in (m.pretrained, m.config) if f)):
        if path is not None and (path / "tokenizer_config.json").is_file():
            limit = json.loads((path / "tokenizer_config.json").read_text()).get("model_max_length") or length
            return min(length, int(limit))
    return length


def flux_targets(kind: str) -> tuple[str, ...]:
    """The block layers a FLUX.1 LoRA adapts for ``lora.targets``: all, or the ``attn.*`` projections only
    (``models.flux_lora_keys.lora_target_names``' rule)."""
    from .workloads import FLUX_LORA_TARGETS

    return tuple(t for t in FLUX_LORA_TARGETS if t.startswith("attn.")) if kind == "attention" else FLUX_LORA_TARGETS


def workload_of_run(cfg: Any, batch: int, prior: str = "", **common: Any) -> Any:
    """The planner's Workload for a FLUX.1 LoRA run: the model's own configs (a diffusers folder's, or
    ``model.config``'s for a single file, else the published ones), its T5 length, rank and resolution;
    ``common``: the Workload fields every job carries (EMA, previews, gradient clipping...)."""
    from ..families.flux_rules import check_flux_config
    from .run_workload import text_cache_batch
    from .workloads import Workload

    check_flux_config(cfg)  # what FLUX.1 cannot train is refused before any profiling
    variant = flux.detect_variant(cfg.model.pretrained)
    transformer, vae, tes = _own_configs(cfg)
    res = int(cfg.data.resolution)
    return Workload("this job", f"{variant} LoRA rank {cfg.lora.rank}, {res}²{prior}", variant, "lora", res, batch,
                    lora_rank=cfg.lora.rank, lora_targets=flux_targets(cfg.lora.targets), unet_overrides=transformer,
                    vae_overrides=vae, text_encoder_overrides=tes, text_tokens=_t5_tokens(cfg, variant),
                    text_cache_batch=text_cache_batch(cfg), **common)


def safe_precision(cfg: Any, card: CardSpec | None) -> list[str]:
    """FLUX.1's activations overflow fp16: compute in bf16 where the card has it, else fp32 (gfx803, GTX 16xx,
    where fp16 is no faster). Changes ``cfg.train.precision`` in place (the plan's copy of the config);
    returns the note saying so."""
    if cfg.train.precision != "fp16" or card is None:
        return []
    cfg.train.precision = "bf16" if getattr(card, "bf16", False) else "fp32"
    return [f"compute in {cfg.train.precision}, not fp16: FLUX.1's activations overflow fp16"
            + ("" if cfg.train.precision == "bf16" else " and this card has no bf16")]
