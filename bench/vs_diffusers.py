"""The same LoRA job through diffusers' own example and through ``lowvram train``, in turn, several times.

    flock /work/heavy.lock python bench/vs_diffusers.py --example PATH/train_text_to_image_lora.py \\
        [--example-python PY] [--repeats 3] [--full]

The example is not part of lowvram: take ``examples/text_to_image/train_text_to_image_lora.py`` from the
diffusers repository (the version matching the installed diffusers) and give its path. It needs the
``datasets`` and ``torchvision`` packages; ``--example-python`` runs it with another interpreter that has
them (lowvram does not). Everything else is built here, offline, in a temporary folder:

* tiny job (the issue's): the tiny SD 1.x pipeline of the test fixtures (real classes, tiny widths),
  21 captioned 64x64 images (``.txt`` sidecars for lowvram, ``metadata.jsonl`` for the example's
  imagefolder loader), batch 4, 60 steps, LoRA rank 4, AdamW lr 1e-4, fp32 on the CPU;
* ``--full``: the full-width SD 1.5 UNet, VAE and CLIP-L text encoder (random weights from the public
  configs), 8 images at 256x256, batch 1, a few steps: where skipping the VAE through the latent cache shows.

Each repeat runs the example, then lowvram (the same job: the example's layers, ``lora.targets=attention``,
no EMA, ``train.ema_decay=0``, as the example keeps none without ``--use_ema``, and no final preview grid,
as the example draws none without a validation prompt), then lowvram with its defaults (the final grid: prompts x guidance scales);
the pairs' ratios are taken per repeat, so a load change between repeats cancels. lowvram starts each
repeat with an empty cache folder (a first run: it profiles, encodes its latents); a last run of the
same job on the warm cache gives the time to the first step of a second run. Timings: whole process
= the child process from start to exit; steps = the example's progress bar from creation to its last
update, lowvram's ``steps`` phase (``metrics.jsonl``). Both run with the same OMP_NUM_THREADS.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny pipelines of the test fixtures

WORDS = ("red", "dog", "cat", "beach", "person")


@dataclass
class Job:
    name: str
    model: Path
    data: Path
    resolution: int
    batch: int
    steps: int
    rank: int = 4
    lr: float = 1e-4


@dataclass
class Timing:
    whole: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    first_step: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)


# ---- what both trainers get --------------------------------------------------------------------------------
def make_images(folder: Path, n: int, side: int) -> None:
    """``n`` smooth random images with captions, as .txt sidecars and as the imagefolder metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC).save(folder / f"{i:03d}.png")
        caption = f"a photo of a {WORDS[i % len(WORDS)]} on the beach"
        (folder / f"{i:03d}.txt").write_text(caption)
        rows.append({"file_name": f"{i:03d}.png", "text": caption})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def tiny_pipeline(root: Path) -> Path:
    from sd_fixtures import tiny_sd1

    tiny_sd1(root).save_pretrained(root / "tiny-sd1")
    return root / "tiny-sd1"


