"""The one atomic-write helper: whole files or the old ones, no temporaries left, no two writers on one name."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors import safe_open

from lowvram.fsutil import (
    atomic_write,
    save_safetensors_atomic,
    temp_name,
    write_bytes_atomic,
    write_text_atomic,
)


def test_text_and_bytes_replace_the_file_and_leave_nothing_beside_it(tmp_path):
    path = tmp_path / "sub" / "config.yaml"  # a missing parent folder is made
    write_text_atomic(path, "a: 1\n")
    write_text_atomic(path, "a: 2\n", fsync=True)
    assert path.read_text(encoding="utf-8") == "a: 2\n"
    write_bytes_atomic(tmp_path / "blob", b"\x00\x01")
    assert (tmp_path / "blob").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["blob", "config.yaml", "sub"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("old")

    def half_then_die(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_die, fsync=True)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_concurrent_writers_never_share_a_temporary_name(tmp_path):
    path = tmp_path / "plan.json"
    assert len({temp_name(path) for _ in range(100)}) == 100
    texts = [str(i) * 1000 for i in range(8)]
    errors: list[BaseException] = []

    def writer(text: str) -> None:
        try:
            for _ in range(20):
                write_text_atomic(path, text)
        except BaseException as e:  # a shared temp name shows as a missing file on rename
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_text() in texts  # one writer's whole text, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_safetensors_are_saved_contiguous_with_their_metadata(tmp_path):
    path = tmp_path / "lora.safetensors"
    strided = torch.arange(12.0).reshape(3, 4).t()  # not contiguous: safetensors alone refuses it
    save_safetensors_atomic({"w": strided}, path, {"ss_network_dim": "4"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"ss_network_dim": "4"}
        assert torch.equal(f.get_tensor("w"), strided)
