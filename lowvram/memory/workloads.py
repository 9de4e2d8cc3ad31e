"""The standard workloads (W1–W6) and the plan knobs, and how to build a workload's models for a plan.

A ``Workload`` is the job (model, LoRA or full or from scratch, resolution, batch); ``Knobs`` are the
memory settings a plan turns. ``build`` creates the real model classes on any device (``meta`` for the
profiler, ``cpu`` for the fidelity test) with the knobs applied the way training applies them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import set_attention
from ..errors import ConfigError
from ..quant import STORAGE_DTYPES, cast_frozen_layers, store_frozen_weights

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Adapted modules of the W1/W2 LoRA: attention projections + feed-forward (+ the 1x1 proj in/out).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
FLUX_MODELS = ("flux-dev", "flux-schnell")
# W5/W6: the layers of each FLUX.1 block a LoRA adapts (lowvram.models.flux_lora_keys' defaults: attention and
# MLP of the double blocks, attention, MLP in and out of the single blocks); no modulation layers.
FLUX_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2", "proj_mlp", "proj_out")


@dataclass(frozen=True)
class Workload:
    """A training job whose memory is planned: which model, what is trained, at what size."""

    id: str
    description: str
    model: str  # an SD family (sd15, sd2, sdxl), a FLUX.1 variant (flux-dev) or a from-scratch size (tiny, ...)
    mode: str  # lora | full | scratch
    resolution: int  # image side in pixels
    batch_size: int
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    adapter: str = "lora"  # lora.type: lora, loha, lokr, dora (their weights and forward temporaries differ)
    ema: bool = False  # keep an EMA copy of the trained weights (from-scratch recipes sample from it)
    text_vocab: int = 256  # from-scratch tokenizers are built from the captions: a few hundred words
    unet_overrides: dict[str, Any] = field(default_factory=dict)  # tests: shrink a real config

    def with_(self, **changes: Any) -> Workload:
        return dataclasses.replace(self, **changes)


WORKLOADS: dict[str, Workload] = {
    "W1": Workload("W1", "SD 1.5 UNet, LoRA rank 16 on attention + feed-forward, 512², batch 1", "sd15", "lora", 512, 1),
    "W2": Workload("W2", "SDXL UNet, LoRA rank 16 (UNet only), 1024², batch 1", "sdxl", "lora", 1024, 1),
    "W3": Workload("W3", "SD 1.5 UNet, full fine-tune, 512², batch 1", "sd15", "full", 512, 1),
    "W4": Workload("W4", "from scratch: celeba64 latent text-to-image (UNet 64/128/256, text 77x512), batch 16",
                   "celeba64", "scratch", 64, 16, ema=True),
    "W5": Workload("W5", "FLUX.1-dev transformer, LoRA rank 16 on attention + MLP of every block, 512², batch 1",
                   "flux-dev", "lora", 512, 1, lora_targets=FLUX_LORA_TARGETS),
    "W6": Workload("W6", "FLUX.1-dev transformer, LoRA rank 16 on attention + MLP of every block, 1024², batch 1",
                   "flux-dev", "lora", 1024, 1, lora_targets=FLUX_LORA_TARGETS),
}


def get_workload(name: str) -> Workload:
    """W1..W6 by id (case-insensitive)."""
    key = name.upper()
    if key not in WORKLOADS:
        raise ConfigError(f"unknown workload '{name}'", f"use one of {', '.join(WORKLOADS)}")
    return WORKLOADS[key]


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
        return {"train": train, "memory": memory}


@dataclass
class Built:
    """A workload's models on a device, with the knobs applied, and the shapes of one step's inputs."""

    unet: nn.Module
    trainable: list[nn.Parameter]
    frozen_modules: dict[str, nn.Module]  # resident on the card besides the UNet (VAE, text encoders)
    train_text_encoder: nn.Module | None
    latent_shape: tuple[int, int, int]
    text_shape: tuple[int, int]  # (tokens, width) of the cross-attention context
    unet_kwargs: dict[str, Any]
    prediction: str = "epsilon"
    notes: list[str] = field(default_factory=list)
    # the family's own loss of one step, (built, inputs) -> loss; None: the UNet diffusion loss (train/step.py)
    step_loss: Callable[[Built, dict[str, torch.Tensor]], torch.Tensor] | None = None
    streamer: Any = None  # a lowvram.streaming.BlockStreamer when knobs.stream_blocks > 0


def attach_lora(unet: nn.Module, rank: int, targets: tuple[str, ...], adapter: str = "lora") -> list[nn.Parameter]:
    """The adapter (``adapter``: lora, loha, lokr, dora) on ``targets`` as training attaches it; returns its parameters."""
    from ..lora import attach_lora as project_attach

    return list(project_attach(unet, rank=rank, alpha=float(rank), target_modules=list(targets), adapter=adapter))


def fp16_compute_safe(workload: Workload) -> bool:
    """False where fp16 activations overflow (FLUX.1): such jobs compute in bf16, or fp32 without bf16 (gfx803)."""
    return workload.model not in FLUX_MODELS


def _is_family(name: str) -> bool:
    from ..models.sd_configs import SD_FAMILIES

    return name in SD_FAMILIES


def _frozen_dtype(knobs: Knobs, fallback_fp8: torch.dtype) -> torch.dtype:
    """Dtype of frozen helper models (VAE, text encoders): fp8 storage applies to the UNet only."""
    return fallback_fp8 if knobs.frozen_dtype == "fp8" else STORAGE_DTYPES[knobs.frozen_dtype]


def build(workload: Workload, knobs: Knobs, device: str | torch.device = "meta",
          recompute_context: Callable[[], Any] | None = None) -> Built:
    """The workload's models on ``device`` with ``knobs`` applied (LoRA, dtypes, checkpointing, attention).

    ``recompute_context`` (profiler only) is entered around gradient-checkpoint recomputation, where
    real autocast is re-entered by torch but the profiler's meta emulation must be re-entered by hand.
    """
    compute = PRECISIONS[knobs.precision]
    half = compute if compute != torch.float32 else torch.float16
    notes: list[str] = []
    te_trained: nn.Module | None = None
    frozen: dict[str, nn.Module] = {}
    targets, step_loss = workload.lora_targets, None
    if workload.model in FLUX_MODELS:
        from .flux_workload import build_flux

        unet, frozen, latent, text, unet_kwargs, targets, step_loss = build_flux(
            workload, knobs, device, _frozen_dtype(knobs, half))
        prediction = "flow"
    elif _is_family(workload.model):
        from ..models import sd_configs

        fam = sd_configs.get_family(workload.model)
        with torch.device(device):
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel(**{**fam.unet, **workload.unet_overrides})
        latent = fam.latent_shape(workload.resolution)
        text = (fam.text_tokens, int(unet.config.cross_attention_dim))
        unet_kwargs = fam.unet_kwargs(knobs.batch_size, device, torch.float32) if fam.is_sdxl else {}
        prediction = fam.prediction
        if not (knobs.cache_latents and knobs.offload_frozen):
            # SDXL's VAE overflows in fp16: it stays fp32 unless bf16 is the compute dtype.
            vae_dtype = torch.float32 if (fam.is_sdxl and compute != torch.bfloat16) else _frozen_dtype(knobs, half)
            frozen["vae"] = sd_configs.build_sd_vae(fam, device, vae_dtype).requires_grad_(False)
        if not (knobs.cache_text and knobs.offload_frozen):
            for i, te in enumerate(sd_configs.build_sd_text_encoders(fam, device, _frozen_dtype(knobs, half))):
                frozen[f"text_encoder{i + 1 if i else ''}"] = te.requires_grad_(False)
    else:
        from ..models import scratch

        spec = scratch.get_spec(workload.model)
        spec = dataclasses.replace(spec, resolution=workload.resolution, unet={**spec.unet, **workload.unet_overrides})
        unet = scratch.build_unet(spec, device=device, task="latent")
        latent = (spec.latent_channels, spec.latent_resolution, spec.latent_resolution)
        text = (spec.text_max_length, int(spec.text_encoder["hidden_size"]))
        if workload.mode == "scratch":  # the small text encoder trains jointly with the UNet
            te_trained = scratch.build_text_encoder(spec, vocab_size=workload.text_vocab, device=device)
        elif not (knobs.cache_text and knobs.offload_frozen):
            frozen["text_encoder"] = scratch.build_text_encoder(
                spec, vocab_size=workload.text_vocab, device=device, dtype=_frozen_dtype(knobs, half)).requires_grad_(False)
        unet_kwargs, prediction = {}, "epsilon"
        if not (knobs.cache_latents and knobs.offload_frozen) and spec.vae is not None:
            frozen["vae"] = scratch.build_vae(spec, device=device, dtype=_frozen_dtype(knobs, half)).requires_grad_(False)
    if workload.mode == "lora":
        trainable = attach_lora(unet, workload.lora_rank, targets, workload.adapter)
        # fp16/bf16 frozen weights under autocast are a plain cast; fp8 (or half without autocast)
        # needs per-layer upcast, which StoredLinear/StoredConv2d do.
        if knobs.frozen_dtype != "fp32":
            if compute != torch.float32 and knobs.frozen_dtype in ("fp16", "bf16"):
                cast_frozen_layers(unet, STORAGE_DTYPES[knobs.frozen_dtype])
            else:
                from ..adapters import weight_readers

                store_frozen_weights(unet, knobs.frozen_dtype, unscaled=weight_readers(unet))
    else:
        unet.requires_grad_(True)
        trainable = list(unet.parameters())
        if te_trained is not None:
            te_trained.requires_grad_(True)
            trainable += list(te_trained.parameters())
        if knobs.trainable_dtype == "bf16":
            for p in trainable:
                p.data = p.data.to(torch.bfloat16)
        elif knobs.trainable_dtype != "fp32":
            raise ConfigError(f"trainable_dtype {knobs.trainable_dtype!r} is not supported", "use fp32 or bf16")
    if knobs.gradient_checkpointing:
        if recompute_context is None:
            unet.enable_gradient_checkpointing()
            if te_trained is not None:
                te_trained.gradient_checkpointing_enable()
        else:
            kw = {"use_reentrant": False, "context_fn": lambda: (contextlib.nullcontext(), recompute_context())}
            unet.enable_gradient_checkpointing(lambda module, *args: checkpoint(module.__call__, *args, **kw))
            if te_trained is not None:
                te_trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    kernel = knobs.attention
    if str(device) == "meta" and kernel in ("sdpa", "xformers"):
        # meta has no fused kernel: model what the card's flash / memory-efficient kernel allocates.
        kernel = "fused_memory"
        notes.append(f"attention {knobs.attention}: modelled as a fused O(N) kernel (output + fp32 logsumexp)")
    set_attention(unet, kernel, knobs.attention_chunk)
    for m in frozen.values():
        if hasattr(m, "set_attn_processor"):
            set_attention(m, kernel, knobs.attention_chunk)
    built = Built(unet, trainable, frozen, te_trained, latent, text, unet_kwargs, prediction, notes, step_loss)
    if knobs.stream_blocks:
        if workload.mode != "lora":
            raise ConfigError("memory.stream_blocks streams frozen weights, and a full or from-scratch job trains "
                              "every weight", "use memory.stream_blocks=0, or a LoRA")
        from ..streaming import stream_frozen_blocks

        # last, as in training: the blocks' frozen tensors are final (LoRA attached, storage dtype set)
        built.streamer = stream_frozen_blocks(unet, device, knobs.stream_blocks, pin=False)
    return built
