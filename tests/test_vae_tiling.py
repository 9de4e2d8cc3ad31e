"""``memory.vae_tiling``: diffusers' tiled AutoencoderKL in the run (caching, previews) and in its plan.

Tiny SD 1.x checkpoint (its VAE downsamples by 2: tiles of 32 latent cells are 64 px), images of 128 px, so
tiling engages in both the encode (128 > 64 px) and the decode (64 > 32 latent cells).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import AutoencoderKL
from sd_fixtures import finetune_argv, save_tiny, tiny_workload, write_image_folder

from lowvram.cli import main
from lowvram.memory.planner import candidates
from lowvram.memory.profiler import profile_step
from lowvram.memory.workloads import WORKLOADS, Knobs, vae_tiles
from lowvram.models.vae_tiles import TILE_LATENTS, tile_vae
from lowvram.presets import load_preset

RES = 128


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiles")
    return {"tmp": tmp, "sd1": save_tiny(tmp, "sd1")["folder"],
            "data": write_image_folder(tmp / "data", 2, RES, "a photo of sks dog")}


def test_tiles_are_set_below_the_training_sizes():
    """enable_tiling() alone tiles only above the config's sample_size (512 / 1024 px): nothing at 512² / 1024²."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL as Kl

    from lowvram.models.sd_configs import get_family

    with __import__("torch").device("meta"):
        vae = Kl(**get_family("sdxl").vae)
    tile_vae(vae)
    assert vae.use_tiling and vae.tile_latent_min_size == TILE_LATENTS and vae.tile_sample_min_size == 256
    assert 512 > vae.tile_sample_min_size and 1024 // 8 > vae.tile_latent_min_size


def test_tiled_vae_lowers_the_cache_and_preview_stages(world):
    card = load_preset("rx570").card
    wl = tiny_workload(world["tmp"], "lora", "sd1").with_(resolution=RES)
    # chunked attention: the tiny UNet's math attention over 64² latents would set the preview's peak
    knobs = Knobs(precision="fp16", frozen_dtype="fp16", cache_latents=True, cache_text=True, offload_frozen=True,
                  gradient_checkpointing=True, attention="chunked", attention_chunk=64)
    plain, tiled = (profile_step(wl, knobs.with_(vae_tiling=t), card=card) for t in (False, True))
    assert tiled.stages["cache"] < plain.stages["cache"]  # the encode of one micro-batch
    assert tiled.stages["preview"] < plain.stages["preview"]  # the decode of the grid
    assert tiled.stages["train"] == plain.stages["train"]  # the step never touches the VAE
    assert any("VAE tiled" in n for n in tiled.notes) and not any("VAE tiled" in n for n in plain.notes)
    # below one tile nothing changes: the planner does not offer the knob there
    small = wl.with_(resolution=32)
    assert not vae_tiles(small) and vae_tiles(wl)
    assert profile_step(small, knobs.with_(vae_tiling=True), card=card).peak_bytes == \
        profile_step(small, knobs, card=card).peak_bytes


def test_planner_tiles_late_before_streaming_and_only_where_it_helps():
    card = load_preset("rx570").card
    names = [n for n, _ in candidates(WORKLOADS["W2"], card)]
    tiles = names.index("VAE in tiles (caching, previews)")
    assert tiles > names.index("fused backward (optimizer steps inside backward)")
    assert all(tiles < i for i, n in enumerate(names) if n.startswith("stream "))
    for wid in ("W4", "W5"):  # from scratch keeps its VAE whole; the planner does not tile FLUX.1's VAE yet
        assert not any(k.vae_tiling for _, k in candidates(WORKLOADS[wid], card))


def test_run_with_tiled_vae_encodes_and_decodes_in_tiles_and_trains(world, monkeypatch, capsys):
    calls = {"encode": 0, "decode": 0}
    encode, decode = AutoencoderKL._tiled_encode, AutoencoderKL.tiled_decode

    def counted_encode(self, *a, **kw):
        calls["encode"] += 1
        return encode(self, *a, **kw)

    def counted_decode(self, *a, **kw):
        calls["decode"] += 1
        return decode(self, *a, **kw)

    monkeypatch.setattr(AutoencoderKL, "_tiled_encode", counted_encode)
    monkeypatch.setattr(AutoencoderKL, "tiled_decode", counted_decode)
    out = world["tmp"] / "run"
    sets = {"data.resolution": RES, "train.batch_size": 2, "data.cache_dir": world["tmp"] / "cache", "lora.rank": 4,
            "train.warmup_steps": 0, "train.lr": 1e-2, "run.checkpoint_every": 0, "run.sample_every": 0,
            "run.tensorboard": "false", "sample.steps": 1, "sample.cfg_scales": "3", "sample.prompts": "a photo"}
    assert main(finetune_argv(world["sd1"], world["data"], out, sets, "memory.vae_tiling=true", steps=2)) == 0
    log = capsys.readouterr().out
    assert "VAE tiled: 64 px tiles" in log
    assert calls["encode"] >= 1 and calls["decode"] >= 1  # the latent cache and the final grid, in tiles
    assert (Path(out) / "samples" / "final.png").is_file()
    from lowvram.memory.run_plan import read_plan

    assert read_plan(out).record["knobs"]["vae_tiling"] is True  # the plan replayed the tiles the run drew
