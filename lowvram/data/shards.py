"""Tensors stored by content key on disk: the keys (a sha256 of a tensor's inputs), safetensors shards and a
locked JSON manifest that several writers share safely.

Layout of a store: ``<root>/<kind>/manifest.json`` (key -> shard, and a sha256 per shard) and
``<root>/<kind>/shards/*.safetensors``. Writers write a new shard (temp file + rename), then merge the manifest
under a lock file; damaged shards (checksum mismatch, bad header) are found by ``verify`` and dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import DataError
from ..fsutil import save_safetensors_atomic
from .report import write_json_atomic

try:  # POSIX; elsewhere an O_EXCL lock file is used
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("lowvram.data")
CACHE_VERSION = 1  # bump when the stored tensors change meaning (e.g. another resize filter in images.py)
SHARD_MAX_ENTRIES = 1024
STALE_ORPHAN_SECONDS = 3600  # shards no manifest names, older than this, are leftovers of a crash


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


@dataclass
class CacheStats:
    """What a build did: entries needed, found, encoded, and shards found damaged."""

    needed: int = 0
    hits: int = 0
    encoded: int = 0
    encode_calls: int = 0
    failed: int = 0
