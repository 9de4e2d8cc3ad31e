"""The memory knobs a plan turns (``Knobs``, named after RunConfig's train.* and memory.* fields) and how a
config sets them, with ``auto`` attention resolved to the kernel the card really runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..card import CardSpec
    from .workloads import Workload


@dataclass(frozen=True)
class Knobs:
    """Every memory setting of a plan; the names follow RunConfig (train.* and memory.*)."""

    precision: str = "fp32"  # autocast dtype of the compute: fp32 (none), fp16, bf16
    frozen_dtype: str = "fp32"  # storage of frozen weights: fp32, fp16, bf16, fp8
    trainable_dtype: str = "fp32"  # fp32, or bf16 (weights kept in bf16, updated with stochastic rounding)
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    attention: str = "math"  # a resolved kernel: sdpa, math, chunked, xformers
    attention_chunk: int = 1024
    batch_size: int = 1  # micro-batch
    grad_accum: int = 1
    cache_latents: bool = True
    cache_text: bool = True
    offload_frozen: bool = True
    ema_on_cpu: bool = False
    fused_backward: bool = False
    processes: int = 1  # data-parallel processes (one card each): not a memory setting, but ZeRO divides by it
    zero_stage: int = 0  # DeepSpeed ZeRO: 0 off, 2 = optimizer state and gradients partitioned over processes
    offload_optimizer: bool = False  # ZeRO-2's optimizer state in host memory (ZeRO-Offload)
    stream_blocks: float = 0.0  # fraction of the frozen block bytes kept in host RAM and streamed (0 = off)
    vae_tiling: bool = False  # a fine-tune's VAE encodes/decodes in tiles (models/vae_tiles.py)
    text_encoders: str = "card"  # where frozen text encoders encode the cache: card, sequential, cpu (text_cache.py)

    def with_(self, **changes: Any) -> Knobs:
        return dataclasses.replace(self, **changes)

    def as_config(self) -> dict[str, dict[str, Any]]:
        """The knobs as RunConfig overrides (sections → keys), for presets and run folders."""
        train = {k: getattr(self, k) for k in ("precision", "optimizer", "gradient_checkpointing", "batch_size",
                                               "grad_accum", "ema_on_cpu")}
        memory = {k: getattr(self, k) for k in ("attention", "attention_chunk", "frozen_dtype", "cache_latents",
                                                "cache_text", "offload_frozen", "fused_backward")}
        if self.trainable_dtype != "fp32":
            memory["trainable_dtype"] = self.trainable_dtype
        if self.zero_stage:
            memory.update(zero_stage=self.zero_stage, offload_optimizer=self.offload_optimizer)
        if self.stream_blocks:
            memory["stream_blocks"] = self.stream_blocks
        if self.vae_tiling:
            memory["vae_tiling"] = True
        if self.text_encoders != "card":
            memory["text_encoders"] = self.text_encoders
        return {"train": train, "memory": memory}


def effective_attention(kind: str, card: CardSpec | None = None) -> tuple[str, str | None]:
    """The kernel the card really runs for ``kind``: SDPA without a fused kernel is the math kernel."""
    from ..attention import resolve_attention

    kind = resolve_attention(kind, card)
    if kind == "sdpa" and card is not None and not getattr(card, "flash_attention", True):
        return "math", "sdpa on a card without flash / memory-efficient kernels runs the math kernel (O(N²))"
    return kind, None


def knobs_from_config(cfg: Any, workload: Workload | None = None, card: CardSpec | None = None) -> Knobs:
    """The plan knobs a RunConfig asks for (``auto`` attention resolved for ``card``).

    With a standard ``workload`` (W1–W4 under a preset's knobs) the workload fixes the images per step
    and the config only the micro-batch."""
    t, m = cfg.train, cfg.memory
    batch, accum = t.batch_size, t.grad_accum
    if workload is not None:
        batch = min(t.batch_size, workload.batch_size)
        accum = max(1, workload.batch_size // batch)
    kind, _ = effective_attention(m.attention, card)
    return Knobs(
        precision=t.precision, frozen_dtype=m.frozen_dtype, trainable_dtype=m.trainable_dtype,
        optimizer=t.optimizer, gradient_checkpointing=t.gradient_checkpointing, attention=kind,
        attention_chunk=m.attention_chunk, batch_size=batch, grad_accum=accum, cache_latents=m.cache_latents,
        cache_text=m.cache_text, offload_frozen=m.offload_frozen, ema_on_cpu=t.ema_on_cpu,
        fused_backward=m.fused_backward, zero_stage=m.zero_stage, offload_optimizer=m.offload_optimizer,
        stream_blocks=float(m.stream_blocks), vae_tiling=m.vae_tiling, text_encoders=m.text_encoders,
    )
