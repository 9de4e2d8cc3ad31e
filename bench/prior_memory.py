"""Prior preservation's memory cost: W1 (SD 1.5 LoRA r16, 512²) at micro-batch 1 vs 2 with each preset's knobs,
and drawing the class images with the base model (data.num_class_images) under the same knobs.

A prior-preservation micro-batch holds one class image per instance image: the profiler runs the step on
twice the micro-batch (Workload.prior). Drawing the class images is a stage of the run's profile
(Workload.class_images: one sampling step with guidance + the VAE decode, every frozen weight on the card;
lowvram/memory/drawing.py class_image_stage). Tensors only, on the meta device (~20 s per preset).
Run: PYTHONPATH=. python bench/prior_memory.py [preset ...]
"""

from __future__ import annotations

import sys

from lowvram.config import ConfigBuilder
from lowvram.memory.profiler import GIB, profile_step
from lowvram.memory.run_plan import knobs_from_config
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
        one, two = (profile_step(wl.with_(prior=prior), k.with_(batch_size=1), card=p.card) for prior in (False, True))
        drawn = profile_step(wl.with_(prior=True, class_images=1), k.with_(batch_size=1), card=p.card)
        draw = drawn.stages["class images"]
        print(f"| {name} | {one.budget_bytes / GIB:.2f} | {one.peak_bytes / GIB:.2f} | {two.peak_bytes / GIB:.2f} | "
              f"{two.fits} | {draw / GIB:.2f} | {draw <= one.budget_bytes} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["gtx1650-4gb", "rx570", "rtx2060-6gb"])
