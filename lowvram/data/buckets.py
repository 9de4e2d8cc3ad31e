"""Aspect-ratio buckets and the batch sampler that draws every batch from one bucket.

Buckets: (w, h) with both sides multiples of ``step``, area <= resolution², aspect ratio within
``max_ratio``; each image goes to the bucket whose aspect ratio is nearest (in log space). The sampler
is a pure function of (seed, epoch), so a resumed run continues the exact data order.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import Sampler

from ..errors import DataError

log = logging.getLogger("lowvram.data")

Bucket = tuple[int, int]


def effective_step(resolution: int, step: int = 64) -> int:
    """``step``, or 8 when the resolution is under 4 steps (64 would leave 32-px images one bucket)."""
    return step if resolution >= 4 * step else 8


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 4.0) -> list[Bucket]:
    """All (w, h) with sides in multiples of ``step``, w*h <= resolution², max(w,h)/min(w,h) <= max_ratio.

    For each width the tallest height that keeps the area is taken (the largest bucket of that shape),
    with its transpose, and the square ``resolution`` x ``resolution`` is always included (kohya's
    scheme). Sorted by aspect ratio.
    """
    area = resolution * resolution
    found: set[Bucket] = {(resolution, resolution)}
    w = step
    while w <= area // step:
        h = (area // w) // step * step
        if h >= step and max(w, h) / min(w, h) <= max_ratio + 1e-9:
            found.update({(w, h), (h, w)})  # portrait and landscape alike
        w += step
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket with the nearest aspect ratio (log distance; ties: the larger area, then wider)."""
    ratio = math.log(width / height)
    return min(
        range(len(buckets)),
        key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), -buckets[i][0] * buckets[i][1], -buckets[i][0]),
    )


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each batch from one bucket; deterministic given (seed, epoch).

    Yields *stream indices* ``epoch * num_items + i`` so that the dataset's per-sample randomness
    (flip, crop, caption dropout) also depends only on (seed, epoch, i), in worker processes too;
    datasets from ``build_dataset`` accept them. Iterating yields the rest of the current epoch and
    then advances the epoch. Resume with ``load_state_dict(state_for(batches_consumed))`` or the
    ``state_dict()`` saved with a checkpoint (exact when ``workers = 0``; with workers the DataLoader
    pre-fetches, so save ``state_for`` of the batches the loop really consumed).
    """

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, *, seed: int = 0, drop_last: bool = False,
                 shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.bucket_ids = list(bucket_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # batches of the current epoch already yielded
        self._cache: tuple[int, list[list[int]]] | None = None
        self._fingerprint = hashlib.sha256(repr((self.bucket_ids, batch_size, drop_last)).encode()).hexdigest()[:16]
        if not self.batches(0):
            raise DataError(f"no bucket holds {batch_size} images, so drop_last leaves no batch at all",
                            "lower train.batch_size, add images, or turn data.buckets off")

    @property
    def num_items(self) -> int:
        return len(self.bucket_ids)

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches as plain item indices (0..num_items-1), in order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(f"buckets-{self.seed}-{epoch}")
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_ids):
            groups.setdefault(b, []).append(i)
        out: list[list[int]] = []
        for b in sorted(groups):
            idx = groups[b]
            if self.shuffle:
                rng.shuffle(idx)
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    out.append(chunk)
        if self.shuffle:
            rng.shuffle(out)
        self._cache = (epoch, out)
        return out

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.batches(0))

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            batches = self.batches(self.epoch)
            if self.position >= len(batches):
                self.epoch += 1
                self.position = 0
                return
            batch = batches[self.position]
            self.position += 1
            offset = self.epoch * self.num_items
            yield [offset + i for i in batch]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is (counting batches it has yielded)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "fingerprint": self._fingerprint}

    def state_for(self, batches_consumed: int) -> dict[str, Any]:
        """The state after the loop has consumed ``batches_consumed`` batches since the start of training."""
        per_epoch = len(self)
        return {"epoch": batches_consumed // per_epoch, "position": batches_consumed % per_epoch,
                "seed": self.seed, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; a changed dataset or seed is logged (the order then differs)."""
        if state.get("fingerprint") not in (None, self._fingerprint) or state.get("seed", self.seed) != self.seed:
            log.warning("data changed since the checkpoint (other images, buckets, batch size or seed): "
                        "the data order after resuming differs from an uninterrupted run")
        self.epoch = int(state.get("epoch", 0))
        self.position = int(state.get("position", 0))
