"""``lowvram eval``: sample every evaluation prompt of the builtin data and score prompt adherence.

The builtin generator knows the truth of each caption, so adherence is measured, not judged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import DataError
from .fsutil import write_text_atomic
from .runs import load_run_model


def evaluate_run(
    run_dir: str | Path,
    *,
    samples_per_prompt: int = 8,
    cfg_scale: float | None = None,
    steps: int = 25,
    sampler: str = "ddim",
    seed: int = 0,
    device: str = "cpu",
    which: str = "auto",
) -> dict[str, Any]:
    """Adherence report of the run's final model (or latest EMA checkpoint); also written to eval.json.

    ``cfg_scale`` None: the run's ``sample.guidance`` (the scale its recipe samples best at)."""
    from .data.builtin import attributes_of_caption, decode_attributes, eval_prompts, matches
    from .evaluate import prompt_adherence
    from .run_folder import load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if cfg.data.source != "builtin":
        raise DataError(
            f"run '{run_dir}' was trained on '{cfg.data.source}': prompt adherence needs the builtin data's truth",
            "use `lowvram sample` to look at its samples instead",
        )
    model = load_run_model(run_dir, device=device, which=which)
    if cfg_scale is None:
        cfg_scale = cfg.sample.guidance

    def generate(prompts: list[str], n: int) -> torch.Tensor:
        batch = [p for p in prompts for _ in range(n)]
        return model.generate(batch, cfg_scale=cfg_scale, steps=steps, sampler=sampler, seed=seed,
                              guidance_rescale=cfg.sample.guidance_rescale)

    report = prompt_adherence(generate, eval_prompts(), samples_per_prompt, matches,
                              decode=decode_attributes, attributes_of=attributes_of_caption)
    report.update({"cfg_scale": cfg_scale, "guidance_rescale": cfg.sample.guidance_rescale, "steps": steps, "sampler": sampler, "seed": seed,
                   "samples_per_prompt": samples_per_prompt})
    write_text_atomic(run_dir / "eval.json", json.dumps(report, indent=1))  # a killed eval keeps the last report
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": "eval", "step": None, "adherence": report["overall"],
                            "cfg_scale": cfg_scale}) + "\n")
    return report
