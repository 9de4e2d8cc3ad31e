"""Training from a user's folder: bad files are skipped and reported, the good ones train."""

from __future__ import annotations

import json

import pytest
from test_data_images import BAD, GOOD, make_corpus

from lowvram.errors import DataError
from lowvram.train.run import train


def test_run_on_a_corpus_with_every_bad_kind_completes(tmp_path, tiny_cfg):
    corpus = make_corpus(tmp_path / "data")
    for name in GOOD:  # captions for the good images; one is left without (the missing-caption rule)
        if name != "gray.png":
            (corpus / name).with_suffix(".txt").write_text(f"a photo of {name.split('.')[0]}")
    cfg = tiny_cfg(data__source=str(corpus), train__batch_size=2, data__bucket_step=8, run__val_every=0,
                   sample__prompts=["a photo of good"])
    result = train(cfg, progress=False)
    assert result.status == "done" and result.step == 4
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert {s["path"]: s["reason"] for s in report["skipped"]} == BAD
    assert report["used"] == len(GOOD)
    steps = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == [1, 2, 3, 4]
    assert (result.run_dir / "final" / "unet").is_dir()


def test_a_folder_without_usable_images_fails_before_any_model_loads(tmp_path, tiny_cfg, monkeypatch):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    import lowvram.train.run as run_module

    monkeypatch.setattr(run_module, "build_components", lambda *a, **k: pytest.fail("models were built"))
    with pytest.raises(DataError, match="empty"):
        train(tiny_cfg(data__source=str(folder)), progress=False)