def full_pipeline(root: Path) -> Path:
    """SD 1.5's UNet, VAE and CLIP-L text encoder with random weights (public configs), and a small CLIP
    tokenizer (77 tokens) that covers the captions: ~4.3 GB of fp32 files."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from sd_fixtures import tiny_tokenizer

    from lowvram.models.sd_configs import build_sd_text_encoders, build_sd_unet, build_sd_vae

    torch.manual_seed(0)
    tok = tiny_tokenizer(root / "tok-full")
    tok.model_max_length = 77
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(
        unet=build_sd_unet("sd15", "cpu"), vae=build_sd_vae("sd15", "cpu"),
        text_encoder=build_sd_text_encoders("sd15", "cpu")[0], tokenizer=tok, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd15-random")
    return root / "sd15-random"


# ---- the two trainers ------------------------------------------------------------------------------------
def env(threads: int, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(HERE.parent), **extra}


def run_example(args: argparse.Namespace, job: Job, work: Path) -> tuple[float, float]:
    out, times = work / "example-out", work / "example-steps.json"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [args.example_python, str(HERE / "diffusers_example_launcher.py"), str(times), str(args.example),
           "--pretrained_model_name_or_path", str(job.model), "--train_data_dir", str(job.data),
           "--image_column", "image", "--caption_column", "text", "--resolution", str(job.resolution),
           "--center_crop", "--train_batch_size", str(job.batch), "--max_train_steps", str(job.steps),
           "--rank", str(job.rank), "--learning_rate", str(job.lr), "--lr_scheduler", "constant",
           "--lr_warmup_steps", "0", "--seed", "0", "--dataloader_num_workers", "0", "--output_dir", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env(args.threads, HF_HOME=str(work / "hf")), capture_output=True, text=True)
    whole = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"the diffusers example failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    marks = json.loads(times.read_text())
    if len(marks) != job.steps + 1:
        sys.exit(f"the example's progress bar was not seen ({len(marks)} marks): is it train_text_to_image_lora.py?")
    return whole, marks[-1] - marks[0]


def run_lowvram(args: argparse.Namespace, job: Job, work: Path, cache: Path, *, previews: bool) -> dict:
    out = work / "lowvram-out"
    shutil.rmtree(out, ignore_errors=True)
    sets = {"train.batch_size": job.batch, "lora.rank": job.rank, "lora.alpha": job.rank, "data.resolution": job.resolution,
            "train.lr": job.lr, "train.warmup_steps": 0}
    if not previews:  # the example's job: its LoRA layers (to_q/k/v/out) and no EMA
        sets |= {"lora.targets": "attention", "train.ema_decay": 0}
    cmd = [sys.executable, "-m", "lowvram", "train", "--preset", "cpu", "--task", "lora", "--model", str(job.model),
           "--data", str(job.data), "--steps", str(job.steps), "--out", str(out), "--seed", "0", "--no-progress"]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    if not previews:
        cmd.append("--no-final-samples")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env(args.threads, LOWVRAM_CACHE=str(cache)), capture_output=True, text=True)
    whole = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"lowvram train failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    account = next(r for r in rows if r["kind"] == "phases")
    return {"whole": whole, "steps": account["seconds"]["steps"], "first_step": account.get("first_step_s"),
            "phases": account["seconds"]}


# ---- the table ------------------------------------------------------------------------------------------
def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f}" + (f" ({min(xs):.1f}-{max(xs):.1f})" if len(xs) > 1 else "")


def ratio(a: list[float], b: list[float]) -> str:
    rs = [x / y for x, y in zip(a, b, strict=True)]
    return f"{statistics.median(rs):.2f}x" + (f" ({min(rs):.2f}-{max(rs):.2f})" if len(rs) > 1 else "")


def compare(args: argparse.Namespace, job: Job, work: Path, *, with_defaults: bool) -> list[str]:
    ex, same, defaults = Timing(), Timing(), Timing()
    for r in range(args.repeats):
        whole, steps = run_example(args, job, work)
        ex.whole.append(whole)
        ex.steps.append(steps)
        runs = [(same, False)] + ([(defaults, True)] if with_defaults else [])
        for timing, previews in runs:
            cache = work / f"cache-{r}-{previews}"  # a first run: nothing profiled or encoded yet
            res = run_lowvram(args, job, work, cache, previews=previews)
            timing.whole.append(res["whole"])
            timing.steps.append(res["steps"])
            timing.phases.append(res["phases"])
        print(f"  repeat {r + 1}/{args.repeats}: example {whole:.1f} s (steps {steps:.1f}), lowvram "
              + ", ".join(f"{t.whole[-1]:.1f} s (steps {t.steps[-1]:.1f})" for t, _ in runs), flush=True)
    # a second run of the same config on the warm cache of the last repeat: plan and latents are reused
    second = run_lowvram(args, job, work, work / f"cache-{args.repeats - 1}-False", previews=False)
    n = job.steps
    lines = [f"| {job.name} | whole process, s | steps, s | s/step | whole vs example | steps vs example |",
             "|---|---|---|---|---|---|",
             f"| diffusers example | {med(ex.whole)} | {med(ex.steps)} | {statistics.median(ex.steps) / n:.3f} | 1.00x | 1.00x |",
             f"| lowvram, same job (no final grid) | {med(same.whole)} | {med(same.steps)} | "
             f"{statistics.median(same.steps) / n:.3f} | {ratio(same.whole, ex.whole)} | {ratio(same.steps, ex.steps)} |"]
    if with_defaults:
        lines.append(f"| lowvram defaults (+ final grid) | {med(defaults.whole)} | {med(defaults.steps)} | "
                     f"{statistics.median(defaults.steps) / n:.3f} | {ratio(defaults.whole, ex.whole)} | "
                     f"{ratio(defaults.steps, ex.steps)} |")
    ph = second["phases"]
    before = {k: v for k, v in ph.items() if k not in ("steps", "checkpoints", "previews", "final saves", "validation")}
    lines += ["", "lowvram phases of the last first run (s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in same.phases[-1].items()),
              f"second run, same config, warm cache: first step after {second['first_step']:.1f} s = "
              + " + ".join(f"{k} {v:.1f}" for k, v in before.items())
              + f" (+ {second['first_step'] - sum(before.values()):.1f} between phases); "
              f"without model loading: {second['first_step'] - ph.get('load', 0.0):.1f} s"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--example", type=Path, required=True, help="path of diffusers' train_text_to_image_lora.py")
    ap.add_argument("--example-python", default=sys.executable, help="interpreter with datasets + torchvision")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60, help="steps of the tiny job")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of both")
    ap.add_argument("--no-defaults", action="store_true",
                    help="tiny job: skip the run with lowvram's defaults (final grid); halves the bench's time")
    ap.add_argument("--full", action="store_true", help="also the full-width SD 1.5 job at 256x256 (heavy)")
    ap.add_argument("--full-only", action="store_true", help="only the full-width job")
    ap.add_argument("--full-steps", type=int, default=4)
    ap.add_argument("--full-repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="keep the generated models and data here (default: a temp folder)")
    args = ap.parse_args()
    if not args.example.is_file():
        sys.exit(f"no diffusers example at {args.example}: get examples/text_to_image/train_text_to_image_lora.py "
                 "from the diffusers repository")
    import diffusers
    import torch

    work = args.workdir or Path(tempfile.mkdtemp(prefix="lowvram-vs-diffusers-"))
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{args.threads}, load average {load0[0]:.1f}; work folder {work}", flush=True)
    out: list[str] = []
    try:
        if not args.full_only:
            model = work / "tiny-sd1" if (work / "tiny-sd1").is_dir() else tiny_pipeline(work)
            make_images(work / "data-64", 21, 64)
            job = Job(f"tiny SD 1.x LoRA, 21 images 64², batch 4, {args.steps} steps, rank 4 (x{args.repeats})",
                      model, work / "data-64", 64, 4, args.steps)
            out += compare(args, job, work, with_defaults=not args.no_defaults) + [""]
        if args.full or args.full_only:
            model = work / "sd15-random" if (work / "sd15-random").is_dir() else full_pipeline(work)
            make_images(work / "data-256", 8, 256)
            full_args = argparse.Namespace(**{**vars(args), "repeats": args.full_repeats})
            job = Job(f"SD 1.5 UNet (random weights) LoRA, 8 images 256², batch 1, {args.full_steps} steps, rank 4 "
                      f"(x{args.full_repeats})", model, work / "data-256", 256, 1, args.full_steps)
            out += compare(full_args, job, work, with_defaults=False)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    print("\n" + "\n".join(out))
    print(f"\nload average at start {load0[0]:.1f}, at end {load1[0]:.1f} (1-minute; this machine has {os.cpu_count()} CPUs). "
          "Ratios are per repeat (lowvram / the example run just before it), median (min-max).")


if __name__ == "__main__":
    main()
