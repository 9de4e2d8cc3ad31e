"""Does a LoRA teach a model a concept it has never seen? Prompt adherence before and after, on the CPU.

1. A base model: the default job (`lowvram train`: the `tiny` model on the builtin shapes) with one attribute
   value held out of its data (`data.builtin_exclude`, default `yellow`): its word is not even in the
   model's vocabulary. Trained once and reused from WORK/base-no-<concept> (the heavy part: ~8 min on 2 free
   cores; run the bench under `flock /work/heavy.lock` on a shared machine).
2. A few images of the concept: one per combination of the other attributes (yellow: 3 shapes x 3
   backgrounds = 9), drawn by the builtin generator, in a folder with caption sidecars, as a user has them.
3. `lowvram train --task lora --model WORK/base-no-<concept>/final --data WORK/data-<concept>` with the
   adapter type as a parameter (`--adapter`; types other than lora set `lora.type`).
4. The builtin evaluator's prompt adherence (all attributes decoded right) on every prompt naming the
   concept, before (the base) and after (the base with the adapter merged), and on the evaluation prompts
   without the concept (what the base knew: a LoRA should not break it).

Run: OMP_NUM_THREADS=2 PYTHONPATH=. flock /work/heavy.lock python bench/lora_learning.py [--adapter lora]
Prints a table and writes WORK/result-<adapter>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lowvram.cli import main as cli
from lowvram.data.builtin import (
    ATTRIBUTES,
    ShapesDataset,
    all_captions,
    attributes_of_caption,
    caption_of,
    eval_prompts,
    render,
)

THRESHOLD = 0.5  # stated before/after: see the closing note of issue 15 for the measured numbers
# The LoRA run (tuned on this bench; see docs/recipes or the closing note of issue 15 for the numbers).
LORA_SETTINGS = {
    "lora.rank": 8, "lora.alpha": 8, "train.lr": 2e-3, "train.batch_size": 9, "train.warmup_steps": 20,
    "train.lr_schedule": "cosine", "train.ema_decay": 0, "run.sample_every": 0, "run.checkpoint_every": 0,
    "run.log_every": 25, "run.tensorboard": "false", "data.caption_dropout": 0.1,
    "sample.cfg_scales": 1.5, "sample.guidance_rescale": 0.7, "sample.steps": 25,  # the final grid: as the base's
}


def run_cli(argv: list[str], log: Path) -> None:
    """One `lowvram` command in this process, its output in ``log`` (raises if it fails)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli(argv)
    log.write_text(out.getvalue())
    if code != 0:
        raise SystemExit(f"`lowvram {' '.join(argv)}` failed ({code}); see {log}")


def base_model(work: Path, concept: str) -> Path:
    """The default job with ``concept`` held out; trained unless WORK already holds it."""
    base = work / f"base-no-{concept}"
    if not (base / "final" / "lowvram_model.json").is_file():
        t = time.perf_counter()
        argv = ["train", "--out", str(base), "--device", "cpu", "--no-progress",
                "--set", f"data.builtin_exclude={concept}"]
        print(f"training the base model: lowvram {' '.join(argv)}", flush=True)
        run_cli(argv, work / f"base-no-{concept}.log")
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    return base


