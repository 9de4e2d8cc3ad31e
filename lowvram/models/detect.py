"""Which Stable Diffusion family (1.x, 2.x, 2.x-v, SDXL) a local checkpoint is, read from its folder or its
single file's keys without loading weights, and the key prefixes of the single-file (LDM) layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")


CONFIGS_DIR = Path(__file__).with_name("single_file_configs")


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# Single-file (LDM) key prefixes and what they mean.
LDM_UNET = "model.diffusion_model."


LDM_VAE = "first_stage_model."


LDM_CLIP = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L/14 (transformers layout)


LDM_OPEN_CLIP = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14


LDM_XL_CLIP = "conditioner.embedders.0.transformer."  # SDXL text encoder 1


LDM_XL_OPEN_CLIP = "conditioner.embedders.1.model."  # SDXL text encoder 2 (OpenCLIP bigG)


KNOWN_PREFIXES = (LDM_UNET, LDM_VAE, LDM_CLIP, LDM_OPEN_CLIP, LDM_XL_CLIP, LDM_XL_OPEN_CLIP)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read '{path}': {e}", "check that the model folder is complete") from None


def _family_of_folder(path: Path) -> str:
    unet_cfg = path / "unet" / "config.json"
    if not unet_cfg.is_file():
        found = sorted(p.name for p in path.iterdir())[:12]
        raise ModelLoadError(
            f"'{path}' is a folder without unet/config.json (found: {', '.join(found) or 'nothing'}): "
            "this does not look like a diffusers Stable Diffusion folder",
            "pass a diffusers folder (with model_index.json, unet/, vae/, text_encoder/) or a single .safetensors file",
        )
    unet = _read_json(unet_cfg)
    if unet.get("_class_name") not in (None, "UNet2DConditionModel"):
        raise ModelLoadError(
            f"'{path}' holds a {unet.get('_class_name')}, not a Stable Diffusion UNet2DConditionModel",
            "lowvram fine-tunes SD 1.x, 2.x and SDXL checkpoints",
        )
    sched_cfg = path / "scheduler" / "scheduler_config.json"
    prediction = _read_json(sched_cfg).get("prediction_type", "epsilon") if sched_cfg.is_file() else "epsilon"
    if unet.get("addition_embed_type") == "text_time" or (path / "text_encoder_2").is_dir():
        return "sdxl"
    cross = unet.get("cross_attention_dim")
    if cross == 768:
        base = "sd1"
    elif cross == 1024:
        base = "sd2"
    else:  # non-standard widths: the text encoder's activation tells OpenAI CLIP from OpenCLIP
        te_cfg = path / "text_encoder" / "config.json"
        act = _read_json(te_cfg).get("hidden_act") if te_cfg.is_file() else None
        if act not in ("quick_gelu", "gelu"):
            raise ModelLoadError(
                f"'{path}': UNet cross_attention_dim {cross} and no text encoder config: cannot tell SD 1.x from 2.x",
                "set model.family (sd1, sd2, sd2-v or sdxl)",
            )
        base = "sd1" if act == "quick_gelu" else "sd2"
    return "sd2-v" if base == "sd2" and prediction == "v_prediction" else base


def _safetensors_keys(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from the header only (no weights read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ModelLoadError(f"'{path}' is not a readable .safetensors file: {e}", "check the download") from None


def _sidecar_prediction(path: Path) -> str | None:
    """A1111 convention: ``model.yaml`` beside ``model.safetensors``; ``parameterization: v`` means v-prediction."""
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        param = data.get("model", {}).get("params", {}).get("parameterization", "eps")
    except (yaml.YAMLError, AttributeError, OSError):
        return None
    return "v_prediction" if param == "v" else "epsilon"


def _family_of_keys(keys: dict[str, list[int]], where: str) -> str:
    has = {p: any(k.startswith(p) for k in keys) for p in KNOWN_PREFIXES}
    if has[LDM_XL_OPEN_CLIP] or has[LDM_XL_CLIP]:
        if not has[LDM_XL_CLIP]:
            raise ModelLoadError(
                f"'{where}' looks like an SDXL refiner (only one OpenCLIP text encoder)",
                "lowvram fine-tunes SDXL base checkpoints, not the refiner",
            )
        return "sdxl"
    if has[LDM_OPEN_CLIP]:
        return "sd2"
    if has[LDM_CLIP]:
        return "sd1"
    if has[LDM_UNET]:
        raise ModelLoadError(
            f"'{where}' has a UNet ({LDM_UNET}…) but no text encoder (cond_stage_model./conditioner.)",
            "pass the full checkpoint, or the diffusers folder of the model",
        )
    raise ModelLoadError(
        f"'{where}': found {len(keys)} tensors, none of the known prefixes ({', '.join(KNOWN_PREFIXES)}): "
        "this does not look like an SD 1.x/2.x/SDXL checkpoint",
        "pass a Stable Diffusion checkpoint (a diffusers folder or an A1111/ComfyUI .safetensors)",
    )


def detect_family(path: str | Path, prediction: str | None = None) -> str:
    """Which model family a local folder or single file holds: sd1, sd2, sd2-v or sdxl.

    ``prediction`` ("v_prediction"/"epsilon") overrides what the files say: SD 2.x single files do
    not record it (A1111 reads it from a ``.yaml`` beside the file, which is honoured here too).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path '{p}' does not exist", "pass a local diffusers folder or .safetensors file")
    if p.is_dir():
        family = _family_of_folder(p)
    elif p.suffix.lower() == ".safetensors":
        keys = _safetensors_keys(p)
        family = _family_of_keys(keys, str(p))
        if family == "sd2" and (prediction or _sidecar_prediction(p)) == "v_prediction":
            family = "sd2-v"
    elif p.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"'{p}' is a pickled checkpoint: its family can only be read by unpickling it",
            "convert it to .safetensors, or allow pickle (config model.allow_pickle: true, CLI --allow-pickle) "
            "and load it with load_pretrained",
        )
    else:
        raise ModelLoadError(f"'{p}': unknown model file type '{p.suffix}'", "pass a diffusers folder or a .safetensors file")
    if prediction == "v_prediction" and family == "sd2":
        family = "sd2-v"
    if prediction == "epsilon" and family == "sd2-v":
        family = "sd2"
    return family
