"""The fidelity harness's measure counts every byte a run holds: tensors made on threads the profiler does
not follow (transformers casts a checkpoint's tensors on a thread pool) and storages mapped from files.

A full-size SD 1.5 run once measured less than the fp32 weights it provably held: the text encoder, cast on
transformers' loading threads, was missing from the profiler's events.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from sd_fixtures import save_tiny

from lowvram.memory.fidelity import allocator_peak

WINDOW = "lowvram.test.window"
MIB = 2**20


def held_in_window(make):
    """(bytes the allocator measure says are live inside a window opened after ``make()``, make's result)."""

    def run():
        made = make()
        with torch.profiler.record_function(WINDOW):
            torch.empty(1)  # one report inside the window: the live bytes there
        return made

    return allocator_peak(run, window=WINDOW)


def storage_bytes(*models) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for m in models for t in (*m.parameters(), *m.buffers())}
    return sum(storages.values())


def test_a_tensor_made_on_a_worker_thread_is_counted():
    with ThreadPoolExecutor(max_workers=1) as pool:
        measured, made = held_in_window(lambda: pool.submit(torch.ones, 2 * MIB).result())
    assert made.nbytes == 8 * MIB
    assert 8 * MIB <= measured < 8 * MIB + MIB


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_a_loaded_checkpoint_measures_its_weights(tmp_path, dtype):
    """The tiny checkpoint is saved in fp32: loaded in fp16 its tensors are cast (the text encoder's on
    transformers' threads), in fp32 they may stay in the mapped safetensors file."""
    from lowvram.models.pretrained import load_pretrained

    folder = save_tiny(tmp_path, "sd1")["folder"]
    measured, comps = held_in_window(lambda: load_pretrained(folder, family="sd1", dtype=dtype))
    weights = storage_bytes(comps.unet, comps.vae, comps.text_encoder)
    assert weights <= measured <= 1.1 * weights, (measured, weights)
