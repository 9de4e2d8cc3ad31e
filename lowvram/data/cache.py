"""Latent and text-embedding caches on disk: encode once, train many times, share safely between runs.

Layout of a cache root: ``latents/`` and ``text/``, each with ``manifest.json`` (key -> shard, and a
sha256 per shard) and ``shards/*.safetensors``. A key is a sha256 of everything that determines the
stored tensor (image content hash, VAE identity, bucket size, dtype, flip, crop, background; or caption
text and encoder identity), so a cache entry is reused exactly while its inputs are unchanged. Writers
write a new shard (temp file + rename), then merge the manifest under a lock file; damaged shards
(checksum mismatch, bad header) are detected at ``build`` and re-encoded, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from ..errors import DataError
from ..fsutil import save_safetensors_atomic
from .buckets import BucketBatchSampler
from .images import ImageProblem
from .report import write_json_atomic

try:  # POSIX; elsewhere an O_EXCL lock file is used
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("lowvram.data")
CACHE_VERSION = 1  # bump when the stored tensors change meaning (e.g. another resize filter in images.py)
SHARD_MAX_ENTRIES = 1024
STALE_ORPHAN_SECONDS = 3600  # shards no manifest names, older than this, are leftovers of a crash


def default_cache_dir(settings: Any = None) -> Path:
    """``data.cache_dir``, else ``$LOWVRAM_CACHE``, else ``~/.cache/lowvram`` (keys are content hashes,
    so one cache serves every dataset)."""
    configured = getattr(settings, "cache_dir", "") if settings is not None else ""
    return Path(configured or os.environ.get("LOWVRAM_CACHE") or Path.home() / ".cache" / "lowvram").expanduser()


# --- identities -------------------------------------------------------------------------------------------


def module_identity(module: torch.nn.Module, extra: Any = None) -> str:
    """A cheap fingerprint of a frozen model: class, config, every tensor's name/shape/dtype, and a strided
    sample (<= 4096 values) of every tensor's bytes. Device-independent; changes when weights change."""
    h = hashlib.sha256()
    h.update(type(module).__qualname__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        # diffusers configs are dicts; transformers' PretrainedConfig is not, but has to_dict()
        cfg = config if isinstance(config, dict) else config.to_dict() if hasattr(config, "to_dict") else dict(config)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}  # _name_or_path etc. are not weights
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        sample = flat[::stride].contiguous().cpu()
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- the shard store ----------------------------------------------------------------------------------------


