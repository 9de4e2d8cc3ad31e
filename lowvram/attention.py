"""Attention kernels for diffusers UNets and FLUX.1: SDPA, the classic math kernel, query-chunked attention, xformers.

The kernel decides the largest activation of a high-resolution step (the N x N attention matrix), so
it is a plan knob: ``set_attention`` installs it, ``resolve_attention`` turns ``auto`` into the kernel
the card really has (gfx803 has no fused SDPA: chunked is its remedy).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, HardwareError

KINDS = ("sdpa", "math", "chunked", "xformers")


def _card_flag(card: Any, name: str, default: bool = False) -> bool:
    """Read a capability flag from a preset card mapping, a dataclass or HardwareInfo alike."""
    if card is None:
        return default
    if isinstance(card, Mapping):
        return bool(card.get(name, default))
    return bool(getattr(card, name, default))


def resolve_attention(kind: str, card: Any = None) -> str:
    """The kernel to use: ``auto`` → sdpa where a fused (flash / memory-efficient) kernel exists, else chunked.

    ``card`` is a preset's ``card`` mapping or a ``HardwareInfo``; it needs ``flash_attention`` (and
    ``xformers`` if that is asked for). Without a card, ``auto`` means chunked: it is safe everywhere.
    """
    if kind not in ("auto", "fused_memory", "fused_memory_cpu", *KINDS):
        raise ConfigError(f"memory.attention = {kind!r} is not a known kernel", f"use one of auto, {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "sdpa" if _card_flag(card, "flash_attention") else "chunked"


def _rows(t: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """Query rows ``start:stop`` of a (batch*heads, queries, keys) mask that may broadcast over queries."""
    if t is None or t.shape[1] == 1:
        return t
    return t[:, start:stop]


def _probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, upcast: bool) -> torch.Tensor:
    """Softmax(q kᵀ · scale + mask) for one chunk of queries, in fp32 when ``upcast`` (as diffusers does)."""
    if upcast:
        q, k = q.float(), k.float()
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # in place: one chunk-sized buffer, not three
    if mask is not None:
        scores.add_(mask.to(scores.dtype))
    return scores.softmax(dim=-1)


class _ChunkedAttention(torch.autograd.Function):
    """softmax(q kᵀ) v computed ``chunk`` query rows at a time, forward and backward.

    Only q, k, v are saved; backward recomputes each chunk's probabilities (as flash attention does), so
    memory is O(chunk · N) instead of the math kernel's O(N²) in both directions.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, chunk, upcast):  # noqa: D102
        k, v = k.to(q.dtype), v.to(q.dtype)
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        for s in range(0, q.shape[1], chunk):
            p = _probs(q[:, s : s + chunk], k, _rows(mask, s, s + chunk), scale, upcast).to(v.dtype)
            out[:, s : s + chunk] = torch.bmm(p, v)
        ctx.save_for_backward(q, k, v, mask, out)
        ctx.scale, ctx.chunk, ctx.upcast = scale, chunk, upcast
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, mask, out = ctx.saved_tensors
        scale, chunk, upcast = ctx.scale, ctx.chunk, ctx.upcast
        work = torch.float32 if upcast else q.dtype
        grad_out = grad_out.to(v.dtype)
        # rowsum(dP ∘ P) = rowsum(dO ∘ O): one number per query row instead of a chunk-sized product
        delta = (grad_out.to(work) * out.to(work)).sum(dim=-1, keepdim=True)
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=work, device=k.device)
        dv = torch.zeros(v.shape, dtype=work, device=v.device)
        for s in range(0, q.shape[1], chunk):
            qc, gc = q[:, s : s + chunk], grad_out[:, s : s + chunk]
            p = _probs(qc, k, _rows(mask, s, s + chunk), scale, upcast)  # (bh, c, n) in `work`
            dv += torch.bmm(p.transpose(1, 2).to(v.dtype), gc).to(work)
            ds = torch.bmm(gc, v.transpose(1, 2)).to(work)  # dP, turned into dS in place below
            ds.sub_(delta[:, s : s + chunk]).mul_(p)
            del p
            dq[:, s : s + chunk] = (torch.bmm(ds, k.to(work)) * scale).to(q.dtype)
            dk += torch.bmm(ds.transpose(1, 2), qc.to(work)) * scale
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
    scale: float, chunk: int = 1024, upcast: bool = False,
) -> torch.Tensor:
    """Attention over (batch*heads, tokens, dim) tensors with O(chunk · N) memory, with gradients."""
    if chunk <= 0:
        raise ConfigError(f"memory.attention_chunk = {chunk} must be above 0", "use e.g. 1024")
    return _ChunkedAttention.apply(q, k, v, mask, scale, chunk, upcast)


