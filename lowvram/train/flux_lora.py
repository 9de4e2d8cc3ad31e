"""FLUX.1 (dev, schnell) LoRA: the job the Trainer runs when ``model.pretrained`` holds a FLUX.1 model.

Order, for host RAM: the VAE, CLIP-L and T5-XXL load first (no transformer); latents and the text of every
caption and preview prompt (T5 sequence + CLIP pooled) are cached; the text encoders are dropped; then the
transformer loads in the plan's frozen dtype and gets the LoRA (block layers, ``flux_lora_keys``). A step is
the flow-matching loss (``flux_cond.training_loss``: σ drawn with FLUX.1's resolution shift, guidance 1.0
for dev), previews are the flow-matching Euler sampler, and the LoRA is written at every checkpoint as a
diffusers file and as the kohya/BFL file ComfyUI loads. Batches, caches, prior preservation, checkpoints,
signals and resume are the SD fine-tune's own (``finetune.py``): this module only says what differs.
"""

from __future__ import annotations

import gc
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..errors import ConfigError, ModelLoadError
from ..fsutil import atomic_write
from ..run_folder import LORA_FILE, RunResult
from .events import Event
from .finetune import (
    LOAD_DTYPES,
    FinetuneJob,
    compute_dtype,
    install_attention,
    parse_prompt_line,
    prior_preservation_loss,
    store_frozen_unet,
)
from .loop import AUTOCAST


def check_flux_config(cfg: RunConfig, world: Any = None) -> None:
    """What a FLUX.1 run cannot do (yet), refused before any model loads."""
    refuse = [
        (cfg.run.task != "lora", f"task '{cfg.run.task}': FLUX.1 trains as a LoRA only (the 12 B transformer "
         "does not fit a small card as trainable weights)", "use --task lora"),
        (cfg.lora.type != "lora", f"lora.type '{cfg.lora.type}': FLUX.1 files are written as plain LoRA "
         "(the formats ComfyUI and diffusers load for FLUX.1)", "use --set lora.type=lora"),
        (cfg.lora.text_encoder, "lora.text_encoder: FLUX.1's text encoders stay frozen (T5-XXL is cached, then "
         "dropped)", "use --set lora.text_encoder=false"),
        (cfg.lora.conv, "lora.conv adapts 3x3 convolutions and FLUX.1's transformer has none",
         "use --set lora.conv=false"),
        (not cfg.memory.cache_text, "memory.cache_text=false: FLUX.1 captions are always encoded once and cached "
         "(T5-XXL would otherwise stay in memory beside the transformer)", "use --set memory.cache_text=true"),
        (cfg.data.shuffle_tags, "data.shuffle_tags makes new captions every draw, and FLUX.1's T5-XXL is dropped "
         "after caching", "use --set data.shuffle_tags=false"),
        (world is not None and world.distributed, "FLUX.1 LoRA trains in one process (several were not tried)",
         "train without --processes"),
    ]
    if cfg.data.num_class_images and cfg.data.class_data:
        from ..data.class_images import missing_numbers

        missing = len(missing_numbers(cfg.data.class_data, cfg.data.num_class_images))
        refuse.append((missing > 0, f"data.num_class_images: {missing} class images are still to be drawn, and lowvram "
                       "draws them with SD checkpoints only", "draw them with FLUX.1 in ComfyUI or diffusers into "
                       "data.class_data, or set data.num_class_images=0"))
    for bad, problem, fix in refuse:
        if bad:
            raise ConfigError(problem, fix)


def flux_sources(cfg: RunConfig) -> Any:
    """Where a transformer-only file finds the rest: model.vae / clip / t5 / tokenizer / t5_tokenizer, and
    model.config when it is a diffusers FLUX.1 folder (its configs, and anything else not given)."""
    from ..models.flux import FluxSources, is_flux_model

    m = cfg.model
    base = m.config if is_flux_model(m.config) else None
    return FluxSources(vae=m.vae, clip=m.clip, t5=m.t5, tokenizer=m.tokenizer, t5_tokenizer=m.t5_tokenizer or base,
                       base=base)


