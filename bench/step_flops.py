"""FLOPs of one training step of the standard workloads, and what that means on the preset cards (estimates).

    python bench/step_flops.py [--efficiency 0.25]

FLOPs are counted, not guessed: each workload's step (the profiler's model on the meta device, the
trainer's ``compute_loss``, backward) runs under ``torch.utils.flop_counter.FlopCounterMode``. Gradient
checkpointing adds the recomputed forward. The time on a card is an **estimate**: FLOPs / (the card's
peak rate from its spec sheet x ``--efficiency``), and at least the time to read the frozen weights once
per pass at the card's memory bandwidth. Real efficiency at batch 1 varies a lot (kernel launches, small
matrices, attention kernels); the spread of published numbers is wide, so read the column as an order of
magnitude, not a promise.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from lowvram.memory.stages import _step_loss
from lowvram.memory.timeline import Timeline
from lowvram.memory.tracker import StorageTracker
from lowvram.memory.workloads import Knobs, build, get_workload

# spec-sheet peaks: dense fp16 with fp32 accumulation where the card has tensor/matrix units (the rate
# autocast uses), TFLOPS; memory bandwidth GB/s. fp32-only cards (GTX 16xx train in fp32) use the fp32 peak.
CARDS = {
    "rx570 (gfx803, fp16 at fp32 rate)": (5.1, 224),
    "gtx1650-4gb (fp32: NaNs in fp16)": (3.0, 128),
    "rtx2060-6gb (fp16 tensor cores)": (25.8, 336),
    "rtx3070-8gb (fp16 tensor cores)": (40.6, 448),
    "rx6600-8gb (fp16 packed math)": (17.9, 224),
}


def step_flops(workload: str, checkpointing: bool) -> tuple[float, int]:
    """(FLOPs of one forward + backward, bytes of the frozen UNet weights in fp16)."""
    wl = get_workload(workload)
    knobs = Knobs(attention="sdpa", batch_size=wl.batch_size, gradient_checkpointing=checkpointing)
    built = build(wl, knobs, "meta")
    # the profiler's own step (cached latents and text; FLUX.1's flow-matching loss), as the job computes it
    tl = Timeline(StorageTracker(device_type="meta"), "meta", torch.float32, "cuda")
    loss_of = _step_loss(built, wl, knobs, tl)
    with FlopCounterMode(display=False) as counter:
        loss = loss_of()
        loss.backward()
    weights = sum(p.numel() for p in built.unet.parameters()) * 2  # 16-bit frozen weights, each read once a pass
    return float(counter.get_total_flops()), weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--efficiency", type=float, default=0.25, help="share of the peak rate assumed (0-1)")
    ap.add_argument("--workload", action="append", choices=("W1", "W2", "W3", "W4", "W5", "W6"))
    args = ap.parse_args()
    names = list(CARDS)
    print("| workload | checkpointing | TFLOP/step | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for w in args.workload or ("W1", "W2", "W3", "W4", "W5", "W6"):
        for ckpt in (False, True):
            flops, weights = step_flops(w, ckpt)
            passes = 3 if ckpt else 2  # forward, backward (+ the recomputed forward)
            cells = []
            for tflops, gbs in CARDS.values():
                seconds = max(flops / (tflops * 1e12 * args.efficiency), passes * weights / (gbs * 1e9))
                cells.append(f"~{seconds:.2g} s")
            print(f"| {w} {get_workload(w).description} | {'on' if ckpt else 'off'} | {flops / 1e12:.2f} | "
                  + " | ".join(cells) + " |", flush=True)
    print(f"\nEstimates at {args.efficiency:.0%} of each card's spec-sheet peak (see the docstring); not measured.")


if __name__ == "__main__":
    main()
