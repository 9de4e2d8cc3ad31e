"""The job a user's run is, as the profiler needs it: the ``Workload`` derived from a resolved RunConfig.

Every config field that decides what is allocated on the card reaches the profile through ``workload_for``
(the rest through ``knobs.knobs_from_config``, or ``run_plan.MEMORY_NEUTRAL`` says why it allocates nothing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import FINETUNE_TASKS, RunConfig, default_resolution
from .workloads import Preview, Workload

# models/pretrained.py names families by checkpoint; the profiler by published architecture
SD_FAMILY_WORKLOAD = {"sd1": "sd15", "sd2": "sd2", "sd2-v": "sd2", "sdxl": "sdxl"}
VALIDATION_ITEMS = 64  # train.run.VAL_ITEMS: the builtin data's held-out images


def _folder_config(folder: str | Path | None, sub: str) -> dict[str, Any]:
    """``folder/sub/config.json`` (or ``folder/config.json``) without the private keys, or {}."""
    if not folder:
        return {}
    for path in (Path(folder) / sub / "config.json", Path(folder) / "config.json"):
        if path.is_file():
            data = json.loads(path.read_text())
            return {k: v for k, v in data.items() if not k.startswith("_")}
    return {}


def _checkpoint_configs(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any], tuple[dict[str, Any], ...]]:
    """The checkpoint's own UNet, VAE and text-encoder configs when a folder describes them (non-standard
    or tiny models); the family's published configs otherwise."""
    unet, vae, tes = {}, {}, []
    for folder in (cfg.model.config, cfg.model.pretrained):
        if folder and Path(folder).is_dir() and (Path(folder) / "unet" / "config.json").is_file():
            unet = _folder_config(folder, "unet")
            vae = _folder_config(folder, "vae")
            tes = [c for c in (_folder_config(folder, "text_encoder"), _folder_config(folder, "text_encoder_2")) if c]
            break
    if cfg.model.vae:
        vae = _folder_config(cfg.model.vae, "vae") or vae
    return unet, vae, tuple(_text_config(c) for c in tes)


_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "projection_dim", "bos_token_id", "eos_token_id",
              "pad_token_id")


def _text_config(data: dict[str, Any]) -> dict[str, Any]:
    return {k: data[k] for k in _TEXT_KEYS if k in data}


def preview_of(cfg: RunConfig) -> Preview:
    """What the run's sample grids draw: how many prompts, whether guided, the largest image (kohya --w/--h)."""
    s = cfg.sample
    guided = any(float(w) != 1.0 for w in s.cfg_scales)
    size = None
    if cfg.run.task in FINETUNE_TASKS and s.prompts:
        from ..train.prompts import parse_prompt_line

        res = int(cfg.data.resolution or default_resolution(cfg.run.task, cfg.model.size, cfg.model.pretrained) or 512)
        specs = [parse_prompt_line(p) for p in s.prompts]
        guided = guided or any(p.cfg is not None and p.cfg != 1.0 for p in specs)
        sizes = [(p.height or res, p.width or res) for p in specs]
        size = max(sizes, key=lambda hw: hw[0] * hw[1])
    return Preview(prompts=len(s.prompts) or 4, guided=guided, size=size)


def _words(caption: str) -> set[str]:
    from tokenizers import normalizers, pre_tokenizers

    return {w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(normalizers.Lowercase().normalize_str(caption))}


def builtin_vocab_exact(num_images: int) -> int:
    """``len(build_tokenizer(captions))`` for the builtin data, from the attributes alone (no drawing)."""
    from ..data.builtin import ShapesDataset, caption_of
    from ..models.tokenizer import SPECIAL_TOKENS

    ds = ShapesDataset(num_images, 16)
    words: set[str] = set()
    seen: set[tuple[str, ...]] = set()
    for i in range(num_images):
        attrs = tuple(ds.attributes(i).values())
        if attrs in seen:
            continue
        seen.add(attrs)
        words |= _words(caption_of(ds.attributes(i)))
        if len(seen) == 36:  # every combination of the 3 attributes has appeared
            break
    return len(SPECIAL_TOKENS) + len(words)


TEXT_CACHE_BATCH = 64  # data.cache.TextEmbeddingCache.build encodes this many captions at once


def text_cache_batch(cfg: RunConfig) -> int:
    """How many captions the text cache encodes at once: 64, or fewer when the folders hold fewer images
    (each has one caption, plus the empty prompt and the preview prompts cached with them); a count of image
    files, no image is opened."""
    import os

    from ..data.images import is_image_name
    from ..train.prompts import parse_prompt_line

    specs = [parse_prompt_line(p) for p in cfg.sample.prompts]
    count = 1 + len({s.prompt for s in specs} | {cfg.sample.negative_prompt if s.negative is None else s.negative
                                                 for s in specs} - {""})
    for folder in (cfg.data.source, cfg.data.class_data):
        if not folder:
            continue
        if not Path(folder).is_dir():
            return TEXT_CACHE_BATCH  # a metadata file or an unknown layout: assume a full batch
        for _root, _dirs, files in os.walk(folder):
            count += sum(1 for f in files if is_image_name(f))
            if count >= TEXT_CACHE_BATCH:
                return TEXT_CACHE_BATCH
    return count


def class_images_to_draw(cfg: RunConfig) -> int:
    """How many class images the run draws with the base model before it trains (data.num_class_images
    less those already in data.class_data): a count of files, nothing is opened."""
    if not (cfg.run.task in FINETUNE_TASKS and cfg.data.class_data and cfg.data.num_class_images):
        return 0
    from ..data.class_images import missing_numbers

    return len(missing_numbers(cfg.data.class_data, cfg.data.num_class_images))


