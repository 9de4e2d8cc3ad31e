"""The latent cache: each image of a dataset encoded once by the VAE (both flips, loss masks on the latent grid),
read back as a dataset with the same order, buckets and captions as the images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .buckets import BucketBatchSampler
from .images import ImageProblem
from .prefetch import fetched_ahead
from .shards import SHARD_MAX_ENTRIES, CacheStats, ShardStore, _key, module_identity

log = logging.getLogger("lowvram.data")


def encode_latents(vae: torch.nn.Module, pixels: torch.Tensor, *, sample: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] -> scaled latents, as the UNet trains on them.

    ``(z - shift_factor) * scaling_factor`` with z the posterior mean (``sample=False``, what the cache
    stores, so cached and uncached batches agree) or a posterior sample.
    """
    param = next(vae.parameters())
    with torch.no_grad():
        dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
    config = getattr(vae, "config", {})
    shift = getattr(config, "shift_factor", None) or 0.0
    scale = getattr(config, "scaling_factor", None) or 1.0
    return (z - shift) * scale


class LatentCache:
    """Latents of a dataset's images, encoded once by ``vae`` (both flips when data.flip is on)."""

    def __init__(self, root: str | Path, vae: torch.nn.Module | None, vae_identity: str | None = None,
                 dtype: torch.dtype = torch.float16, vae_factor: int | None = None, threads: int = 0) -> None:
        if vae_identity is None:
            if vae is None:
                raise ValueError("give vae_identity when no VAE is passed")
            from ..models.vae_tiles import tiling_identity

            vae_identity = module_identity(vae, extra=tiling_identity(vae))  # tiled latents differ a little
        self.vae = vae
        self.vae_identity = vae_identity
        self.dtype = dtype
        # pixels per latent cell: what a loss mask is averaged over (data/masks.py)
        blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
        self.vae_factor = vae_factor or (2 ** (len(blocks) - 1) if blocks else 8)
        self.store = ShardStore(root, "latents")
        self.stats = CacheStats()
        self.threads = threads  # image decoding threads (data.workers); 0: in the calling thread

    def key(self, dataset: Any, source: int, flip: bool) -> str:
        """The cache key of one source image of ``dataset`` (content hash + everything that shapes its latent)."""
        s = dataset.settings
        w, h = dataset.buckets[dataset.source_bucket(source)]
        return _key(kind="latent", image=dataset.source_id(source), vae=self.vae_identity, size=[w, h],
                    dtype=str(self.dtype), flip=bool(flip), crop="center", background=list(s.background_rgb()))

    def mask_key(self, dataset: Any, source: int, flip: bool) -> str | None:
        """The cache key of a source's loss mask on the latent grid (None without a mask). A mask is its own
        entry, keyed by the mask's content: adding or editing a mask does not re-encode the image."""
        mask_id = dataset.source_mask_id(source)
        if mask_id is None:
            return None
        w, h = dataset.buckets[dataset.source_bucket(source)]
        return _key(kind="mask", mask=mask_id, size=[w, h], grid=[w // self.vae_factor, h // self.vae_factor],
                    pool="area", flip=bool(flip), crop="center")

    def build(self, dataset: Any, batch_size: int = 8, progress: bool = True) -> LatentCacheDataset:
        """Encode every missing latent (and loss mask) of ``dataset`` and return the cached view of it."""
        flips = (False, True) if dataset.settings.flip else (False,)
        if dataset.settings.crop == "random":
            log.warning("data.crop = random is not cached: cached latents use centre crops")
        keys = {(u, f): self.key(dataset, u, f) for u in range(dataset.num_sources()) for f in flips}
        mask_keys = {(u, f): k for u in range(dataset.num_sources()) for f in flips
                     if (k := self.mask_key(dataset, u, f)) is not None}
        manifest = self.store.verify([*keys.values(), *mask_keys.values()])
        missing_sources = sorted({u for (u, f), k in keys.items() if k not in manifest["entries"]})
        self.stats = CacheStats(needed=len(keys), hits=sum(k in manifest["entries"] for k in keys.values()))
        if missing_sources:
            if self.vae is None:
                raise DataError(f"{len(missing_sources)} images are not in the latent cache {self.store.root}",
                                "pass the VAE so they can be encoded")
            self._encode(dataset, missing_sources, flips, keys, batch_size, progress, mask_keys)
        missing_masks = sorted({u for (u, f), k in mask_keys.items() if k not in manifest["entries"]}
                               - set(missing_sources))
        if missing_masks:  # the latents are cached, their masks are new: no VAE needed
            pending: dict[str, torch.Tensor] = {}
            meta: dict[str, dict[str, Any]] = {}
            for u in missing_masks:
                if self._masks_of(dataset, u, flips, mask_keys, pending, meta):
                    self.stats.failed += 1
            self.store.put(pending, meta)
        for u in sorted(set(missing_sources) | set(missing_masks)):
            if dataset.is_bad(u):
                for f in flips:
                    keys.pop((u, f), None)
                    mask_keys.pop((u, f), None)
        manifest = self.store.read_manifest()
        return LatentCacheDataset(dataset, self.store, manifest, keys, mask_keys)

    def _masks_of(self, dataset: Any, u: int, flips: tuple[bool, ...], mask_keys: dict,
                  pending: dict[str, torch.Tensor], meta: dict[str, dict[str, Any]]) -> bool:
        """Add source ``u``'s loss masks on the latent grid to ``pending``; True if its mask failed to load."""
        from .masks import to_latent_grid

        if not any((u, f) in mask_keys for f in flips):
            return False
        try:
            mask = dataset.load_mask(u)
        except Exception as e:  # like an image: reported, and the image is replaced by another one
            reason, detail = (e.reason, e.detail) if isinstance(e, ImageProblem) else ("corrupt", f"{type(e).__name__}: {e}")
            dataset.mark_bad(u, reason, f"loss mask: {detail}")
            return True
        w, h = dataset.buckets[dataset.source_bucket(u)]
        for flip in flips:
            m = torch.flip(mask, dims=[-1]) if flip else mask
            k = mask_keys[(u, flip)]
            pending[f"{k}.mask"] = to_latent_grid(m[None], (h // self.vae_factor, w // self.vae_factor))[0].contiguous()
            meta[k] = {"source": dataset.source_key(u), "flip": flip, "kind": "mask"}
        return False

    def _encode(self, dataset: Any, sources: list[int], flips: tuple[bool, ...], keys: dict, batch_size: int,
                progress: bool, mask_keys: dict | None = None) -> None:
        from tqdm import tqdm

        by_bucket: dict[int, list[int]] = {}
        for u in sources:
            by_bucket.setdefault(dataset.source_bucket(u), []).append(u)
        pending: dict[str, torch.Tensor] = {}
        meta: dict[str, dict[str, Any]] = {}
        bar = tqdm(total=len(sources), desc="caching latents", unit="img", disable=not progress)
        # the next batch's images are decoded in background threads while the VAE encodes this one; one
        # batch of pixels ahead is host memory (on the cpu preset, beside the encode: a batch of pixels
        # next to the VAE's activations of the same batch, far below the training step's peak)
        order = [u for bucket in sorted(by_bucket) for u in by_bucket[bucket]]
        decoded = fetched_ahead(dataset.load_source, order, threads=self.threads, depth=batch_size)
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            for s in range(0, len(group), batch_size):
                loaded, pixels = [], []
                for u in group[s : s + batch_size]:
                    image = next(decoded)
                    assert image.item == u  # the same order as the loop
                    try:
                        pixels.append(image.get())
                        if self._masks_of(dataset, u, flips, mask_keys or {}, pending, meta):
                            pixels.pop()
                            self.stats.failed += 1
                            continue
                        loaded.append(u)
                    except ImageProblem as e:
                        dataset.mark_bad(u, e.reason, e.detail)
                        self.stats.failed += 1
                    except Exception as e:  # one bad file never stops the cache step
                        dataset.mark_bad(u, "corrupt", f"{type(e).__name__}: {e}")
                        self.stats.failed += 1
                bar.update(len(group[s : s + batch_size]))
                if not loaded:
                    continue
                batch = torch.stack(pixels)
                for flip in flips:
                    latents = encode_latents(self.vae, torch.flip(batch, dims=[-1]) if flip else batch)
                    self.stats.encode_calls += 1
                    for u, z in zip(loaded, latents.to("cpu", self.dtype), strict=True):
                        k = keys[(u, flip)]
                        pending[f"{k}.latents"] = z.clone()
                        meta[k] = {"source": dataset.source_key(u), "flip": flip}
                        self.stats.encoded += 1
                if len(pending) >= SHARD_MAX_ENTRIES:
                    self.store.put(pending, meta)
                    pending, meta = {}, {}
        self.store.put(pending, meta)
        bar.close()


class LatentCacheDataset(Dataset):
    """The cached view of a dataset: items ``{"latents", "caption", "key"}`` (and ``"mask"`` on the latent
    grid for images with a loss mask) in the same order, with the same flips and captions as the image
    dataset (same stream indices, same BucketBatchSampler)."""

    def __init__(self, dataset: Any, store: ShardStore, manifest: dict[str, Any], keys: dict,
                 mask_keys: dict | None = None) -> None:
        self.dataset = dataset
        self.store = store
        self.manifest = manifest
        self.keys = keys
        self.mask_keys = mask_keys or {}
        self.bucket_ids = dataset.bucket_ids
        self.buckets = dataset.buckets
        self.report = dataset.report
        self.settings = dataset.settings

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        plan = self.dataset.plan(index)
        key = self.keys.get((plan.source, plan.flip))
        if key is None:
            raise DataError(f"{self.dataset.source_key(plan.source)} is not in the latent cache",
                            "run the cache step again (lowvram cache)")
        latents = self.store.get(key, self.manifest, ["latents"])["latents"]
        item = {"latents": latents, "caption": plan.caption, "key": plan.key}
        mask_key = self.mask_keys.get((plan.source, plan.flip))
        if mask_key is not None:
            item["mask"] = self.store.get(mask_key, self.manifest, ["mask"])["mask"]
        return item

    def make_sampler(self, batch_size: int, *, seed: int | None = None, drop_last: bool = False) -> BucketBatchSampler:
        return self.dataset.make_sampler(batch_size, seed=seed, drop_last=drop_last)

    def write_report(self, run_dir: str | Path) -> Path:
        return self.dataset.write_report(run_dir)

