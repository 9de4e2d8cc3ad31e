"""The memory plan against a real card: train each standard workload a few steps with its planned knobs and
print the prediction beside what the card's allocator saw.

    PYTHONPATH=. python bench/gpu_check.py [--preset rtx3070-8gb] [--workloads W1 W4] [--steps 3] [--json]
    PYTHONPATH=. python bench/gpu_check.py --dry-run          # plans only (no GPU needed)
    PYTHONPATH=. python bench/gpu_check.py --tiny --device cpu  # the whole path on tiny models, on the CPU

On a CUDA or ROCm machine (ROCm builds answer to ``cuda`` in PyTorch) each workload becomes a real run
through the front door (``lowvram.api``: resolve the preset's config plus the job, plan, train), on
random-weight models of the published SD 1.5 / SDXL layouts (no download) saved as diffusers folders,
and 4 random captioned images at the workload's resolution. Printed per workload: the plan's verdict,
its predicted peak of tensor bytes, and ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``
over the run (reserved adds the caching allocator's blocks: what the budget's margin is for). On the CPU
(``--device cpu``) the allocator's peak inside the run's phases is measured instead (lowvram.memory.fidelity).
The plan for a card is made with the CUDA autocast rules; the first card at hand confirms them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

GIB = 2**30
TESTS = Path(__file__).resolve().parents[1] / "tests"
# The standard jobs as front-door settings (memory/workloads.py describes them): family or size, task,
# resolution, images per step.
JOBS: dict[str, dict[str, Any]] = {
    "W1": {"family": "sd1", "task": "lora", "resolution": 512, "batch": 1},
    "W2": {"family": "sdxl", "task": "lora", "resolution": 1024, "batch": 1},
    "W3": {"family": "sd1", "task": "full", "resolution": 512, "batch": 1},
    "W4": {"family": None, "task": "latent", "resolution": 64, "batch": 16},
}


def clip_tokenizer(folder: Path) -> Any:
    """A CLIP tokenizer with a small byte-level vocabulary (ids stay inside the real 49408-word table)."""
    sys.path.insert(0, str(TESTS))
    from sd_fixtures import tiny_tokenizer

    tok = tiny_tokenizer(folder)
    tok.model_max_length = 77
    return tok


def random_pipeline(family: str, folder: Path, tiny: bool) -> Path:
    """A diffusers folder of ``family`` with random weights: the published layout, or the tests' tiny one."""
    if tiny:
        sys.path.insert(0, str(TESTS))
        from sd_fixtures import save_tiny

        return save_tiny(folder, family)["folder"]
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    from lowvram.models import sd_configs

    name = {"sd1": "sd15", "sdxl": "sdxl"}[family]
    fam = sd_configs.get_family(name)
    torch.manual_seed(0)
    unet = sd_configs.build_sd_unet(fam, "cpu", torch.float16)
    vae = sd_configs.build_sd_vae(fam, "cpu", torch.float16)
    tes = sd_configs.build_sd_text_encoders(fam, "cpu", torch.float16)
    tok = clip_tokenizer(folder / "tok")
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=tes[0], text_encoder_2=tes[1], tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler(**sched))
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=tes[0], tokenizer=tok, unet=unet,
                                       scheduler=DDIMScheduler(**sched), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    out = folder / family
    pipe.save_pretrained(out)
    return out


