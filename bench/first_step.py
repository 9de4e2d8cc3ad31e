"""Time to the first training step of a second run of the same config, against the libraries' own import time.

    flock /work/heavy.lock python bench/first_step.py [--repeats 5] [--threads 1] [--src OTHER_CHECKOUT ...]
    flock /work/heavy.lock python bench/first_step.py --panel [--repeats 5]   # the panel: spare vs fresh


The job is the tiny LoRA job of ``vs_diffusers.py`` (the tiny SD 1.x pipeline of the test fixtures, 21
captioned 64x64 images, batch 4, rank 4), 2 steps, no final grid. One run fills the plan and latent caches;
then each repeat runs, in turn, (a) a bare interpreter importing what any trainer of this job needs (torch,
diffusers' UNet and VAE, transformers' CLIP text encoder, peft: what diffusers' own example imports too)
and (b) ``lowvram train`` again on the warm caches, and reads ``first_step_s`` and the phases from its
``metrics.jsonl``. Reported: the first step, model loading, the first step without loading, and that over
(a), per repeat, median (min-max). ``--src DIR`` adds the lowvram of another checkout (e.g. an older
commit from ``git worktree add``), run in turn with this one, each with its own warm caches.
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

from vs_diffusers import make_images, med, ratio, tiny_pipeline  # noqa: E402

LIBRARIES = ("import torch; from diffusers import AutoencoderKL, UNet2DConditionModel; "
             "from transformers import CLIPTextModel, CLIPTokenizer; import peft")


def run_env(threads: int, src: Path, cache: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(src), "LOWVRAM_CACHE": str(cache)}


def libraries(threads: int) -> float:
    """Wall seconds of a fresh interpreter that only imports the libraries the job needs."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", LIBRARIES], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                   check=True, capture_output=True, cwd=tempfile.gettempdir())
    return time.perf_counter() - t0


def second_run(src: Path, work: Path, threads: int, cache: Path) -> dict:
    """``lowvram train`` (the code under ``src``, caches in ``cache``) on the job; returns its time account."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "lowvram", "train", "--preset", "cpu", "--task", "lora", "--model", str(work / "tiny-sd1"),
           "--data", str(work / "data-64"), "--steps", "2", "--out", str(out), "--seed", "0", "--no-progress",
           "--no-final-samples"]
    for item in ("train.batch_size=4", "lora.rank=4", "lora.alpha=4", "data.resolution=64", "train.warmup_steps=0"):
        cmd += ["--set", item]
    # cwd: the work folder, so that PYTHONPATH (not a checkout in the current directory) says which lowvram runs
    proc = subprocess.run(cmd, env=run_env(threads, src, cache), capture_output=True, text=True, cwd=work)
    if proc.returncode:
        sys.exit(f"lowvram train ({src}) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["kind"] == "phases")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    ap.add_argument("--src", type=Path, action="append", default=[],
                    help="another lowvram checkout to compare, run in turn with this one (repeatable)")
    ap.add_argument("--workdir", type=Path, help="keep the model, data and caches here (default: a temp folder)")
    ap.add_argument("--panel", action="store_true",
                    help="the same job through the web panel's job path: a warm spare against a fresh process")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lowvram-first-step-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tiny-sd1").is_dir():
        tiny_pipeline(work)
    make_images(work / "data-64", 21, 64)
    sources = [HERE.parent.resolve(), *(s.resolve() for s in args.src)]
    load0 = os.getloadavg()[0]
    if args.panel:
        panel(work, args, load0)
        return
    try:
        caches = {src: work / f"cache-{i}" for i, src in enumerate(sources)}
        for src in sources:  # the first run of each: plan profiled, latents encoded
            second_run(src, work, args.threads, caches[src])
        libs: list[float] = []
        runs: dict[Path, list[dict]] = {src: [] for src in sources}
        for r in range(args.repeats):
            libs.append(libraries(args.threads))
            for src in sources:
                runs[src].append(second_run(src, work, args.threads, caches[src]))
            print(f"  repeat {r + 1}/{args.repeats}: libraries {libs[-1]:.2f} s, first step "
                  + ", ".join(f"{runs[s][-1]['first_step_s']:.2f} s" for s in sources), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nimporting the libraries alone ({LIBRARIES}): {med(libs)} s")
    print("| lowvram | first step, s | model loading, s | first step without loading, s | that / libraries' import "
          "| first step / this checkout's |")
    print("|---|---|---|---|---|---|")
    notes: list[str] = []
    for src in sources:
        first = [a["first_step_s"] for a in runs[src]]
        load = [a["seconds"].get("load", 0.0) for a in runs[src]]
        bare = [f - ld for f, ld in zip(first, load, strict=True)]
        here = [a["first_step_s"] for a in runs[sources[0]]]
        print(f"| {src} | {med(first)} | {med(load)} | {med(bare)} | {ratio(bare, libs)} | {ratio(first, here)} |")
        phases = {k: statistics.median(a["seconds"].get(k, 0.0) for a in runs[src])
                  for k in runs[src][-1]["seconds"] if k not in ("steps", "checkpoints", "final saves")}
        notes.append(f"{src}: phases before the first step (median s): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    print("\n" + "\n".join(notes))
    print(f"\nload average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end ({os.cpu_count()} CPUs); "
          f"OMP_NUM_THREADS={args.threads}")


def panel(work: Path, args: argparse.Namespace, load0: float) -> None:
    sys.path.insert(0, str(HERE.parent))  # this checkout's lowvram, in this process (the panel's)
    from panel_first_step import panel_bench

    try:
        panel_bench(work, args.repeats, args.threads)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end ({os.cpu_count()} CPUs); "
          f"OMP_NUM_THREADS={args.threads}")


if __name__ == "__main__":
    main()
