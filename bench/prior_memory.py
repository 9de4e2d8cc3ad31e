"""Prior preservation's memory cost: W1 (SD 1.5 LoRA r16, 512²) at micro-batch 1 vs 2 with each preset's knobs,
and drawing the class images with the base model (data.num_class_images) under the same knobs.

A prior-preservation micro-batch holds one class image per instance image, so it is profiled at twice the
micro-batch (lowvram/memory/run_plan.py prior_factor). Drawing a class image is one sampling step with
guidance (batch 2, no gradients) + the VAE decode, with the VAE and text encoders on the card
(lowvram/memory/sampling.py). Tensors only, on the meta device (~20 s per preset).
Run: PYTHONPATH=. python bench/prior_memory.py [preset ...]
"""

from __future__ import annotations

import sys

from lowvram.config import ConfigBuilder
from lowvram.memory.profiler import GIB, profile_step
from lowvram.memory.report import knobs_from_config
from lowvram.memory.sampling import profile_sampling
from lowvram.memory.workloads import WORKLOADS
from lowvram.presets import load_preset


def main(presets: list[str]) -> None:
    wl = WORKLOADS["W1"]
    print("| preset | budget GiB | micro-batch 1 GiB | + class image (micro-batch 2) GiB | fits | drawing class images GiB | fits |")
    print("|---|---|---|---|---|---|---|")
    for name in presets:
        p = load_preset(name)
        cfg = (ConfigBuilder().apply(p.config, name).set("run.task", "lora", "bench")
               .set("model.pretrained", "bench", "bench").build())
        k = knobs_from_config(cfg, wl, p.card).with_(grad_accum=1, fused_backward=False)
        one, two = (profile_step(wl, k.with_(batch_size=b), card=p.card) for b in (1, 2))
        draw = profile_sampling(wl, k, card=p.card)
        print(f"| {name} | {one.budget_bytes / GIB:.2f} | {one.peak_bytes / GIB:.2f} | {two.peak_bytes / GIB:.2f} | "
              f"{two.fits} | {draw.peak_bytes / GIB:.2f} | {draw.fits} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["gtx1650-4gb", "rx570", "rtx2060-6gb"])