def images(folder: Path, resolution: int, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of sks dog, photo {i}")
    return folder


def settings(wid: str, work: Path, models: dict[str, Path], args: argparse.Namespace) -> list[Any]:
    """The front door's settings of a standard job (the preset gives the knobs, the planner the rest)."""
    from lowvram.api import Setting

    job = JOBS[wid]
    res = 32 if args.tiny and job["family"] else 16 if args.tiny else job["resolution"]
    out = [("run.out", str(work / f"run-{wid}")), ("run.steps", args.steps), ("run.device", args.device),
           ("run.checkpoint_every", 0), ("run.sample_every", 0), ("run.tensorboard", False),
           ("sample.steps", 2), ("train.batch_size", job["batch"]), ("train.grad_accum", 1),
           ("data.resolution", res)]
    if job["family"]:
        out += [("run.task", job["task"]), ("model.pretrained", str(models[job["family"]])),
                ("data.source", str(images(work / f"data-{res}", res))), ("lora.rank", 4 if args.tiny else 16),
                ("data.cache_dir", str(work / "cache")), ("sample.prompts", "a photo of sks dog")]
    else:
        out += [("run.task", "latent"), ("model.size", "tiny" if args.tiny else "celeba64"),
                ("data.num_images", 64), ("train.autoencoder_steps", 2)]
    return [Setting(k, v, f"bench/gpu_check.py ({wid})") for k, v in out]


def measure(planned: Any, device: str) -> tuple[int | None, int | None]:
    """(peak allocated, peak reserved) of training ``planned``: the CUDA allocator's, or the CPU allocator's
    peak inside the run's phases (reserved: not defined on the CPU)."""
    from lowvram import api

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        api.train(planned, progress=False)
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    import gc

    from lowvram.memory.fidelity import allocator_peak
    from lowvram.train.step import RANGE_PREFIX

    gc.collect()
    peak, _ = allocator_peak(lambda: api.train(planned, progress=False), window=RANGE_PREFIX)
    return peak, None


def check(args: argparse.Namespace) -> list[dict[str, Any]]:
    from lowvram import api
    from lowvram.errors import LowvramError

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        families = {JOBS[w]["family"] for w in args.workloads} - {None}
        models = {} if args.dry_run and not args.tiny else \
            {f: random_pipeline(f, work / "models", args.tiny) for f in sorted(families)}
        for wid in args.workloads:
            if args.dry_run and not args.tiny and JOBS[wid]["family"]:
                models.setdefault(JOBS[wid]["family"], work / "models" / f"not-built-{JOBS[wid]['family']}.safetensors")
                extra = [api.Setting("model.family", JOBS[wid]["family"], "bench/gpu_check.py (dry run)")]
            else:
                extra = []
            row: dict[str, Any] = {"workload": wid}
            start = time.perf_counter()
            try:
                run = api.resolve(args.preset, settings=settings(wid, work, models, args) + extra,
                                  probe_hardware=args.preset is None)
                planned = api.plan(run, processes=1)
                row.update(preset=run.preset.name, verdict=planned.verdict, predicted=planned.peak_bytes,
                           stage=planned.record.get("peak_stage"), changed=planned.record.get("changed", {}))
                if not args.dry_run:
                    row["allocated"], row["reserved"] = measure(planned, args.device)
            except LowvramError as e:
                row["error"] = str(e)
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(json.dumps(row, default=str), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def gib(b: Any) -> str:
        return f"{b / GIB:.3f}" if isinstance(b, int) else "-"

    out = [f"{'':4}{'preset':<14}{'verdict':<10}{'predicted':>10}{'allocated':>11}{'reserved':>10}{'error':>8}  peak in"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['workload']:<4}{r['error']}")
            continue
        err = f"{(r['predicted'] - r['allocated']) / r['allocated']:+.1%}" if r.get("allocated") else "-"
        out.append(f"{r['workload']:<4}{r['preset']:<14}{r['verdict']:<10}{gib(r['predicted']):>10}"
                   f"{gib(r.get('allocated')):>11}{gib(r.get('reserved')):>10}{err:>8}  {r['stage']}")
    return "\n".join(out) + "\n(GiB of tensors; error = predicted vs allocated)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", help="Card preset (default: the one recommended for this machine's card).")
    ap.add_argument("--workloads", nargs="*", default=list(JOBS), choices=list(JOBS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="The tests' tiny model layouts (for a quick check of the path).")
    ap.add_argument("--dry-run", action="store_true", help="Plan only: no model is built, nothing trains.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        ap.error("no CUDA/ROCm device: use --dry-run, or --device cpu")
    rows = check(args)
    print(json.dumps(rows, indent=2, default=str) if args.json else table(rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
