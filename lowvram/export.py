"""Export a trained LoRA (kohya or diffusers format) and merge a LoRA into its base model.

The merged model is written both as a diffusers folder and as one A1111/ComfyUI ``.safetensors``
file (LDM key names from ``models/ldm_convert.py``), so it loads in every common tool.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .adapters import merge_adapters, type_of_state
from .errors import ModelLoadError
from .fsutil import atomic_dir, save_safetensors_atomic
from .lora import (
    TEXT_NAMES,
    _meta_strings,
    count_saved_modules,
    ensure_lora_loaded,
    kohya_metadata,
    load_adapter_file,
    read_lora_file,
    to_kohya,
)
from .models.key_names import canonical_pipeline_state, canonicalize_pipeline_folder
from .run_folder import LORA_FILE as RUN_LORA_FILE
from .run_folder import load_run_config

# Where a run keeps its LoRA (diffusers/peft format, written by lora.save_lora_diffusers).
FORMATS = ("kohya", "diffusers")
LORA_META_KEY = "lora_adapter_metadata"  # diffusers' header key with the adapter configs (r, lora_alpha)
UNET_CONFIG_KEY = "lowvram_unet_config"  # the trained UNet's config (SDXL kohya names depend on its layout)
EXPORT_FORMATS = (*FORMATS, "both")


def find_run_lora(source: str | Path) -> Path:
    """The LoRA file of a run folder (or ``source`` itself when it is a file)."""
    p = Path(source).expanduser()
    if p.is_file():
        return p
    for cand in (p / RUN_LORA_FILE, p / RUN_LORA_FILE.name):
        if cand.is_file():
            return cand
    raise ModelLoadError(
        f"no LoRA found in '{p}' (looked for {RUN_LORA_FILE})",
        "pass the run folder of a lora task (lowvram export --run DIR) or the LoRA .safetensors file",
    )


def _alphas_from_header(header: Mapping[str, str], state: Mapping[str, torch.Tensor]
                        ) -> tuple[dict[str, float], dict[str, int]]:
    """Per-component alpha and rank from diffusers' adapter metadata (alpha = rank when a file has none)."""
    from .adapters import rank_alpha

    packed = json.loads(header.get(LORA_META_KEY, "{}"))
    alphas: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for comp in ("unet", *TEXT_NAMES):
        cfg = {k[len(comp) + 1:]: v for k, v in packed.items() if k.startswith(comp + ".")}
        if cfg.get("r") is not None:
            ranks[comp], alphas[comp] = rank_alpha(cfg)
            continue
        # diffusers' own rule when a file carries no config: scale 1
        r = next((v.shape[0] for k, v in state.items() if k.startswith(comp + ".") and ".lora_A." in k), None)
        if r is not None:
            ranks[comp], alphas[comp] = int(r), float(r)
    return alphas, ranks


def export_lora(
    source: str | Path | Mapping[str, torch.Tensor],
    out_path: str | Path,
    format: str = "kohya",
    *,
    family: str | None = None,
    alphas: Mapping[str, float] | None = None,
    unet_config: Any | None = None,
    metadata: Mapping[str, Any] | None = None,
    steps: int | None = None,
) -> Path:
    """Write a run's LoRA (run folder, diffusers LoRA file, or flat peft state dict) as kohya or diffusers.

    ``family`` and ``alphas`` are read from the file's header when it has them (files written by lowvram
    do); SDXL kohya names need the UNet layout (``unet_config``, default: the real SDXL UNet).
    """
    if format not in FORMATS:
        raise ModelLoadError(f"unknown LoRA format '{format}'", f"use one of {', '.join(FORMATS)}")
    header: dict[str, str] = {}
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        state, header = read_lora_file(find_run_lora(source))
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in state):
        raise ModelLoadError("the LoRA is already in kohya format", "diffusers and A1111 load kohya files directly")
    if not count_saved_modules(state):
        raise ModelLoadError("no LoRA weights (unet.*.lora_A/B) found in the source", "export a lowvram LoRA")
    family = family or header.get("lowvram_family")
    if family is None:
        raise ModelLoadError("the LoRA file does not say which model family it is for", "pass family= (sd1, sd2, sd2-v, sdxl)")
    if unet_config is None and header.get(UNET_CONFIG_KEY):  # a non-standard SDXL layout, recorded at training
        unet_config = json.loads(header[UNET_CONFIG_KEY])
    header_alphas, ranks = _alphas_from_header(header, state)
    alphas = {**header_alphas, **(alphas or {})}
    rank = ranks.get("unet", 0)
    adapter = header.get("lowvram_adapter") or type_of_state(state)
    out = Path(out_path)
    if format == "diffusers":  # older lowvram files named text-encoder keys after transformers 5.x's tree
        keep = {k: v for k, v in header.items() if not k.startswith("ss_")}
        keep.update(_meta_strings(metadata))
        save_safetensors_atomic(canonical_pipeline_state(state), out, keep)
        return out
    try:
        tensors = to_kohya(state, family, alphas, unet_config, ranks, adapter)
    except KeyError as e:
        raise ModelLoadError(f"LoRA module names do not fit the {family} UNet layout: {e}",
                             "pass the base model's UNet config (unet_config) or the right family") from None
    extra = {k: v for k, v in header.items() if k.startswith("ss_") and k not in ("ss_network_module", "ss_network_args")}
    extra.update(_meta_strings(metadata))
    save_safetensors_atomic(tensors, out, kohya_metadata(family, rank, alphas.get("unet", rank), steps, extra, adapter))
    return out


