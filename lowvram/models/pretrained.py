"""Load pretrained Stable Diffusion 1.x / 2.x / SDXL checkpoints from local files only.

Two layouts: a diffusers folder (``model_index.json``) and a single ``.safetensors`` file in the
A1111/ComfyUI (LDM) layout. Nothing here contacts a hub: folders load with ``local_files_only=True``
and single files take their model configs from ``single_file_configs/`` shipped with lowvram.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .detect import (  # noqa: F401 (re-exported: families, runs and tests import them here)
    CONFIGS_DIR,
    FAMILIES,
    KNOWN_PREFIXES,
    LDM_CLIP,
    LDM_OPEN_CLIP,
    LDM_UNET,
    LDM_VAE,
    LDM_XL_CLIP,
    LDM_XL_OPEN_CLIP,
    PICKLE_SUFFIXES,
    _family_of_folder,
    _family_of_keys,
    _read_json,
    _safetensors_keys,
    detect_family,
)
from .tokenizers import TOKENIZER_NAMES, check_tokenizer_fits, load_tokenizers  # noqa: F401

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Components:
    """Everything a fine-tune needs from a pretrained checkpoint, with its family."""

    family: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    text_encoder_2: Any | None = None
    tokenizer_2: Any | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def training_scheduler(self) -> Any:
        """A DDPMScheduler with the checkpoint's betas and prediction type (for adding noise in training)."""
        from diffusers import DDPMScheduler

        keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "prediction_type", "steps_offset", "timestep_spacing", "rescale_betas_zero_snr")
        return DDPMScheduler.from_config({k: v for k, v in self.scheduler_config.items() if k in keep})

    def pipeline(self, scheduler: Any | None = None) -> Any:
        """A diffusers pipeline over these components (for samples and for ``save_pretrained``)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        sched = scheduler or DDIMScheduler.from_config(self.scheduler_config)
        if self.family == "sdxl":
            return StableDiffusionXLPipeline(
                unet=self.unet, vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, scheduler=sched,
            )
        return StableDiffusionPipeline(
            unet=self.unet, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


# ---------------------------------------------------------------------------------------------
# loading


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown frozen dtype '{dtype}'", f"use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _vae_dtype(vae_config: Any, dtype: torch.dtype, family: str) -> torch.dtype:
    """SDXL's VAE overflows in fp16 (config ``force_upcast``): keep it fp32 unless an fp16-fixed VAE is used."""
    if family == "sdxl" and dtype == torch.float16 and getattr(vae_config, "force_upcast", False):
        return torch.float32
    return dtype


def read_single_file(path: Path, allow_pickle: bool = False, prefixes: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a single-file checkpoint; pickled files only with the opt-in, and never executing code."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if prefixes is None or k.startswith(prefixes)}
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(
                f"'{path}' is a pickled checkpoint ({suffix}); unpickling can run code hidden in the file",
                "convert it to .safetensors, or, for a file you trust, allow it with config model.allow_pickle: true "
                "(CLI --allow-pickle); it is then read with torch.load(weights_only=True)",
            )
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            raise ModelLoadError(
                f"'{path}' could not be read with torch.load(weights_only=True): {str(e).splitlines()[0]}",
                "the file holds more than tensors; convert it to .safetensors with a tool you trust",
            ) from None
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise ModelLoadError(f"'{path}' does not hold a state dict", "pass a Stable Diffusion checkpoint")
        return {k: v for k, v in sd.items() if torch.is_tensor(v) and (prefixes is None or k.startswith(prefixes))}
    raise ModelLoadError(f"'{path}': unknown model file type '{suffix}'", "pass a diffusers folder or a .safetensors file")


def _load_folder(p: Path, family: str, dtype: torch.dtype, vae_path: Path | None, tokenizer: str | Path | None) -> Components:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    local = {"local_files_only": True}
    try:
        extra = {"upcast_attention": True} if family.startswith("sd2") else {}
        unet = UNet2DConditionModel.from_pretrained(p, subfolder="unet", torch_dtype=dtype, **local, **extra)
        vae = _load_vae(vae_path or p, "vae" if vae_path is None else None, dtype, family)
        te = CLIPTextModel.from_pretrained(p, subfolder="text_encoder", torch_dtype=dtype, **local)
        tok_root = Path(tokenizer) if tokenizer else p
        tok = CLIPTokenizer.from_pretrained(tok_root, subfolder="tokenizer", **local)
        te2 = tok2 = None
        if family == "sdxl":
            te2 = CLIPTextModelWithProjection.from_pretrained(p, subfolder="text_encoder_2", torch_dtype=dtype, **local)
            tok2 = CLIPTokenizer.from_pretrained(tok_root, subfolder="tokenizer_2", **local)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load the diffusers folder '{p}': {str(e).splitlines()[0]}",
            "check that the folder is complete (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)",
        ) from None
    sched_file = p / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_file) if sched_file.is_file() else _read_json(CONFIGS_DIR / family / "scheduler" / "scheduler_config.json")
    return Components(family, unet, vae, te, tok, sched, te2, tok2, source=str(p))


def _load_vae(root: Path, subfolder: str | None, dtype: torch.dtype, family: str) -> Any:
    from diffusers import AutoencoderKL

    kw: dict[str, Any] = {"local_files_only": True}
    if subfolder:
        kw["subfolder"] = subfolder
    cfg = AutoencoderKL.load_config(root, **kw)
    return AutoencoderKL.from_pretrained(root, torch_dtype=_vae_dtype(_Cfg(cfg), dtype, family), **kw)


