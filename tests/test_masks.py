"""Masked loss: masks found by the peers' conventions, cut and flipped with their image, cached with the
latents, and weighting the loss so that masked-out pixels contribute nothing to the gradient.
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
from sd_fixtures import finetune_argv, save_tiny, tiny_latent_unet

from lowvram.config import RunConfig
from lowvram.data import masks
from lowvram.data.cache import LatentCache
from lowvram.data.dataset import build_dataset
from lowvram.train.step import compute_loss

RES = 32


def cfg_for(source: Path, **data) -> RunConfig:
    cfg = RunConfig()
    cfg.data.source, cfg.data.resolution = str(source), RES
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def image(path: Path, size=(RES, RES), seed: int = 0, mode: str = "RGB") -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)
    path.with_suffix(".txt").write_text(f"a photo {seed}")
    return arr


def left_half_mask(path: Path, size=(RES, RES), columns: int | None = None) -> None:
    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    arr[:, : columns or size[0] // 2] = 255
    Image.fromarray(arr, "L").save(path)


# ---- where masks come from ----------------------------------------------------------------------------
def test_mask_conventions_and_the_switch(tmp_path):
    data, mdir = tmp_path / "data", tmp_path / "masks"
    (data / "sub").mkdir(parents=True)
    mdir.mkdir()
    image(data / "a.png", seed=1)
    left_half_mask(data / "a-masklabel.png")  # OneTrainer: beside the image
    image(data / "sub" / "b.png", seed=2)
    (mdir / "sub").mkdir()
    left_half_mask(mdir / "sub" / "b.jpg")  # kohya / SimpleTuner: same relative name in another folder
    image(data / "c.png", seed=3, mode="RGBA")  # transparency: a mask only with masked_loss = alpha
    image(data / "d.png", seed=4)  # no mask: trains normally
    image(data / "e.png", seed=5)
    (data / "e-masklabel.png").write_bytes(b"not a png")  # a broken mask skips its image

    def masks_of(**kw):
        ds = build_dataset(cfg_for(data, **{"mask_dir": str(mdir), **kw}), echo=None)
        return {r.rel: r.mask for r in ds.records}, ds

    found, ds = masks_of()
    # mask files never become training images, in either place
    assert set(found) == {"a.png", "sub/b.png", "c.png", "d.png"}
    assert found["a.png"].endswith("a-masklabel.png") and found["sub/b.png"].endswith("b.jpg")
    assert found["c.png"] == found["d.png"] == ""
    assert [(s["path"], s["reason"]) for s in ds.report.skipped] == [("e.png", "bad_mask")]
    assert ds.report.masks == 2 and "loss masks: 2 of 4 images" in ds.report.summary()

    found, _ = masks_of(masked_loss="alpha")
    assert found["c.png"] == masks.ALPHA and found["d.png"] == ""
    found, ds = masks_of(masked_loss="off")
    assert set(found.values()) == {""} and not ds.has_masks and ds.report.masks == 0
    assert {r.rel for r in ds.records} == {"a.png", "sub/b.png", "c.png", "d.png", "e.png"}

    # a mask folder inside the data folder holds masks, not images
    inside = data / "masks"
    inside.mkdir()
    left_half_mask(inside / "d.png")
    found, _ = masks_of(mask_dir=str(inside))
    assert "masks/d.png" not in found and found["d.png"].endswith("masks/d.png")


def test_mask_is_cut_and_flipped_with_its_image(tmp_path):
    """A 2:1 image whose left third is red, with a mask of exactly that region: after the bucket's resize and
    crop (and a flip), the mask still covers the red pixels and nothing else."""
    data = tmp_path / "data"
    data.mkdir()
    w, h = 96, 48
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 3] = (255, 0, 0)
    Image.fromarray(arr).save(data / "wide.png")
    (data / "wide.txt").write_text("red")
    m = np.zeros((h // 2, w // 2), dtype=np.uint8)  # a mask of half the size: stretched to the image
    m[:, : w // 6] = 255
    Image.fromarray(m, "L").save(data / "wide-masklabel.png")
    for flip in (False, True):
        cfg = cfg_for(data, flip=flip)
        cfg.data.bucket_step = 8
        ds = build_dataset(cfg, echo=None)
        assert ds.report.warnings_by_kind() == {"mask_size_mismatch": 1}
        for index in range(4):  # several draws: with flip on, both orientations occur
            item = ds[index]
            red = (item["pixel_values"][0] > 0.5) & (item["pixel_values"][1] < -0.5)
            mask = item["mask"][0] > 0.5
            assert item["mask"].shape[1:] == item["pixel_values"].shape[1:]
            assert (red != mask).float().mean() < 0.03, (flip, index)  # only the resampled edge may differ


def test_alpha_mask_reads_transparency(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    arr = np.full((RES, RES, 4), 200, dtype=np.uint8)
    arr[:, :, 3] = 0
    arr[: RES // 4, :, 3] = 255  # only the top quarter is opaque
    Image.fromarray(arr, "RGBA").save(data / "cut.png")
    ds = build_dataset(cfg_for(data, masked_loss="alpha"), echo=None)
    m = ds.load_mask(0)
    assert m[0, : RES // 4].min() == 1 and m[0, RES // 4 :].max() == 0


def test_latent_grid_is_area_average():
    m = torch.rand(2, 1, 64, 48)
    m[1, :, :32] = 0
    pooled = torch.nn.functional.avg_pool2d(m, 8)
    torch.testing.assert_close(masks.to_latent_grid(m, (8, 6)), pooled)
    w = masks.batch_weights([None, m[1]], (8, 6), unmasked_weight=0.25)
    assert w.shape == (2, 1, 8, 6) and torch.equal(w[0], torch.ones(1, 8, 6))
    assert torch.equal(w[1, :, :4], torch.full((1, 4, 6), 0.25))  # the floor where the mask is black
    torch.testing.assert_close(w[1], pooled[1].clamp(min=0.25))
    assert masks.batch_weights([None, None], (8, 6)) is None


# ---- the gradient -------------------------------------------------------------------------------------
def _tiny_unet_with_lora():
    from lowvram.lora import attach_lora

    unet = tiny_latent_unet()
    params = attach_lora(unet, 4, 4.0)
    for p in params:  # as after some training: lora_B is not zero, so every adapter weight gets a gradient
        p.data.normal_(0, 0.1)
    return unet, params


def test_masked_pixels_contribute_nothing_to_the_gradient():
    unet, params = _tiny_unet_with_lora()
    acp = torch.linspace(0.99, 0.01, 100)
    x0, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    weights = torch.zeros(2, 1, 8, 8)
    weights[0, :, :, :3] = 1.0  # image 0: its left 3 columns count; image 1: masked out entirely
    weights[0, :, 2:4, 3] = 0.5  # and a soft edge
    captured = {}

    def grads(loss_weights=None, perturb=None, seed=7, **kw):
        def hook(module, args, output):
            if perturb is not None:  # what the model predicts where the mask is 0 must not matter
                output.sample = output.sample + perturb * (loss_weights == 0)
            output.sample.retain_grad()
            captured["out"] = output.sample
            return output

        handle = unet.register_forward_hook(hook)
        try:
            loss = compute_loss(unet, x0, cond, alphas_cumprod=acp, prediction="epsilon",
                                generator=torch.Generator().manual_seed(seed), loss_weights=loss_weights, **kw)
            loss.sum().backward()  # per-sample losses (reduce=False) are summed
        finally:
            handle.remove()
        out = [p.grad.clone() for p in params], captured["out"].grad.clone(), loss.detach()
        for p in params:
            p.grad = None
        return out

    g, d_out, loss = grads(weights)
    # d loss / d prediction is exactly zero outside the mask, and proportional to the weight inside
    assert torch.all(d_out[(weights == 0).expand_as(d_out)] == 0)
    assert torch.all(d_out[0, :, :, :3] != 0)
    # the prediction where the mask is 0 can be anything: the adapter's gradient is bit for bit the same
    g2, _, loss2 = grads(weights, perturb=torch.randn(2, 4, 8, 8) * 100)
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(g, g2, strict=True))
    # an image masked out entirely teaches nothing: zero loss and zero gradient
    g0, _, loss0 = grads(torch.zeros(2, 1, 8, 8))
    assert loss0 == 0 and all(torch.count_nonzero(t) == 0 for t in g0)
    # a white mask is the plain loss (min-SNR weighting too, and per sample for prior preservation)
    for kw in ({}, {"snr_gamma": 5.0}, {"reduce": False}):
        g1, _, loss1 = grads(torch.ones(2, 1, 8, 8), **kw)
        gp, _, lossp = grads(None, **kw)
        torch.testing.assert_close(loss1, lossp)
        for a, b in zip(g1, gp, strict=True):
            torch.testing.assert_close(a, b)


# ---- the cache ----------------------------------------------------------------------------------------
def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1)


def test_masks_are_cached_with_the_latents_under_their_own_key(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    for i in range(3):
        image(data / f"{i}.png", seed=i)
    left_half_mask(data / "0-masklabel.png")
    vae = _vae()

    def build():
        ds = build_dataset(cfg_for(data, flip=True), echo=None)
        lc = LatentCache(cache, vae, dtype=torch.float32)
        return ds, lc, lc.build(ds, progress=False)

    ds, lc, view = build()
    assert lc.stats.encoded == 6 and lc.vae_factor == 2
    src = {r.rel: u for u, r in enumerate(ds.records)}
    for index in range(2 * len(ds)):  # two epochs: both flips
        plan = ds.plan(index)
        item = view[index]
        if plan.source == src["0.png"]:
            want = masks.to_latent_grid(ds.mask(index)[None], item["latents"].shape[-2:])[0]
            assert torch.equal(item["mask"], want)  # the cached mask is the uncached one
        else:
            assert "mask" not in item
    # a mask shares the latents' shard when encoded with them
    manifest = json.loads((cache / "latents" / "manifest.json").read_text())
    kinds = {e["shard"] for e in manifest["entries"].values() if e.get("kind") == "mask"}
    assert len(kinds) == 1 and kinds <= {e["shard"] for e in manifest["entries"].values() if "kind" not in e}

    # adding a mask later, or editing one, encodes no image again: only the new mask is stored
    left_half_mask(data / "1-masklabel.png", columns=5)
    left_half_mask(data / "2-masklabel.png")  # the same content as 0's mask: the same entries
    ds, lc, view = build()
    assert (lc.stats.encoded, lc.stats.hits) == (0, 6)
    assert view.mask_keys[(src["2.png"], False)] == view.mask_keys[(src["0.png"], False)]
    Image.fromarray(np.full((RES, RES), 255, dtype=np.uint8), "L").save(data / "0-masklabel.png")
    ds, lc, view = build()
    assert lc.stats.encoded == 0
    index = next(i for i in range(len(ds)) if ds.plan(i).source == src["0.png"])
    assert torch.equal(view[index]["mask"], torch.ones_like(view[index]["mask"]))
    masked = [e for e in json.loads((cache / "latents" / "manifest.json").read_text())["entries"].values()
              if e.get("kind") == "mask"]
    assert len(masked) == 6  # 3 masks x 2 flips, each keyed by its content


# ---- a fine-tune --------------------------------------------------------------------------------------
def test_fully_masked_data_teaches_a_lora_nothing(tmp_path):
    """Through `lowvram train`: with every pixel masked out the adapter never moves (AdamW without weight
    decay takes no step on zero gradients); with white masks the run is the unmasked run."""
    sd1 = save_tiny(tmp_path, "sd1")["folder"]
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        image(data / f"{i}.png", seed=i)

    def run(name: str, fill: int | None) -> tuple[dict, list]:
        for i in range(2):
            f = data / f"{i}-masklabel.png"
            if fill is None:
                f.unlink(missing_ok=True)
            else:
                Image.fromarray(np.full((RES, RES), fill, dtype=np.uint8), "L").save(f)
        out = tmp_path / name
        sets = {"data.resolution": RES, "train.batch_size": 2, "lora.rank": 4, "train.lr": 1e-2,
                "train.warmup_steps": 0, "run.checkpoint_every": 0, "run.sample_every": 0, "run.log_every": 1,
                "run.tensorboard": "false", "sample.steps": 1, "sample.cfg_scales": "2",
                "data.cache_dir": tmp_path / "cache", "train.ema_decay": 0}
        from lowvram.cli import main

        with contextlib.redirect_stdout(io.StringIO()):
            assert main(finetune_argv(sd1, data, out, sets, steps=2)) == 0
        steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors")), [s["loss"] for s in steps
                                                                                      if s["kind"] == "step"]

    black, black_losses = run("black", 0)
    assert black_losses == [0.0, 0.0]
    ups = [v for k, v in black.items() if "lora_B" in k or "lora_up" in k]
    assert ups and all(torch.count_nonzero(v) == 0 for v in ups)  # peft starts lora_B at zero; it stayed
    white, white_losses = run("white", 255)
    plain, plain_losses = run("plain", None)
    assert white_losses == pytest.approx(plain_losses, rel=1e-5)
    assert any(torch.count_nonzero(v) for k, v in plain.items() if "lora_B" in k)
    for k in plain:
        torch.testing.assert_close(white[k], plain[k], rtol=1e-4, atol=1e-6)
