"""The jobs whose memory is planned (W1–W6 and any user's run), and how to build a job's models for a plan.

A ``Workload`` is the job as training runs it (model, LoRA or full or from scratch, resolution, batch,
what stays on the card, previews, EMA ...); ``Knobs`` (``knobs.py``, re-exported here) are the memory
settings a plan turns. ``build``
creates the real model classes on any device (``meta`` for the profiler, ``cpu`` for the fidelity test)
with the knobs applied through the training code's own helpers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attention import set_attention
from ..errors import ConfigError
from .knobs import Knobs

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
class Preview:
    """The sample grids a run draws with the trained weights (at least once, at the end)."""

    prompts: int = 4  # rows of the grid; a from-scratch job samples them as one batch
    guided: bool = True  # some guidance scale is not 1: [unconditional, conditional] run as one batch
    size: tuple[int, int] | None = None  # largest (height, width) in pixels; None: the training resolution


@dataclass(frozen=True)
class Workload:
    """A training job whose memory is planned: which model, what is trained, at what size, and everything
    else that decides what is allocated on the card (``run_workload.workload_for`` derives it from a config)."""

    id: str
    description: str
    model: str  # an SD family (sd15, sd2, sdxl), a FLUX.1 variant (flux-dev) or a from-scratch size (tiny, ...)
    mode: str  # lora | full | scratch
    resolution: int  # image side in pixels
    batch_size: int  # images per optimizer step (the knobs split it into micro-batch x accumulation)
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    adapter: str = "lora"  # lora.type: lora, loha, lokr, dora (their weights and forward temporaries differ)
    lora_conv: bool = False  # LoCon: the 3x3 convolutions too
    lora_dropout: float = 0.0  # dropout on the LoRA branch keeps a dropped copy of each adapted input
    lora_text_encoder: bool = False  # LoRA on the text encoder(s) too: they stay on the card, with grad
    ema: bool = False  # an fp32 EMA copy of the trained weights (train.ema_decay > 0)
    text_vocab: int = 256  # from-scratch tokenizers are built from the captions: a few hundred words
    unet_overrides: dict[str, Any] = field(default_factory=dict)  # a checkpoint's own UNet config (tests: tiny)
    vae_overrides: dict[str, Any] = field(default_factory=dict)  # a checkpoint's own VAE config
    text_encoder_overrides: tuple[dict[str, Any], ...] = ()  # a checkpoint's own text encoder config(s)
    task: str = "latent"  # from scratch: "latent" (UNet on autoencoder latents) or "text2img" (pixels)
    autoencoder_stage: bool = False  # from scratch, latent: train the autoencoder first (no model.vae)
    frozen_text_encoder: bool = False  # from scratch: a pretrained text encoder, frozen, encoding every step
    text_every_step: bool = False  # captions change every draw (data.shuffle_tags): encoded when drawn
    prior: bool = False  # prior preservation: every instance image has a class image beside it
    preview: Preview | None = field(default_factory=Preview)
    validation_items: int = 0  # held-out images validated (builtin data), in micro-batches
    host_images: int = 0  # images the run keeps in memory as fp32 pixels (builtin data); latents alike
    grad_clip: float = 1.0
    snr_gamma: float = 0.0
    text_cache_batch: int = 64  # captions the text cache encodes at once (at most 64; fewer in a small dataset)
    class_images: int = 0  # class images still to draw with the base model before training (fine-tunes)
    base_from_scratch: bool = False  # LoRA on a model lowvram trained from scratch (train/scratch_lora.py)
    text_tokens: int = 0  # FLUX.1: the T5 sequence the run encodes (0: the variant's own, 512 dev / 256 schnell)
    caching_pass: bool = True  # FLUX.1: replay the caching pass (VAE, CLIP-L and T5-XXL encode once, then dropped)

    def with_(self, **changes: Any) -> Workload:
        return dataclasses.replace(self, **changes)

    @property
    def from_scratch(self) -> bool:
        """A from-scratch model's job (its data, text encoder and previews), trained whole or with LoRA."""
        return self.mode == "scratch" or self.base_from_scratch


