"""The text-embedding cache: a frozen text encoder's outputs per caption, keyed by caption text and encoder
identity, encoded once and read back batched in the structure the encoder returned."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import DataError
from .shards import SHARD_MAX_ENTRIES, CacheStats, ShardStore, _key

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

