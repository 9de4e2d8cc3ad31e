"""FLUX.1 LoRA: the adapted layers, and the two file formats users load.

- diffusers/peft: ``transformer.<module>.lora_A.weight`` / ``lora_B`` with the adapter config in the
  header, written by diffusers' own ``FluxPipeline.save_lora_weights``: what ``load_lora_weights`` reads.
- kohya/BFL: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``lora_up`` / ``.alpha``, the
  names of the original model, as sd-scripts (networks/lora_flux.py, "make ComfyUI compatible") writes
  them and ComfyUI (comfy/lora.py model_lora_keys_unet: ``lora_unet_`` + the model's own key),
  Forge and diffusers load them. ComfyUI reads alpha from ``.alpha`` tensors only (not the header).

BFL fuses q, k, v of each attention (and, in single blocks, q, k, v with the MLP input) into one layer.
Separate adapters A_i (r × in), B_i (out_i × r) become one adapter of rank n·r with
down = cat(A_1 … A_n) and up = blockdiag(B_1 … B_n), alpha × n: up·down·(n·alpha)/(n·r) stacks
B_i·A_i·alpha/r, the exact update of each part. A part without an adapter gets zero rows. This is the
block structure sd-scripts' and diffusers' converters recognise and split back exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError
from ..fsutil import save_safetensors_atomic
from ..lora import ADAPTER, _adapter_alpha, _peft_state, kohya_metadata, write_with_diffusers

# diffusers' train_dreambooth_lora_flux.py defaults (attention + feed-forward of the double blocks) plus
# the single blocks' attention, MLP input and output; the AdaLN modulation linears are optional.
DOUBLE_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2")
SINGLE_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
DOUBLE_MODULATION = ("norm1.linear", "norm1_context.linear")
SINGLE_MODULATION = ("norm.linear",)
DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"

# diffusers layer inside a block → (BFL layer, part, parts): parts > 1 is a slice of a fused layer
# (the same table as ComfyUI's comfy/utils.py flux_to_diffusers and diffusers' single-file converter).
_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
DOUBLE_BFL: dict[str, tuple[str, int, int]] = {
    **{m: ("img_attn.qkv", i, 3) for i, m in enumerate(_QKV)},
    **{m: ("txt_attn.qkv", i, 3) for i, m in enumerate(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))},
    "attn.to_out.0": ("img_attn.proj", 0, 1), "attn.to_add_out": ("txt_attn.proj", 0, 1),
    "ff.net.0.proj": ("img_mlp.0", 0, 1), "ff.net.2": ("img_mlp.2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp.0", 0, 1), "ff_context.net.2": ("txt_mlp.2", 0, 1),
    "norm1.linear": ("img_mod.lin", 0, 1), "norm1_context.linear": ("txt_mod.lin", 0, 1),
}
SINGLE_BFL: dict[str, tuple[str, int, int]] = {
    **{m: ("linear1", i, 4) for i, m in enumerate((*_QKV, "proj_mlp"))},
    "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation.lin", 0, 1),
}
_BLOCK = re.compile(rf"^({DOUBLE}|{SINGLE})\.(\d+)\.(.+)$")


def lora_target_names(transformer: nn.Module, modulation: bool = False, attention_only: bool = False) -> list[str]:
    """Full names of the transformer's layers a FLUX.1 LoRA adapts (block layers only, never the embedders);
    ``attention_only`` (``lora.targets=attention``): the ``attn.*`` projections alone (a single block's
    ``proj_out`` mixes attention and MLP outputs, so it is left out)."""
    names = []
    for name, mod in transformer.named_modules():
        m = _BLOCK.match(name)
        if m is None or not isinstance(mod, nn.Linear):
            continue
        wanted = (DOUBLE_TARGETS + DOUBLE_MODULATION * modulation) if m.group(1) == DOUBLE \
            else (SINGLE_TARGETS + SINGLE_MODULATION * modulation)
        if m.group(3) in wanted and (not attention_only or m.group(3).startswith("attn.")):
            names.append(name)
    return names


def bfl_layer(module: str) -> tuple[str, int, int]:
    """``transformer_blocks.3.attn.to_k`` → (``double_blocks.3.img_attn.qkv``, part 1, of 3 parts)."""
    m = _BLOCK.match(module)
    table = DOUBLE_BFL if m and m.group(1) == DOUBLE else SINGLE_BFL
    if m is None or m.group(3) not in table:
        raise ModelLoadError(f"LoRA on '{module}' has no name in the original FLUX.1 layout",
                             "adapt only the transformer blocks' attention, MLP and modulation layers")
    layer, part, parts = table[m.group(3)]
    kind = "double_blocks" if m.group(1) == DOUBLE else "single_blocks"
    return f"{kind}.{m.group(2)}.{layer}", part, parts


def part_modules(module: str) -> list[str]:
    """The diffusers layers that make up ``module``'s BFL layer, in their fused order."""
    m = _BLOCK.match(module)
    layer, _, _ = bfl_layer(module)
    table = DOUBLE_BFL if m.group(1) == DOUBLE else SINGLE_BFL
    own = layer.split(".", 2)[2]
    parts = sorted((p, name) for name, (lay, p, _) in table.items() if lay == own)
    return [f"{m.group(1)}.{m.group(2)}.{name}" for _, name in parts]


