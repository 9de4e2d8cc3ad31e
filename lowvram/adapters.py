"""Adapter types beside LoRA (LoHa, LoKr, DoRA): their peft configs, the tensors each saves, and their
kohya/LyCORIS names in the files A1111 and ComfyUI load.

All four train through peft (``LoraConfig``, ``LoraConfig(use_dora=True)``, ``LoHaConfig``, ``LoKrConfig``),
which lowvram already uses for LoRA: one attach/save/load path, adapters on diffusers and transformers
models alike, and state dicts whose tensor names are the LyCORIS ones (``hada_w1_a``, ``lokr_w1``, …). The
kohya-style file takes them as they are, with these differences (checked against ComfyUI's
``comfy/weight_adapter`` and LyCORIS' modules):

- DoRA: peft's magnitude ``lora_magnitude_vector`` (one norm per output row, as the DoRA paper's code,
  LyCORIS ≥ 3.2 ``wd_on_output`` and diffusers) is written as ``dora_scale`` shaped ``(out, 1[, 1, 1])``,
  LyCORIS' layout for output-axis decomposition.
- LoKr: peft scales by alpha/rank always; A1111/ComfyUI/LyCORIS scale by alpha/rank only when a factor
  is rank-decomposed (``lokr_w?_a/_b``), else by 1. For modules with two full factors the scale is baked
  into ``lokr_w1`` and no alpha is written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name for the one adapter lowvram trains


def _lora_config(rank: int, alpha: float, dropout: float, targets: list[str], dora: bool = False) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=targets, use_dora=dora)


def _loha_config(rank: int, alpha: float, dropout: float, targets: list[str]) -> Any:
    from peft import LoHaConfig

    # peft's dropouts for LoHa/LoKr act on the rank dimension (LyCORIS' rank_dropout)
    return LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=targets)


def _lokr_config(rank: int, alpha: float, dropout: float, targets: list[str]) -> Any:
    from peft import LoKrConfig

    return LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=targets)


def _dora_scale(name: str, value: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's DoRA magnitude ((out,) for Linear, (1, out, 1, 1) for Conv2d) → LyCORIS' ``dora_scale`` (out, 1, ...)."""
    ndim = like["lora_A.weight"].ndim
    return {"dora_scale": value.reshape(-1, *[1] * (ndim - 1))}