def text_device(modules: list[nn.Module], device: torch.device, place: str = "card") -> tuple[torch.device, str]:
    """Where the text encoders run once for the cache: the CPU when ``memory.text_encoders`` says so; else the
    card when they fit in its free memory, else the CPU."""
    if device.type != "cuda":
        return device, f"text encoders run on the {device.type}"
    need = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    if place == "cpu":
        return torch.device("cpu"), f"text encoders ({need / 2**30:.1f} GiB) run on the CPU once, for the cache"
    free, _ = torch.cuda.mem_get_info(device)
    if need < 0.9 * free:
        return device, f"text encoders ({need / 2**30:.1f} GiB) run on the card once, for the cache"
    return torch.device("cpu"), (f"text encoders ({need / 2**30:.1f} GiB) run on the CPU once, for the cache "
                                 f"(the card has {free / 2**30:.1f} GiB free)")


class FluxLoraJob(FinetuneJob):
    """A LoRA of a FLUX.1 transformer. Batches (cached latents, prior preservation), metadata, LoRA files at
    every checkpoint and the final save come from :class:`FinetuneJob`; text, loss and previews are FLUX.1's."""

    def __init__(self, cfg: RunConfig, run_dir: Path, comps: Any, device: torch.device, data: Any,
                 sample_prompts: list[str]) -> None:
        from ..flow import FlowSampling

        self.cfg, self.run_dir, self.c, self.device, self.data = cfg, run_dir, comps, device, data
        self.unet = comps.transformer  # set by attach_transformer once the caches are built
        self.sdxl, self.lora, self.train_text, self.has_validation = False, True, False, False
        self.sample_prompts = sample_prompts
        self.prediction = "flow"
        self.sampling = FlowSampling()
        tok2 = comps.tokenizer_2
        # the tokenizer's own limit where it is shorter (T5-XXL's is 512; tiny test tokenizers are shorter)
        self.max_length = min(comps.max_sequence_length, getattr(tok2, "model_max_length", 512) or 512)
        self.text_device, self.text_note = text_device([comps.text_encoder, comps.text_encoder_2], device,
                                                       cfg.memory.text_encoders)
        for m in (comps.text_encoder, comps.text_encoder_2):
            m.to(self.text_device)
        self.frozen = [comps.vae]
        comps.vae.to(device)
        if cfg.memory.vae_tiling:  # the latent cache's encode and the previews' decode
            from ..models.vae_tiles import tile_vae

            print(f"note: {tile_vae(comps.vae)}")
        self.frozen_on_device = True
        self.lora_name = run_dir.resolve().name or "lora"
        self.prior_losses: deque[tuple[float, float]] = deque(maxlen=cfg.train.grad_accum)
        self.preview_text: Any = None

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"transformer": self.unet}

    # -- text: encoded once, cached, then the encoders are dropped ---------------------------------------
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        from ..models.flux_cond import encode_prompts

        c = self.c
        text = encode_prompts(c.text_encoder, c.tokenizer, c.text_encoder_2, c.tokenizer_2, captions,
                              self.max_length, self.text_device)
        return {"t5": text.t5, "pooled": text.pooled}

    def text_identity(self) -> str:
        from ..data.cache import module_identity

        c = self.c
        return module_identity(nn.ModuleDict({"text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2}),
                               extra={"encode": "FluxPipeline.encode_prompt", "family": c.variant,
                                      "max_length": self.max_length, "t5_config": c.text_encoder_2.config.to_dict(),
                                      "clip_config": c.text_encoder.config.to_dict()})

    def cache_preview_text(self) -> None:
        """The preview prompts' text, kept in memory (the encoders are gone when previews are drawn)."""
        prompts = [parse_prompt_line(p).prompt for p in self.sample_prompts]
        self.preview_text = {k: v.cpu() for k, v in self.data.text.get(prompts).items()}

    def drop_text_encoders(self) -> None:
        self.c.drop_text_encoders()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def conditioning(self, captions: list[str], gen: torch.Generator) -> Any:
        """Cached text with guidance dropout: a share ``data.caption_dropout`` gets the empty prompt's encoding."""
        from ..models.flux_cond import FluxText

        keep = torch.rand(len(captions), generator=gen) >= self.cfg.data.caption_dropout
        cond = self.data.text.get([c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)])
        return FluxText(cond["t5"], cond["pooled"]).to(self.device, torch.float32)

    # -- the model -----------------------------------------------------------------------------------
    def attach_transformer(self, transformer: nn.Module) -> list[str]:
        """LoRA (fp32) on the block layers, frozen storage, attention kernel, streaming or the device; notes."""
        from ..lora import attach_lora
        from ..models.flux_lora_keys import lora_target_names

        cfg, lo = self.cfg, self.cfg.lora
        torch.manual_seed(cfg.run.seed)  # LoRA's random init: the same run gives the same adapter
        names = lora_target_names(transformer)
        attach_lora(transformer, lo.rank, lo.alpha, lo.dropout, target_modules=names)
        notes = [f"LoRA rank {lo.rank} on {len(names)} transformer layers",
                 f"frozen transformer weights: {store_frozen_unet(transformer, cfg)}"]
        transformer.train()
        notes.append(f"attention: {install_attention([transformer], cfg, self.device)}")
        if cfg.memory.stream_blocks:
            from ..streaming import stream_frozen_blocks

            streamer = stream_frozen_blocks(transformer, self.device, cfg.memory.stream_blocks)
            notes.append(f"streaming {len(streamer.units)} transformer blocks from host RAM "
                         f"({streamer.host_bytes / 2**30:.2f} GiB, {cfg.memory.stream_blocks:.0%} of the block weights)")
        else:
            transformer.to(self.device)
        self.unet = self.c.transformer = transformer
        return notes

    def loss(self, batch: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        from ..models.flux_cond import training_loss

        text = self.conditioning(batch["captions"], gen)
        n = batch.get("n_instance", len(batch["captions"]))
        prior = n < len(batch["captions"])
        loss = training_loss(self.unet, batch["x0"].to(self.device), text, sampling=self.sampling, generator=gen,
                             reduce=not prior)
        if not prior:
            return loss
        total, instance, prior_loss = prior_preservation_loss(loss, n, self.cfg.train.prior_loss_weight)
        self.prior_losses.append((instance.item(), prior_loss.item()))
        return total

    # -- previews: the flow-matching Euler sampler, one pass per image (dev's guidance is an input) ----
    def preview_guidance(self, spec: Any) -> float:
        from ..models.flux_cond import PREVIEW_GUIDANCE

        return spec.cfg if spec.cfg is not None else PREVIEW_GUIDANCE

    @torch.no_grad()
    def preview(self) -> Any:
        """One column: each prompt (kohya options --w --h --d --l --s honoured) at FLUX.1's guidance input."""
        from ..models.flux_cond import FluxText, decode_images, sample_latents
        from ..sample import make_grid

        s = self.cfg.sample
        res = self.cfg.data.resolution or 512
        factor = self.vae_factor()
        precision = self.cfg.train.precision
        autocast = torch.autocast(self.device.type, dtype=AUTOCAST[precision]) if precision in AUTOCAST else nullcontext()
        specs = [parse_prompt_line(p) for p in self.sample_prompts]
        cells = []
        self.unet.eval()
        try:
            with self.frozen_models_on_device():
                for i, spec in enumerate(specs):
                    text = FluxText(self.preview_text["t5"][i : i + 1], self.preview_text["pooled"][i : i + 1])
                    height, width = (spec.height or res) // factor, (spec.width or res) // factor
                    seed = s.seed if spec.seed is None else spec.seed
                    with autocast:
                        latents = sample_latents(self.unet, text.to(self.device, torch.float32), self.c.scheduler_config,
                                                 height=height, width=width, steps=spec.steps or s.steps,
                                                 guidance=self.preview_guidance(spec),
                                                 generator=torch.Generator().manual_seed(seed))
                    cells.append(decode_images(self.c.vae, latents)[0].cpu() * 2 - 1)  # [0, 1] → the grid's [-1, 1]
        finally:
            self.unet.train()
        h, w = max(c.shape[1] for c in cells), max(c.shape[2] for c in cells)
        grid = torch.ones(len(cells), 3, h, w)  # white around smaller images
        for i, c in enumerate(cells):
            grid[i, :, : c.shape[1], : c.shape[2]] = c
        label = "guidance input" if self.c.guidance_embeds else "schnell"
        return make_grid(grid, nrow=1, labels=[label])

    # -- saving --------------------------------------------------------------------------------------
    def metadata(self, step: int) -> dict[str, Any]:
        """The SD job's ``ss_*`` keys plus how FLUX.1 was trained (sd-scripts' names where it has them)."""
        from ..models.flux_cond import TRAIN_GUIDANCE

        meta = super().metadata(step)
        meta.update({"ss_guidance_scale": str(TRAIN_GUIDANCE), "ss_timestep_sampling": self.sampling.mode,
                     "ss_model_prediction_type": "raw", "ss_max_sequence_length": str(self.max_length),
                     "lowvram_prediction": "flow"})
        return meta

    def save_lora(self, step: int, kohya_path: Path | None = None) -> dict[str, Path]:
        """The diffusers file (``lora/pytorch_lora_weights.safetensors``) and the kohya/BFL file ComfyUI loads."""
        from ..models.flux_lora_keys import save_lora_comfy, save_lora_diffusers

        meta = self.metadata(step)
        diff = save_lora_diffusers(self.run_dir / LORA_FILE, self.unet, self.c.variant, meta)
        comfy = save_lora_comfy(kohya_path or self.run_dir / "lora" / f"{self.lora_name}.safetensors", self.unet,
                                self.c.variant, meta, steps=step)
        return {"diffusers": diff, "kohya": comfy}


def train_flux_lora(cfg: RunConfig, run_dir: Path, device: torch.device, emit: Callable[[Event], None], *,
                    stop: Callable[[], bool] = lambda: False, resume: bool = False, cache_only: bool = False,
                    world: Any = None, clock: Any = None) -> Any:
    """LoRA of the FLUX.1 model at ``model.pretrained`` on the folder ``data.source``; returns a ``RunResult``."""
    from ..distributed import SINGLE, main_first
    from ..models.flux import load_flux
    from .finetune import build_caches, default_prompts, fit_job, open_finetune_data
    from .phases import PhaseClock

    world = world or SINGLE
    clock = clock or PhaseClock(emit)
    check_flux_config(cfg, world)
    with clock.phase("data check"):
        data = open_finetune_data(cfg, run_dir, cache_only)
    load = {"dtype": LOAD_DTYPES[cfg.memory.frozen_dtype], "sources": flux_sources(cfg), "config": cfg.model.config}
    with clock.phase("load"):
        comps = load_flux(cfg.model.pretrained, transformer=False, **load)
        for note in comps.notes:
            print(f"note: {note}")
        job = FluxLoraJob(cfg, run_dir, comps, device, data, cfg.sample.prompts or default_prompts(data.dataset))
    with clock.phase("caching"):
        with main_first(world):
            build_caches(cfg, job)  # the preview prompts' text too (job.cache_preview_text)
        job.drop_text_encoders()
    if cache_only:
        data.dataset.write_report(run_dir)
        return RunResult(run_dir, "cached", 0)
    with clock.phase("load"):
        transformer = load_flux(cfg.model.pretrained, text_encoders=False, **load).transformer
        notes = [job.text_note, *job.attach_transformer(transformer)]
    if compute_dtype(cfg) == torch.float16:
        notes.append("fp16 compute: FLUX.1's activations can overflow fp16 (bf16 or fp32 are safe)")
    print(f"lora fine-tune of {comps.variant} (flow matching, σ sampling {job.sampling.mode}) from "
          f"{cfg.model.pretrained}; " + "; ".join(notes))
    return fit_job(cfg, run_dir, job, data.epoch_batches, device, emit, stop=stop, resume=resume, world=world,
                   clock=clock)

def export_flux_run(run_dir: Path, formats: tuple[str, ...], merge: bool, out_dir: Path, name: str) -> list[Path]:
    """``lowvram export`` of a FLUX.1 run: copies of the files the job wrote (diffusers, kohya/BFL for ComfyUI)."""
    import shutil

    if merge:
        raise ModelLoadError("merging a LoRA into the FLUX.1 transformer (a 24 GB model file) is not supported",
                             "load the LoRA file beside the model (ComfyUI: LoraLoaderModelOnly; diffusers: load_lora_weights)")
    files = {"kohya": (run_dir / "lora" / f"{name}.safetensors", f"{name}.safetensors"),
             "diffusers": (run_dir / LORA_FILE, LORA_FILE.name)}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        source, target = files[fmt]
        if not source.is_file():
            raise ModelLoadError(f"'{source}' is missing: the run has not saved its LoRA yet",
                                 f"train until a checkpoint is written, or `lowvram train --resume {run_dir}`")
        written.append(atomic_write(out_dir / target, lambda tmp, source=source: shutil.copyfile(source, tmp)))
    return written
