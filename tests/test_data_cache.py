"""Latent and text-embedding caches: reuse, exact invalidation, damaged shards, concurrent writers, equality."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from lowvram.config import RunConfig
from lowvram.data.cache import (
    LatentCache,
    ShardStore,
    TextEmbeddingCache,
    build_cache,
    dataset_captions,
    encode_latents,
    module_identity,
)
from lowvram.data.dataset import build_dataset, collate


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32,
    )
    return vae.eval().requires_grad_(False)


class CountingVAE(torch.nn.Module):
    """Wraps a VAE and counts encode calls (what the cache must avoid on a hit)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae
        self.config = vae.config
        self.calls = 0

    def encode(self, x):
        self.calls += 1
        return self.vae.encode(x)


def _folder(root: Path, n: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (48, 24), (24, 48), (40, 40), (60, 30), (30, 30)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"image number {i}")
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


def _build(root: Path, cfg: RunConfig, vae: torch.nn.Module, **kw):
    ds = build_dataset(cfg, echo=None)
    cache = LatentCache(root, vae, module_identity(vae.vae if isinstance(vae, CountingVAE) else vae), **kw)
    view = cache.build(ds, batch_size=4, progress=False)
    return ds, cache, view


def test_second_run_hits_without_encoding(tmp_path):
    data = _folder(tmp_path / "data")
    vae = CountingVAE(tiny_vae())
    ds, cache, view = _build(tmp_path / "cache", _cfg(data), vae)
    assert vae.calls > 0 and cache.stats.encoded == 2 * 6  # both flips
    first = [view[i]["latents"] for i in range(len(view))]
    vae.calls = 0
    _, cache2, view2 = _build(tmp_path / "cache", _cfg(data), vae)
    assert vae.calls == 0 and cache2.stats.hits == 12 and cache2.stats.encoded == 0
    assert all(torch.equal(a, view2[i]["latents"]) for i, a in enumerate(first))


def test_batches_from_the_cache_equal_batches_computed_without_it(tmp_path):
    data = _folder(tmp_path / "data")
    vae = tiny_vae()
    ds, _, view = _build(tmp_path / "cache", _cfg(data), vae, dtype=torch.float32)
    sampler = ds.make_sampler(2)
    for _ in range(2):  # two epochs: different flips and caption draws
        for batch in sampler:
            plain = collate([ds[i] for i in batch])
            cached = collate([view[i] for i in batch])
            assert cached["caption"] == plain["caption"] and cached["key"] == plain["key"]
            expected = encode_latents(vae, plain["pixel_values"])
            torch.testing.assert_close(cached["latents"], expected, rtol=1e-4, atol=1e-5)
    _, _, half = _build(tmp_path / "cache16", _cfg(data), vae, dtype=torch.float16)
    for i in range(len(half)):
        assert half[i]["latents"].dtype == torch.float16
        torch.testing.assert_close(half[i]["latents"].float(), view[i]["latents"], rtol=1e-2, atol=2e-3)


def test_invalidation_is_exact_for_each_input(tmp_path):
    data = _folder(tmp_path / "data")
    root = tmp_path / "cache"
    vae = CountingVAE(tiny_vae())
    _build(root, _cfg(data), vae)

    (data / "0.txt").write_text("a brand new caption")  # captions do not shape latents
    _, cache, _ = _build(root, _cfg(data), vae)
    assert cache.stats.encoded == 0

    Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(data / "1.png")  # new bytes, same name
    _, cache, _ = _build(root, _cfg(data), vae)
    assert cache.stats.encoded == 2  # that image, both flips

    _, cache, _ = _build(root, _cfg(data, flip=False), vae)
    assert cache.stats.encoded == 0  # unflipped latents are already there

    changed = CountingVAE(copy.deepcopy(vae.vae))
    with torch.no_grad():
        changed.vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    _, cache, _ = _build(root, _cfg(data), changed)
    assert cache.stats.encoded == 12  # another VAE: everything

    _, cache, _ = _build(root, _cfg(data, resolution=64), vae)
    assert cache.stats.encoded == 12  # other buckets: everything

    _, cache, _ = _build(root, _cfg(data), vae, dtype=torch.float32)
    assert cache.stats.encoded == 12  # another storage dtype

    _, cache, _ = _build(root, _cfg(data), vae)
    assert cache.stats.encoded == 0  # and the original entries are all still valid


