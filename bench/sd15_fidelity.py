"""The plan against the run at full size: SD 1.5 (random weights from the published config, no download),
`lowvram plan`'s peak vs the CPU allocator's peak of `lowvram train` with the same config, on the CPU.

    flock /work/heavy.lock env PYTHONPATH=. python bench/sd15_fidelity.py [--resolution 512] [--cases w1 fp32]

Cases (each a LoRA rank 16 run of 2 steps, a preview at the end, batch 1, on the `cpu` preset's card):
- ``w1``: the knobs W1's plan on the rx570 preset runs with (the planner's, from the preset's), trained on the
  CPU: the step model at full size under CPU autocast rules (the card's figure, with CUDA rules, is printed too);
- ``fp32``: an fp32 plan (fp32 weights and compute, gradient checkpointing, SDPA).
The measure is the CPU allocator's count of every thread's bytes plus the storages mapped from the checkpoint
(lowvram/memory/fidelity.py): the text encoder is cast to the run's dtype on transformers' loading threads,
which torch.profiler's own events do not follow (they once read 0.46 GiB below the fp32 weights).
Heavy: several GB of RAM and minutes of CPU per case (run it under the shared lock).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import images, random_pipeline  # noqa: E402

GIB = 2**30


def w1_knobs_on(preset: str) -> dict[str, Any]:
    """The settings W1's plan on ``preset`` runs with: the preset's knobs and what the planner switched on."""
    from lowvram.memory.report import preset_start, standard_plan
    from lowvram.memory.workloads import WORKLOADS, Knobs
    from lowvram.presets import load_preset

    p = load_preset(preset)
    wl, start = preset_start(WORKLOADS["W1"], p)
    planned = standard_plan(wl, p.card, start)
    chosen = planned["chosen"] or planned["start"]
    knobs = Knobs(**chosen.knobs)  # attention as the card runs it (auto resolved)
    out = {f"{sec}.{key}": value for sec, body in knobs.as_config().items() for key, value in body.items()}
    return {"settings": out, "card_peak": chosen.peak_bytes, "card_stage": chosen.peak_phase}


CASES = {
    "w1": "W1's planned knobs (rx570; bf16 for fp16)",
    "fp32": "fp32, gradient checkpointing, SDPA",
}


def case_settings(case: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if case == "w1":
        found = w1_knobs_on("rx570")
        # fp16 convolutions run ~400x slower than bf16 on CPUs without AVX512-FP16 (26 s vs 0.06 s for one
        # 128-channel 3x3 conv at 128² here): the CPU run uses bf16 where the card's plan has fp16. Same bytes
        # per tensor, and CPU autocast casts the same ops for both ("float16 shares the lists of bfloat16").
        settings = {k: ("bf16" if v == "fp16" and k in ("train.precision", "memory.frozen_dtype") else v)
                    for k, v in found["settings"].items()}
        return settings, found
    return {"train.precision": "fp32", "memory.frozen_dtype": "fp32", "train.gradient_checkpointing": True,
            "memory.attention": "sdpa", "train.optimizer": "adamw"}, {}


def run_case(case: str, model: Path, data: Path, work: Path, resolution: int) -> dict[str, Any]:
    from lowvram.memory.fidelity import predict_and_measure

    knobs, extra = case_settings(case)
    sets = {"data.resolution": resolution, "train.batch_size": 1, "train.grad_accum": 1, "lora.rank": 16,
            "run.checkpoint_every": 0, "run.sample_every": 0, "run.tensorboard": False, "sample.steps": 1,
            "sample.cfg_scales": "1,3", "sample.prompts": "a photo of sks dog", "train.warmup_steps": 0,
            "data.cache_dir": str(work / "cache"), **knobs}
    argv = ["train", "--preset", "cpu", "--task", "lora", "--model", str(model), "--data", str(data),
            "--steps", "2", "--out", str(work / f"run-{case}"), "--no-progress"]
    for key, value in sets.items():
        argv += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    import resource

    start = time.perf_counter()
    predicted, measured, record = predict_and_measure(argv)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak so far (Linux: KiB)
    return {"case": case, "what": CASES[case], "resolution": resolution, "predicted_bytes": predicted,
            "measured_bytes": measured, "error": (predicted - measured) / measured, "peak_stage": record["peak_stage"],
            "stages": record["stages"], "by_category": record["by_category"], "knobs": knobs, "card_figure_bytes": extra.get("card_peak"),
            "seconds": round(time.perf_counter() - start, 1), "process_peak_rss_bytes": rss, "argv": argv}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = random_pipeline("sd1", work / "models", tiny=False)
        data = images(work / "data", args.resolution, n=2)
        for case in args.cases:
            rows.append(run_case(case, model, data, work, args.resolution))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'case':<36}{'res':>5}{'predicted':>11}{'measured':>10}{'error':>8}  peak in     (GiB, CPU allocator)")
    for r in rows:
        print(f"{r['what']:<36}{r['resolution']:>5}{r['predicted_bytes'] / GIB:>11.3f}{r['measured_bytes'] / GIB:>10.3f}"
              f"{r['error']:>+8.1%}  {r['peak_stage']}")
        if r["card_figure_bytes"]:
            print(f"  the same knobs on the rx570 card (CUDA autocast rules): {r['card_figure_bytes'] / GIB:.3f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
