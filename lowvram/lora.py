"""LoRA through peft: attach to the UNet / text encoders, save in diffusers (peft) and kohya formats, count.

Files written here load fully in diffusers (``load_lora_weights``), A1111 and ComfyUI. Loading a LoRA
can silently drop modules (REFERENCE.md trap), so every save can be checked by counting the LoRA
modules that come back against those written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError

# A1111/kohya's default set: every Linear / 1×1 conv inside the transformer blocks.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
# "LoCon": the 3×3 convolutions of the ResNet blocks and the down/up samplers.
UNET_CONV_PATTERN = re.compile(r"(^|\.)(resnets\.\d+\.conv[12]|(downsamplers|upsamplers)\.0\.conv)$")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
TEXT_NAMES = ("text_encoder", "text_encoder_2")
ADAPTER = "default"

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2", "sdxl": "sdxl_base_v1-0",
                      "flux-dev": "flux1", "flux-schnell": "flux1"}  # sd-scripts' flux_utils.MODEL_VERSION_FLUX_V1
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                  "sd2-v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base",
                  "flux-dev": "flux-1-dev", "flux-schnell": "flux-1-schnell"}


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


def _attach(model: nn.Module, names: list[str], rank: int, alpha: float, dropout: float, what: str) -> list[nn.Parameter]:
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if rank < 1:
        raise ModelLoadError(f"LoRA rank {rank} for the {what}", "set lora.rank to 1 or more")
    if not names:
        raise ModelLoadError(f"no LoRA target modules found in the {what}", "check lora target modules")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                        target_modules=names)
    model.requires_grad_(False)
    model.add_adapter(config)
    # trainable LoRA weights stay fp32 whatever the frozen dtype: fp16 updates underflow under GradScaler
    cast_training_params(model, dtype=torch.float32)
    return [p for p in model.parameters() if p.requires_grad]


def attach_lora(unet: nn.Module, rank: int, alpha: float, dropout: float = 0.0, conv: bool = False,
                target_modules: Iterable[str] | None = None) -> list[nn.Parameter]:
    """Add a peft LoRA adapter to the UNet (A1111's targets; ``conv`` adds 3×3 convs); returns the trainable params."""
    names = lora_target_names(unet, target_modules or UNET_TARGETS, conv)
    return _attach(unet, names, rank, alpha, dropout, "UNet")


def attach_text_lora(text_encoder: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                     target_modules: Iterable[str] | None = None) -> list[nn.Parameter]:
    """Add a peft LoRA adapter to a CLIP text encoder (attention and MLP projections)."""
    names = lora_target_names(text_encoder, target_modules or TEXT_TARGETS)
    return _attach(text_encoder, names, rank, alpha, dropout, "text encoder")


def count_loaded_modules(model: nn.Module | None) -> int:
    """How many modules of ``model`` carry a LoRA adapter (any adapter name)."""
    from peft.tuners.lora import LoraLayer

    if model is None:
        return 0
    return sum(1 for m in model.modules() if isinstance(m, LoraLayer) and len(m.lora_A) + len(m.lora_B) > 0)


def _component_models(model_or_pipe: Any) -> dict[str, nn.Module]:
    if isinstance(model_or_pipe, nn.Module):
        return {"unet": model_or_pipe}
    return {n: m for n in ("unet", *TEXT_NAMES) if (m := getattr(model_or_pipe, n, None)) is not None}


def _peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    if not getattr(model, "peft_config", None):
        return {}
    return {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def lora_state_dict_peft(unet: nn.Module, text_encoders: Mapping[str, nn.Module | None] | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights as peft keys (``unet.<module>.lora_A.weight``), unconverted: converting them with
    ``convert_state_dict_to_diffusers`` makes diffusers drop the attention keys on load (REFERENCE.md)."""
    out = {f"unet.{k}": v for k, v in _peft_state(unet).items()}
    for name, te in (text_encoders or {}).items():
        if te is not None:
            out.update({f"{name}.{k}": v for k, v in _peft_state(te).items()})
    return out


def split_components(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"unet": {...}, "text_encoder": {...}}`` from a flat prefixed state dict."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        comp, _, rest = k.partition(".")
        out.setdefault(comp, {})[rest] = v
    return out


def _adapter_alpha(model: nn.Module | None) -> tuple[int, float] | None:
    cfg = getattr(model, "peft_config", {}).get(ADAPTER) if model is not None else None
    return (cfg.r, float(cfg.lora_alpha)) if cfg is not None else None


def _meta_strings(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_lora_diffusers(path: str | Path, unet: nn.Module, text_encoders: Mapping[str, nn.Module | None] | None = None,
                        family: str = "sd1", metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the LoRA as diffusers/peft ``.safetensors`` (what ``pipeline.load_lora_weights`` reads), with rank/alpha.

    Written by diffusers' own ``save_lora_weights`` (so the header carries the adapter config that makes
    alpha ≠ rank load right), then ``metadata`` is added to the header.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "pytorch_lora_weights.safetensors"
    tes = {k: v for k, v in (text_encoders or {}).items() if v is not None and getattr(v, "peft_config", None)}
    layers = {"unet_lora_layers": _peft_state(unet),
              "unet_lora_adapter_metadata": unet.peft_config[ADAPTER].to_dict()}
    for name, te in tes.items():
        layers[f"{name}_lora_layers"] = _peft_state(te)
        layers[f"{name}_lora_adapter_metadata"] = te.peft_config[ADAPTER].to_dict()
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    if "text_encoder_2_lora_layers" in layers and cls is StableDiffusionPipeline:
        raise ModelLoadError("a second text encoder LoRA given for a non-SDXL model", "pass family='sdxl'")
    return write_with_diffusers(cls, path, layers, metadata, family)


def write_with_diffusers(pipeline_cls: Any, path: Path, layers: dict[str, Any], metadata: Mapping[str, Any] | None,
                         family: str) -> Path:
    """``pipeline_cls.save_lora_weights(**layers)`` (diffusers writes its own format and adapter config),
    then ``metadata`` added to the header and the file moved to ``path`` atomically."""
    from safetensors import safe_open

    tmp_dir = path.parent / (path.name + ".parts")
    pipeline_cls.save_lora_weights(tmp_dir, weight_name="lora.safetensors", **layers)
    with safe_open(str(tmp_dir / "lora.safetensors"), framework="pt") as f:
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header.update(_meta_strings(metadata))
    header.setdefault("lowvram_family", family)
    _atomic_save(tensors, path, header)
    (tmp_dir / "lora.safetensors").unlink()
    tmp_dir.rmdir()
    return path


# ---------------------------------------------------------------------------------------------
# kohya format


def _kohya_module(component: str, module: str, family: str, unet_config: Any) -> str:
    if component == "unet":
        if family == "sdxl":  # kohya's SDXL UNet uses the original (LDM) block names
            from .models.ldm_convert import unet_key_to_ldm

            module = unet_key_to_ldm(module + ".weight", unet_config).removesuffix(".weight")
        return "lora_unet_" + module.replace(".", "_")
    if not module.startswith("text_model."):  # transformers ≥ 5.6 flattens CLIPTextModel
        module = "text_model." + module
    prefix = {"text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + module.replace(".", "_")


def _default_unet_config(family: str) -> dict[str, Any]:
    from .models.pretrained import CONFIGS_DIR

    return json.loads((CONFIGS_DIR / family / "unet" / "config.json").read_text())


def to_kohya(state: Mapping[str, torch.Tensor], family: str, alphas: Mapping[str, float],
             unet_config: Any | None = None) -> dict[str, torch.Tensor]:
    """peft keys (``unet.<module>.lora_A.weight``) → kohya keys with a per-module ``.alpha``."""
    if family == "sdxl" and unet_config is None:
        unet_config = _default_unet_config("sdxl")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        component, _, rest = key.partition(".")
        m = re.match(r"(.+)\.lora_([AB])\.weight$", rest)
        if m is None:
            raise ModelLoadError(f"unexpected LoRA key '{key}' (not a peft lora_A/lora_B weight)",
                                 "export LoRA files written by lowvram or diffusers")
        name = _kohya_module(component, m.group(1), family, unet_config)
        out[f"{name}.{'lora_down' if m.group(2) == 'A' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alphas[component]))
    return out


def kohya_metadata(family: str, rank: int, alpha: float, steps: int | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``ss_*`` header keys kohya's tools, A1111's and ComfyUI's LoRA browsers read."""
    from . import __version__

    meta = {
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_v2": str(family.startswith("sd2")),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_training_comment": f"trained with lowvram {__version__}",
        "modelspec.architecture": MODELSPEC_ARCH[family] + "/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "lowvram_version": __version__,
    }
    if steps is not None:
        meta["ss_steps"] = str(steps)
    meta.update(_meta_strings(extra))
    return meta


def save_lora_kohya(path: str | Path, unet_sd: Mapping[str, torch.Tensor],
                    te_sd: Mapping[str, Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor] | None,
                    family: str, metadata: Mapping[str, Any] | None = None, *, alpha: float, rank: int | None = None,
                    te_alpha: float | None = None, unet_config: Any | None = None, steps: int | None = None) -> Path:
    """Write a kohya-format LoRA (``lora_unet_…``/``lora_te…``) with ``ss_*`` metadata.

    ``unet_sd``/``te_sd`` are peft state dicts without component prefix; ``te_sd`` is either one text
    encoder's dict or ``{"text_encoder": …, "text_encoder_2": …}``.
    """
    state = {f"unet.{k}": v for k, v in unet_sd.items()}
    if te_sd:
        per = te_sd if set(te_sd) <= set(TEXT_NAMES) else {"text_encoder": te_sd}
        for name, sd in per.items():
            state.update({f"{name}.{k}": v for k, v in sd.items()})
    alphas = {"unet": alpha, "text_encoder": te_alpha or alpha, "text_encoder_2": te_alpha or alpha}
    if rank is None:
        rank = next((v.shape[0] for k, v in unet_sd.items() if ".lora_A." in k), 0)
    tensors = to_kohya(state, family, alphas, unet_config)
    path = Path(path)
    _atomic_save(tensors, path, kohya_metadata(family, rank, alpha, steps, metadata))
    return path


def save_lora_kohya_from_models(path: str | Path, unet: nn.Module,
                                text_encoders: Mapping[str, nn.Module | None] | None = None, family: str = "sd1",
                                metadata: Mapping[str, Any] | None = None, steps: int | None = None) -> Path:
    """kohya file straight from models carrying a peft adapter (rank/alpha read from the adapter)."""
    rank, alpha = _adapter_alpha(unet) or (0, 0.0)
    tes = {k: _peft_state(v) for k, v in (text_encoders or {}).items() if v is not None and _peft_state(v)}
    te_alpha = next((a[1] for v in (text_encoders or {}).values() if (a := _adapter_alpha(v))), None)
    return save_lora_kohya(path, _peft_state(unet), tes, family, metadata, alpha=alpha, rank=rank,
                           te_alpha=te_alpha, unet_config=unet.config, steps=steps)


# ---------------------------------------------------------------------------------------------
# reading back and counting


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of a LoRA ``.safetensors`` file."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"LoRA file '{p}' does not exist", "check the path")
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors' own error types
        raise ModelLoadError(f"'{p}' is not a readable .safetensors LoRA: {e}", "check the file") from None


def count_saved_modules(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """LoRA modules per component in a peft/diffusers or kohya state dict."""
    counts: dict[str, set[str]] = {}
    for k in state:
        m = re.match(r"(unet|text_encoder_2|text_encoder)\.(.+)\.lora_[AB]\.weight$", k)
        if m:
            counts.setdefault(m.group(1), set()).add(m.group(2))
            continue
        m = re.match(r"(lora_unet|lora_te2|lora_te1|lora_te)_(.+)\.lora_(down|up)\.weight$", k)
        if m:
            comp = {"lora_unet": "unet", "lora_te2": "text_encoder_2"}.get(m.group(1), "text_encoder")
            counts.setdefault(comp, set()).add(m.group(2))
    return {k: len(v) for k, v in counts.items()}


def ensure_lora_loaded(model_or_pipe: Any, expected: Mapping[str, int] | str | Path) -> dict[str, int]:
    """Raise unless every LoRA module written (``expected`` counts, or the file) was loaded back.

    Returns the loaded counts per component. diffusers can drop keys silently on load; this makes it loud.
    """
    if isinstance(expected, str | Path):
        expected = count_saved_modules(read_lora_file(expected)[0])
    models = _component_models(model_or_pipe)
    loaded = {name: count_loaded_modules(models.get(name)) for name in expected}
    short = {n: (loaded[n], c) for n, c in expected.items() if loaded[n] < c}
    if short:
        detail = ", ".join(f"{n}: {got} of {want}" for n, (got, want) in short.items())
        raise ModelLoadError(
            f"LoRA loaded only partly ({detail} modules)",
            "the file's key names do not match this model; re-export it with `lowvram export` or check the base model",
        )
    return loaded


def load_lora_into(unet: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Put saved peft LoRA weights (unprefixed keys) into a UNet already carrying a matching adapter (resume)."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, dict(state), adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise ModelLoadError(f"{len(unexpected)} LoRA weights do not fit this model (e.g. {unexpected[:2]})",
                             "resume with the same lora.rank, lora.conv and base model")