class _Cfg:
    def __init__(self, d: dict[str, Any]) -> None:
        self.force_upcast = d.get("force_upcast", False)


def _build(cls: Any, config: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> Any:
    """Build ``cls`` from ``config`` without allocating random weights, then load the converted ``state``."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ModelLoadError(
            f"the {what} in the file does not match the {what} config: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})",
            "check model.family, or pass a matching diffusers config folder (model.config)",
        )
    if any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)
    return model.eval()


def _load_single_file(p: Path, family: str, dtype: torch.dtype, allow_pickle: bool, config: Path | None,
                      vae_path: Path | None, tokenizer: str | Path | None) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_diffusers_clip_model_from_ldm,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg_dir = config or CONFIGS_DIR / family
    state = read_single_file(p, allow_pickle)
    if not any(k.startswith(LDM_UNET) for k in state):
        _family_of_keys({k: list(v.shape) for k, v in state.items()}, str(p))  # raises the clear error
    try:
        unet_cfg = dict(UNet2DConditionModel.load_config(cfg_dir / "unet"))
        if family.startswith("sd2"):
            unet_cfg["upcast_attention"] = True
        unet_sd = convert_ldm_unet_checkpoint({k: v for k, v in state.items() if k.startswith(LDM_UNET)}, unet_cfg)
        unet = _build(UNet2DConditionModel, unet_cfg, unet_sd, dtype, "UNet")
        if vae_path is not None:
            vae = _load_vae(vae_path, None, dtype, family)
        else:
            vae_cfg = dict(AutoencoderKL.load_config(cfg_dir / "vae"))
            vae_sd = convert_ldm_vae_checkpoint({k: v for k, v in state.items() if k.startswith(LDM_VAE)}, vae_cfg)
            vae = _build(AutoencoderKL, vae_cfg, vae_sd, _vae_dtype(_Cfg(vae_cfg), dtype, family), "VAE")
        te = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state, subfolder="text_encoder", config=str(cfg_dir), torch_dtype=dtype, local_files_only=True
        )
        te2 = None
        if family == "sdxl":
            te2 = create_diffusers_clip_model_from_ldm(
                CLIPTextModelWithProjection, state, subfolder="text_encoder_2", config=str(cfg_dir),
                torch_dtype=dtype, local_files_only=True,
            )
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise ModelLoadError(
            f"'{p}' does not match the {family} layout: {str(e).splitlines()[0]}",
            "check model.family (sd1, sd2, sd2-v, sdxl), or pass the model's diffusers config folder as model.config",
        ) from None
    del state
    tok, tok2 = load_tokenizers(family, tokenizer, cfg_dir)
    check_tokenizer_fits(tok, te, "text encoder")
    if te2 is not None:
        check_tokenizer_fits(tok2, te2, "second text encoder")
    sched = _read_json(cfg_dir / "scheduler" / "scheduler_config.json")
    if family == "sd2-v":
        sched = dict(sched, prediction_type="v_prediction")
    return Components(family, unet, vae, te, tok, sched, te2, tok2, source=str(p))


def load_pretrained(
    path: str | Path,
    family: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    allow_pickle: bool = False,
    tokenizer: str | Path | None = None,
    vae: str | Path | None = None,
    config: str | Path | None = None,
    prediction: str | None = None,
) -> Components:
    """Load a local SD checkpoint (diffusers folder or single file) with its frozen weights in ``dtype``.

    ``tokenizer``: folder with the CLIP vocabulary (single files lack it); ``vae``: a replacement VAE folder
    (e.g. an fp16-fixed SDXL VAE); ``config``: a diffusers folder whose configs describe a single file
    (default: the shipped config of its family); ``prediction`` overrides epsilon/v.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path '{p}' does not exist", "pass a local diffusers folder or .safetensors file")
    if family is not None and family not in FAMILIES:
        raise ModelLoadError(f"unknown model family '{family}'", f"use one of {', '.join(FAMILIES)}")
    dt = _dtype(dtype)
    if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES:
        # the family of a pickled file is only known after reading it, which needs the opt-in
        state = read_single_file(p, allow_pickle)
        fam = family or _family_of_keys({k: list(v.shape) for k, v in state.items()}, str(p))
        del state
    else:
        fam = family or detect_family(p, prediction)
    if prediction == "v_prediction" and fam == "sd2":
        fam = "sd2-v"
    vae_p = Path(vae).expanduser() if vae else None
    if vae_p is not None and not vae_p.is_dir():
        raise ModelLoadError(f"VAE folder '{vae_p}' does not exist", "pass a local diffusers AutoencoderKL folder")
    if p.is_dir():
        comps = _load_folder(p, fam, dt, vae_p, tokenizer)
    else:
        comps = _load_single_file(p, fam, dt, allow_pickle, Path(config) if config else None, vae_p, tokenizer)
    if prediction is not None:
        comps.scheduler_config = dict(comps.scheduler_config, prediction_type=prediction)
    for m in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
        if m is not None:
            m.requires_grad_(False)
    if comps.vae.dtype != dt:
        comps.notes.append(f"VAE kept in {str(comps.vae.dtype).removeprefix('torch.')} (fp16 overflows in this VAE)")
    return comps