def test_damaged_shards_are_detected_and_rebuilt(tmp_path):
    data = _folder(tmp_path / "data")
    root = tmp_path / "cache"
    vae = tiny_vae()
    _, _, view = _build(root, _cfg(data), vae)
    good = [view[i]["latents"] for i in range(len(view))]
    shards = sorted((root / "latents" / "shards").glob("*.safetensors"))
    assert shards
    raw = bytearray(shards[0].read_bytes())
    raw[-5] ^= 0xFF  # one flipped bit in the data: the header still parses, the checksum does not match
    shards[0].write_bytes(bytes(raw))
    _, cache, view = _build(root, _cfg(data), vae)
    assert cache.stats.encoded == 12
    assert all(torch.equal(a, view[i]["latents"]) for i, a in enumerate(good))

    shard = next((root / "latents" / "shards").glob("*.safetensors"))
    shard.write_bytes(b"\xff" * 8 + b"{garbage")  # a broken header
    _, cache, view = _build(root, _cfg(data), vae)
    assert cache.stats.encoded == 12
    assert all(torch.equal(a, view[i]["latents"]) for i, a in enumerate(good))

    (root / "latents" / "manifest.json").write_text("{ truncated")  # a damaged manifest is rebuilt too
    _, cache, _ = _build(root, _cfg(data), vae)
    assert cache.stats.encoded == 12


def _consistent(root: Path) -> dict:
    store = ShardStore(root, "latents")
    manifest = store.read_manifest()
    for name, rec in manifest["shards"].items():
        assert store._shard_ok(name, rec), name
    for key, entry in manifest["entries"].items():
        assert entry["shard"] in manifest["shards"]
        assert store.get(key, manifest, ["latents"])["latents"].shape[0] == 4
    return manifest


