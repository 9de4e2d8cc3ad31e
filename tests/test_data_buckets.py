"""Aspect-ratio buckets and the bucket batch sampler: bounds, nearest ratio, determinism, exact resume."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowvram.config import RunConfig
from lowvram.data.buckets import BucketBatchSampler, effective_step, make_buckets, nearest_bucket
from lowvram.data.dataset import build_dataset, make_loader
from lowvram.errors import DataError


@pytest.mark.parametrize("resolution,step", [(512, 64), (1024, 64), (768, 64), (64, 8), (32, 8)])
def test_buckets_respect_area_step_and_ratio(resolution, step):
    buckets = make_buckets(resolution, step, max_ratio=2.0)
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w * h <= resolution * resolution
        assert w % step == 0 and h % step == 0
        assert max(w, h) / min(w, h) <= 2.0
        # the tallest for its width, or the transpose of one: no bucket is needlessly small
        assert (h + step) * w > resolution * resolution or (w + step) * h > resolution * resolution
        assert (h, w) in buckets
    assert len(set(buckets)) == len(buckets)
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_sd_buckets_match_the_usual_list():
    buckets = set(make_buckets(512, 64))  # default max_ratio 4: kohya's 256..1024 range at 512
    assert {(512, 512), (576, 448), (448, 576), (640, 384), (384, 640), (704, 320), (320, 704), (1024, 256),
            (256, 1024)} <= buckets
    assert max(max(w, h) / min(w, h) for w, h in buckets) <= 4.0


def test_tiny_resolutions_use_a_step_of_8():
    assert effective_step(512, 64) == 64
    assert effective_step(32, 64) == 8
    assert effective_step(128, 64) == 8
    assert make_buckets(32, effective_step(32), max_ratio=2.0) == [(24, 40), (32, 32), (40, 24)]


def test_nearest_bucket_by_aspect_ratio():
    buckets = make_buckets(512, 64)
    for w, h in [(1920, 1080), (1080, 1920), (1000, 1000), (3000, 2000), (640, 480), (5000, 1000)]:
        i = nearest_bucket(w, h, buckets)
        best = min(abs(math.log(bw / bh) - math.log(w / h)) for bw, bh in buckets)
        assert abs(math.log(buckets[i][0] / buckets[i][1]) - math.log(w / h)) == pytest.approx(best)
    assert buckets[nearest_bucket(1000, 1000, buckets)] == (512, 512)
    assert buckets[nearest_bucket(5000, 1000, buckets)] == max(buckets, key=lambda b: b[0] / b[1])


def _bucket_ids(n: int = 53) -> list[int]:
    return [i % 4 if i % 7 else 2 for i in range(n)]


def test_each_batch_comes_from_one_bucket_and_each_item_once_per_epoch():
    ids = _bucket_ids()
    sampler = BucketBatchSampler(ids, 4, seed=3)
    for epoch in range(3):
        batches = list(sampler)
        assert len(batches) == len(sampler)
        flat = [i - epoch * len(ids) for b in batches for i in b]
        assert sorted(flat) == list(range(len(ids)))
        for b in batches:
            assert len({ids[i % len(ids)] for i in b}) == 1 and 1 <= len(b) <= 4
    dropped = BucketBatchSampler(ids, 4, seed=3, drop_last=True)
    assert all(len(b) == 4 for b in dropped)
    with pytest.raises(DataError, match="batch_size"):
        BucketBatchSampler([0, 1, 2], 2, drop_last=True)


def test_sampler_is_deterministic_and_epochs_differ():
    ids = _bucket_ids()
    a, b = BucketBatchSampler(ids, 4, seed=1), BucketBatchSampler(ids, 4, seed=1)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b
    second = [[i - len(ids) for i in batch] for batch in a]
    assert second != first_a  # a new shuffle each epoch
    assert list(BucketBatchSampler(ids, 4, seed=2)) != first_a


def test_resume_continues_the_exact_order():
    ids = _bucket_ids()
    reference = BucketBatchSampler(ids, 4, seed=7)
    full = [batch for _ in range(3) for batch in reference]
    run = BucketBatchSampler(ids, 4, seed=7)
    seen = list(itertools.islice(iter(run), 5))
    state = run.state_dict()
    resumed = BucketBatchSampler(ids, 4, seed=7)
    resumed.load_state_dict(state)
    rest = [batch for _ in range(3) for batch in resumed]
    assert seen + rest[: len(full) - 5] == full
    # state_for(consumed) gives the same position without having iterated
    other = BucketBatchSampler(ids, 4, seed=7)
    other.load_state_dict(other.state_for(len(reference) + 2))
    assert next(iter(other)) == full[len(reference) + 2]


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (96, 48), (48, 96), (80, 40), (40, 40), (60, 64), (100, 50), (50, 100), (64, 32)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"image {i}")
    return root


def _cfg(source: Path, **data) -> RunConfig:
    cfg = RunConfig()
    cfg.data.source = str(source)
    cfg.data.resolution = 32
    cfg.data.caption_dropout = 0.2
    cfg.data.flip = True
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_images_go_to_their_nearest_bucket_and_load_at_that_size(tmp_path):
    ds = build_dataset(_cfg(_folder(tmp_path)), echo=None)
    for rec in ds.records:
        assert rec.bucket == nearest_bucket(rec.width, rec.height, ds.buckets)
    assert len(set(ds.bucket_ids)) == 3
    for i in range(len(ds)):
        w, h = ds.buckets[ds.bucket_ids[i]]
        assert tuple(ds[i]["pixel_values"].shape) == (3, h, w)
    off = build_dataset(_cfg(tmp_path, buckets=False), echo=None)
    assert {tuple(off[i]["pixel_values"].shape) for i in range(len(off))} == {(3, 32, 32)}


def test_random_crop_is_deterministic_per_seed_epoch_index(tmp_path):
    ds = build_dataset(_cfg(_folder(tmp_path), crop="random", buckets=False), echo=None)
    a = [ds[i]["pixel_values"] for i in range(2 * len(ds))]
    b = [ds[i]["pixel_values"] for i in range(2 * len(ds))]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    center = build_dataset(_cfg(tmp_path, buckets=False), echo=None)
    assert any(not torch.equal(ds[i]["pixel_values"], center[i]["pixel_values"]) for i in range(len(ds)))


def test_flip_mirrors_the_pixels(tmp_path):
    ds = build_dataset(_cfg(_folder(tmp_path), caption_dropout=0.0), echo=None)
    plain = build_dataset(_cfg(tmp_path, flip=False, caption_dropout=0.0), echo=None)
    flipped = [i for i in range(4 * len(ds)) if ds[i]["key"].endswith("#flip")]
    assert 0 < len(flipped) < 4 * len(ds)
    i = flipped[0]
    assert torch.equal(ds[i]["pixel_values"], torch.flip(plain[i % len(ds)]["pixel_values"], dims=[-1]))


def test_loader_batches_match_with_and_without_workers(tmp_path):
    ds = build_dataset(_cfg(_folder(tmp_path)), echo=None)
    loader0, _ = make_loader(ds, 2, seed=5, workers=0)
    loader1, _ = make_loader(ds, 2, seed=5, workers=1)
    for _ in range(2):  # two epochs
        for x, y in zip(loader0, loader1, strict=True):
            assert x["key"] == y["key"] and x["caption"] == y["caption"]
            assert torch.equal(x["pixel_values"], y["pixel_values"])
