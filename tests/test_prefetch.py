"""Images decoded ahead in background threads: same order, same values, errors in place, bounded, cancellable."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_data_cache import _cfg, _folder, tiny_vae

from lowvram.data.dataset import build_dataset
from lowvram.data.latent_cache import LatentCache
from lowvram.data.prefetch import fetched_ahead


def _square(i: int) -> int:
    if i == 3:
        raise ValueError("item 3 is corrupt")
    time.sleep(0.002 * (7 - i))  # earlier items finish later: order must not follow completion
    return i * i


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_order_values_and_errors_in_place(threads):
    out = list(fetched_ahead(_square, range(7), threads=threads, depth=4))
    assert [f.item for f in out] == list(range(7))
    assert [f.value for f in out if f.error is None] == [0, 1, 4, 16, 25, 36]
    with pytest.raises(ValueError, match="item 3"):
        out[3].get()


def test_work_runs_in_other_threads_at_most_depth_ahead():
    started: list[int] = []
    seen_threads: set[str] = set()
    lock = threading.Lock()

    def load(i: int) -> int:
        with lock:
            started.append(i)
            seen_threads.add(threading.current_thread().name)
        return i

    it = fetched_ahead(load, range(20), threads=2, depth=3)
    first = next(it)
    time.sleep(0.05)  # let the pool run as far ahead as it may
    assert first.item == 0
    assert max(started) <= 3  # item 0 consumed + 3 in flight, never the whole list
    assert all(name.startswith("lowvram-decode") for name in seen_threads)
    it.close()  # leaving early: no thread keeps loading the rest
    time.sleep(0.05)
    assert len(started) <= 5


def test_latents_decoded_ahead_equal_latents_decoded_in_turn(tmp_path):
    data = _folder(tmp_path / "data")
    datasets = {t: build_dataset(_cfg(data), run_dir=tmp_path / f"run{t}", echo=None) for t in (0, 2)}
    (data / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # fails mid-pass: reported as in a plain loop
    views, failures = [], []
    for threads, ds in datasets.items():
        cache = LatentCache(tmp_path / f"cache{threads}", tiny_vae(), "v", dtype=torch.float32, threads=threads)
        views.append(cache.build(ds, batch_size=2, progress=False))
        failures.append([s["path"] for s in ds.report.midrun_failures()])
        assert cache.stats.encoded == 2 * 5 and cache.stats.failed == 1
    assert failures == [["3.png"], ["3.png"]]
    plain, ahead = views
    assert len(plain) == len(ahead)
    for i in range(len(plain)):
        assert plain[i]["key"] == ahead[i]["key"]
        assert torch.equal(plain[i]["latents"], ahead[i]["latents"])