def test_concurrent_writers_leave_a_consistent_cache(tmp_path):
    data_a = _folder(tmp_path / "a")
    data_b = _folder(tmp_path / "b", n=5)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data_b / "extra.png")
    root = tmp_path / "cache"
    vae = tiny_vae()
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def worker(data: Path) -> None:
        try:
            barrier.wait()
            _build(root, _cfg(data), copy.deepcopy(vae))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(d,)) for d in (data_a, data_a, data_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    manifest = _consistent(root)
    assert len(manifest["entries"]) == 2 * 7  # 6 images shared by both folders + extra.png, both flips
    for d in (data_a, data_b):
        _, cache, _ = _build(root, _cfg(d), vae)
        assert cache.stats.encoded == 0


def test_builtin_dataset_is_cacheable(tmp_path):
    cfg = RunConfig()
    cfg.data.num_images = 6
    cfg.data.resolution = 32
    vae = tiny_vae()
    result = build_cache(cfg, vae, cache_dir=tmp_path, progress=False, echo=None)
    assert len(result.latents) == 6
    item = result.latents[3]
    assert item["latents"].shape == (4, 16, 16) and item["key"] == result.dataset[3]["key"]
    expected = encode_latents(vae, result.dataset[3]["pixel_values"][None])[0]
    torch.testing.assert_close(item["latents"].float(), expected, rtol=1e-2, atol=2e-3)


class CountingEncoder:
    """A fake frozen text encoder: deterministic per text, counting calls and texts."""

    def __init__(self, pooled: bool = False) -> None:
        self.calls = 0
        self.texts: list[str] = []
        self.pooled = pooled

    def __call__(self, captions: list[str]):
        self.calls += 1
        self.texts += captions
        rows = []
        for c in captions:
            g = torch.Generator().manual_seed(sum(map(ord, c)) * 31 + len(c))
            rows.append(torch.randn(7, 5, generator=g))
        hidden = torch.stack(rows)
        return (hidden, hidden.mean(dim=1)) if self.pooled else hidden


def test_text_cache_reuse_invalidation_and_empty_prompt(tmp_path):
    enc = CountingEncoder()
    caps = ["a cat", "a dog", "a cat"]
    TextEmbeddingCache(tmp_path, enc, "enc-1").build(caps, progress=False)
    assert sorted(enc.texts) == ["", "a cat", "a dog"]  # unique, and the empty prompt
    enc.texts.clear()
    cache = TextEmbeddingCache(tmp_path, enc, "enc-1").build(caps + ["a bird"], progress=False)
    assert enc.texts == ["a bird"]
    enc.calls = 0
    got = cache.get(["a dog", "", "a bird"])
    assert enc.calls == 0
    torch.testing.assert_close(got, enc(["a dog", "", "a bird"]))
    enc.texts.clear()
    TextEmbeddingCache(tmp_path, enc, "enc-2").build(caps, progress=False)
    assert sorted(enc.texts) == ["", "a cat", "a dog"]  # another encoder identity: all again


def test_text_cache_tuple_outputs_and_on_the_fly_captions(tmp_path):
    enc = CountingEncoder(pooled=True)
    TextEmbeddingCache(tmp_path, enc, "sdxl").build(["x, y"], progress=False)
    cache = TextEmbeddingCache(tmp_path, None, "sdxl")  # encoder already offloaded
    hidden, pooled = cache.get(["x, y", ""])
    ref_hidden, ref_pooled = enc(["x, y", ""])
    torch.testing.assert_close(hidden, ref_hidden)
    torch.testing.assert_close(pooled, ref_pooled)
    live = TextEmbeddingCache(tmp_path, enc, "sdxl")
    enc.texts.clear()
    live.get(["y, x"])  # a shuffled order never cached: encoded now, persisted by flush
    live.flush()
    assert enc.texts == ["y, x"]
    assert len(TextEmbeddingCache(tmp_path, None, "sdxl").get(["y, x"])) == 2


def test_dataset_captions_include_prefix_and_empty_prompt(tmp_path):
    data = _folder(tmp_path / "data", n=3)
    ds = build_dataset(_cfg(data, caption_prefix="sks, "), echo=None)
    assert dataset_captions(ds) == {"", "sks, image number 0", "sks, image number 1", "sks, image number 2"}


def test_module_identity_tracks_weights_and_config():
    vae = tiny_vae()
    same = copy.deepcopy(vae)
    assert module_identity(vae) == module_identity(same)
    with torch.no_grad():
        same.decoder.conv_out.bias[0] += 1e-4
    assert module_identity(vae) != module_identity(same)
    assert module_identity(vae) != module_identity(tiny_vae(seed=1))
    assert module_identity(vae) != module_identity(vae.to(torch.float16))


def test_cache_manifest_records_a_checksum_per_shard(tmp_path):
    data = _folder(tmp_path / "data", n=2)
    _build(tmp_path / "cache", _cfg(data), tiny_vae())
    manifest = json.loads((tmp_path / "cache" / "latents" / "manifest.json").read_text())
    assert manifest["shards"] and all(len(r["sha256"]) == 64 for r in manifest["shards"].values())


@pytest.mark.parametrize("failing", ["3.png"])
def test_an_image_failing_during_caching_is_skipped(tmp_path, failing):
    data = _folder(tmp_path / "data")
    ds = build_dataset(_cfg(data), run_dir=tmp_path / "run", echo=None)
    (data / failing).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    view = LatentCache(tmp_path / "cache", tiny_vae(), "v").build(ds, progress=False)
    keys = {view[i]["key"].split("#")[0] for i in range(len(view))}
    assert failing not in keys and len(keys) == 5
    assert [s["path"] for s in ds.report.midrun_failures()] == [failing]


def _writer_process(root: str, worker: int) -> None:
    store = ShardStore(root, "latents")
    for j in range(8):
        key = f"{(worker * 5 + j) % 12:064x}"  # workers overlap on some keys
        store.put({f"{key}.latents": torch.full((4, 2, 2), float(int(key, 16)))}, {key: {"by": worker}})


def test_concurrent_writer_processes_keep_every_entry(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer_process, args=(str(tmp_path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    manifest = _consistent(tmp_path)
    assert len(manifest["entries"]) == 12
    store = ShardStore(tmp_path, "latents")
    for key in manifest["entries"]:
        assert torch.equal(store.get(key, manifest, ["latents"])["latents"], torch.full((4, 2, 2), float(int(key, 16))))
    leftovers = [p.name for p in (tmp_path / "latents" / "shards").iterdir() if p.name not in manifest["shards"]]
    assert leftovers == []  # shards whose keys another writer stored first are collected at once