class ChunkedAttnProcessor:
    """diffusers processor: the classic ``AttnProcessor`` with the score matrix computed in query chunks.

    Plain PyTorch ops only, so it runs on every backend (gfx803 included); numerically it is the math
    kernel (same scale, same optional fp32 upcast), re-associated per chunk.
    """

    def __init__(self, chunk: int = 1024) -> None:
        self.chunk = chunk

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        hidden_states = chunked_attention(
            query, key, value, attention_mask, scale=attn.scale, chunk=self.chunk,
            upcast=bool(attn.upcast_attention or attn.upcast_softmax),
        )
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class _FusedAttentionMemory(torch.autograd.Function):
    """Stands in for a flash / memory-efficient kernel on the ``meta`` device: same tensors, no math.

    Forward allocates the output and the fp32 log-sum-exp per row and saves q, k, v, out, lse (what
    the CUDA kernels save); backward allocates dq, dk, dv and the per-row fp32 delta. Used only by
    the profiler: meta has no fused kernel, and its SDPA fallback would materialise N².
    """

    @staticmethod
    def forward(ctx, q, k, v, cpu_threads):  # noqa: D102
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        if cpu_threads:
            scratch = _cpu_flash_scratch(q, k, cpu_threads, backward=False)
            del scratch
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cpu_threads = cpu_threads
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, out, lse = ctx.saved_tensors
        delta = torch.empty_like(lse)  # rowsum(dO ∘ O), fp32, as the kernels keep it
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if ctx.cpu_threads:
            scratch = _cpu_flash_scratch(q, k, ctx.cpu_threads, backward=True)
            del scratch
        del delta
        return dq, dk, dv, None


def _cpu_flash_scratch(q: torch.Tensor, k: torch.Tensor, threads: int, backward: bool) -> torch.Tensor:
    """The per-thread fp32 buffer of torch's CPU flash attention (aten/src/ATen/native/cpu/
    FlashAttentionKernel.cpp): query blocks of 32/64/256 rows by key blocks of 512."""
    q_len, kv_len, head = q.shape[-2], k.shape[-2], q.shape[-1]
    q_split = min(q_len, 256 if q_len >= 768 else 64 if q_len >= 192 else 32)
    kv_split = min(kv_len, 512)
    per_thread = 2 * q_split * kv_split if backward else q_split * kv_split + 2 * q_split + q_split * head
    return torch.empty((threads, per_thread), dtype=torch.float32, device=q.device)


