"""The latent cache's first pass with images decoded ahead in background threads (``data.workers``) or not.

Phone-photo-sized JPEGs (12 MP by default: what users point lowvram at) are decoded, resized and
cropped, then encoded by a tiny AutoencoderKL (the one of ``cache_speed.py``); the pass is timed in this
process (imports excluded) with ``threads`` 0 (decode in the caching thread) and N, in turn, and the
decode-only and encode-only seconds per image are reported beside it. The tiny VAE is cheap next to a
12 MP decode, like a real VAE on a GPU; on a CPU a full-size VAE dwarfs the decode and the gain shrinks.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/decode_ahead.py [--images 24 --resolution 256 --threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache_speed import tiny_models  # noqa: E402

from lowvram.config import RunConfig  # noqa: E402
from lowvram.data.dataset import build_dataset  # noqa: E402
from lowvram.data.latent_cache import LatentCache, encode_latents  # noqa: E402
from lowvram.data.shards import module_identity  # noqa: E402


def make_photos(root: Path, n: int, width: int, height: int) -> None:
    """Smooth colour fields with sensor-like noise, saved as quality-92 JPEGs (~5 MB each at 12 MP)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 255, (height // 50, width // 50, 3), dtype=np.uint8))
        arr = np.asarray(base.resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
        arr += rng.integers(-20, 20, arr.shape, dtype=np.int16)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / f"{i:04d}.jpg", quality=92)
        (root / f"{i:04d}.txt").write_text(f"photo {i}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="decoding threads of the timed variant")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="4000x3000", help="source photo size, WxH")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        make_photos(data, args.images, width, height)
        cfg = RunConfig()
        cfg.data.source, cfg.data.resolution = str(data), args.resolution
        ds = build_dataset(cfg, echo=None)
        vae, _ = tiny_models(args.resolution)
        sources = list(range(ds.num_sources()))
        t0 = time.perf_counter()
        pixels = [ds.load_source(u) for u in sources]
        decode = (time.perf_counter() - t0) / len(sources)
        t0 = time.perf_counter()
        for s in range(0, len(pixels), args.batch):
            encode_latents(vae, torch.stack(pixels[s : s + args.batch]))
        encode = (time.perf_counter() - t0) / len(sources)
        times: dict[int, list[float]] = {0: [], args.threads: []}
        for r in range(args.repeats):
            for threads in times:
                root = Path(tmp) / f"cache-{r}-{threads}"  # a first pass each time: nothing reused
                t0 = time.perf_counter()
                LatentCache(root, vae, module_identity(vae), torch.float16, threads=threads).build(
                    ds, batch_size=args.batch, progress=False)
                times[threads].append((time.perf_counter() - t0) / len(sources))
    print(f"{args.images} JPEGs {width}x{height} -> {args.resolution}px, batch {args.batch}, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"decode alone {1000 * decode:.0f} ms/image, tiny-VAE encode alone {1000 * encode:.0f} ms/image")
    base = statistics.median(times[0])
    print("| data.workers | ms/image, median (min-max) | vs 0 |\n|---|---|---|")
    for threads, ts in times.items():
        print(f"| {threads} | {1000 * statistics.median(ts):.0f} ({1000 * min(ts):.0f}-{1000 * max(ts):.0f}) | "
              f"{statistics.median(ts) / base:.2f}x |")


if __name__ == "__main__":
    main()
