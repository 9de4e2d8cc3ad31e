"""LoRA on a model lowvram trained from scratch (``--task lora --model RUN/final``), and holding a concept out
of the builtin data (``data.builtin_exclude``): the two halves of the learning bench (bench/lora_learning.py).

The bench shows the learning itself (minutes); these tests hold the path: a base without the concept, an
adapter that trains on images of it, lowers their loss, leaves the base's weights alone, and is merged into
``final/`` exactly.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lowvram.cli import main
from lowvram.config import ConfigBuilder
from lowvram.data.builtin import ATTRIBUTES, ShapesDataset, caption_of, render
from lowvram.errors import ConfigError, DataError
from lowvram.pipeline import TextToImage

FAST = {"run.sample_every": 0, "run.checkpoint_every": 0, "run.tensorboard": "false", "sample.steps": 2,
        "sample.cfg_scales": "1", "run.log_every": 1}


def cli(argv: list[str], sets: dict) -> str:
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The default job's tiny model without 'yellow', 2 steps: its weights are barely trained, its layout real."""
    tmp = tmp_path_factory.mktemp("scratch_lora")
    run = tmp / "base"
    cli(["train", "--preset", "cpu", "--out", str(run), "--steps", "2", "--no-progress"],
        {**FAST, "data.builtin_exclude": "yellow", "data.num_images": 32, "train.batch_size": 8})
    return run


@pytest.fixture(scope="module")
def yellow(base) -> Path:
    """Images of the held-out concept, one per (shape, background), with caption sidecars."""
    folder = base.parent / "yellow"
    folder.mkdir()
    for i, shape in enumerate(ATTRIBUTES["shape"]):
        for j, bg in enumerate(ATTRIBUTES["background"]):
            attrs = {"shape": shape, "colour": "yellow", "background": bg}
            Image.fromarray(render(attrs, 24, np.random.default_rng([i, j]))).save(folder / f"{shape}-{bg}.png")
            (folder / f"{shape}-{bg}.txt").write_text(caption_of(attrs))
    return folder


def test_builtin_exclude_holds_a_concept_out():
    full, held = ShapesDataset(64, seed=3), ShapesDataset(300, seed=3, exclude=("yellow", "triangle"))
    assert [full.attributes(i) for i in range(64)] == [ShapesDataset(64, seed=3, exclude=()).attributes(i)
                                                       for i in range(64)]  # nothing excluded: unchanged
    drawn = [held.attributes(i) for i in range(300)]
    assert {a["colour"] for a in drawn} == {"red", "green", "blue"}
    assert {a["shape"] for a in drawn} == {"circle", "square"}
    with pytest.raises(DataError, match="purple"):
        ShapesDataset(4, exclude=("purple",))
    with pytest.raises(DataError, match="no background"):
        ShapesDataset(4, exclude=tuple(ATTRIBUTES["background"]))
    with pytest.raises(ConfigError, match="data.builtin_exclude"):
        ConfigBuilder().set("data.source", "/some/folder", "--data").set("data.builtin_exclude", "yellow", "--set").build()


def test_base_never_saw_the_word(base):
    tok = TextToImage.load(base / "final").tokenizer
    ids = tok("a yellow circle on a white background").input_ids
    assert tok.unk_token_id in ids and tok("a red circle on a white background").input_ids.count(tok.unk_token_id) == 0


def _val_loss(model_dir: Path, folder: Path) -> float:
    """The model's loss (its own objective) on the concept images at fixed timesteps and noise."""
    from diffusers import DDPMScheduler

    from lowvram.diffusion import validation_loss

    model = TextToImage.load(model_dir)
    files = sorted(folder.glob("*.png"))
    x0 = torch.stack([torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                      for f in files])
    cond = model.encode_prompts([f.with_suffix(".txt").read_text() for f in files])
    sched = DDPMScheduler.from_config(model.scheduler_config)

    def predict(noisy, t, c):
        return model.unet(noisy, t, encoder_hidden_states=c).sample

    with torch.no_grad():
        return validation_loss(predict, x0, cond, sched.alphas_cumprod.float(), sched.config.prediction_type)


