"""The FLUX.1 (dev, schnell) family: a transformer on T5 + CLIP text, flow matching, LoRA only.

Order, for host RAM: the VAE, CLIP-L and T5-XXL load first (no transformer); latents and the text of every
caption and preview prompt (T5 sequence + CLIP pooled) are cached; the text encoders are dropped; then the
transformer loads in the plan's frozen dtype and gets the LoRA (block layers, ``models/flux_lora_keys``). A
step is the flow-matching loss (``models/flux_cond.training_loss``: σ drawn with FLUX.1's resolution shift,
guidance 1.0 for dev), previews are the flow-matching Euler sampler, and the LoRA is written as a diffusers
file and as the kohya/BFL file ComfyUI loads. Loading is ``models/flux.py``'s.
"""

from __future__ import annotations

import gc
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError
from ..fsutil import atomic_write
from ..run_folder import LORA_FILE
from .base import ModelFamily, register
from .flux_rules import check_flux_config


def flux_sources(cfg: Any) -> Any:
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


@register
class FluxFamily(ModelFamily):
    """FLUX.1: ``comps`` are ``models.flux.FluxComponents``; the job's ``unet`` is the transformer (after caching)."""

    name = "flux"
    label = "FLUX.1"
    variants = ("flux-dev", "flux-schnell")
    denoiser_key = "transformer"
    tasks = ("lora",)  # the 12 B transformer does not fit a small card as trainable weights

    @classmethod
    def detect(cls, path: Path, allow_pickle: bool = False) -> bool:
        from ..models.flux import is_flux_model

        return is_flux_model(path)  # Chroma and Fill files count: loading refuses them with the reason

    @classmethod
    def describe(cls, path: Path) -> str:
        from ..models.flux import detect_variant

        variant = detect_variant(path)  # refuses Chroma, Fill/Depth with the reason
        return f"FLUX.1 model, {variant} (LoRA on the transformer; text encoders cached, then dropped)"

    @classmethod
    def check_config(cls, cfg: Any, world: Any = None) -> None:
        check_flux_config(cfg, world)

    @classmethod
    def workload(cls, cfg: Any, res: int, batch: int, extra: str, common: dict[str, Any]) -> Any:
        from ..memory.flux_workload import workload_of_run

        # its caching pass and flow-matching previews are profiled stages (memory/flux_stages.py)
        return workload_of_run(cfg, batch, extra, **common, adapter=cfg.lora.type, lora_dropout=cfg.lora.dropout)

    @classmethod
    def plan_precision(cls, planned: Any, card: Any) -> list[str]:
        from ..memory.flux_workload import safe_precision

        return safe_precision(planned, card)  # the plan's copy computes in bf16/fp32, not fp16

    @classmethod
    def export_run(cls, run_dir: Path, formats: tuple[str, ...], merge: bool, out_dir: Path,
                   name: str) -> list[Path] | None:
        return export_flux_run(run_dir, formats, merge, out_dir, name)  # the job wrote both formats itself

    # -- loading: text side first, the transformer after caching -------------------------------------
    def load_settings(self) -> dict[str, Any]:
        from ..train.finetune_models import LOAD_DTYPES

        cfg = self.cfg
        return {"dtype": LOAD_DTYPES[cfg.memory.frozen_dtype], "sources": flux_sources(cfg), "config": cfg.model.config}

    def load(self) -> Any:
        from ..models.flux import load_flux

        return load_flux(self.cfg.model.pretrained, transformer=False, **self.load_settings())

    def bind(self, job: Any) -> list[nn.Module]:
        from ..flow import FlowSampling

        comps = job.c
        job.prediction = "flow"
        self.sampling = FlowSampling()
        tok2 = comps.tokenizer_2
        # the tokenizer's own limit where it is shorter (T5-XXL's is 512; tiny test tokenizers are shorter)
        self.max_length = min(comps.max_sequence_length, getattr(tok2, "model_max_length", 512) or 512)
        self.text_device, self.text_note = text_device([comps.text_encoder, comps.text_encoder_2], self.device,
                                                       self.cfg.memory.text_encoders)
        for m in (comps.text_encoder, comps.text_encoder_2):
            m.to(self.text_device)
        comps.vae.to(self.device)
        if self.cfg.memory.vae_tiling:  # the latent cache's encode and the previews' decode
            from ..models.vae_tiles import tile_vae
            from ..train.events import note

            job.emit(note(f"note: {tile_vae(comps.vae)}"))
        self.preview_text: Any = None
        return [comps.vae]

    def after_caching(self, job: Any) -> None:
        """The preview prompts' text kept in memory (the encoders are gone when previews are drawn); then the
        text encoders are dropped."""
        from ..train.prompts import parse_prompt_line

        prompts = [parse_prompt_line(p).prompt for p in job.sample_prompts]
        self.preview_text = {k: v.cpu() for k, v in job.data.text.get(prompts).items()}
        job.c.drop_text_encoders()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def denoiser_to_card(self, job: Any) -> list[str]:
        """LoRA (fp32) on the block layers, frozen storage, attention kernel, streaming or the device; notes."""
        from ..lora import attach_lora
        from ..models.flux import load_flux
        from ..models.flux_lora_keys import lora_target_names
        from ..train.finetune_models import compute_dtype, install_attention, store_frozen_unet

        cfg, lo = self.cfg, self.cfg.lora
        transformer = load_flux(cfg.model.pretrained, text_encoders=False, **self.load_settings()).transformer
        torch.manual_seed(cfg.run.seed)  # LoRA's random init: the same run gives the same adapter
        names = lora_target_names(transformer, attention_only=lo.targets == "attention")
        attach_lora(transformer, lo.rank, lo.alpha, lo.dropout, target_modules=names)
        notes = [self.text_note, f"LoRA rank {lo.rank} on {len(names)} transformer layers",
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
        job.unet = job.c.transformer = transformer
        if compute_dtype(cfg) == torch.float16:
            notes.append("fp16 compute: FLUX.1's activations can overflow fp16 (bf16 or fp32 are safe)")
        return notes

    def summary(self, job: Any, notes: list[str]) -> str:
        return (f"lora fine-tune of {job.c.variant} (flow matching, σ sampling {self.sampling.mode}) from "
                f"{self.cfg.model.pretrained}; " + "; ".join(notes))

    # -- text: encoded once, cached, then the encoders are dropped ---------------------------------------
    def encode_text(self, job: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        from ..models.flux_cond import encode_prompts

        c = job.c
        text = encode_prompts(c.text_encoder, c.tokenizer, c.text_encoder_2, c.tokenizer_2, captions,
                              self.max_length, self.text_device)
        return {"t5": text.t5, "pooled": text.pooled}

    def text_identity(self, job: Any) -> str:
        from ..data.cache import module_identity

        c = job.c
        return module_identity(nn.ModuleDict({"text_encoder": c.text_encoder, "text_encoder_2": c.text_encoder_2}),
                               extra={"encode": "FluxPipeline.encode_prompt", "family": c.variant,
                                      "max_length": self.max_length, "t5_config": c.text_encoder_2.config.to_dict(),
                                      "clip_config": c.text_encoder.config.to_dict()})

    def conditioning(self, job: Any, captions: list[str], gen: torch.Generator) -> Any:
        """Cached text with guidance dropout: a share ``data.caption_dropout`` gets the empty prompt's encoding."""
        from ..models.flux_cond import FluxText

        keep = torch.rand(len(captions), generator=gen) >= self.cfg.data.caption_dropout
        cond = job.data.text.get([c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)])
        return FluxText(cond["t5"], cond["pooled"]).to(self.device, torch.float32)

    def loss(self, job: Any, batch: dict[str, Any], gen: torch.Generator, reduce: bool) -> torch.Tensor:
        from ..models.flux_cond import training_loss

        text = self.conditioning(job, batch["captions"], gen)
        return training_loss(job.unet, batch["x0"].to(self.device), text, sampling=self.sampling, generator=gen,
                             reduce=reduce)

    # -- previews: the flow-matching Euler sampler, one pass per image (dev's guidance is an input) ----
    @torch.no_grad()
    def preview(self, job: Any) -> Any:
        """One column: each prompt (kohya options --w --h --d --l --s honoured) at FLUX.1's guidance input."""
        from ..models.flux_cond import PREVIEW_GUIDANCE, FluxText, decode_images, sample_latents
        from ..sample import make_grid
        from ..train.loop import AUTOCAST
        from ..train.prompts import parse_prompt_line

        s, res, factor = self.cfg.sample, self.cfg.data.resolution or 512, job.vae_factor()
        precision = self.cfg.train.precision
        autocast = torch.autocast(self.device.type, dtype=AUTOCAST[precision]) if precision in AUTOCAST else nullcontext()
        cells = []
        job.unet.eval()
        try:
            with job.frozen_models_on_device():
                for i, spec in enumerate(parse_prompt_line(p) for p in job.sample_prompts):
                    text = FluxText(self.preview_text["t5"][i : i + 1], self.preview_text["pooled"][i : i + 1])
                    with autocast:
                        latents = sample_latents(
                            job.unet, text.to(self.device, torch.float32), job.c.scheduler_config,
                            height=(spec.height or res) // factor, width=(spec.width or res) // factor,
                            steps=spec.steps or s.steps, guidance=spec.cfg if spec.cfg is not None else PREVIEW_GUIDANCE,
                            generator=torch.Generator().manual_seed(s.seed if spec.seed is None else spec.seed))
                    cells.append(decode_images(job.c.vae, latents)[0].cpu() * 2 - 1)  # [0, 1] → the grid's [-1, 1]
        finally:
            job.unet.train()
        h, w = max(c.shape[1] for c in cells), max(c.shape[2] for c in cells)
        grid = torch.ones(len(cells), 3, h, w)  # white around smaller images
        for i, c in enumerate(cells):
            grid[i, :, : c.shape[1], : c.shape[2]] = c
        return make_grid(grid, nrow=1, labels=["guidance input" if job.c.guidance_embeds else "schnell"])

    # -- saving --------------------------------------------------------------------------------------
    def metadata(self, job: Any, meta: dict[str, Any]) -> dict[str, Any]:
        """How FLUX.1 was trained, beside the ``ss_*`` keys (sd-scripts' names where it has them)."""
        from ..models.flux_cond import TRAIN_GUIDANCE

        meta.update({"ss_guidance_scale": str(TRAIN_GUIDANCE), "ss_timestep_sampling": self.sampling.mode,
                     "ss_model_prediction_type": "raw", "ss_max_sequence_length": str(self.max_length),
                     "lowvram_prediction": "flow"})
        return meta

    def save_lora(self, job: Any, step: int, kohya_path: Path | None = None) -> dict[str, Path]:
        """The diffusers file (``lora/pytorch_lora_weights.safetensors``) and the kohya/BFL file ComfyUI loads."""
        from ..models.flux_lora_keys import save_lora_comfy, save_lora_diffusers

        meta = job.metadata(step)
        diff = save_lora_diffusers(job.run_dir / LORA_FILE, job.unet, job.c.variant, meta)
        comfy = save_lora_comfy(kohya_path or job.run_dir / "lora" / f"{job.lora_name}.safetensors", job.unet,
                                job.c.variant, meta, steps=step)
        return {"diffusers": diff, "kohya": comfy}
