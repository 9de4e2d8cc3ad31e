"""Attention kernels: chunked equals math (values and gradients), resolves per card, saves memory."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch.utils.checkpoint import checkpoint

from lowvram.attention import (
    ChunkedAttnProcessor,
    chunked_attention,
    make_processor,
    resolve_attention,
    set_attention,
    xformers_available,
)
from lowvram.errors import ConfigError, HardwareError
from lowvram.memory.tracker import StorageTracker


def _run(attn: Attention, kind: str, x: torch.Tensor, ctx: torch.Tensor | None, chunk: int = 7, ckpt: bool = False):
    attn.set_processor(make_processor(kind, chunk))
    attn.zero_grad()
    x = x.detach().requires_grad_(True)
    y = checkpoint(attn, x, ctx, use_reentrant=False) if ckpt else attn(x, ctx)
    (y.square().sum() + y.sum()).backward()
    return y.detach(), x.grad, attn.to_q.weight.grad.clone(), attn.to_k.weight.grad.clone(), attn.to_v.weight.grad.clone()


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("ckpt", [False, True])
def test_chunked_equals_math_values_and_gradients(cross, ckpt):
    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=24 if cross else None, heads=4, dim_head=8).double()
    x = torch.randn(2, 50, 32, dtype=torch.double)  # 50 rows: the last chunk of 7 is partial
    ctx = torch.randn(2, 11, 24, dtype=torch.double) if cross else None
    want = _run(attn, "math", x, ctx)
    got = _run(attn, "chunked", x, ctx, ckpt=ckpt)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_chunked_attention_gradcheck_with_mask():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, n, 4, dtype=torch.double, requires_grad=True) for n in (9, 5, 5))
    mask = torch.zeros(2, 9, 5, dtype=torch.double)
    mask[:, :, -1] = -1e4  # the last key is masked out for every query
    assert torch.autograd.gradcheck(lambda q, k, v: chunked_attention(q, k, v, mask, scale=0.5, chunk=4), (q, k, v))
    out = chunked_attention(q, k, v, mask, scale=0.5, chunk=4)
    ref = torch.softmax(q @ k.transpose(1, 2) * 0.5 + mask, -1) @ v
    torch.testing.assert_close(out, ref)


def test_chunked_upcast_matches_math_in_half_precision():
    torch.manual_seed(2)
    attn = Attention(32, heads=4, dim_head=8, upcast_attention=True, upcast_softmax=True).to(torch.bfloat16)
    x = torch.randn(1, 40, 32, dtype=torch.bfloat16)
    attn.set_processor(AttnProcessor())
    ref = attn(x).float()
    attn.set_processor(ChunkedAttnProcessor(16))
    torch.testing.assert_close(attn(x).float(), ref, rtol=2e-2, atol=2e-2)


def test_resolve_attention_per_card():
    assert resolve_attention("auto", {"flash_attention": True}) == "sdpa"
    assert resolve_attention("auto", SimpleNamespace(flash_attention=False)) == "chunked"  # gfx803
    assert resolve_attention("auto", None) == "chunked"
    assert resolve_attention("math", {"flash_attention": True}) == "math"
    with pytest.raises(ConfigError, match="attention"):
        resolve_attention("flash3")


@pytest.mark.skipif(xformers_available(), reason="xformers is installed here")
def test_xformers_missing_is_a_clear_error():
    with pytest.raises(HardwareError, match="chunked"):
        make_processor("xformers")


def test_set_attention_covers_a_whole_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    ).eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    assert set_attention(unet, "math") == "math"
    with torch.no_grad():
        ref = unet(x, 3, encoder_hidden_states=ctx).sample
    assert set_attention(unet, "chunked", chunk=10) == "chunked"
    procs = list(unet.attn_processors.values())
    assert procs and all(isinstance(p, ChunkedAttnProcessor) and p.chunk == 10 for p in procs)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 3, encoder_hidden_states=ctx).sample, ref, rtol=1e-4, atol=1e-5)


def _attention_peak(kind: str, tokens: int = 2048, chunk: int = 256) -> int:
    with torch.device("meta"):
        attn = Attention(64, heads=4, dim_head=16)
    attn.set_processor(make_processor(kind, chunk))
    tracker = StorageTracker()
    with tracker:
        x = torch.empty(1, tokens, 64, device="meta", requires_grad=True)
        attn(x).sum().backward()
    return tracker.peak


def test_chunked_attention_needs_far_less_memory_than_math():
    math_peak, chunked_peak = _attention_peak("math"), _attention_peak("chunked")
    n2 = 4 * 2048 * 2048 * 4  # one fp32 attention matrix over 4 heads
    assert math_peak > n2  # the math kernel materialises (and saves) the N x N matrix
    assert chunked_peak < n2 / 2  # chunks of 256 rows: an eighth of it at a time