WORKLOADS: dict[str, Workload] = {
    # The fine-tunes keep the config's defaults: an EMA of the trained weights (train.ema_decay 0.999) and
    # sample previews of 4 captions at guidance scales 1-7 (folder data: no validation set).
    "W1": Workload("W1", "SD 1.5 UNet, LoRA rank 16 on attention + feed-forward, 512², batch 1", "sd15", "lora", 512,
                   1, ema=True),
    "W2": Workload("W2", "SDXL UNet, LoRA rank 16 (UNet only), 1024², batch 1", "sdxl", "lora", 1024, 1, ema=True),
    "W3": Workload("W3", "SD 1.5 UNet, full fine-tune, 512², batch 1", "sd15", "full", 512, 1, ema=True),
    "W4": Workload("W4", "from scratch: celeba64 latent text-to-image (UNet 64/128/256, text 77x512), batch 16",
                   "celeba64", "scratch", 64, 16, ema=True),
    # FLUX.1 (families/flux.py) keeps an EMA of its LoRA like the others (train.ema_decay 0.999). The rows show
    # the steady-state step with that EMA and the 512²/1024² preview (memory/flux_stages.py); a run's plan
    # (`lowvram plan`) replays its caching pass too, where T5-XXL (9.5 GiB in 16 bits) encodes on the CPU on
    # every preset's card
    "W5": Workload("W5", "FLUX.1-dev transformer, LoRA rank 16 on attention + MLP of every block, 512², batch 1",
                   "flux-dev", "lora", 512, 1, lora_targets=FLUX_LORA_TARGETS, ema=True,
                   caching_pass=False),
    "W6": Workload("W6", "FLUX.1-dev transformer, LoRA rank 16 on attention + MLP of every block, 1024², batch 1",
                   "flux-dev", "lora", 1024, 1, lora_targets=FLUX_LORA_TARGETS, ema=True,
                   caching_pass=False),
}
# The jobs the presets' memory tables show: every standard job (all of them train through `lowvram train`)
TABLE_WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6")


def get_workload(name: str) -> Workload:
    """W1..W6 by id (case-insensitive)."""
    key = name.upper()
    if key not in WORKLOADS:
        raise ConfigError(f"unknown workload '{name}'", f"use one of {', '.join(WORKLOADS)}")
    return WORKLOADS[key]