def concept_images(work: Path, concept: str, per_combination: int, known: int, repeats: int,
                   resolution: int) -> Path:
    """A kohya folder: ``<repeats>_new/`` holds ``per_combination`` images of the concept per combination of the
    other attributes; ``1_known/`` holds ``known`` images of what the base knew (drawn as its data was), the
    mixed dataset that keeps the other colours from drifting to the new one. Captions beside every image."""
    folder = work / f"data-{concept}-x{per_combination}-known{known}-r{repeats}"
    if folder.is_dir():
        return folder
    key = next(k for k, values in ATTRIBUTES.items() if concept in values)
    others = [k for k in ATTRIBUTES if k != key]
    tmp = folder.with_name(folder.name + ".tmp")
    (tmp / f"{repeats}_new").mkdir(parents=True, exist_ok=True)
    n = 0
    for a in ATTRIBUTES[others[0]]:
        for b in ATTRIBUTES[others[1]]:
            attrs = {key: concept, others[0]: a, others[1]: b}
            for j in range(per_combination):
                pixels = render(attrs, resolution, np.random.default_rng([7, n, j]))
                Image.fromarray(pixels).save(tmp / f"{repeats}_new" / f"{n:03d}-{j}.png")
                (tmp / f"{repeats}_new" / f"{n:03d}-{j}.txt").write_text(caption_of(attrs))
            n += 1
    if known:
        (tmp / "1_known").mkdir()
        old = ShapesDataset(known, resolution, seed=7, exclude=(concept,))
        for i in range(known):
            item = old[i]
            pixels = ((item["pixel_values"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(tmp / "1_known" / f"{i:03d}.png")
            (tmp / "1_known" / f"{i:03d}.txt").write_text(item["caption"])
    tmp.rename(folder)
    return folder


def adherence(model_dir: Path, prompts: list[str], samples: int, sampling: dict[str, Any]) -> dict[str, Any]:
    from lowvram.data.builtin import decode_attributes, matches
    from lowvram.evaluate import prompt_adherence
    from lowvram.runs import load_run_model

    model = load_run_model(model_dir, which="final")

    def generate(ps: list[str], n: int) -> torch.Tensor:
        return model.generate([p for p in ps for _ in range(n)], **sampling)

    return prompt_adherence(generate, prompts, samples, matches, decode=decode_attributes,
                            attributes_of=attributes_of_caption)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench-lora", help="folder for the base model, data and runs (reused)")
    ap.add_argument("--concept", default="yellow", help="attribute value held out of the base and taught by the LoRA")
    ap.add_argument("--adapter", default="lora", help="lora, or loha / lokr / dora (sets lora.type)")
    ap.add_argument("--steps", type=int, default=400, help="LoRA optimizer steps")
    ap.add_argument("--per-combination", type=int, default=1, help="concept images per combination of the others")
    ap.add_argument("--known", type=int, default=27, help="images of what the base knew, mixed in (0: the concept only)")
    ap.add_argument("--repeats", type=int, default=4, help="kohya repeats of the concept images per epoch")
    ap.add_argument("--samples", type=int, default=8, help="samples per evaluation prompt")
    ap.add_argument("--set", action="append", default=[], help="extra SECTION.KEY=VALUE for the LoRA run")
    ap.add_argument("--threshold", type=float, default=THRESHOLD,
                    help="adherence on the new concept the adapter must reach (the bench exits 1 below it)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    base = base_model(work, args.concept)
    from lowvram.train.run import load_run_config

    bcfg = load_run_config(base)
    data = concept_images(work, args.concept, args.per_combination, args.known, args.repeats, int(bcfg.data.resolution))
    # the base run's own sampling settings, before and after
    sampling = {"cfg_scale": bcfg.sample.guidance, "guidance_rescale": bcfg.sample.guidance_rescale,
                "steps": 25, "sampler": "ddim", "seed": 0}
    new = [c for c in all_captions() if args.concept in attributes_of_caption(c).values()]
    known = [c for c in eval_prompts() if args.concept not in attributes_of_caption(c).values()]

    run = work / f"lora-{args.adapter}-{data.name.removeprefix('data-')}-s{args.steps}"
    if not (run / "final" / "lowvram_model.json").is_file():
        sets = dict(LORA_SETTINGS)
        if args.adapter != "lora":
            sets["lora.type"] = args.adapter
        argv = ["train", "--task", "lora", "--model", str(base / "final"), "--data", str(data), "--out", str(run),
                "--steps", str(args.steps), "--device", "cpu", "--no-progress"]
        for k, v in sets.items():
            argv += ["--set", f"{k}={v}"]
        for kv in args.set:
            argv += ["--set", kv]
        print(f"LoRA: lowvram {' '.join(argv)}", flush=True)
        t = time.perf_counter()
        run_cli(argv, work / f"{run.name}.log")
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)

    result: dict[str, Any] = {"concept": args.concept, "adapter": args.adapter, "steps": args.steps,
                              "images": len(list(data.glob(f"{args.repeats}_new/*.png"))), "known_images": args.known,
                              "repeats": args.repeats, "samples_per_prompt": args.samples, "sampling": sampling,
                              "run": str(run)}
    for name, folder in (("before", base), ("after", run)):
        result[name] = {"new": adherence(folder, new, args.samples, sampling),
                        "known": adherence(folder, known, args.samples, sampling)}
    result["threshold"] = args.threshold
    (work / f"result-{run.name}.json").write_text(json.dumps(result, indent=1))
    print(f"\nconcept '{args.concept}' ({len(new)} prompts) and the evaluation prompts without it ({len(known)}),"
          f" {args.samples} samples each; adapter {args.adapter}, {args.steps} steps on {result['images']} images"
          f" of it (x{args.repeats}) + {args.known} of what the base knew")
    print("| model | adherence, new concept | its attribute accuracy | adherence, known prompts |")
    print("|---|---|---|---|")
    for name in ("before", "after"):
        r = result[name]
        attr = ", ".join(f"{k} {v:.0%}" for k, v in r["new"].get("per_attribute", {}).items())
        print(f"| {name} | {r['new']['overall']:.1%} | {attr} | {r['known']['overall']:.1%} |")
    reached = result["after"]["new"]["overall"] >= args.threshold
    print(f"\nnew-concept adherence after the adapter {'reaches' if reached else 'MISSES'} the threshold {args.threshold:.0%}")
    raise SystemExit(0 if reached else 1)


if __name__ == "__main__":
    main()