def _unet_targets(kind: str) -> tuple[str, ...]:
    """``lora.targets``' UNet layers, as training attaches them (lora_attach imports peft: only when planning)."""
    from ..lora_attach import unet_targets

    return unet_targets(kind)


def scratch_lora_workload(cfg: RunConfig, folder: Path, desc: dict[str, Any], res: int, batch: int,
                          common: dict[str, Any]) -> Workload:
    """LoRA on a model lowvram trained from scratch (the scratch family's ``workload``; train/scratch_lora.py):
    the size's UNet and the base's text encoder (frozen; its vocabulary), the VAE of a latent model on the card
    encoding every batch."""
    size = str(desc.get("size", cfg.model.size))
    te = _text_config(_folder_config(folder, "text_encoder"))
    latent = bool(desc.get("has_vae"))
    return Workload("this job", f"{cfg.lora.type} on the from-scratch {size} model, {res}²", size, "lora", res, batch,
                    lora_rank=cfg.lora.rank, adapter=cfg.lora.type, lora_conv=cfg.lora.conv,
                    lora_targets=_unet_targets(cfg.lora.targets),
                    lora_dropout=cfg.lora.dropout, lora_text_encoder=cfg.lora.text_encoder,
                    task="latent" if latent else "text2img", base_from_scratch=True, frozen_text_encoder=True,
                    text_vocab=int(te.get("vocab_size", 0)) or 256, **common)


def workload_for(cfg: RunConfig) -> Workload:
    """The job this config runs, as the profiler needs it: everything that decides what is allocated."""
    task = cfg.run.task
    res = int(cfg.data.resolution or default_resolution(task, cfg.model.size, cfg.model.pretrained) or 32)
    batch = cfg.train.batch_size * cfg.train.grad_accum
    # previews are drawn every run.sample_every steps and at the end (unless sample.final is off)
    previews = cfg.sample.final or cfg.run.sample_every > 0
    common = dict(ema=cfg.train.ema_decay > 0, preview=preview_of(cfg) if previews else None,
                  grad_clip=cfg.train.grad_clip, snr_gamma=cfg.train.snr_gamma)
    if task in FINETUNE_TASKS:
        from ..families import family_of

        extra = " + class images (prior preservation)" if cfg.data.class_data else ""
        return family_of(cfg.model).workload(cfg, res, batch, extra, common)  # the family knows its model
    builtin = cfg.data.source == "builtin"
    te = _text_config(_folder_config(cfg.model.text_encoder, "text_encoder")) if cfg.model.text_encoder else {}
    vae = _folder_config(cfg.model.vae, "vae") if cfg.model.vae else {}
    scratch_task = "text2img" if task == "text2img" else "latent"
    return Workload(
        "this job", f"{cfg.model.size} from scratch ({task}), {res}²", cfg.model.size, "scratch", res, batch,
        task="autoencoder" if task == "autoencoder" else scratch_task,
        autoencoder_stage=task == "autoencoder" or (task == "latent" and not cfg.model.vae),
        frozen_text_encoder=bool(cfg.model.text_encoder), text_encoder_overrides=(te,) if te else (),
        vae_overrides=vae, text_vocab=int(te.get("vocab_size", 0)) or (
            builtin_vocab_exact(cfg.data.num_images) if builtin else 256),
        validation_items=VALIDATION_ITEMS if builtin and cfg.run.val_every > 0 else 0,
        host_images=cfg.data.num_images if builtin else 0, **common,
        **({"preview": None} if task == "autoencoder" else {}),
    )



def sd_workload(cfg: RunConfig, res: int, batch: int, extra: str, common: dict[str, Any]) -> Workload:
    """The Workload of an SD 1.x/2.x/SDXL fine-tune (their families' ``workload``): the checkpoint's own
    UNet/VAE/text-encoder configs, the adapter, the text cache, class images."""
    from ..models.pretrained import detect_family

    task, lora = cfg.run.task, cfg.run.task == "lora"
    family = SD_FAMILY_WORKLOAD[cfg.model.family or detect_family(cfg.model.pretrained, None)]
    unet, vae, tes = _checkpoint_configs(cfg)
    what = cfg.lora.type if lora else task
    return Workload("this job", f"{family} {what}, {res}²{extra}", family, task, res, batch,
                    lora_rank=cfg.lora.rank, adapter=cfg.lora.type, lora_conv=lora and cfg.lora.conv,
                    lora_targets=_unet_targets(cfg.lora.targets),
                    lora_dropout=cfg.lora.dropout if lora else 0.0,
                    lora_text_encoder=lora and cfg.lora.text_encoder, unet_overrides=unet, vae_overrides=vae,
                    text_encoder_overrides=tes, text_every_step=cfg.data.shuffle_tags, prior=bool(cfg.data.class_data),
                    text_cache_batch=text_cache_batch(cfg), class_images=class_images_to_draw(cfg),
                    **common)


def family_of_run(cfg: RunConfig) -> Any:
    """The model family a fine-tune config trains (the registry's answer: SD, SDXL, FLUX.1, or the scratch
    family of a model lowvram trained from scratch), or None: a from-scratch task."""
    if cfg.run.task not in FINETUNE_TASKS or not cfg.model.pretrained:
        return None
    from ..families import family_of

    return family_of(cfg.model)
