"""Does channels-last memory format speed up a LoRA training step here? Contiguous vs channels-last, in turn.

    OMP_NUM_THREADS=2 python bench/channels_last.py --unet mid [--resolution 32 --batch 1 --repeats 9]
    flock /work/heavy.lock python bench/channels_last.py --unet sd15      # 3.4 GB of weights

One step = the UNet's forward + backward with LoRA (rank 4, lowvram's targets) on latents of
``--resolution``; the two memory formats alternate (A B, B A, ...) so load changes hit both alike.
``tiny``: the test fixtures' SD 1.x UNet (8-16 channels); ``mid``: SD 1.5's layout at ~1/4 width
(96/192/320/320); ``sd15``: the full-width SD 1.5 UNet (random weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(kind: str) -> tuple[torch.nn.Module, int]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if kind == "sd15":
        from lowvram.models.sd_configs import build_sd_unet

        return build_sd_unet("sd15", "cpu"), 768
    if kind == "mid":
        return UNet2DConditionModel(
            block_out_channels=(96, 192, 320, 320), cross_attention_dim=192, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3), 192
    import tempfile

    from sd_fixtures import tiny_sd1

    with tempfile.TemporaryDirectory() as tmp:
        return tiny_sd1(Path(tmp)).unet, 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet", choices=("tiny", "mid", "sd15"), default="mid")
    ap.add_argument("--resolution", type=int, default=32, help="latent side")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    from lowvram.lora import attach_lora

    unet, width = build(args.unet)
    unet.requires_grad_(False)
    attach_lora(unet, 4, 4, 0.0)
    unet.train()
    b, r = args.batch, args.resolution
    x, t, ctx = torch.randn(b, 4, r, r), torch.randint(0, 1000, (b,)), torch.randn(b, 77, width)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.repeats):
        for cl in (False, True) if i % 2 == 0 else (True, False):
            fmt = torch.channels_last if cl else torch.contiguous_format
            unet.to(memory_format=fmt)
            t0 = time.perf_counter()
            unet(x.contiguous(memory_format=fmt), t, encoder_hidden_states=ctx).sample.pow(2).mean().backward()
            times[cl].append(time.perf_counter() - t0)
    a, c = statistics.median(times[False][1:]), statistics.median(times[True][1:])  # the first warms up
    print(f"{args.unet} UNet, latents {b}x4x{r}x{r}, threads {torch.get_num_threads()}: contiguous {a:.3f} s, "
          f"channels-last {c:.3f} s per step: {c / a:.2f}x")


if __name__ == "__main__":
    main()
