"""What each memory knob costs in step time: a LoRA job with one knob changed from the preset's, in turn.

    flock /work/heavy.lock python bench/knob_speed.py [--model tiny|sd15] [--repeats 2] [--steps 6]

Each variant is a real ``lowvram train --preset cpu --task lora`` run (the same data, seed and
settings) with one ``--set`` changed; the baseline runs before every variant, so each ratio compares two
runs made one after the other. Step time = the median over steps 2.. of the per-step times in
``metrics.jsonl`` (``log_every 1``; the first step warms up allocators). ``--model tiny`` is the tiny SD 1.x
pipeline of the test fixtures at 64x64, batch 4 (overheads dominate); ``sd15`` the full-width SD 1.5
UNet/VAE/CLIP-L with random weights at 256x256, batch 1 (~4.3 GB of files, heavy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vs_diffusers import full_pipeline, make_images, tiny_pipeline  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "gradient checkpointing": ["train.gradient_checkpointing=true"],
    "attention math (O(N^2) matrix)": ["memory.attention=math"],
    "attention chunked (256 rows)": ["memory.attention=chunked", "memory.attention_chunk=256"],
    "frozen weights fp16 (upcast per layer)": ["memory.frozen_dtype=fp16"],
    "frozen weights fp8 (upcast per layer)": ["memory.frozen_dtype=fp8"],
    "bf16 autocast (+ bf16 frozen weights)": ["train.precision=bf16", "memory.frozen_dtype=bf16"],
    "8-bit AdamW (bitsandbytes)": ["train.optimizer=adamw8bit"],
    "8-bit AdamW (portable)": ["train.optimizer=adamw8bit_portable"],
    "Adafactor": ["train.optimizer=adafactor"],
    "fused backward": ["memory.fused_backward=true"],
    "micro-batch / 2, accumulation 2": ["train.batch_size={half}", "train.grad_accum=2"],
    "no latent cache (VAE every step)": ["memory.cache_latents=false"],
    "no text cache (text encoder every step)": ["memory.cache_text=false"],
    "no EMA": ["train.ema_decay=0"],
}
MODELS = {"tiny": (64, 4, 21), "sd15": (256, 1, 8)}  # resolution, batch, images


def step_time(args: argparse.Namespace, model: Path, data: Path, out: Path, cache: Path, sets: list[str]) -> float:
    res, batch, _ = MODELS[args.model]
    shutil.rmtree(out, ignore_errors=True)
    base = {"train.batch_size": batch, "lora.rank": 4, "data.resolution": res, "run.log_every": 1,
            "run.tensorboard": "false", "train.warmup_steps": 0}
    cmd = [sys.executable, "-m", "lowvram", "train", "--preset", "cpu", "--task", "lora", "--model", str(model),
           "--data", str(data), "--steps", str(args.steps), "--out", str(out), "--no-progress", "--no-final-samples"]
    for item in [f"{k}={v}" for k, v in base.items()] + [s.format(half=max(1, batch // 2)) for s in sets]:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "LOWVRAM_CACHE": str(cache),
           "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        return float("nan")  # e.g. bitsandbytes without a CPU build: shown as n/a
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [1.0 / r["it_s"] for r in rows if r["kind"] == "step" and r["step"] >= 2 and r.get("it_s")]
    return statistics.median(per_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(MODELS), default="tiny")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", action="append", help="variant names to run (default: all)")
    ap.add_argument("--workdir", type=Path, help="keep the generated model and data here")
    args = ap.parse_args()
    import torch

    work = args.workdir or Path(tempfile.mkdtemp(prefix="lowvram-knobs-"))
    work.mkdir(parents=True, exist_ok=True)
    res, batch, n = MODELS[args.model]
    name = "tiny-sd1" if args.model == "tiny" else "sd15-random"
    model = work / name if (work / name).is_dir() else (tiny_pipeline(work) if args.model == "tiny" else full_pipeline(work))
    data = work / f"data-{res}"
    make_images(data, n, res)
    cache = work / "cache"  # shared: latents and plans are made once, then every run reuses them
    load0 = os.getloadavg()[0]
    print(f"{args.model}: LoRA rank 4, {res}x{res}, batch {batch}, {args.steps} steps per run, preset cpu; torch "
          f"{torch.__version__}, OMP_NUM_THREADS={args.threads}, load average {load0:.1f}", flush=True)
    step_time(args, model, data, work / "out", cache, [])  # warm the caches (plan, latents, text)
    rows = []
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    t0 = time.perf_counter()
    for label, sets in variants.items():
        ratios, base_t, var_t = [], [], []
        for _ in range(args.repeats):
            b = step_time(args, model, data, work / "out", cache, [])
            v = step_time(args, model, data, work / "out", cache, sets)
            base_t.append(b)
            var_t.append(v)
            ratios.append(v / b)
        rows.append((label, " ".join(s.format(half=max(1, batch // 2)) for s in sets), statistics.median(base_t),
                     statistics.median(var_t), statistics.median(ratios), min(ratios), max(ratios)))
        print(f"  {label}: {rows[-1][4]:.2f}x", flush=True)
    print("\n| knob (--set) | s/step preset | s/step with knob | step time vs preset |\n|---|---|---|---|")
    for label, sets, b, v, r, lo, hi in rows:
        cell = "n/a (failed to run here)" if r != r else f"{r:.2f}x ({lo:.2f}-{hi:.2f})"
        print(f"| {label} (`{sets}`) | {b:.3f} | {v:.3f} | {cell} |")
    print(f"\n{args.repeats} repeats, preset run just before each variant run; load average {load0:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end; {time.perf_counter() - t0:.0f} s")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