class FusedAttentionMemoryProcessor:
    """diffusers processor for profiling a flash-capable target on ``meta``: O(N) attention memory.

    ``cpu_threads`` > 0: the target is the CPU, whose flash kernel also takes a scratch buffer per thread."""

    def __init__(self, cpu_threads: int = 0) -> None:
        self.cpu_threads = cpu_threads

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        b = query.shape[0]
        head_dim = key.shape[-1] // attn.heads
        # The kernels take (batch, heads, tokens, dim) views; the transposes below are free views.
        query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = _FusedAttentionMemory.apply(query, key, value, self.cpu_threads)
        hidden_states = hidden_states.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, chunk: int = 1024,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over (batch, tokens, heads, dim) tensors with the resolved kernel ``kind``."""
    if kind == "sdpa":
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask).transpose(1, 2)
    if kind == "xformers":
        if not xformers_available():
            make_processor(kind)  # raises the install advice
        import xformers.ops

        return xformers.ops.memory_efficient_attention(q, k, v, attn_bias=mask)
    if mask is not None:
        raise ConfigError(f"attention masks are not supported by the {kind} kernel here", "use memory.attention=sdpa")
    b, s, h, d = q.shape
    if kind in ("fused_memory", "fused_memory_cpu"):  # the profiler's stand-ins for a flash kernel
        threads = torch.get_num_threads() if kind == "fused_memory_cpu" else 0
        return _FusedAttentionMemory.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           threads).transpose(1, 2)
    flat = [t.transpose(1, 2).reshape(b * h, -1, d) for t in (q, k, v)]
    if kind == "chunked":
        out = chunked_attention(*flat, scale=d**-0.5, chunk=chunk)
    elif kind == "math":  # the classic kernel: the (tokens x tokens) probabilities are kept for backward
        out = torch.bmm(_probs(flat[0], flat[1], None, d**-0.5, upcast=False), flat[2])
    else:
        raise ConfigError(f"memory.attention = {kind!r} is not a known kernel", f"use one of auto, {', '.join(KINDS)}")
    return out.reshape(b, h, s, d).transpose(1, 2)


class FluxKernelProcessor:
    """FLUX.1's joint attention (diffusers' ``FluxAttnProcessor``, unfused projections) with the plan's kernel.

    diffusers' own processor always calls its SDPA dispatcher; this one computes the same projections,
    RMS norms and rotary embedding and then runs ``attend`` with the kernel the plan chose.
    """

    def __init__(self, kind: str, chunk: int = 1024) -> None:
        self.kind, self.chunk = kind, chunk

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (-1, attn.head_dim))

        q = attn.norm_q(heads(attn.to_q(hidden_states)))
        k = attn.norm_k(heads(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        if attn.added_kv_proj_dim is not None:  # double blocks: text tokens first, then image tokens
            q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), q], dim=1)
            k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), k], dim=1)
            v = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = attend(q, k, v, self.kind, self.chunk, attention_mask).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())


def xformers_available() -> bool:
    """True when ``xformers`` can be imported (never on gfx803 or CPU-only installs)."""
    return importlib.util.find_spec("xformers") is not None


def make_processor(kind: str, chunk: int = 1024) -> Any:
    """A fresh diffusers attention processor for a resolved ``kind``."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if kind == "sdpa":
        return AttnProcessor2_0()
    if kind == "math":
        return AttnProcessor()
    if kind == "chunked":
        if chunk <= 0:
            raise ConfigError(f"memory.attention_chunk = {chunk} must be above 0", "use e.g. 1024")
        return ChunkedAttnProcessor(chunk)
    if kind == "fused_memory":
        return FusedAttentionMemoryProcessor()
    if kind == "fused_memory_cpu":
        return FusedAttentionMemoryProcessor(cpu_threads=torch.get_num_threads())
    if kind == "xformers":
        if not xformers_available():
            raise HardwareError(
                "memory.attention = 'xformers' but xformers is not installed (it has no ROCm gfx803 or CPU build)",
                "use memory.attention=chunked (works everywhere) or sdpa, or `pip install xformers` on CUDA",
            )
        from diffusers.models.attention_processor import XFormersAttnProcessor

        return XFormersAttnProcessor()
    raise ConfigError(f"memory.attention = {kind!r} is not a known kernel", f"use one of auto, {', '.join(KINDS)}")


def set_attention(model: nn.Module, kind: str, chunk: int = 1024, card: Any = None) -> str:
    """Install the attention kernel ``kind`` on every diffusers ``Attention`` in ``model``; returns it resolved.

    Works on UNets, VAEs and FLUX.1 transformers alike, and is safe to call again (each call replaces the processors).
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_flux import FluxAttention

    kind = resolve_attention(kind, card)
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(make_processor(kind, chunk))
        elif isinstance(module, FluxAttention):
            module.set_processor(FluxKernelProcessor(kind, chunk))
    return kind