def test_lora_on_the_scratch_model_trains_the_adapter_only(base, yellow):
    run = base.parent / "lora"
    out = cli(["train", "--preset", "cpu", "--task", "lora", "--model", str(base / "final"), "--data", str(yellow),
               "--out", str(run), "--steps", "30", "--no-progress"],
              {**FAST, "lora.rank": 4, "lora.alpha": 4, "train.lr": 1e-2, "train.warmup_steps": 0,
               "train.batch_size": 9, "train.ema_decay": 0, "data.caption_dropout": 0})
    assert "lora fine-tune of the from-scratch model" in out and "model.prediction = v_prediction" in out
    saved = json.loads((run / "final" / "lowvram_model.json").read_text())
    assert saved["task"] == "lora" and saved["sample_shape"] == [3, 24, 24]
    from lowvram.train.run import load_run_config

    cfg = load_run_config(run)  # the objective and resolution the base decided
    assert (cfg.model.prediction, cfg.data.resolution) == ("v_prediction", 24)

    lora = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora) and all(k.startswith("unet.") for k in lora)
    assert any(torch.count_nonzero(v) for k, v in lora.items() if ".lora_B." in k)  # the adapter moved

    before, after = TextToImage.load(base / "final"), TextToImage.load(run / "final")
    # final/ is the base with the adapter merged: the adapted layers changed by exactly scale * B @ A,
    # every other weight (and the text encoder) is the base's, bit for bit
    b_sd, a_sd = before.unet.state_dict(), after.unet.state_dict()
    assert b_sd.keys() == a_sd.keys()
    changed = set()
    for name, w in a_sd.items():
        module = name.rsplit(".", 1)[0]
        key_a = f"unet.{module}.lora_A.weight"
        if name.endswith(".weight") and key_a in lora:
            delta = lora[f"unet.{module}.lora_B.weight"].flatten(1) @ lora[key_a].flatten(1)
            torch.testing.assert_close(w - b_sd[name], delta.view_as(w), atol=2e-6, rtol=1e-4)
            changed.add(name)
        else:
            assert torch.equal(w, b_sd[name]), name
    assert len(changed) == len({k.split(".lora_")[0] for k in lora})
    for (n, w), (_, w0) in zip(after.text_encoder.state_dict().items(), before.text_encoder.state_dict().items(),
                               strict=True):
        assert torch.equal(w, w0), n
    # checkpoints hold the adapter only, not the frozen base
    ckpt = load_file(str(next((run / "checkpoints").iterdir()) / "model.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)
    # the adapter learned its images: their loss at fixed noise went down
    assert _val_loss(run / "final", yellow) < 0.8 * _val_loss(base / "final", yellow)


def test_full_finetune_of_a_scratch_model_is_refused(base, yellow, tmp_path):
    from lowvram.cli import build_parser, resolve_config
    from lowvram.train.run import train

    argv = ["train", "--preset", "cpu", "--task", "full", "--model", str(base), "--data", str(yellow),
            "--out", str(tmp_path / "full"), "--steps", "1", "--no-progress"]
    cfg, _, _ = resolve_config(build_parser().parse_args(argv))
    with pytest.raises(ConfigError, match="--task lora"):
        train(cfg, progress=False)


@pytest.mark.slow  # three more adapter runs (~20 s each on 2 free cores); the plain LoRA run is in the default suite
@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_every_adapter_type_trains_on_the_scratch_model(base, yellow, kind):
    """lora.type reaches the from-scratch LoRA: the file holds that type's tensors, final/ changes exactly the
    adapted modules of the base (nothing else, bit for bit), and the adapter lowers its images' loss."""
    from lowvram.adapters import split_peft_key, type_of_state

    run = base.parent / f"lora-{kind}"
    cli(["train", "--preset", "cpu", "--task", "lora", "--model", str(base / "final"), "--data", str(yellow),
         "--out", str(run), "--steps", "30", "--no-progress"],
        {**FAST, "lora.type": kind, "lora.rank": 4, "lora.alpha": 4, "train.lr": 1e-2, "train.warmup_steps": 0,
         "train.batch_size": 9, "train.ema_decay": 0, "data.caption_dropout": 0})
    path = run / "lora" / "pytorch_lora_weights.safetensors"
    state = load_file(str(path))
    assert type_of_state(state) == kind
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["lowvram_adapter"] == kind
    adapted = {split_peft_key(k)[0].removeprefix("unet.") for k in state}
    b_sd, a_sd = TextToImage.load(base / "final").unet.state_dict(), TextToImage.load(run / "final").unet.state_dict()
    assert b_sd.keys() == a_sd.keys()
    changed = {n.rsplit(".", 1)[0] for n, w in a_sd.items() if not torch.equal(w, b_sd[n])}
    assert changed == adapted
    assert _val_loss(run / "final", yellow) < 0.8 * _val_loss(base / "final", yellow)
