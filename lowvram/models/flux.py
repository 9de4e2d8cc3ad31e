"""Load FLUX.1 (dev, schnell) from local files only: diffusers folders and the single files people have.

Layouts: a diffusers ``FluxPipeline`` folder; the original BFL transformer file (``flux1-dev.safetensors``:
``double_blocks.0.img_attn.qkv.weight`` …), bare or with ComfyUI's ``model.diffusion_model.`` prefix, in
bf16/fp16, fp8 (``float8_e4m3fn``) or ComfyUI's "scaled fp8"; ComfyUI's all-in-one checkpoints (transformer
+ ``vae.`` + ``text_encoders.clip_l``/``t5xxl``). A transformer-only file takes the VAE, CLIP-L and T5-XXL
(files or folders) and the tokenizers from ``FluxSources``. Conversion is diffusers' own; model configs
come from ``single_file_configs/flux-*`` shipped with lowvram. Nothing here contacts a hub. Detection lives
in ``flux_detect.py`` and the transformer's conversion in ``flux_transformer.py`` (both re-exported here).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .flux_detect import (  # noqa: F401 (re-exported: the family, the panel and tests import them here)
    CHROMA_KEY,
    FLUX_KEY,
    TRANSFORMER_PREFIXES,
    VARIANTS,
    _strip,
    detect_variant,
    is_flux_model,
)
from .flux_transformer import (  # noqa: F401 (re-exported: the profiler builds the transformer through here)
    FLUX1_WIDTH,
    _transformer_from_state,
    build_transformer,
    dequantize,
    transformer_config,
)
from .pretrained import (
    CONFIGS_DIR,
    _build,
    _dtype,
    _read_json,
    load_tokenizers,
    read_single_file,
)

MAX_SEQUENCE_LENGTH = {"flux-dev": 512, "flux-schnell": 256}  # T5 tokens each variant was trained with
VAE_PREFIXES = ("vae.", "first_stage_model.")
CLIP_PREFIX = "text_encoders.clip_l.transformer."  # ComfyUI all-in-one (and diffusers' SD3 converter)
T5_PREFIX = "text_encoders.t5xxl.transformer."
OTHERS = (*VAE_PREFIXES, "text_encoders.")  # an all-in-one checkpoint's other components
LDM_CLIP = "cond_stage_model.transformer."  # the prefix diffusers' CLIP converter reads
CLIP_EXTRAS = ("text_projection.weight", "logit_scale", "text_model.embeddings.position_ids")

TOKENIZER_FIX = ("point model.t5_tokenizer (--t5-tokenizer) at a folder with the T5 tokenizer.json: the FLUX.1 "
                 "diffusers folder's tokenizer_2/, or ComfyUI's comfy/text_encoders/t5_tokenizer/")


@dataclass
class FluxSources:
    """Where components come from when the model path does not hold them (a transformer-only file).

    Each is a local path: ``vae`` (ae.safetensors or an AutoencoderKL folder), ``clip`` (clip_l.safetensors
    or a CLIPTextModel folder), ``t5`` (t5xxl_*.safetensors or a T5EncoderModel folder), ``tokenizer``
    (CLIP vocab folder), ``t5_tokenizer`` (folder with tokenizer.json); ``base`` is a diffusers FLUX.1
    folder that fills in anything not given.
    """

    vae: str | Path | None = None
    clip: str | Path | None = None
    t5: str | Path | None = None
    tokenizer: str | Path | None = None
    t5_tokenizer: str | Path | None = None
    base: str | Path | None = None


@dataclass
class FluxComponents:
    """A loaded FLUX.1 model: transformer, VAE, CLIP-L + T5-XXL with tokenizers, scheduler config."""

    variant: str
    transformer: Any | None
    vae: Any
    text_encoder: Any | None
    tokenizer: Any | None
    text_encoder_2: Any | None
    tokenizer_2: Any | None
    scheduler_config: dict[str, Any]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def family(self) -> str:
        """The name LoRA headers and the trainer's logs use (``flux-dev`` / ``flux-schnell``)."""
        return self.variant

    @property
    def guidance_embeds(self) -> bool:
        return self.variant == "flux-dev"  # the variant is read from guidance_in / the config's guidance_embeds

    @property
    def max_sequence_length(self) -> int:
        return MAX_SEQUENCE_LENGTH[self.variant]

    def drop_text_encoders(self) -> None:
        """Free CLIP-L and T5-XXL (~10 GB) once the captions are encoded and cached."""
        self.text_encoder = self.text_encoder_2 = None

    def pipeline(self) -> Any:
        """A diffusers FluxPipeline over these components (for ``save_pretrained`` and LoRA loading)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
                            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                            transformer=self.transformer)


# ---------------------------------------------------------------------------------------------
# components


def _local(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{what} path '{p}' does not exist", "pass a local file or folder")
    return p


def _from_folder(cls: Any, folder: Path, subfolder: str, dtype: torch.dtype, what: str) -> Any:
    """``cls.from_pretrained`` of ``folder/subfolder`` (a pipeline folder) or of ``folder`` itself."""
    root, sub = (folder, subfolder) if (folder / subfolder / "config.json").is_file() else (folder, None)
    if sub is None and not (folder / "config.json").is_file():
        raise ModelLoadError(f"'{folder}' has neither {subfolder}/config.json nor config.json for the {what}",
                             f"pass the {what}'s folder or its .safetensors file")
    kw: dict[str, Any] = {"local_files_only": True, "torch_dtype": dtype}
    if sub:
        kw["subfolder"] = sub
    try:
        return cls.from_pretrained(root, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the {what} from '{folder}': {str(e).splitlines()[0]}",
                             "check that the folder is complete") from None


def _vae_dtype(dtype: torch.dtype, cfg: dict[str, Any]) -> torch.dtype:
    """The FLUX.1 VAE config says ``force_upcast``: it runs in fp32 rather than fp16 (bf16 is fine)."""
    return torch.float32 if dtype == torch.float16 and cfg.get("force_upcast", False) else dtype


def load_vae(source: Path | dict[str, torch.Tensor], cfg_dir: Path, dtype: torch.dtype) -> Any:
    """The 16-channel AutoencoderKL from a folder, BFL's ``ae.safetensors`` or a checkpoint's ``vae.`` tensors."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = dict(AutoencoderKL.load_config(cfg_dir / "vae"))
    if isinstance(source, Path) and source.is_dir():
        return _from_folder(AutoencoderKL, source, "vae", _vae_dtype(dtype, cfg), "VAE")
    state = read_single_file(source) if isinstance(source, Path) else source
    return _build(AutoencoderKL, cfg, convert_ldm_vae_checkpoint(state, cfg), _vae_dtype(dtype, cfg), "VAE")