@dataclass
class Built:
    """A job's models on a device, with the knobs applied, and the shapes of one step's inputs."""

    unet: nn.Module
    trainable: list[nn.Parameter]
    trained: dict[str, nn.Module]  # what the trainer's EMA and optimizer see, by name (unet, text_encoder, ...)
    vae: nn.Module | None  # frozen autoencoder (fine-tunes, latent from-scratch jobs)
    text_encoders: list[nn.Module]  # frozen or trained (``text_trained``)
    text_trained: bool
    latent_shape: tuple[int, int, int]  # (C, H, W) the UNet denoises at the training resolution
    text_tokens: int
    sdxl: bool = False
    prediction: str = "epsilon"
    vae_factor: int = 8
    notes: list[str] = field(default_factory=list)
    # the family's own loss of one step, (built, inputs) -> loss; None: the UNet diffusion loss (train/step.py)
    step_loss: Callable[[Built, dict[str, torch.Tensor]], torch.Tensor] | None = None
    streamer: Any = None  # a lowvram.streaming.BlockStreamer when knobs.stream_blocks > 0
    # FLUX.1's CLIP-L and T5-XXL: they encode the caption cache once and are dropped before the transformer loads
    cache_encoders: list[nn.Module] = field(default_factory=list)

    def unet_kwargs(self, batch: int, device: str | torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """SDXL's pooled embedding and size ids, as the fine-tune passes them (``added_cond_kwargs``)."""
        if not self.sdxl:
            return {}
        pooled = int(self.unet.config.projection_class_embeddings_input_dim) - 6 * int(
            self.unet.config.addition_time_embed_dim)
        return {"added_cond_kwargs": {"text_embeds": torch.empty(batch, pooled, device=device, dtype=dtype),
                                      "time_ids": torch.empty(batch, 6, device=device, dtype=dtype)}}


def attach_lora(unet: nn.Module, rank: int, targets: tuple[str, ...], dropout: float = 0.0,
                conv: bool = False, adapter: str = "lora") -> list[nn.Parameter]:
    """The adapter (``adapter``: lora, loha, lokr, dora) on ``targets`` (+ 3x3 convs) through lowvram.lora,
    as training attaches it; returns its parameters."""
    from ..lora import attach_lora as project_attach

    return list(project_attach(unet, rank=rank, alpha=float(rank), dropout=dropout, conv=conv,
                               target_modules=list(targets), adapter=adapter))


def fp16_compute_safe(workload: Workload) -> bool:
    """False where fp16 activations overflow (FLUX.1): such jobs compute in bf16, or fp32 without bf16 (gfx803)."""
    return workload.model not in FLUX_MODELS


def vae_tiles(workload: Workload) -> bool:
    """Whether ``memory.vae_tiling`` changes this job: a fine-tune of an SD family whose images (training
    resolution, largest preview) are larger than a tile. FLUX.1's caching pass and previews tile its VAE too, but
    the planner does not offer the knob for it yet; from-scratch jobs keep their VAE whole."""
    from ..models.sd_configs import SD_FAMILIES
    from ..models.vae_tiles import TILE_LATENTS

    if workload.from_scratch or workload.model not in SD_FAMILIES:
        return False
    vae = {**SD_FAMILIES[workload.model].vae, **workload.vae_overrides}
    tile = TILE_LATENTS * 2 ** (len(vae["block_out_channels"]) - 1)
    sides = [workload.resolution, *(workload.preview.size or () if workload.preview else ())]
    return max(sides) > tile


def text_placement_applies(workload: Workload, knobs: Knobs) -> bool:
    """Whether ``memory.text_encoders`` off the card changes this job: a fine-tune of an SD family whose frozen
    text encoders encode the caption cache once (FLUX.1's text encoders go to the CPU by themselves when they do
    not fit, ``flux_stages.text_place``; from-scratch jobs train their text encoder)."""
    from ..train.text_cache import previews_from_cache

    return (_is_family(workload.model) and not workload.from_scratch and
            previews_from_cache(knobs.cache_text, workload.mode == "lora" and workload.lora_text_encoder,
                                workload.text_every_step))


def _is_family(name: str) -> bool:
    from ..models.sd_configs import SD_FAMILIES

    return name in SD_FAMILIES


def _build_family(workload: Workload, knobs: Knobs, device: str | torch.device, notes: list[str]) -> Built:
    """An SD checkpoint's UNet, VAE and text encoder(s) in the dtypes the fine-tune loads them with."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..models import sd_configs
    from ..quant import store_frozen_unet
    from ..train.finetune_models import helper_dtypes

    fam = sd_configs.get_family(workload.model)
    with torch.device(device):
        unet = UNet2DConditionModel(**{**fam.unet, **workload.unet_overrides})
        vae = AutoencoderKL(**{**fam.vae, **workload.vae_overrides})
        te_configs = workload.text_encoder_overrides or fam.text_encoders
        encoders = []
        for i, te_cfg in enumerate(te_configs):
            cls = CLIPTextModelWithProjection if (fam.is_sdxl and i == 1) else CLIPTextModel
            encoders.append(cls(CLIPTextConfig(**te_cfg)))
    compute = PRECISIONS[knobs.precision]
    te_dtype, vae_dtype = helper_dtypes(knobs.precision, fam.is_sdxl, bool(vae.config.force_upcast))
    # nn.Module.to: diffusers' own .to(dtype) warns about an empty list of fp32 modules on every cast
    vae = nn.Module.to(vae, vae_dtype).requires_grad_(False)
    encoders = [te.to(te_dtype).requires_grad_(False) for te in encoders]
    trained: dict[str, nn.Module] = {"unet": unet}
    text_trained = workload.mode == "lora" and workload.lora_text_encoder
    if workload.mode == "lora":
        trainable = attach_lora(unet, workload.lora_rank, workload.lora_targets, workload.lora_dropout,
                                workload.lora_conv, workload.adapter)
        if text_trained:
            from ..lora import attach_text_lora

            for name, te in zip(("text_encoder", "text_encoder_2"), encoders, strict=False):
                trainable += attach_text_lora(te, workload.lora_rank, float(workload.lora_rank), workload.lora_dropout)
                trained[name] = te
        notes.append(f"frozen UNet weights: {store_frozen_unet(unet, knobs.frozen_dtype, compute)}")
    else:
        unet.requires_grad_(True)
        trainable = list(unet.parameters())
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = workload.resolution // factor
    latent = (int(unet.config.in_channels), side, side)
    tokens = int(encoders[0].config.max_position_embeddings)
    return Built(unet, trainable, trained, vae, encoders, text_trained, latent, tokens, fam.is_sdxl, fam.prediction,
                 factor, notes)


def _build_scratch(workload: Workload, device: str | torch.device) -> Built:
    """A from-scratch size as ``train.setup.build_components`` builds it (fp32; the text encoder trains)."""
    from ..models import scratch

    spec = scratch.get_spec(workload.model)
    spec = dataclasses.replace(spec, resolution=workload.resolution, unet={**spec.unet, **workload.unet_overrides})
    te_cfg = {**spec.text_encoder, **(workload.text_encoder_overrides[0] if workload.text_encoder_overrides else {})}
    spec = dataclasses.replace(spec, text_encoder=te_cfg)
    te = scratch.build_text_encoder(spec, vocab_size=workload.text_vocab, device=device)
    # cross-attention follows the text encoder (a pretrained one may be wider than the size's own)
    spec = dataclasses.replace(spec, unet={**spec.unet, "cross_attention_dim": te.config.hidden_size})
    latent = workload.task == "latent"
    unet = scratch.build_unet(spec, device=device, task="latent" if latent else "text2img")
    vae = None
    if latent:
        vae_spec = dataclasses.replace(spec, vae={**spec.vae, **workload.vae_overrides}) if spec.vae else spec
        vae = scratch.build_vae(vae_spec, device=device).requires_grad_(False)
    cfg = scratch.unet_config(spec, "latent" if latent else "text2img")
    shape = (int(cfg["in_channels"]), int(cfg["sample_size"]), int(cfg["sample_size"]))
    unet.requires_grad_(True)
    trainable = list(unet.parameters())
    trained: dict[str, nn.Module] = {"unet": unet}
    if workload.frozen_text_encoder:
        te.requires_grad_(False)
    else:
        te.requires_grad_(True)
        trainable += list(te.parameters())
        trained["text_encoder"] = te
    factor = workload.resolution // shape[1] if latent else 1
    return Built(unet, trainable, trained, vae, [te], not workload.frozen_text_encoder, shape,
                 int(te.config.max_position_embeddings), vae_factor=max(1, factor))


def _scratch_lora(built: Built, workload: Workload) -> Built:
    """A from-scratch model frozen, with the adapter on its UNet (and text encoder), as
    ``train.scratch_lora.attach_adapters`` attaches it; every weight stays fp32."""
    from ..lora import attach_text_lora

    for m in (built.unet, *built.text_encoders):
        m.requires_grad_(False)
    built.trainable = attach_lora(built.unet, workload.lora_rank, workload.lora_targets, workload.lora_dropout,
                                  workload.lora_conv, workload.adapter)
    built.trained = {"unet": built.unet}
    built.text_trained = workload.lora_text_encoder
    if workload.lora_text_encoder:
        te = built.text_encoders[0]
        built.trainable += attach_text_lora(te, workload.lora_rank, float(workload.lora_rank), workload.lora_dropout,
                                            adapter=workload.adapter)
        built.trained["text_encoder"] = te
    return built


def build(workload: Workload, knobs: Knobs, device: str | torch.device = "meta",
          recompute_context: Callable[[], Any] | None = None, helper_kernel: str = "sdpa",
          cpu_card: bool = False) -> Built:
    """The job's models on ``device`` with ``knobs`` applied (LoRA, dtypes, checkpointing, attention).

    ``recompute_context`` (profiler only) is entered around gradient-checkpoint recomputation, where
    real autocast is re-entered by torch but the profiler's meta emulation must be re-entered by hand.
    ``helper_kernel``: what the VAE's SDPA processor really runs on the card (``math`` without flash);
    ``cpu_card``: the target is the CPU (its flash kernel's per-thread scratch is modelled too).
    """
    from ..train.step import enable_checkpointing

    notes: list[str] = []
    if workload.model in FLUX_MODELS:
        from .flux_workload import build_flux

        built = build_flux(workload, knobs, device, PRECISIONS[knobs.precision])
    elif _is_family(workload.model):
        built = _build_family(workload, knobs, device, notes)
    elif workload.mode == "scratch":
        built = _build_scratch(workload, device)
    elif workload.base_from_scratch and workload.mode == "lora":
        built = _scratch_lora(_build_scratch(workload, device), workload)
    else:
        raise ConfigError(f"a {workload.mode} fine-tune needs a Stable Diffusion family, not '{workload.model}'",
                          "use model sd15, sd2 or sdxl (with unet_overrides for a small test model)")
    if knobs.trainable_dtype == "bf16" and workload.mode != "lora":
        for p in built.trainable:
            p.data = p.data.to(torch.bfloat16)
    elif knobs.trainable_dtype not in ("fp32", "bf16"):
        raise ConfigError(f"trainable_dtype {knobs.trainable_dtype!r} is not supported", "use fp32 or bf16")
    if knobs.gradient_checkpointing:
        ctx = None if recompute_context is None else (lambda: (contextlib.nullcontext(), recompute_context()))
        enable_checkpointing(built.trained.values(), ctx)
    kernel = knobs.attention
    fused = "fused_memory_cpu" if cpu_card else "fused_memory"
    if str(device) == "meta" and kernel in ("sdpa", "xformers"):
        # meta has no fused kernel: model what the card's flash / memory-efficient kernel allocates.
        kernel = fused
        notes.append(f"attention {knobs.attention}: modelled as a fused O(N) kernel (output + fp32 logsumexp)")
    set_attention(built.unet, kernel, knobs.attention_chunk)
    if knobs.vae_tiling and built.vae is not None and not workload.from_scratch:
        from ..models.vae_tiles import tile_vae

        # the fine-tunes' VAE, as the trainer tiles it (from-scratch jobs keep theirs whole)
        built.notes.append(tile_vae(built.vae))
    if built.vae is not None:
        # training keeps diffusers' SDPA processor in the VAE: the card's fused kernel, or math without one
        set_attention(built.vae, fused if helper_kernel == "sdpa" and str(device) == "meta" else helper_kernel)
    built.notes = list(dict.fromkeys(notes + built.notes))  # the family builder writes into ``notes`` too
    if knobs.stream_blocks:
        if workload.mode != "lora":
            raise ConfigError("memory.stream_blocks streams frozen weights, and a full or from-scratch job trains "
                              "every weight", "use memory.stream_blocks=0, or a LoRA")
        from ..streaming import stream_frozen_blocks

        # last, as in training: the blocks' frozen tensors are final (LoRA attached, storage dtype set)
        built.streamer = stream_frozen_blocks(built.unet, device, knobs.stream_blocks, pin=False)
    return built
