"""Whether a local model is FLUX.1 and which variant (dev, schnell), read from its folder or its single file's
keys without loading weights; Chroma and the Fill/Depth models are refused with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .pretrained import _read_json, _safetensors_keys

VARIANTS = ("flux-dev", "flux-schnell")


TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI checkpoint / saved UNet


FLUX_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"  # diffusers' own FLUX.1 detection key


CHROMA_KEY = "distilled_guidance_layer.in_proj.bias"


def _strip(keys: dict[str, Any], prefixes: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The first prefix under which ``keys`` hold a FLUX transformer ("" for a bare file), and those keys."""
    for p in prefixes:
        sub = {k[len(p):]: v for k, v in keys.items() if k.startswith(p)}
        if FLUX_KEY in sub or CHROMA_KEY in sub:
            return p, sub
    return "", keys


def _variant_of_keys(keys: dict[str, Any], where: str) -> str:
    prefix, sub = _strip(keys, TRANSFORMER_PREFIXES)
    if CHROMA_KEY in sub:
        raise ModelLoadError(
            f"'{where}' is a Chroma checkpoint (distilled_guidance_layer, no modulation layers)",
            "Chroma loads through diffusers' ChromaTransformer2DModel, which lowvram does not train yet")
    if FLUX_KEY not in sub:
        raise ModelLoadError(
            f"'{where}': found {len(keys)} tensors but no FLUX.1 transformer ({FLUX_KEY}, bare or under "
            f"{' / '.join(TRANSFORMER_PREFIXES)})",
            "pass the FLUX.1 transformer file (flux1-dev.safetensors), a ComfyUI FLUX checkpoint or a diffusers folder")
    shape = sub.get("img_in.weight")
    if shape is not None and list(shape)[1] != 64:
        raise ModelLoadError(f"'{where}': img_in takes {list(shape)[1]} channels: a FLUX.1 Fill/Depth/Kontext model",
                             "lowvram trains the text-to-image FLUX.1 dev and schnell models")
    return "flux-dev" if "guidance_in.in_layer.weight" in sub else "flux-schnell"


def is_flux_model(path: str | Path | None) -> bool:
    """Whether a local path holds a FLUX.1-like transformer (diffusers folder or .safetensors file): the
    trainer's family switch. Chroma and Fill files count, so that loading refuses them with the reason."""
    if not path:
        return False
    p = Path(path).expanduser()
    if p.is_dir():
        cfg_file = p / "transformer" / "config.json"
        return cfg_file.is_file() and _read_json(cfg_file).get("_class_name") == "FluxTransformer2DModel"
    if not (p.is_file() and p.suffix.lower() == ".safetensors"):
        return False
    _, sub = _strip(_safetensors_keys(p), TRANSFORMER_PREFIXES)
    return FLUX_KEY in sub or CHROMA_KEY in sub


def detect_variant(path: str | Path) -> str:
    """flux-dev (guidance embedding) or flux-schnell, from a diffusers folder's config or a file's tensor names."""
    p = Path(path).expanduser()
    if p.is_dir():
        cfg_file = p / "transformer" / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"'{p}' has no transformer/config.json: not a diffusers FLUX.1 folder",
                                 "pass a FluxPipeline folder or a FLUX.1 .safetensors file")
        cfg = _read_json(cfg_file)
        if cfg.get("_class_name") != "FluxTransformer2DModel":
            raise ModelLoadError(f"'{p}' holds a {cfg.get('_class_name')}, not a FluxTransformer2DModel",
                                 "pass a FLUX.1 dev or schnell folder")
        return "flux-dev" if cfg.get("guidance_embeds") else "flux-schnell"
    if p.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"'{p}': FLUX.1 loads from .safetensors files or diffusers folders",
                             "convert the file to .safetensors")
    return _variant_of_keys(_safetensors_keys(p), str(p))
