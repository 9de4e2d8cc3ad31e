"""AdamW step time by implementation (per-tensor loop, multi-tensor foreach, fused) on real parameter sets.

    OMP_NUM_THREADS=2 python bench/optimizer_step.py [--repeats 30]

Parameter sets: the LoRA adapters lowvram puts on the SD 1.5 UNet (rank 4 and 16, its default targets),
and a full SD 1.5 UNet (a full fine-tune's trainable weights). Gradients are random; the three
implementations step in turn (A, B, C, A, B, C, ...), so load changes hit them alike. Also prints the
largest difference between their updated weights after 5 steps (they agree to float rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def lora_params(rank: int) -> list[torch.Tensor]:
    from lowvram.lora import attach_lora
    from lowvram.models.sd_configs import build_sd_unet

    unet = build_sd_unet("sd15", "meta")
    attach_lora(unet, rank, rank, 0.0)
    return [torch.zeros(p.shape) for p in unet.parameters() if p.requires_grad]


def full_params() -> list[torch.Tensor]:
    from lowvram.models.sd_configs import build_sd_unet

    return [torch.zeros(p.shape) for p in build_sd_unet("sd15", "meta").parameters()]


def make(shapes: list[torch.Tensor], impl: str) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(t.shape, generator=g)) for t in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    kw = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    return params, torch.optim.AdamW(params, lr=1e-3, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--skip-full", action="store_true", help="only the LoRA sets (the full UNet needs ~14 GB)")
    args = ap.parse_args()
    sets = {"LoRA r4 (SD 1.5)": lora_params(4), "LoRA r16 (SD 1.5)": lora_params(16)}
    if not args.skip_full:
        sets["full UNet (SD 1.5)"] = full_params()
    impls = ("loop", "foreach", "fused")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| parameters | tensors | elements | loop ms | foreach ms | fused ms | max |w diff| |\n|---|---|---|---|---|---|---|")
    for name, shapes in sets.items():
        runs = {impl: make(shapes, impl) for impl in impls}
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for i in range(args.repeats + 5):
            for impl in impls:
                opt = runs[impl][1]
                t0 = time.perf_counter()
                opt.step()
                if i >= 5:  # the first steps create the state
                    times[impl].append(time.perf_counter() - t0)
            if i == 4:
                ref = runs["loop"][0]
                diff = max(float((a - b).detach().abs().max()) for impl in impls[1:] for a, b in zip(ref, runs[impl][0], strict=True))
        n = sum(t.numel() for t in shapes)
        cells = " | ".join(f"{1000 * statistics.median(times[i]):.1f}" for i in impls)
        print(f"| {name} | {len(shapes)} | {n / 1e6:.2f} M | {cells} | {diff:.1e} |", flush=True)
        del runs


if __name__ == "__main__":
    main()
