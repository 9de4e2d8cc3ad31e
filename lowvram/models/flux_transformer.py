"""FLUX.1's transformer from a BFL or ComfyUI state dict (fp8 and scaled fp8 dequantized, single blocks' linear1
split as diffusers expects) and, without weights, from its published config for the memory profiler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .flux_detect import VARIANTS
from .pretrained import CONFIGS_DIR, _build, _read_json

FLUX1_WIDTH = 3072  # diffusers' converter splits single blocks' linear1 assuming this width


def dequantize(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """ComfyUI "scaled fp8" (``<layer>.scale_weight`` beside each fp8 weight) → plain weights in ``dtype``.

    ComfyUI computes ``weight * scale_weight`` (comfy/ops.py scaled_fp8_op); tensors are converted one at
    a time so the peak is one layer in fp32, not the whole model.
    """
    if "scaled_fp8" not in state and not any(k.endswith(".scale_weight") for k in state):
        return state
    out = {}
    for k, v in state.items():
        if k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input")):
            continue
        scale = state.get(k.removesuffix("weight") + "scale_weight") if k.endswith(".weight") else None
        if scale is not None:
            s = scale.float().reshape(-1, *([1] * (v.ndim - 1))) if scale.numel() > 1 else scale.float()
            v = (v.float() * s).to(dtype)
        out[k] = v
    return out


def _split_linear1(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert BFL transformer keys to diffusers' with diffusers' converter, at any width.

    The converter splits each single block's fused ``linear1`` (q, k, v, mlp) at FLUX.1's width 3072,
    written into it: it gets a free ``meta`` placeholder of that shape, and the real tensor is split
    here by the file's own width (``img_in`` rows), so smaller test models take the same path.
    """
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers as convert,
    )

    width = state["img_in.weight"].shape[0]
    fused = {k: state.pop(k) for k in [k for k in state if k.startswith("single_blocks.") and ".linear1." in k]}
    for k, t in fused.items():
        state[k] = torch.empty((7 * FLUX1_WIDTH, *t.shape[1:]), device="meta")
    out = convert(state)
    for k, t in fused.items():
        block, kind = k.split(".")[1], k.rsplit(".", 1)[1]
        parts = torch.split(t, [width, width, width, t.shape[0] - 3 * width])
        for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts, strict=True):
            out[f"single_transformer_blocks.{block}.{name}.{kind}"] = part
    return out


def _transformer_config(cfg_dir: Path, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The config at ``cfg_dir``, with block counts and widths read from the file's shapes (variants differ)."""
    from diffusers import FluxTransformer2DModel

    cfg = dict(FluxTransformer2DModel.load_config(cfg_dir / "transformer"))
    head = state["double_blocks.0.img_attn.norm.key_norm.scale"].shape[0]
    width = state["img_in.weight"].shape[0]
    cfg.update(
        num_layers=1 + max(int(k.split(".")[1]) for k in state if k.startswith("double_blocks.")),
        num_single_layers=1 + max(int(k.split(".")[1]) for k in state if k.startswith("single_blocks.")),
        attention_head_dim=head, num_attention_heads=width // head,
        in_channels=state["img_in.weight"].shape[1], joint_attention_dim=state["txt_in.weight"].shape[1],
        pooled_projection_dim=state["vector_in.in_layer.weight"].shape[1],
        guidance_embeds="guidance_in.in_layer.weight" in state,
    )
    if sum(cfg["axes_dims_rope"]) != head:
        raise ModelLoadError(
            f"the file's attention heads are {head} wide but the config's rotary axes {cfg['axes_dims_rope']} "
            f"sum to {sum(cfg['axes_dims_rope'])}",
            "pass the model's diffusers config folder as model.config")
    return cfg


def _transformer_from_state(state: dict[str, torch.Tensor], cfg_dir: Path, dtype: torch.dtype, where: str) -> Any:
    from diffusers import FluxTransformer2DModel

    state = dequantize(state, dtype)
    try:
        cfg = _transformer_config(cfg_dir, state)
        converted = _split_linear1(state)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"'{where}' is not a complete FLUX.1 transformer: {str(e).splitlines()[0]}",
                             "check the download (the file may be truncated)") from None
    return _build(FluxTransformer2DModel, cfg, converted, dtype, "FLUX transformer")


def transformer_config(variant: str = "flux-dev") -> dict[str, Any]:
    """The published FLUX.1 transformer config (19 double + 38 single blocks, 3072 wide, 24 heads)."""
    if variant not in VARIANTS:
        raise ModelLoadError(f"unknown FLUX.1 variant '{variant}'", f"use one of {', '.join(VARIANTS)}")
    cfg = _read_json(CONFIGS_DIR / variant / "transformer" / "config.json")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build_transformer(variant: str = "flux-dev", device: str | torch.device = "meta",
                      overrides: dict[str, Any] | None = None) -> Any:
    """The FLUX.1 transformer created directly on ``device`` (``meta``: no bytes)."""
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        return FluxTransformer2DModel(**{**transformer_config(variant), **(overrides or {})})
