"""LoRA (and LoHa, LoKr, DoRA: ``adapters.py``) files through peft: save in diffusers (peft) and kohya formats,
read them back and count what loaded (attaching lives in ``lora_attach.py``, re-exported here).

Files written here load fully in diffusers (``load_lora_weights``; LoHa/LoKr: see ``adapters.py``), A1111
and ComfyUI. Loading a LoRA can silently drop modules (REFERENCE.md trap), so every save can be checked by
counting the adapted modules that come back against those written. Text-encoder keys are written in the
canonical ``text_model.`` layout whatever transformers is installed (``models/key_names.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import (
    ADAPTER,
    ADAPTERS,
    is_marker,
    kohya_module_tensors,
    rank_alpha,
    split_peft_key,
    type_of_model,
    type_of_state,
)
from .errors import ModelLoadError
from .fsutil import save_safetensors_atomic
from .lora_attach import (  # noqa: F401 (re-exported: the trainers and tests attach through lowvram.lora)
    TEXT_NAMES,
    TEXT_TARGETS,
    UNET_CONV_PATTERN,
    UNET_TARGETS,
    attach_lora,
    attach_text_lora,
    count_loaded_modules,
    lora_target_names,
)
from .models.key_names import canonical_pipeline_state, canonical_text_key

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2", "sdxl": "sdxl_base_v1-0",
                      "flux-dev": "flux1", "flux-schnell": "flux1"}  # sd-scripts' flux_utils.MODEL_VERSION_FLUX_V1
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                  "sd2-v": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base",
                  "flux-dev": "flux-1-dev", "flux-schnell": "flux-1-schnell"}


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
    """The adapter weights as peft keys (``unet.<module>.lora_A.weight``), unconverted (converting them with
    ``convert_state_dict_to_diffusers`` makes diffusers drop the attention keys on load, REFERENCE.md); text
    encoders in the canonical ``text_encoder.text_model.…`` layout."""
    out = {f"unet.{k}": v for k, v in _peft_state(unet).items()}
    for name, te in (text_encoders or {}).items():
        if te is not None:
            out.update({f"{name}.{k}": v for k, v in _peft_state(te).items()})
    return canonical_pipeline_state(out)


def split_components(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"unet": {...}, "text_encoder": {...}}`` from a flat prefixed state dict."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        comp, _, rest = k.partition(".")
        out.setdefault(comp, {})[rest] = v
    return out


def _adapter_alpha(model: nn.Module | None) -> tuple[int, float] | None:
    cfg = getattr(model, "peft_config", {}).get(ADAPTER) if model is not None else None
    return rank_alpha(cfg) if cfg is not None else None


def _meta_strings(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}


def save_lora_diffusers(path: str | Path, unet: nn.Module, text_encoders: Mapping[str, nn.Module | None] | None = None,
                        family: str = "sd1", metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the adapter as diffusers/peft ``.safetensors`` (what ``pipeline.load_lora_weights`` reads for LoRA
    and DoRA), with rank/alpha.

    Written by diffusers' own ``save_lora_weights`` (so the header carries the adapter config that makes
    alpha ≠ rank load right), then ``metadata`` is added to the header. Text-encoder keys are canonical.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "pytorch_lora_weights.safetensors"
    tes = {k: v for k, v in (text_encoders or {}).items() if v is not None and getattr(v, "peft_config", None)}
    layers = {"unet_lora_layers": _peft_state(unet),
              "unet_lora_adapter_metadata": unet.peft_config[ADAPTER].to_dict()}
    for name, te in tes.items():
        layers[f"{name}_lora_layers"] = {canonical_text_key(k): v for k, v in _peft_state(te).items()}
        layers[f"{name}_lora_adapter_metadata"] = te.peft_config[ADAPTER].to_dict()
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    if "text_encoder_2_lora_layers" in layers and cls is StableDiffusionPipeline:
        raise ModelLoadError("a second text encoder LoRA given for a non-SDXL model", "pass family='sdxl'")
    return write_with_diffusers(cls, path, layers, metadata, family, type_of_model(unet) or "lora")


def write_with_diffusers(pipeline_cls: Any, path: Path, layers: dict[str, Any], metadata: Mapping[str, Any] | None,
                         family: str, adapter: str = "lora") -> Path:
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
    header["lowvram_adapter"] = adapter
    save_safetensors_atomic(tensors, path, header)
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
    module = canonical_text_key(module)  # transformers 5.x has no text_model level in CLIPTextModel
    prefix = {"text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + module.replace(".", "_")


def _default_unet_config(family: str) -> dict[str, Any]:
    from .models.pretrained import CONFIGS_DIR

    return json.loads((CONFIGS_DIR / family / "unet" / "config.json").read_text())


def _rank_of(tensors: Mapping[str, torch.Tensor]) -> int | None:
    """A module's rank from its tensor shapes (None for LoKr with two full factors: only its config knows)."""
    for suffix in ("lora_A.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if suffix in tensors:
            return int(tensors[suffix].shape[0])
    return None


def to_kohya(state: Mapping[str, torch.Tensor], family: str, alphas: Mapping[str, float],
             unet_config: Any | None = None, ranks: Mapping[str, int] | None = None,
             adapter: str | None = None) -> dict[str, torch.Tensor]:
    """peft keys (``unet.<module>.lora_A.weight``, ``….hada_w1_a``, …) → kohya/LyCORIS keys with a per-module
    ``.alpha``; ``ranks`` (per component) is needed only for LoKr modules whose factors are both full."""
    if family == "sdxl" and unet_config is None:
        unet_config = _default_unet_config(family)
    adapter = adapter or type_of_state(state)
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        component, _, rest = key.partition(".")
        parts = split_peft_key(rest)
        if parts is None or parts[1] not in ADAPTERS[adapter].kohya_names:
            raise ModelLoadError(f"unexpected {adapter} key '{key}' (not a peft {adapter} tensor)",
                                 "export LoRA files written by lowvram or diffusers")
        modules.setdefault((component, parts[0]), {})[parts[1]] = value
    out: dict[str, torch.Tensor] = {}
    for (component, module), tensors in modules.items():
        rank = _rank_of(tensors) or (ranks or {}).get(component)
        if rank is None:
            raise ModelLoadError(f"the rank of '{component}.{module}' is not recorded (LoKr with full factors)",
                                 "export the run's own LoRA file, whose header records the adapter config")
        name = _kohya_module(component, module, family, unet_config)
        for suffix, value in kohya_module_tensors(adapter, tensors, alphas[component], rank).items():
            out[f"{name}.{suffix}"] = value
    return out


def kohya_metadata(family: str, rank: int, alpha: float, steps: int | None = None,
                   extra: Mapping[str, Any] | None = None, adapter: str = "lora") -> dict[str, str]:
    """The ``ss_*`` header keys kohya's tools, A1111's and ComfyUI's LoRA browsers read (LoHa/LoKr/DoRA as
    kohya + LyCORIS record them: ``lycoris.kohya`` with the algorithm in ``ss_network_args``)."""
    from . import __version__

    args = ADAPTERS[adapter].network_args
    meta = {
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_v2": str(family.startswith("sd2")),
        "ss_network_module": "lycoris.kohya" if args else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_training_comment": f"trained with lowvram {__version__}",
        "modelspec.architecture": MODELSPEC_ARCH[family] + "/" + ("lycoris" if args else "lora"),
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "lowvram_version": __version__,
        "lowvram_adapter": adapter,
    }
    if args:
        meta["ss_network_args"] = json.dumps(args)
    if steps is not None:
        meta["ss_steps"] = str(steps)
    meta.update(_meta_strings(extra))
    return meta


def save_lora_kohya(path: str | Path, unet_sd: Mapping[str, torch.Tensor],
                    te_sd: Mapping[str, Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor] | None,
                    family: str, metadata: Mapping[str, Any] | None = None, *, alpha: float, rank: int | None = None,
                    te_alpha: float | None = None, unet_config: Any | None = None, steps: int | None = None,
                    te_rank: int | None = None, adapter: str | None = None) -> Path:
    """Write a kohya-format file (``lora_unet_…``/``lora_te…``; LyCORIS names for LoHa/LoKr/DoRA) with ``ss_*``
    metadata.

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
        rank = next((r for k, v in unet_sd.items() if (parts := split_peft_key(k))
                     and (r := _rank_of({parts[1]: v}))), 0)
    ranks = {"unet": rank, "text_encoder": te_rank or rank, "text_encoder_2": te_rank or rank}
    adapter = adapter or type_of_state(state)
    tensors = to_kohya(state, family, alphas, unet_config, ranks, adapter)
    path = Path(path)
    save_safetensors_atomic(tensors, path, kohya_metadata(family, rank, alpha, steps, metadata, adapter))
    return path


def save_lora_kohya_from_models(path: str | Path, unet: nn.Module,
                                text_encoders: Mapping[str, nn.Module | None] | None = None, family: str = "sd1",
                                metadata: Mapping[str, Any] | None = None, steps: int | None = None) -> Path:
    """kohya file straight from models carrying a peft adapter (type, rank and alpha read from the adapter)."""
    rank, alpha = _adapter_alpha(unet) or (0, 0.0)
    tes = {k: _peft_state(v) for k, v in (text_encoders or {}).items() if v is not None and _peft_state(v)}
    te_cfg = next((a for v in (text_encoders or {}).values() if (a := _adapter_alpha(v))), None)
    return save_lora_kohya(path, _peft_state(unet), tes, family, metadata, alpha=alpha, rank=rank,
                           te_alpha=te_cfg[1] if te_cfg else None, te_rank=te_cfg[0] if te_cfg else None,
                           unet_config=unet.config, steps=steps, adapter=type_of_model(unet))


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
    """Adapted modules per component in a peft/diffusers or kohya/LyCORIS state dict (any adapter type)."""
    counts: dict[str, set[str]] = {}
    for k in state:
        m = re.match(r"(unet|text_encoder_2|text_encoder)\.(.+)$", k)
        if m:
            parts = split_peft_key(m.group(2))
            if parts is not None and is_marker(parts[1]):
                counts.setdefault(m.group(1), set()).add(parts[0])
            continue
        m = re.match(r"(lora_unet|lora_te2|lora_te1|lora_te)_([^.]+)\.(.+)$", k)
        if m and is_marker(m.group(3)):
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


def _peft_config_from_dict(data: Mapping[str, Any]) -> Any:
    """A peft config from its ``to_dict()`` as diffusers stores it in the file header (unknown keys dropped)."""
    import dataclasses

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING[str(data.get("peft_type") or "LORA").upper()]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in fields and k != "peft_type"})


def load_adapter_file(model_or_pipe: Any, path: str | Path) -> dict[str, int]:
    """Attach the adapters of a lowvram peft-format file (any type: LoHa/LoKr too, which diffusers' pipelines
    do not read) to the pipeline's models with peft, weights loaded; returns the loaded module counts
    (raises when any module is missing). Canonical text-encoder keys are mapped to the installed layout."""
    from peft.utils import set_peft_model_state_dict

    from .models.key_names import live_text_key

    state, header = read_lora_file(path)
    configs = json.loads(header.get("lora_adapter_metadata", "{}"))
    models = _component_models(model_or_pipe)
    for comp, sd in split_components(state).items():
        cfg = {k[len(comp) + 1:]: v for k, v in configs.items() if k.startswith(comp + ".")}
        if comp not in models or not cfg:
            raise ModelLoadError(f"'{path}' has {comp} weights but " + ("no such model" if comp not in models else
                                 "no adapter config in its header"), "load LoRA files written by lowvram")
        model = models[comp]
        model.add_adapter(_peft_config_from_dict(cfg))
        live = {live_text_key(k, model) if comp in TEXT_NAMES else k: v for k, v in sd.items()}
        result = set_peft_model_state_dict(model, live, adapter_name=ADAPTER)
        if getattr(result, "unexpected_keys", None):
            raise ModelLoadError(f"{len(result.unexpected_keys)} {comp} adapter weights do not fit the model "
                                 f"(e.g. {result.unexpected_keys[:2]})", "check the base model")
    return ensure_lora_loaded(model_or_pipe, count_saved_modules(state))


def load_lora_into(unet: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Put saved peft LoRA weights (unprefixed keys) into a UNet already carrying a matching adapter (resume)."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, dict(state), adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise ModelLoadError(f"{len(unexpected)} LoRA weights do not fit this model (e.g. {unexpected[:2]})",
                             "resume with the same lora.rank, lora.targets, lora.conv and base model")
