"""Training steps per second with and without the latent cache, side by side, on the CPU.

A tiny latent pipeline: a folder of generated PNGs (decoded, resized and cropped each step when
uncached), a tiny AutoencoderKL (4x downsampling) and a tiny UNet2DConditionModel; one step =
load batch (+ VAE encode when uncached) + noise + UNet forward/backward + AdamW. The real SD VAE costs
far more relative to the UNet than this tiny one, so the speed-up here is a lower bound.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/cache_speed.py [--steps 30 --batch 8 --resolution 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image

from lowvram.config import RunConfig
from lowvram.data.cache import LatentCache, encode_latents, module_identity
from lowvram.data.dataset import build_dataset, make_loader


def make_images(root: Path, n: int, side: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (side, side) if i % 3 else (side * 3 // 2, side)  # some landscape images too
        base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC).save(root / f"{i:04d}.png")
        (root / f"{i:04d}.txt").write_text(f"image {i}")


def tiny_models(resolution: int) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=resolution,
    ).eval().requires_grad_(False)
    unet = UNet2DConditionModel(
        sample_size=resolution // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    return vae, unet


def run(loader, unet, vae, steps: int, cached: bool) -> float:
    """Seconds per step over ``steps`` steps (after one warm-up step)."""
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    sched = DDPMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(0)
    it = iter(loader)
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        latents = batch["latents"].float() if cached else encode_latents(vae, batch["pixel_values"])
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
        text = torch.zeros(latents.shape[0], 8, 32)  # the text side is identical in both modes
        pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
        F.mse_loss(pred, noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--source-side", type=int, default=256, help="side of the generated source images")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, cache_root = Path(tmp) / "data", Path(tmp) / "cache"
        data.mkdir()
        make_images(data, args.images, args.source_side)
        cfg = RunConfig()
        cfg.data.source, cfg.data.resolution, cfg.data.flip, cfg.data.caption_dropout = str(data), args.resolution, True, 0.1
        ds = build_dataset(cfg, echo=None)
        vae, unet = tiny_models(args.resolution)
        t0 = time.perf_counter()
        view = LatentCache(cache_root, vae, module_identity(vae), torch.float16).build(ds, batch_size=8, progress=False)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        LatentCache(cache_root, vae, module_identity(vae), torch.float16).build(ds, batch_size=8, progress=False)
        reuse_s = time.perf_counter() - t0
        plain_loader, _ = make_loader(ds, args.batch, seed=0)
        cached_loader, _ = make_loader(view, args.batch, seed=0)
        uncached = run(plain_loader, unet, vae, args.steps, cached=False)
        _, unet = tiny_models(args.resolution)  # same initial weights for the cached run
        cached = run(cached_loader, unet, vae, args.steps, cached=True)
    print(f"{args.images} images {args.source_side}px -> {args.resolution}px, batch {args.batch}, {args.steps} steps, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"cache build: {build_s:.2f} s ({2 * args.images} latents, both flips); second run reuse: {reuse_s:.2f} s")
    print("| mode | s/step | steps/s | speed-up |\n|---|---|---|---|")
    print(f"| images + VAE encode every step | {uncached:.3f} | {1 / uncached:.2f} | 1.00x |")
    print(f"| latent cache | {cached:.3f} | {1 / cached:.2f} | {uncached / cached:.2f}x |")


if __name__ == "__main__":
    main()