def to_kohya(state: Mapping[str, torch.Tensor], alpha: float, out_features: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """peft keys (``<module>.lora_A.weight``, unprefixed) → kohya/BFL keys with ``.alpha``, fusing q/k/v exactly.

    ``out_features``: the output width of every block layer (a fused layer's parts without an adapter
    still take rows), as ``block_out_features`` gives them.
    """
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(r"(.+)\.lora_([AB])\.weight$", key)
        if m is None:
            raise ModelLoadError(f"unexpected LoRA key '{key}' (not a peft lora_A/lora_B weight)",
                                 "export LoRA files written by lowvram or diffusers")
        (downs if m.group(2) == "A" else ups)[m.group(1)] = value
    groups: dict[str, list[str]] = {}
    for module in downs:
        groups.setdefault(bfl_layer(module)[0], []).append(module)
    out: dict[str, torch.Tensor] = {}
    for layer, modules in groups.items():
        name = "lora_unet_" + layer.replace(".", "_")
        parts = part_modules(modules[0])
        present = [p for p in parts if p in downs]
        rank = downs[present[0]].shape[0]
        if any(downs[p].shape[0] != rank for p in present):
            raise ModelLoadError(f"the parts of {layer} have different LoRA ranks", "use one lora.rank for the whole model")
        down = torch.cat([downs[p] for p in present], dim=0)
        up = torch.zeros(sum(out_features[p] for p in parts), rank * len(present), dtype=ups[present[0]].dtype)
        row = 0
        for p in parts:
            if p in downs:
                col = present.index(p) * rank
                up[row:row + out_features[p], col:col + rank] = ups[p]
            row += out_features[p]
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(alpha) * len(present))
    return out


def block_out_features(transformer: nn.Module) -> dict[str, int]:
    """Output width of every Linear inside the transformer blocks (what ``to_kohya`` needs for fused layers)."""
    out = {}
    for name, mod in transformer.named_modules():
        m = _BLOCK.match(name)
        if m and m.group(3) in (DOUBLE_BFL if m.group(1) == DOUBLE else SINGLE_BFL):
            out[name] = getattr(mod, "base_layer", mod).out_features  # peft wraps the layer it adapts
    return out


def save_lora_diffusers(path: str | Path, transformer: nn.Module, variant: str = "flux-dev",
                        metadata: Mapping[str, Any] | None = None) -> Path:
    """The LoRA as diffusers writes it for FLUX.1 (``FluxPipeline.load_lora_weights`` reads it, alpha included)."""
    from diffusers import FluxPipeline

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "pytorch_lora_weights.safetensors"
    layers = {"transformer_lora_layers": _peft_state(transformer),
              "transformer_lora_adapter_metadata": transformer.peft_config[ADAPTER].to_dict()}
    return write_with_diffusers(FluxPipeline, path, layers, metadata, variant)


def save_lora_comfy(path: str | Path, transformer: nn.Module, variant: str = "flux-dev",
                    metadata: Mapping[str, Any] | None = None, steps: int | None = None) -> Path:
    """The LoRA in kohya/BFL names (ComfyUI, Forge, sd-scripts, diffusers), with sd-scripts' ``ss_*`` header."""
    from .. import __version__

    rank, alpha = _adapter_alpha(transformer) or (0, 0.0)
    tensors = to_kohya(_peft_state(transformer), alpha, block_out_features(transformer))
    extra = {"ss_network_module": "networks.lora_flux",
             "modelspec.implementation": "https://github.com/black-forest-labs/flux",
             "lowvram_version": __version__, **(metadata or {})}
    path = Path(path)
    save_safetensors_atomic(tensors, path, kohya_metadata(variant, rank, alpha, steps, extra))
    return path

