"""A fine-tune's data: the image folder (and class images) opened before any model loads, and its latent/text caches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError
from .events import note


@dataclass
class FinetuneData:
    """The folder dataset with its bucket batches, and where latents and text embeddings come from."""

    dataset: Any
    epoch_batches: Callable[[int], list[list[int]]]
    latents: Any = None  # LatentCacheDataset, or None: encode with the VAE every step
    text: Any = None  # TextEmbeddingCache, or None: encode every step
    prior: Any = None  # data.prior.ClassImages (prior preservation), or None
    prior_latents: Any = None  # the class images' LatentCacheDataset, or None


def open_dataset(cfg: RunConfig, run_dir: Path) -> tuple[Any, Callable[[int], list[list[int]]]]:
    """Validate the folder before any model loads (see ``data.dataset.open_for_training``)."""
    from ..data.dataset import open_for_training

    return open_for_training(cfg, run_dir)


def open_finetune_data(cfg: RunConfig, run_dir: Path, cache_only: bool = False, scan_class: bool = True) -> FinetuneData:
    """The image folder (and class images, unless ``scan_class`` is off: some are still to be drawn) of a
    fine-tune, validated before any model loads."""
    from ..data.prior import open_class_images, scan_class_images

    if cfg.data.source == "builtin":
        raise ConfigError("lora/full fine-tunes need your images: data.source is 'builtin'",
                          "pass a folder of images with .txt captions (--data DIR)")
    # class images are validated before any model loads, and before open_dataset rewrites data_report.json
    # (a resumed run reuses their verdicts from it)
    class_scan = scan_class_images(cfg, run_dir) if cfg.data.class_data and scan_class else None
    ds, epoch_batches = open_dataset(cfg, run_dir)
    prior = open_class_images(cfg, ds, run_dir, scan=class_scan) if class_scan is not None else None
    if not cache_only:
        epoch_batches(0)  # fails now (DataError) when no bucket fills a batch, not mid-run
    return FinetuneData(ds, epoch_batches, prior=prior)


def default_prompts(ds: Any, n: int = 4) -> list[str]:
    caps = [ds.plan(i).caption for i in range(len(ds))]
    return list(dict.fromkeys(c for c in caps if c))[:n] or ["a photo"]


def build_caches(cfg: RunConfig, job: Any) -> None:
    """Encode latents (and text, when the text encoders stay frozen) once; then offload the frozen models
    if nothing needs them during training (previews bring them back for a moment)."""
    from ..data.cache import LatentCache, TextEmbeddingCache, dataset_captions, default_cache_dir
    from .text_cache import previews_from_cache

    ds = job.data.dataset
    root = default_cache_dir(cfg.data)
    if cfg.memory.cache_latents:
        cache = LatentCache(root, job.c.vae, dtype=job.c.vae.dtype, threads=cfg.data.workers)
        job.data.latents = cache.build(ds, batch_size=max(1, cfg.train.batch_size))
        st = cache.stats
        job.emit(note(f"latent cache {cache.store.root}: {st.needed} latents, {st.hits} reused, {st.encoded} encoded"))
        if job.data.prior is not None:  # class images: the same content-keyed cache
            job.data.prior_latents = cache.build(job.data.prior.dataset, batch_size=max(1, cfg.train.batch_size))
            st = cache.stats
            job.emit(note(f"latent cache (class images): {st.needed} latents, {st.hits} reused, {st.encoded} encoded"))
    if cfg.memory.cache_text and not job.train_text:
        text = TextEmbeddingCache(root, job.encode_text, job.text_identity())
        captions = dataset_captions(ds) | job.family.preview_captions(job)  # previews draw from the cache too
        if job.data.prior is not None:
            captions |= dataset_captions(job.data.prior.dataset)
        job.data.text = text.build(captions)
        job.emit(note(f"text cache {text.store.root}: {text.stats.needed} captions, {text.stats.hits} reused"))
    cached_text = job.data.text is not None
    cached_latents = job.data.latents is not None and (job.data.prior is None or job.data.prior_latents is not None)
    if cached_text and previews_from_cache(cfg.memory.cache_text, job.train_text, cfg.data.shuffle_tags):
        job.family.cache_preview_text(job)  # while the encoders are still where they encode
    if not frozen_stay_on_device(cfg.memory.offload_frozen, cached_latents, cached_text, job.train_text,
                                 cfg.data.shuffle_tags):
        for m in job.frozen:
            m.to("cpu")
        job.frozen_on_device = False
    if getattr(job.family, "preview_text", None) is not None:  # previews bring the VAE back, never the text encoders
        job.frozen = [m for m in job.frozen if m is job.c.vae]


def frozen_stay_on_device(offload: bool, cached_latents: bool, cached_text: bool, train_text: bool,
                          shuffle_tags: bool) -> bool:
    """Whether the frozen VAE and text encoders stay on the device while training (the profiler asks too).

    They leave it only together, and only when nothing encodes during training: latents and captions
    cached, no text-encoder LoRA, and no tag shuffling (it makes new captions every draw, encoded when drawn).
    """
    needs_text = not train_text and (not cached_text or shuffle_tags)
    return not offload or needs_text or not cached_latents
