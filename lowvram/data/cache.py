"""Latent and text-embedding caches on disk, filled in one call: encode once, train many times, share safely
between runs.

A cache root holds ``latents/`` (``latent_cache``) and ``text/`` (``text_embeddings``), each a content-keyed
shard store (``shards``): a key is a sha256 of everything that determines the stored tensor (image content hash,
VAE identity, bucket size, dtype, flip, crop, background; or caption text and encoder identity), so a cache
entry is reused exactly while its inputs are unchanged; damaged shards are detected at ``build`` and
re-encoded, never trusted. The caches' names are importable from here, where the trainer and tools find them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .latent_cache import LatentCache, LatentCacheDataset, encode_latents
from .shards import CacheStats, ShardStore, module_identity
from .text_embeddings import EncodeFn, TextEmbeddingCache, dataset_captions

__all__ = ["CacheResult", "CacheStats", "EncodeFn", "LatentCache", "LatentCacheDataset", "ShardStore",
           "TextEmbeddingCache", "build_cache", "dataset_captions", "default_cache_dir", "encode_latents",
           "module_identity"]


def default_cache_dir(settings: Any = None) -> Path:
    """``data.cache_dir``, else ``$LOWVRAM_CACHE``, else ``~/.cache/lowvram`` (keys are content hashes,
    so one cache serves every dataset)."""
    configured = getattr(settings, "cache_dir", "") if settings is not None else ""
    return Path(configured or os.environ.get("LOWVRAM_CACHE") or Path.home() / ".cache" / "lowvram").expanduser()


@dataclass
class CacheResult:
    """What ``build_cache`` made: the image dataset, its cached latent view and the text cache (or None)."""

    dataset: Any
    latents: LatentCacheDataset
    text: TextEmbeddingCache | None
    root: Path


def build_cache(cfg: Any, vae: torch.nn.Module, *, text_encode_fn: EncodeFn | None = None,
                text_identity: str | None = None, text_encoder: torch.nn.Module | None = None,
                cache_dir: str | Path | None = None, run_dir: str | Path | None = None, dataset: Any = None,
                resolution: int | None = None,
                dtype: torch.dtype = torch.float16, batch_size: int = 8, progress: bool = True,
                echo: Callable[[str], None] | None = print) -> CacheResult:
    """Validate the data source, then fill the latent cache (and the text cache when an encode function is
    given). Afterwards the caller may move ``vae`` / the text encoder off the training device."""
    from .dataset import DataSettings, build_dataset

    settings = DataSettings.from_config(cfg, resolution=resolution)
    if dataset is None:
        dataset = build_dataset(cfg, resolution=resolution, run_dir=run_dir, echo=echo)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir(settings)
    cache = LatentCache(root, vae, dtype=dtype, threads=settings.workers)
    latents = cache.build(dataset, batch_size=batch_size, progress=progress)
    if echo:
        st = cache.stats
        echo(f"latent cache {cache.store.root}: {st.needed} latents, {st.hits} reused, {st.encoded} encoded"
             + (f", {st.failed} images failed" if st.failed else ""))
    text = None
    if text_encode_fn is not None:
        if text_identity is None:
            if text_encoder is None:
                raise ValueError("give text_identity or text_encoder with text_encode_fn")
            text_identity = module_identity(text_encoder)
        text = TextEmbeddingCache(root, text_encode_fn, text_identity)
        text.build(dataset_captions(dataset), progress=progress)
        if echo:
            note = " (tag shuffling: shuffled orders are encoded during training)" if settings.shuffle_tags else ""
            echo(f"text cache {text.store.root}: {text.stats.needed} captions, {text.stats.hits} reused{note}")
    return CacheResult(dataset, latents, text, root)