class ShardStore:
    """Tensors by key in safetensors shards + a JSON manifest; safe for several writers at once."""

    def __init__(self, root: str | Path, kind: str) -> None:
        self.root = Path(root) / kind
        self.kind = kind
        self.shard_dir = self.root / "shards"
        self.manifest_path = self.root / "manifest.json"
        self.lock_path = self.root / ".lock"
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()
        self._verified: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:  # worker processes open their own shard handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _mkdirs(self) -> None:
        self.shard_dir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lock(self, timeout: float = 600.0) -> Iterator[None]:
        """Exclusive lock for read-modify-write of the manifest (flock, or an O_EXCL file elsewhere)."""
        self._mkdirs()
        if fcntl is not None:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        deadline = time.monotonic() + timeout  # pragma: no cover - non-POSIX fallback
        while True:
            try:
                fd = os.open(str(self.lock_path) + ".excl", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise DataError(f"cache '{self.root}' stays locked", "delete the .lock.excl file if no run uses it") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            os.close(fd)
            os.unlink(str(self.lock_path) + ".excl")

    def read_manifest(self) -> dict[str, Any]:
        """The manifest (written by rename, so never half-written); a damaged one counts as empty."""
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            if data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
                data.setdefault("shards", {})
                return data
            log.warning("cache manifest %s has another version: rebuilding", self.manifest_path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError):
            log.warning("cache manifest %s is damaged: rebuilding", self.manifest_path)
        return {"version": CACHE_VERSION, "kind": self.kind, "entries": {}, "shards": {}}

    def _shard_ok(self, name: str, record: dict[str, Any]) -> bool:
        path = self.shard_dir / name
        try:
            if path.stat().st_size != record.get("bytes") or _file_sha256(path) != record.get("sha256"):
                return False
            with safe_open(str(path), framework="pt") as f:  # header must parse too
                f.keys()
            return True
        except Exception:
            return False

    def verify(self, keys: Iterable[str]) -> dict[str, Any]:
        """Check every shard holding one of ``keys``; drop damaged ones (and their entries). Returns the manifest."""
        manifest = self.read_manifest()
        names = {manifest["entries"][k]["shard"] for k in keys if k in manifest["entries"]}
        bad = [n for n in sorted(names - self._verified)
               if not self._shard_ok(n, manifest["shards"].get(n, {}))]
        self._verified |= names - set(bad)
        if bad:
            log.warning("cache %s: %d damaged shard(s) found, their entries are rebuilt: %s", self.root, len(bad), bad)
            with self.lock():
                manifest = self.read_manifest()
                for n in bad:
                    manifest["shards"].pop(n, None)
                    with contextlib.suppress(FileNotFoundError):
                        (self.shard_dir / n).unlink()
                manifest["entries"] = {k: v for k, v in manifest["entries"].items() if v["shard"] not in bad}
                write_json_atomic(self.manifest_path, manifest)
            self._handles.clear()
        return manifest

    def put(self, tensors: dict[str, torch.Tensor], meta: dict[str, dict[str, Any]] | None = None) -> None:
        """Write ``tensors`` (name -> tensor; entry key = name up to the first '.') as one new shard."""
        if not tensors:
            return
        self._mkdirs()
        name = f"{uuid.uuid4().hex}.safetensors"
        save_safetensors_atomic(tensors, self.shard_dir / name, {"lowvram": f"{self.kind}-v{CACHE_VERSION}"}, fsync=True)
        record = {"sha256": _file_sha256(self.shard_dir / name), "bytes": (self.shard_dir / name).stat().st_size,
                  "count": len(tensors)}
        keys = sorted({k.split(".", 1)[0] for k in tensors})
        with self.lock():
            manifest = self.read_manifest()
            manifest["shards"][name] = record
            for k in keys:  # another writer may have stored the same key: both copies are valid
                manifest["entries"].setdefault(k, {"shard": name, **((meta or {}).get(k, {}))})
            self._collect_orphans(manifest)
            write_json_atomic(self.manifest_path, manifest)
        self._verified.add(name)

    def _collect_orphans(self, manifest: dict[str, Any]) -> None:
        # Old shards no manifest names (a writer crashed before merging); recent ones may be a live writer's.
        now = time.time()
        used = {v["shard"] for v in manifest["entries"].values()}
        for name in list(manifest["shards"]):
            if name not in used:
                manifest["shards"].pop(name)
                with contextlib.suppress(FileNotFoundError):
                    (self.shard_dir / name).unlink()
        for p in self.shard_dir.glob("*.safetensors"):
            if p.name not in manifest["shards"]:
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime > STALE_ORPHAN_SECONDS:
                        p.unlink()

    def get(self, key: str, manifest: dict[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tensors ``key.name`` for each of ``names`` from the shard the manifest gives."""
        if os.getpid() != self._pid:  # forked worker: do not share mmap handles with the parent
            self._handles, self._pid = {}, os.getpid()
        entry = manifest["entries"].get(key)
        if entry is None:
            raise KeyError(key)
        shard = entry["shard"]
        try:
            handle = self._handles.get(shard)
            if handle is None:
                handle = self._handles[shard] = safe_open(str(self.shard_dir / shard), framework="pt")
            return {n: handle.get_tensor(f"{key}.{n}") for n in names}
        except Exception as e:
            raise DataError(f"cache shard {self.shard_dir / shard} cannot be read ({e})",
                            "run the cache step again (lowvram cache): damaged shards are rebuilt") from None


# --- latents --------------------------------------------------------------------------------------------------


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


@dataclass
class CacheStats:
    """What a build did: entries needed, found, encoded, and shards found damaged."""

    needed: int = 0
    hits: int = 0
    encoded: int = 0
    encode_calls: int = 0
    failed: int = 0


class LatentCache:
    """Latents of a dataset's images, encoded once by ``vae`` (both flips when data.flip is on)."""

    def __init__(self, root: str | Path, vae: torch.nn.Module | None, vae_identity: str | None = None,
                 dtype: torch.dtype = torch.float16, vae_factor: int | None = None) -> None:
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
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            for s in range(0, len(group), batch_size):
                loaded, pixels = [], []
                for u in group[s : s + batch_size]:
                    try:
                        pixels.append(dataset.load_source(u))
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


# --- text embeddings --------------------------------------------------------------------------------------------

EncodeFn = Callable[[list[str]], Any]


def _as_dict(out: Any) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"embeds": out}
    if isinstance(out, dict):
        return {str(k): v for k, v in out.items()}
    if isinstance(out, list | tuple):
        return {str(i): v for i, v in enumerate(out)}
    raise TypeError(f"encode_fn must return a tensor, a dict or a tuple of tensors, got {type(out).__name__}")


class TextEmbeddingCache:
    """Outputs of a frozen text encoder per caption (empty prompt included), keyed by text + encoder identity.

    ``encode_fn(list[str])`` returns a tensor [B, …], a dict of tensors or a tuple (e.g. SDXL hidden states
    and pooled embeddings); ``get`` returns the same structure batched.
    """

    def __init__(self, root: str | Path, encode_fn: EncodeFn | None, identity: str,
                 dtype: torch.dtype | None = None) -> None:
        self.encode_fn = encode_fn
        self.identity = identity
        self.dtype = dtype
        self.store = ShardStore(root, "text")
        self.stats = CacheStats()
        self._manifest: dict[str, Any] = self.store.read_manifest()
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self._structure: tuple[str, list[str]] | None = None  # ("tensor" | "dict" | "tuple", names)

    def key(self, caption: str) -> str:
        return _key(kind="text", text=caption, encoder=self.identity, dtype=str(self.dtype))

    def build(self, captions: Iterable[str], batch_size: int = 64, progress: bool = True) -> TextEmbeddingCache:
        """Encode every caption (and the empty prompt) not cached yet."""
        unique = sorted(set(captions) | {""})
        keys = {c: self.key(c) for c in unique}
        self._manifest = self.store.verify(keys.values())
        missing = [c for c in unique if keys[c] not in self._manifest["entries"]]
        self.stats = CacheStats(needed=len(unique), hits=len(unique) - len(missing))
        if missing:
            if self.encode_fn is None:
                raise DataError(f"{len(missing)} captions are not in the text cache {self.store.root}",
                                "pass the text encoder so they can be encoded")
            from tqdm import tqdm

            pending: dict[str, torch.Tensor] = {}
            for s in tqdm(range(0, len(missing), batch_size), desc="caching text", disable=not progress):
                chunk = missing[s : s + batch_size]
                for c, out in zip(chunk, self._encode(chunk), strict=True):
                    for name, t in out.items():
                        pending[f"{keys[c]}.{name}"] = t
                if len(pending) >= SHARD_MAX_ENTRIES:
                    self.store.put(pending)
                    pending = {}
            self.store.put(pending)
            self._manifest = self.store.read_manifest()
        return self

    def _encode(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        with torch.no_grad():
            raw = self.encode_fn(captions)  # type: ignore[misc]
        self.stats.encode_calls += 1
        self.stats.encoded += len(captions)
        if self._structure is None:
            kind = "tensor" if isinstance(raw, torch.Tensor) else "dict" if isinstance(raw, dict) else "tuple"
            self._structure = (kind, list(_as_dict(raw)))
        out = _as_dict(raw)
        rows = []
        for i in range(len(captions)):
            rows.append({n: (t[i].to("cpu", self.dtype) if self.dtype else t[i].cpu()).clone() for n, t in out.items()})
        return rows

    def get(self, captions: Sequence[str]) -> Any:
        """The embeddings of ``captions`` stacked; captions not cached are encoded now (kept in memory)."""
        rows: list[dict[str, torch.Tensor] | None] = []
        todo: list[int] = []
        for i, c in enumerate(captions):
            k = self.key(c)
            if k in self._memory:
                rows.append(self._memory[k])
            elif k in self._manifest["entries"]:
                names = self._structure[1] if self._structure else self._names_of(k)
                row = self.store.get(k, self._manifest, names)
                rows.append(row)
            else:
                rows.append(None)
                todo.append(i)
        if todo:
            if self.encode_fn is None:
                raise DataError(f"caption {captions[todo[0]]!r} is not in the text cache",
                                "build the text cache with every caption, or keep the text encoder loaded")
            new = self._encode([captions[i] for i in todo])
            for i, row in zip(todo, new, strict=True):
                self._memory[self.key(captions[i])] = row
                rows[i] = row
        batch = {n: torch.stack([r[n] for r in rows]) for n in rows[0]}  # type: ignore[index]
        kind = self._structure[0] if self._structure else ("tensor" if list(batch) == ["embeds"] else "dict")
        if kind == "tensor":
            return batch["embeds"]
        if kind == "tuple":
            return tuple(batch[str(i)] for i in range(len(batch)))
        return batch

    def _names_of(self, key: str) -> list[str]:
        shard = self._manifest["entries"][key]["shard"]
        with safe_open(str(self.store.shard_dir / shard), framework="pt") as f:
            names = sorted(k.split(".", 1)[1] for k in f.keys() if k.startswith(key + "."))
        kind = "tensor" if names == ["embeds"] else ("tuple" if all(n.isdigit() for n in names) else "dict")
        if kind == "tuple":
            names = sorted(names, key=int)
        self._structure = (kind, names)
        return names

    def flush(self) -> None:
        """Persist captions encoded on the fly by ``get`` (e.g. shuffled tag orders)."""
        pending = {f"{k}.{n}": t for k, row in self._memory.items() for n, t in row.items()}
        self.store.put(pending)
        self._memory.clear()
        self._manifest = self.store.read_manifest()


def dataset_captions(dataset: Any) -> set[str]:
    """Every caption the dataset can hand out when its caption rules are static (no tag shuffle):
    each source's caption with prefix/suffix, and the empty prompt."""
    rules = dataset.rules
    return {f"{rules.prefix}{dataset.source_caption(u)}{rules.suffix}" for u in range(dataset.num_sources())} | {""}


# --- one call for the CLI -----------------------------------------------------------------------------------------


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
    cache = LatentCache(root, vae, dtype=dtype)
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