def _lokr_module(tensors: dict[str, torch.Tensor], alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """LyCORIS applies alpha/rank only to a rank-decomposed factor: bake peft's scale when both are full."""
    if "lokr_w1_b" in tensors or "lokr_w2_b" in tensors:
        return {**tensors, "alpha": torch.tensor(float(alpha))}
    return {**tensors, "lokr_w1": tensors["lokr_w1"] * (alpha / rank)}


def _with_alpha(tensors: dict[str, torch.Tensor], alpha: float, rank: int) -> dict[str, torch.Tensor]:
    return {**tensors, "alpha": torch.tensor(float(alpha))}


@dataclass(frozen=True)
class AdapterType:
    """One adapter type: how peft makes it and how its tensors are named in a kohya/LyCORIS file."""

    name: str
    make_config: Callable[[int, float, float, list[str]], Any]
    # peft tensor suffix → kohya suffix (a callable makes a suffix → tensor mapping from the module's tensors)
    kohya_names: dict[str, str | Callable[..., dict[str, torch.Tensor]]]
    # the tensor suffixes (peft and kohya naming) of which every adapted module has exactly one: to count modules
    marker: tuple[str, ...]
    finish_module: Callable[[dict[str, torch.Tensor], float, int], dict[str, torch.Tensor]] = _with_alpha
    network_args: dict[str, str] = field(default_factory=dict)  # kohya's ss_network_args (LyCORIS algo)


_LORA_NAMES: dict[str, Any] = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

ADAPTERS: dict[str, AdapterType] = {
    "lora": AdapterType("lora", _lora_config, _LORA_NAMES, ("lora_A.weight", "lora_down.weight")),
    "loha": AdapterType("loha", _loha_config, {n: n for n in _HADA}, ("hada_w1_a",),
                        network_args={"algo": "loha"}),
    "lokr": AdapterType("lokr", _lokr_config, {n: n for n in _LOKR}, ("lokr_w1", "lokr_w1_a"),
                        _lokr_module, network_args={"algo": "lokr"}),
    "dora": AdapterType("dora", lambda r, a, d, t: _lora_config(r, a, d, t, dora=True),
                        {**_LORA_NAMES, "lora_magnitude_vector": _dora_scale}, ("lora_A.weight", "lora_down.weight"),
                        network_args={"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}),
}
ADAPTER_TYPES = tuple(ADAPTERS)
# every peft tensor suffix any type saves, longest first (``lokr_w1_a`` before ``lokr_w1``)
PEFT_SUFFIXES = tuple(sorted({s for t in ADAPTERS.values() for s in t.kohya_names}, key=len, reverse=True))


def adapter_config(kind: str, rank: int, alpha: float, dropout: float, targets: list[str]) -> Any:
    """The peft config of adapter type ``kind`` on the modules ``targets``."""
    return ADAPTERS[kind].make_config(rank, alpha, dropout, targets)


def type_of_config(config: Any) -> str:
    """lora, dora, loha or lokr, from a peft config (or its ``to_dict()``)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    peft_type = str(getattr(get("peft_type"), "value", get("peft_type")) or "LORA").upper()
    kind = {"LOHA": "loha", "LOKR": "lokr"}.get(peft_type, "lora")
    return "dora" if kind == "lora" and get("use_dora", False) else kind


def type_of_model(model: nn.Module | None) -> str | None:
    cfg = getattr(model, "peft_config", {}).get(ADAPTER) if model is not None else None
    return type_of_config(cfg) if cfg is not None else None


def rank_alpha(config: Any) -> tuple[int, float]:
    """(rank, alpha) of any of the four configs (LoRA calls alpha ``lora_alpha``)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    alpha = get("lora_alpha") if get("lora_alpha") is not None else get("alpha")
    return int(get("r")), float(alpha)


def split_peft_key(key: str) -> tuple[str, str] | None:
    """``(module, suffix)`` of a peft adapter tensor name (``…to_q.hada_w1_a`` → ``(…to_q, hada_w1_a)``)."""
    for suffix in PEFT_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def type_of_state(state: Mapping[str, torch.Tensor]) -> str:
    """The adapter type of a peft/diffusers or kohya state dict, from its tensor names."""
    names = {k.rsplit(".", 1)[-1] for k in state}
    if any(n.startswith("hada_") for n in names):
        return "loha"
    if any(n.startswith("lokr_") for n in names):
        return "lokr"
    return "dora" if {"lora_magnitude_vector", "dora_scale"} & names else "lora"


def kohya_module_tensors(kind: str, tensors: Mapping[str, torch.Tensor], alpha: float,
                         rank: int) -> dict[str, torch.Tensor]:
    """One adapted module's peft tensors (by suffix) → its kohya/LyCORIS tensors (by suffix, alpha included)."""
    spec = ADAPTERS[kind]
    out: dict[str, torch.Tensor] = {}
    for suffix, value in tensors.items():
        name = spec.kohya_names[suffix]
        out.update(name(suffix, value, tensors) if callable(name) else {name: value})
    return spec.finish_module(out, alpha, rank)


def is_marker(suffix: str) -> bool:
    """True for the one tensor suffix per adapted module (peft or kohya naming) that counts the module."""
    return suffix in {m for t in ADAPTERS.values() for m in t.marker}


def count_adapter_modules(model: nn.Module | None) -> int:
    """How many modules of ``model`` carry an adapter of any of the four types (any adapter name)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if model is None:
        return 0
    return sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer)
               and any(len(getattr(m, n, {})) for n in m.adapter_layer_names))


def weight_readers(model: nn.Module) -> list[nn.Module]:
    """Base layers whose weight their adapter reads in forward (DoRA's weight norm), not only their output."""
    return [m.get_base_layer() for m in model.modules() if any(getattr(m, "use_dora", {}).values())]


def merge_adapters(model: nn.Module, scale: float = 1.0) -> int:
    """Fold every peft adapter of ``model`` (times ``scale``) into its base weights and remove the adapter
    layers; returns how many.

    peft's ``merge_and_unload`` needs a ``PeftModel``; adapters injected into diffusers/transformers models
    (``add_adapter``) have none, so each tuner layer is merged and replaced by its base layer here."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        if scale != 1.0:
            layer.scale_layer(scale)
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
    return len(layers)
