"""Attaches a peft adapter (LoRA, LoHa, LoKr, DoRA) to the UNet or a CLIP text encoder: which modules it adapts
(A1111's targets, optionally the 3×3 convs) and the trainable parameters it adds."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from .adapters import ADAPTERS, count_adapter_modules
from .errors import ModelLoadError
from .models.key_names import target_suffix

# A1111/kohya's default set: every Linear / 1×1 conv inside the transformer blocks.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
# lora.targets=attention: the attention projections only (diffusers' train_text_to_image_lora.py adapts these)
UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def unet_targets(kind: str) -> tuple[str, ...]:
    """The module-name suffixes a UNet adapter adapts for ``lora.targets`` (``all`` or ``attention``)."""
    return UNET_ATTENTION_TARGETS if kind == "attention" else UNET_TARGETS


# "LoCon": the 3×3 convolutions of the ResNet blocks and the down/up samplers.
UNET_CONV_PATTERN = re.compile(r"(^|\.)(resnets\.\d+\.conv[12]|(downsamplers|upsamplers)\.0\.conv)$")


TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


TEXT_NAMES = ("text_encoder", "text_encoder_2")


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_target_names(model: nn.Module, targets: Iterable[str], conv: bool = False) -> list[str]:
    """Full names of the modules a LoRA with these suffix ``targets`` (+ 3×3 convs) adapts."""
    targets = tuple(targets)
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear | nn.Conv2d) and _matches(name, targets):
            names.append(name)
        elif conv and isinstance(mod, nn.Conv2d) and UNET_CONV_PATTERN.search(name):
            names.append(name)
    return names


def _attach(model: nn.Module, names: list[str], rank: int, alpha: float, dropout: float, what: str,
            adapter: str) -> list[nn.Parameter]:
    from diffusers.training_utils import cast_training_params

    from .adapters import adapter_config

    if rank < 1:
        raise ModelLoadError(f"LoRA rank {rank} for the {what}", "set lora.rank to 1 or more")
    if not names:
        raise ModelLoadError(f"no LoRA target modules found in the {what}", "check lora target modules")
    if adapter not in ADAPTERS:
        raise ModelLoadError(f"unknown adapter type '{adapter}'", f"set lora.type to one of {', '.join(ADAPTERS)}")
    config = adapter_config(adapter, rank, alpha, dropout, names)
    model.requires_grad_(False)
    model.add_adapter(config)
    # trainable LoRA weights stay fp32 whatever the frozen dtype: fp16 updates underflow under GradScaler
    cast_training_params(model, dtype=torch.float32)
    return [p for p in model.parameters() if p.requires_grad]


def attach_lora(unet: nn.Module, rank: int, alpha: float, dropout: float = 0.0, conv: bool = False,
                target_modules: Iterable[str] | None = None, adapter: str = "lora") -> list[nn.Parameter]:
    """Add a peft adapter (``adapter``: lora, loha, lokr, dora) to the UNet (A1111's targets; ``conv`` adds 3×3
    convs); returns the trainable params."""
    names = lora_target_names(unet, target_modules or UNET_TARGETS, conv)
    return _attach(unet, names, rank, alpha, dropout, "UNet", adapter)


def attach_text_lora(text_encoder: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                     target_modules: Iterable[str] | None = None, adapter: str = "lora") -> list[nn.Parameter]:
    """Add a peft adapter to a CLIP text encoder (attention and MLP projections).

    Targets are named without ``text_model.`` so that the config saved with the file matches the modules on
    transformers 4.x and 5.x alike (peft matches target names as suffixes)."""
    names = [target_suffix(n) for n in lora_target_names(text_encoder, target_modules or TEXT_TARGETS)]
    return _attach(text_encoder, names, rank, alpha, dropout, "text encoder", adapter)


def count_loaded_modules(model: nn.Module | None) -> int:
    """How many modules of ``model`` carry an adapter (LoRA, LoHa, LoKr or DoRA; any adapter name)."""
    return count_adapter_modules(model)
