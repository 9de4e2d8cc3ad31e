"""What each adapter type costs: W1 (SD 1.5, rank 16 on attention + feed-forward, 512², batch 1) with each
``lora.type`` under a preset's knobs. Tensors only, on the meta device (seconds per row).
Run: PYTHONPATH=. python bench/adapter_memory.py [preset]
"""

from __future__ import annotations

import sys

from lowvram.adapters import ADAPTER_TYPES
from lowvram.config import ConfigBuilder
from lowvram.memory.profiler import GIB, profile_step
from lowvram.memory.report import knobs_from_config
from lowvram.memory.workloads import WORKLOADS
from lowvram.presets import load_preset

MIB = 2**20


def main(preset: str) -> None:
    p = load_preset(preset)
    cfg = (ConfigBuilder().apply(p.config, preset).set("run.task", "lora", "bench")
           .set("model.pretrained", "bench", "bench").build())
    knobs = knobs_from_config(cfg, WORKLOADS["W1"], p.card).with_(grad_accum=1, fused_backward=False)
    print(f"{preset}: {', '.join(f'{k}={v}' for k, v in knobs.as_config()['train'].items())}; "
          f"frozen {knobs.frozen_dtype}, attention {knobs.attention}")
    print("| lora.type | trainable MiB | optimizer MiB | activations GiB | peak GiB | fits |")
    print("|---|---|---|---|---|---|")
    for adapter in ADAPTER_TYPES:
        prof = profile_step(WORKLOADS["W1"].with_(adapter=adapter), knobs, card=p.card)
        c = prof.by_category
        print(f"| {adapter} | {c['trainable_weights'] / MIB:.1f} | {c['optimizer_state'] / MIB:.1f} | "
              f"{c['activations'] / GIB:.2f} | {prof.peak_bytes / GIB:.2f} | {prof.fits} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "rtx2060-6gb")
