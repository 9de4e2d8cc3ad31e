"""Checkpoints are atomic: a crash mid-save leaves the previous checkpoint intact and loadable."""

from __future__ import annotations

import pytest
import torch

from lowvram.errors import CheckpointError
from lowvram.train import checkpoint as ckpt

POSITION = {"epoch": 0, "batch_in_epoch": 0}


def _tensors(v: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {"w": torch.full((4, 4), v)}, "optimizer": {"state.0.exp_avg": torch.full((4,), v)},
            "rng": {"torch_cpu": torch.get_rng_state()}}


def test_save_and_load_round_trip(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 5, _tensors(1.5), {"epoch": 2, "batch_in_epoch": 3})
    tensors, meta = ckpt.load_checkpoint(path)
    assert meta == {"step": 5, "epoch": 2, "batch_in_epoch": 3}
    assert torch.equal(tensors["model"]["w"], torch.full((4, 4), 1.5))


def test_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 10, _tensors(1.0), POSITION)
    real = ckpt.save_file
    calls = {"n": 0}

    def crash_on_second_file(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")  # the process dies while writing the new checkpoint
        real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", crash_on_second_file)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 20, _tensors(2.0), {})
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000010"
    tensors, _ = ckpt.load_checkpoint(latest)
    assert torch.equal(tensors["model"]["w"], torch.ones(4, 4))
    assert not (tmp_path / "step-00000020").exists()


def test_resaving_a_step_replaces_it_whole(tmp_path):
    ckpt.save_checkpoint(tmp_path, 3, _tensors(1.0), POSITION)
    ckpt.save_checkpoint(tmp_path, 3, _tensors(7.0), {**POSITION, "note": "again"})
    tensors, meta = ckpt.load_checkpoint(tmp_path / "step-00000003")
    assert meta["note"] == "again" and torch.equal(tensors["model"]["w"], torch.full((4, 4), 7.0))
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("step-")] == []


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, _tensors(step), {}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, _tensors(1.0), POSITION)
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="damaged"):
        ckpt.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a lowvram checkpoint"):
        ckpt.load_checkpoint(tmp_path)
