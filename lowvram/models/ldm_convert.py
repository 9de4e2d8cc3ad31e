"""Diffusers → original (LDM / A1111 / ComfyUI) key names for SD 1.x, 2.x and SDXL.

diffusers ships the reverse direction as library functions but this one only as scripts, so the
mapping lives here, generic over block counts; tests check it by converting back with diffusers' own
``convert_ldm_*`` functions. Also used for kohya SDXL LoRA names (``input_blocks_4_1_…``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    # family → LDM prefix of each text encoder (transformers-layout CLIP or OpenCLIP layout)
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "openclip"),
    },
}

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _cfg_key(cfg: Any) -> tuple:
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    lpb = get("layers_per_block")
    if not isinstance(lpb, int):
        raise ValueError(f"per-block layers_per_block {lpb!r} is not a Stable Diffusion layout")
    return len(get("block_out_channels")), lpb, tuple(get("down_block_types")), tuple(get("up_block_types"))


@lru_cache(maxsize=8)
def _unet_prefixes(n: int, lpb: int, down: tuple, up: tuple) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is_resnet) for every block of a UNet2DConditionModel layout."""
    m: list[tuple[str, str, bool]] = []
    for i in range(n):
        for j in range(lpb):
            m.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * (lpb + 1) + j}.0.", True))
            if "CrossAttn" in down[i]:
                m.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{1 + i * (lpb + 1) + j}.1.", False))
        if i < n - 1:
            m.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (lpb + 1)}.0.op.", False))
        for j in range(lpb + 1):
            m.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (lpb + 1) + j}.0.", True))
            if "CrossAttn" in up[i]:
                m.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (lpb + 1) + j}.1.", False))
        if i < n - 1:
            slot = 2 if "CrossAttn" in up[i] else 1
            m.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (lpb + 1) + lpb}.{slot}.", False))
    m.append(("mid_block.attentions.0.", "middle_block.1.", False))
    m += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", True) for j in range(2)]
    return m


def unet_key_to_ldm(key: str, unet_config: Any) -> str:
    """One diffusers UNet parameter (or module) name → its LDM name, without the ``model.diffusion_model.`` prefix."""
    for d, o in _UNET_TOP.items():
        if key.startswith(d):
            return o + key[len(d):]
    for d, o, is_res in _unet_prefixes(*_cfg_key(unet_config)):
        if key.startswith(d):
            rest = key[len(d):]
            if is_res:
                head, _, tail = rest.partition(".")
                rest = _RESNET.get(head, head) + ("." + tail if tail else "")
            return o + rest
    raise KeyError(f"no LDM name for UNet key '{key}'")


def unet_to_ldm(state: dict[str, torch.Tensor], unet_config: Any) -> dict[str, torch.Tensor]:
    return {UNET_PREFIX + unet_key_to_ldm(k, unet_config): v for k, v in state.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], vae_config: Any) -> dict[str, torch.Tensor]:
    """AutoencoderKL → LDM ``first_stage_model.*`` (mid attention as 1×1 convs, as the original)."""
    get = vae_config.get if isinstance(vae_config, dict) else (lambda k, d=None: getattr(vae_config, k, d))
    n = len(get("block_out_channels"))
    pre = [("encoder.mid_block.attentions.0.", "encoder.mid.attn_1."),
           ("decoder.mid_block.attentions.0.", "decoder.mid.attn_1.")]
    for part in ("encoder", "decoder"):
        pre += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.") for k in range(2)]
        pre.append((f"{part}.conv_norm_out.", f"{part}.norm_out."))
    for i in range(n):
        pre.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        pre.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        pre.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."))
        pre.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    out: dict[str, torch.Tensor] = {}
    for key, v in state.items():
        new = key
        for d, o in pre:
            if key.startswith(d):
                new = o + key[len(d):]
                break
        new = new.replace("conv_shortcut.", "nin_shortcut.")
        if ".mid.attn_1." in new:
            head, _, tail = new.partition(".mid.attn_1.")
            for d, o in attn.items():
                if tail.startswith(d):
                    tail = o + tail[len(d):]
            new = f"{head}.mid.attn_1.{tail}"
            if v.ndim == 2:  # the original uses 1×1 convolutions for q/k/v/proj_out
                v = v[:, :, None, None]
        out[VAE_PREFIX + new] = v
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel → LDM (same names under ``prefix`` + ``text_model.``)."""
    out = {}
    for k, v in state.items():
        if k == "text_projection.weight":  # SD 1.x / SDXL encoder 1 have no projection in the original
            continue
        out[prefix + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return out


def openclip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text model → OpenCLIP layout (fused in_proj, resblocks, transposed text_projection)."""
    s = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    simple = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    for d, o in simple.items():
        if d in s:
            out[prefix + o] = s[d]
    if "text_projection.weight" in s:
        out[prefix + "text_projection"] = s["text_projection.weight"].T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in s if k.startswith("encoder.layers.")})
    ren = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
           "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
    for i in range(len(layers)):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [s[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
        for k, v in s.items():
            if k.startswith(src):
                rest = k[len(src):]
                for d, o in ren.items():
                    if rest.startswith(d):
                        out[dst + o + rest[len(d):]] = v
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor], family: str, name: str) -> dict[str, torch.Tensor]:
    fam = "sd2" if family.startswith("sd2") else family
    prefix, kind = TEXT_PREFIXES[fam][name]
    return clip_to_ldm(state, prefix) if kind == "clip" else openclip_to_ldm(state, prefix)


def pipeline_to_ldm(unet: Any, vae: Any, text_encoders: dict[str, Any], family: str) -> dict[str, torch.Tensor]:
    """One A1111/ComfyUI single-file state dict from diffusers modules."""
    out = unet_to_ldm(unet.state_dict(), unet.config)
    out.update(vae_to_ldm(vae.state_dict(), vae.config))
    for name, te in text_encoders.items():
        if te is not None:
            out.update(text_encoder_to_ldm(te.state_dict(), family, name))
    return out