def _fuse(pipe: Any, lora_file: Path, scale: float) -> list[str]:
    """Fuse ``lora_file`` into ``pipe``'s UNet and text encoders; the names of the fused components."""
    parts = [n for n in ("unet", *TEXT_NAMES) if getattr(pipe, n, None) is not None]
    if LORA_META_KEY in read_lora_file(lora_file)[1]:
        # a file that records its adapter configs (lowvram's): peft attaches any type exactly; diffusers'
        # pipelines read no LoHa/LoKr, and with transformers 5.x drop a text encoder's DoRA magnitudes
        load_adapter_file(pipe, lora_file)
        for n in parts:
            merge_adapters(getattr(pipe, n), scale)
    else:
        pipe.load_lora_weights(str(lora_file))
        ensure_lora_loaded(pipe, lora_file)
        pipe.fuse_lora(components=parts, lora_scale=scale)
        pipe.unload_lora_weights()
    return parts


def merge_lora(
    base_path: str | Path,
    lora_path: str | Path,
    out_dir: str | Path,
    single_file: bool = True,
    *,
    family: str | None = None,
    tokenizer: str | Path | None = None,
    config: str | Path | None = None,
    allow_pickle: bool = False,
    save_dtype: str = "fp16",
    scale: float = 1.0,
) -> dict[str, Path]:
    """Fuse a LoRA into its base model; writes ``out_dir/diffusers/`` and (``single_file``) ``out_dir/<out_dir name>.safetensors``.

    Fusing happens in fp32; the result is stored in ``save_dtype``. Raises if the LoRA loads only partly.
    Returns the written paths (``{"diffusers": …, "single_file": …}``).
    """
    from .models.ldm_convert import pipeline_to_ldm
    from .models.pretrained import DTYPES, load_pretrained

    if save_dtype not in DTYPES:
        raise ModelLoadError(f"unknown save dtype '{save_dtype}'", f"use one of {', '.join(DTYPES)}")
    lora_file = find_run_lora(lora_path)
    comps = load_pretrained(base_path, family=family, dtype=torch.float32, allow_pickle=allow_pickle,
                            tokenizer=tokenizer, config=config)
    pipe = comps.pipeline()
    parts = _fuse(pipe, lora_file, scale)
    dt = DTYPES[save_dtype]
    for n in parts + ["vae"]:
        getattr(pipe, n).to(dt)

    out = Path(out_dir)
    written: dict[str, Path] = {}
    folder = out / "diffusers"
    with atomic_dir(folder) as tmp:  # a killed merge leaves the previous folder whole
        pipe.save_pretrained(tmp)
        canonicalize_pipeline_folder(tmp)  # text_model.… keys, loadable by transformers 4.x too
    written["diffusers"] = folder
    if single_file:
        tes = {n: getattr(pipe, n, None) for n in TEXT_NAMES}
        sd = pipeline_to_ldm(pipe.unet, pipe.vae, tes, comps.family)
        from . import __version__

        meta = {"lowvram_version": __version__, "lowvram_family": comps.family,
                "lowvram_merged_lora": lora_file.name, "format": "pt"}
        path = out / f"{out.name or 'merged'}.safetensors"
        save_safetensors_atomic(sd, path, meta)
        written["single_file"] = path
    return written


def export_cli(run: str | Path, fmt: str = "kohya", merge: bool = False, out: str | Path | None = None,
               dtype: str = "fp16") -> list[Path]:
    """``lowvram export``: a LoRA run's file(s) in ``fmt`` (kohya, diffusers or both) into ``out``
    (default ``RUN/export``); ``merge`` also fuses the LoRA into the run's base model. Returns the paths."""

    if fmt not in EXPORT_FORMATS:
        raise ModelLoadError(f"unknown LoRA format '{fmt}'", f"use one of {', '.join(EXPORT_FORMATS)}")
    run_dir = Path(run).expanduser()
    cfg = load_run_config(run_dir)
    if cfg.run.task != "lora":
        raise ModelLoadError(f"'{run_dir}' is a '{cfg.run.task}' run, not a LoRA run",
                             "a full fine-tune is saved as a model already: RUN/final/ (diffusers folder + .safetensors)")
    lora_file = find_run_lora(run_dir)
    out_dir = Path(out).expanduser() if out else run_dir / "export"
    name = run_dir.resolve().name or "lora"
    from .families import family_of

    try:
        family = family_of(cfg.model)
    except ModelLoadError:  # base moved, or a model trained from scratch: the LoRA file alone converts
        family = None
    own = family.export_run(run_dir, FORMATS if fmt == "both" else (fmt,), merge, out_dir, name) if family else None
    if own is not None:  # the family's job wrote its files in their formats itself (FLUX.1)
        return own
    written = []
    for f in FORMATS if fmt == "both" else (fmt,):
        target = out_dir / (f"{name}.safetensors" if f == "kohya" else "pytorch_lora_weights.safetensors")
        written.append(export_lora(lora_file, target, f))
    if merge:
        m = cfg.model
        merged = merge_lora(m.pretrained, lora_file, out_dir / f"{name}-merged", family=m.family,
                            tokenizer=m.tokenizer, config=getattr(m, "config", None), allow_pickle=m.allow_pickle,
                            save_dtype=dtype)
        written.extend(merged.values())
    return written