def load_clip(source: Path | dict[str, torch.Tensor], cfg_dir: Path, dtype: torch.dtype) -> Any:
    """CLIP-L (the pooled vector) from a folder, ``clip_l.safetensors`` or a checkpoint's clip_l tensors."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    if isinstance(source, Path) and source.is_dir():
        return _from_folder(CLIPTextModel, source, "text_encoder", dtype, "CLIP text encoder")
    state = read_single_file(source) if isinstance(source, Path) else source
    state = {k.removeprefix(CLIP_PREFIX): v for k, v in state.items()}
    # diffusers' converter reads the SD layout: every key under cond_stage_model.transformer.text_model.
    ldm = {LDM_CLIP + (k if k.startswith("text_model.") else "text_model." + k): v
           for k, v in state.items() if k not in CLIP_EXTRAS}
    return create_diffusers_clip_model_from_ldm(CLIPTextModel, ldm, subfolder="text_encoder", config=str(cfg_dir),
                                                torch_dtype=dtype, local_files_only=True)


def load_t5(source: Path | dict[str, torch.Tensor], cfg_dir: Path, dtype: torch.dtype) -> Any:
    """T5-XXL's encoder from a folder, ``t5xxl_*.safetensors`` (fp16, fp8, scaled fp8) or checkpoint tensors."""
    from diffusers.loaders.single_file_utils import create_diffusers_t5_model_from_checkpoint
    from transformers import T5EncoderModel

    if isinstance(source, Path) and source.is_dir():
        return _from_folder(T5EncoderModel, source, "text_encoder_2", dtype, "T5 text encoder")
    state = read_single_file(source) if isinstance(source, Path) else source
    state = dequantize({k.removeprefix(T5_PREFIX): v for k, v in state.items()}, dtype)
    if "encoder.embed_tokens.weight" not in state and "shared.weight" in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied; files store it once
    return create_diffusers_t5_model_from_checkpoint(
        T5EncoderModel, {T5_PREFIX + k: v for k, v in state.items()}, subfolder="text_encoder_2",
        config=str(cfg_dir), torch_dtype=dtype, local_files_only=True)


