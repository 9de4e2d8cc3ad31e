"""End-to-end runs of the `tiny` model on CPU: files written, metrics logged, resume, NaN guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_checkpoints_equal

from lowvram.errors import ConfigError, TrainingDiverged
from lowvram.train import jobs as jobs_module
from lowvram.train.checkpoint import latest_checkpoint
from lowvram.train.run import resume, train

REPO = Path(__file__).resolve().parents[1]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pixel_run_writes_everything(tiny_cfg):
    cfg = tiny_cfg(run__sample_every=2)
    result = train(cfg, progress=False)
    run = result.run_dir
    assert result.status == "done" and result.step == 4
    assert (run / "config.yaml").is_file()
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert {p.name for p in (run / "samples").iterdir()} == {"step-00000002.png", "final.png"}
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (run / "final" / part).is_dir(), part
    from safetensors import safe_open

    with safe_open(str(run / "final" / "text_encoder" / "model.safetensors"), framework="pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # the hub layout, whatever transformers wrote
    rows = metrics(run)
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r["loss"] > 0 and r["lr"] > 0 and r["it_s"] > 0 and r["peak_mem_mib"] > 0
    vals = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [2, 4]
    # the grid has one row per prompt and one column per guidance scale
    from PIL import Image

    grid = Image.open(run / "samples" / "final.png")
    assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2 scales x 2 prompts of 16 px, 2 px padding


def test_final_model_samples_like_training(tiny_cfg):
    from lowvram.runs import load_run_model

    run = train(tiny_cfg(), progress=False).run_dir
    model = load_run_model(run)
    a = model.generate(["a red circle on a blue background"], cfg_scale=3.0, steps=3, seed=5)
    b = model.generate(["a red circle on a blue background"], cfg_scale=3.0, steps=3, seed=5)
    c = model.generate(["a red circle on a blue background"], cfg_scale=3.0, steps=3, seed=6)
    assert a.shape == (1, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_latent_run_trains_autoencoder_first(tiny_cfg):
    cfg = tiny_cfg(run__task="latent")
    run = train(cfg, progress=False).run_dir
    assert (run / "autoencoder" / "latent_scale.json").is_file()
    scale = json.loads((run / "autoencoder" / "latent_scale.json").read_text())["latent_scale"]
    assert scale > 0
    assert (run / "final" / "vae").is_dir()
    rows = metrics(run)
    assert any(r.get("stage") == "autoencoder" for r in rows)
    # the latent UNet denoises 4x8x8 latents of 16x16 images
    desc = json.loads((run / "final" / "lowvram_model.json").read_text())
    assert desc["sample_shape"] == [4, 8, 8] and desc["has_vae"]


def test_existing_run_is_not_overwritten(tiny_cfg):
    train(tiny_cfg(), progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_cfg(), progress=False)


def test_nonfinite_losses_stop_the_run_and_keep_the_last_checkpoint(tiny_cfg, monkeypatch):
    real = jobs_module.compute_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(jobs_module, "compute_loss", flaky)
    cfg = tiny_cfg(run__steps=10, run__max_nonfinite=3)
    with pytest.raises(TrainingDiverged, match="non-finite") as err:
        train(cfg, progress=False)
    assert "learning rate" in err.value.fix
    run = Path(cfg.run.out)
    assert latest_checkpoint(run / "checkpoints").name == "step-00000002"
    rows = metrics(run)
    assert [r["streak"] for r in rows if r["kind"] == "nonfinite"] == [1, 2, 3]


def test_one_nonfinite_loss_skips_only_that_step(tiny_cfg, monkeypatch):
    real = jobs_module.compute_loss
    calls = {"n": 0}

    def once(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("inf") if calls["n"] == 2 else loss

    monkeypatch.setattr(jobs_module, "compute_loss", once)
    result = train(tiny_cfg(), progress=False)
    assert result.status == "done" and result.step == 4
    assert [r["step"] for r in metrics(result.run_dir) if r["kind"] == "nonfinite"] == [2]


def test_fp16_fused_backward_skips_overflowing_gradients_and_keeps_training(tiny_cfg, monkeypatch):
    """A step whose scaled gradients overflow (injected: a finite loss too big for the loss scale) does not
    touch the weights; the run says so, halves the scale and trains on."""
    real = jobs_module.compute_loss
    calls = {"n": 0}

    def overflowing(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * 1e35 if calls["n"] == 2 else loss  # finite, but x 65536 (the loss scale) is not

    monkeypatch.setattr(jobs_module, "compute_loss", overflowing)
    seen = []
    cfg = tiny_cfg(train__precision="fp16", memory__fused_backward=True, run__checkpoint_every=1, run__steps=3,
                   run__keep_checkpoints=5)
    result = train(cfg, listeners=[seen.append], progress=False)
    assert result.status == "done" and result.step == 3
    warnings = [e for e in seen if e.kind == "warning" and "fp16 overflow" in e.data["message"]]
    assert len(warnings) == 1 and warnings[0].step == 1 and "loss scale now 32768" in warnings[0].data["message"]
    from safetensors.torch import load_file

    run = result.run_dir
    one, two = (load_file(str(run / "checkpoints" / f"step-0000000{i}" / "model.safetensors")) for i in (1, 2))
    assert all(torch.equal(one[k], two[k]) for k in one)  # the overflowing step changed no weight
    assert all(torch.isfinite(t).all() for t in two.values())
    meta = json.loads((run / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert meta["scaler"]["scale"] == 32768.0
    assert not [r for r in metrics(run) if r["kind"] == "nonfinite"]


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config
    from lowvram.train.run import train
    from pathlib import Path

    def kill_after_first_checkpoint(event):
        if event.kind == "checkpoint":
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no final save

    train(tiny_config(Path({out!r}), **{overrides!r}), listeners=[kill_after_first_checkpoint], progress=False)
    """
)


@pytest.mark.parametrize("overrides", [
    {},
    {"train__grad_accum": 2, "train__optimizer": "adamw8bit_portable"},
    {"memory__fused_backward": True, "train__grad_accum": 2},
], ids=["adamw", "accum-portable8bit", "fused-backward-accum"])
def test_killed_and_resumed_run_is_bitwise_equal(tmp_path, overrides):
    from conftest import tiny_config

    overrides = {"run__steps": 6, "run__checkpoint_every": 3, **overrides}
    straight = train(tiny_config(tmp_path / "straight", **overrides), progress=False).run_dir

    killed = tmp_path / "killed"
    script = KILLER.format(tests=str(REPO / "tests"), out=str(killed), overrides=overrides)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert latest_checkpoint(killed / "checkpoints").name == "step-00000003"
    assert not (killed / "final").exists()

    result = resume(killed, progress=False)
    assert result.step == 6
    assert_checkpoints_equal(straight, killed, 6, "after resume")