def load_t5_tokenizer(folder: str | Path) -> Any:
    """T5's tokenizer from ``tokenizer.json`` (no extra package) or ``spiece.model`` (needs sentencepiece)."""
    from transformers import T5TokenizerFast

    root = _local(folder, "T5 tokenizer")
    for cand in (root / "tokenizer_2", root):
        if (cand / "tokenizer.json").is_file():
            return T5TokenizerFast.from_pretrained(cand, local_files_only=True)
        if (cand / "spiece.model").is_file():
            if importlib.util.find_spec("sentencepiece") is None:
                raise ModelLoadError(f"'{cand}' has only spiece.model: reading it needs the sentencepiece package",
                                     "`pip install sentencepiece`, or " + TOKENIZER_FIX)
            return T5TokenizerFast.from_pretrained(cand, local_files_only=True)
    raise ModelLoadError(f"no T5 tokenizer (tokenizer.json or spiece.model) in '{root}' or its tokenizer_2/",
                         TOKENIZER_FIX)


def _pick(given: str | Path | None, checkpoint: dict[str, torch.Tensor] | None, base: Path | None, sub: str,
          what: str, flag: str) -> Path | dict[str, torch.Tensor]:
    """A component's source: the user's path, else the checkpoint's own tensors, else the base folder."""
    if given is not None:
        return _local(given, what)
    if checkpoint:
        return checkpoint
    if base is not None and (base / sub).is_dir():
        return base / sub
    raise ModelLoadError(f"the FLUX.1 file has no {what} and none was given",
                         f"pass it with {flag} (a .safetensors file or folder), or model.flux_base: a diffusers FLUX.1 folder")


def _with_prefix(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for p in prefixes:
        sub = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
        if sub:
            return sub
    return {}


def load_flux(path: str | Path, dtype: torch.dtype | str = torch.bfloat16, sources: FluxSources | None = None,
              config: str | Path | None = None, text_encoders: bool = True, transformer: bool = True) -> FluxComponents:
    """Load FLUX.1 from a diffusers folder or a single file, frozen, with weights in ``dtype``.

    ``config``: a diffusers folder whose configs describe a single file (default: the shipped config of
    its variant); ``text_encoders=False`` skips CLIP-L/T5-XXL (their outputs already cached);
    ``transformer=False`` skips the 12 B transformer (caching text first keeps T5 and it out of RAM together).
    """
    p = _local(path, "model")
    src = sources or FluxSources()
    dt = _dtype(dtype)
    variant = detect_variant(p)
    base = _local(src.base, "FLUX base folder") if src.base else (p if p.is_dir() else None)
    cfg_dir = Path(config).expanduser() if config else (p if p.is_dir() else CONFIGS_DIR / variant)
    notes: list[str] = []
    model, state = None, {}
    if p.is_dir() and transformer:
        from diffusers import FluxTransformer2DModel

        model = _from_folder(FluxTransformer2DModel, p, "transformer", dt, "FLUX transformer")
    elif not p.is_dir() and not transformer:
        state = read_single_file(p, prefixes=OTHERS)
    elif not p.is_dir():
        state = read_single_file(p)
        prefix, _ = _strip(dict.fromkeys(state), TRANSFORMER_PREFIXES)
        mine = [k for k in state if k.startswith(prefix)] if prefix else [k for k in state if not k.startswith(OTHERS)]
        own = {k[len(prefix):]: state.pop(k) for k in mine}  # what stays: an all-in-one's VAE and text encoders
        model = _transformer_from_state(own, cfg_dir, dt, str(p))
        del own
    vae = load_vae(_pick(src.vae, _with_prefix(state, VAE_PREFIXES), base, "vae", "VAE", "model.vae (--vae)"),
                   cfg_dir, dt)
    te = tok = te2 = tok2 = None
    if text_encoders:
        te = load_clip(_pick(src.clip, _with_prefix(state, (CLIP_PREFIX,)), base, "text_encoder",
                             "CLIP-L text encoder", "model.clip (--clip)"), cfg_dir, dt)
        te2 = load_t5(_pick(src.t5, _with_prefix(state, (T5_PREFIX,)), base, "text_encoder_2",
                            "T5-XXL text encoder", "model.t5 (--t5)"), cfg_dir, dt)
        tok, _ = load_tokenizers(variant, src.tokenizer or base, cfg_dir)
        t5_tok = src.t5_tokenizer or base
        if t5_tok is None:
            raise ModelLoadError("no T5 tokenizer for a single-file FLUX.1 model", TOKENIZER_FIX)
        tok2 = load_t5_tokenizer(t5_tok)
    del state
    sched_file = cfg_dir / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_file if sched_file.is_file() else CONFIGS_DIR / variant / "scheduler" / "scheduler_config.json")
    for m in (model, vae, te, te2):
        if m is not None:
            m.requires_grad_(False).eval()
    if vae.dtype != dt:
        notes.append(f"VAE kept in {str(vae.dtype).removeprefix('torch.')} (its config asks for fp32 over fp16)")
    return FluxComponents(variant, model, vae, te, tok, te2, tok2, sched, source=str(p), notes=notes)
