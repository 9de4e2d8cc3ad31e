"""LoRA and full fine-tunes of pretrained SD 1.x / 2.x / SDXL checkpoints: the job the Trainer runs.

The base model loads with the plan's frozen dtype, latents and text embeddings come from the data
cache, the loss is the profiler's own ``compute_loss``, previews are drawn by the diffusers pipeline
(so a preview is what diffusers gives with the saved file), and the LoRA files are rewritten at every
checkpoint in the diffusers/peft and the kohya (A1111/ComfyUI) formats.
"""

from __future__ import annotations

import json
import re
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..errors import ConfigError
from ..run_folder import FINAL_DIR, LORA_FILE, STEP_LORA_DIR, RunResult
from .events import Event
from .loop import AUTOCAST, Trainer
from .phases import PhaseClock
from .step import compute_loss, phase_range

SAMPLER_CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm++": "DPMSolverMultistepScheduler"}
LOAD_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float16}


# ---- kohya-style sample prompt lines ------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSpec:
    """One preview row: the prompt and its per-line options (None: the sample.* default)."""

    prompt: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    cfg: float | None = None
    steps: int | None = None


_PROMPT_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
    "l": ("cfg", float), "s": ("steps", int),
}


def parse_prompt_line(line: str) -> PromptSpec:
    """kohya's sample-prompt line: ``prompt --n negative --w 512 --h 768 --d seed --l cfg --s steps``."""
    parts = re.split(r"(?:^|\s)--([A-Za-z]+)(?=\s|$)", line.strip())
    values: dict[str, Any] = {"prompt": parts[0].strip()}
    for key, raw in zip(parts[1::2], parts[2::2], strict=True):
        if key not in _PROMPT_OPTIONS:
            raise ConfigError(f"sample prompt {line!r}: unknown option --{key}",
                              "use --n negative, --w width, --h height, --d seed, --l guidance, --s steps")
        name, kind = _PROMPT_OPTIONS[key]
        try:
            values[name] = kind(raw.strip())
        except ValueError:
            raise ConfigError(f"sample prompt {line!r}: --{key} needs a {kind.__name__}, got {raw.strip()!r}",
                              "e.g. --w 512 --d 42 --l 7.5 --s 30") from None
    for side in ("width", "height"):
        if values.get(side) is not None and (values[side] <= 0 or values[side] % 8):
            raise ConfigError(f"sample prompt {line!r}: --{side[0]} {values[side]} is not a positive multiple of 8",
                              "image sides must be multiples of 8 (the VAE downsamples by 8)")
    return PromptSpec(**values)


# ---- loading: frozen dtypes, LoRA, attention ----------------------------------------------------------
def compute_dtype(cfg: RunConfig) -> torch.dtype:
    return AUTOCAST.get(cfg.train.precision, torch.float32)


def resolve_prediction(cfg: RunConfig) -> str | None:
    """``model.prediction`` defaults to epsilon, which must not override a detected v-prediction checkpoint:
    for pretrained runs only an explicit v_prediction (or family sd2-v) forces v; otherwise the checkpoint says."""
    if cfg.model.prediction == "v_prediction" or cfg.model.family == "sd2-v":
        return "v_prediction"
    return None


def load_base(cfg: RunConfig) -> Any:
    """The pretrained components, frozen, in the load dtype (fp8 storage starts from fp16 weights)."""
    from ..models.pretrained import load_pretrained

    m = cfg.model
    dtype = torch.float32 if cfg.run.task == "full" else LOAD_DTYPES[cfg.memory.frozen_dtype]
    return load_pretrained(m.pretrained, family=m.family, dtype=dtype, allow_pickle=m.allow_pickle,
                           tokenizer=m.tokenizer, vae=m.vae, config=getattr(m, "config", None),
                           prediction=resolve_prediction(cfg))


def store_frozen_unet(unet: nn.Module, cfg: RunConfig) -> str:
    """Keep the frozen UNet weights in ``memory.frozen_dtype`` exactly as the memory profiler models it."""
    from ..quant import store_frozen_unet as store

    return store(unet, cfg.memory.frozen_dtype, compute_dtype(cfg))


def helper_dtypes(precision: str, sdxl: bool, vae_force_upcast: bool) -> tuple[torch.dtype, torch.dtype]:
    """(text encoders, VAE) dtype of a fine-tune's frozen helpers: the compute dtype, except SDXL's VAE,
    which overflows in fp16 and stays fp32 there. The memory profiler builds them the same way."""
    dt = AUTOCAST.get(precision, torch.float32)
    return dt, torch.float32 if sdxl and dt == torch.float16 and vae_force_upcast else dt


def install_attention(models: list[nn.Module], cfg: RunConfig, device: torch.device) -> str:
    """The plan's attention kernel; ``auto`` asks the hardware probe on a GPU (the CPU has fused SDPA)."""
    from ..attention import set_attention

    card: Any = {"flash_attention": True}
    if cfg.memory.attention == "auto" and device.type == "cuda":
        from ..hardware import probe

        card = probe()
    kind = ""
    for m in models:
        kind = set_attention(m, cfg.memory.attention, cfg.memory.attention_chunk, card=card)
    return kind


# ---- data ---------------------------------------------------------------------------------------------
@dataclass
class FinetuneData:
    """The folder dataset with its bucket batches, and where latents and text embeddings come from."""

    dataset: Any
    epoch_batches: Callable[[int], list[list[int]]]
    latents: Any = None  # LatentCacheDataset, or None: encode with the VAE every step
    text: Any = None  # TextEmbeddingCache, or None: encode every step
    prior: Any = None  # data.prior.ClassImages (prior preservation), or None
    prior_latents: Any = None  # the class images' LatentCacheDataset, or None


def open_dataset(cfg: RunConfig, run_dir: Path) -> tuple[Any, Callable[[int], list[list[int]]]]:
    """Validate the folder before any model loads (see ``data.dataset.open_for_training``)."""
    from ..data.dataset import open_for_training

    return open_for_training(cfg, run_dir)


def prior_preservation_loss(per_sample: torch.Tensor, n_instance: int,
                            weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, instance, prior) of a batch whose rows from ``n_instance`` on are class images:
    total = mean instance loss + ``weight`` x mean class loss, as diffusers' train_dreambooth_lora."""
    instance, prior = per_sample[:n_instance].mean(), per_sample[n_instance:].mean()
    return instance + weight * prior, instance.detach(), prior.detach()


def sdxl_time_ids(original: tuple[int, int], target: tuple[int, int]) -> list[float]:
    """SDXL's size conditioning (orig h, w, crop top, left, target h, w) for a resize-to-cover + centre crop."""
    (oh, ow), (th, tw) = original, target
    scale = max(tw / ow, th / oh)
    nw, nh = max(tw, round(ow * scale)), max(th, round(oh * scale))
    return [float(oh), float(ow), float((nh - th) // 2), float((nw - tw) // 2), float(th), float(tw)]


# ---- the job ------------------------------------------------------------------------------------------
class FinetuneJob:
    """A LoRA (UNet, optionally text encoders) or full UNet fine-tune of a pretrained SD checkpoint."""

    def __init__(self, cfg: RunConfig, run_dir: Path, comps: Any, device: torch.device, data: FinetuneData,
                 sample_prompts: list[str]) -> None:
        self.cfg, self.run_dir, self.c, self.device, self.data = cfg, run_dir, comps, device, data
        self.unet = comps.unet
        self.sdxl = comps.family == "sdxl"
        self.lora = cfg.run.task == "lora"
        self.train_text = self.lora and cfg.lora.text_encoder
        self.sample_prompts = sample_prompts
        self.has_validation = False
        self.alphas_cumprod = comps.training_scheduler().alphas_cumprod.float()
        self.prediction = comps.prediction_type
        self.pipe = comps.pipeline()
        self.pipe.set_progress_bar_config(disable=True)
        # the frozen VAE and text encoders: on the device until build_caches offloads them (text encoders
        # off the card with memory.text_encoders=sequential / cpu: text_cache.py)
        self.text_place = "card" if self.train_text else cfg.memory.text_encoders
        tes = [] if self.train_text or self.text_place != "card" else [comps.text_encoder, comps.text_encoder_2]
        self.frozen = [m for m in (comps.vae, *tes) if m is not None]
        for m in self.frozen:
            m.to(device)
        if self.text_place == "sequential":
            from .text_cache import visit_device

            visit_device(self.text_encoders().values(), device)
        self.frozen_on_device = True
        self.preview_text: Any = None  # text_cache.PreviewText once the captions are cached
        self.lora_name = run_dir.resolve().name or "lora"
        self.prior_losses: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=cfg.train.grad_accum)  # the last step's

    # -- models --------------------------------------------------------------------------------------
    def text_encoders(self) -> dict[str, nn.Module]:
        return {n: m for n in ("text_encoder", "text_encoder_2") if (m := getattr(self.c, n, None)) is not None}

    def trainable_modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"unet": self.unet}
        if self.train_text:
            mods.update(self.text_encoders())
        return mods

    @contextmanager
    def frozen_models_on_device(self) -> Iterator[None]:
        """Bring offloaded VAE/text encoders to the device for a block (previews, uncached encoding)."""
        if self.frozen_on_device:
            yield
            return
        for m in self.frozen:
            m.to(self.device)
        try:
            yield
        finally:
            for m in self.frozen:
                m.to("cpu")

    # -- batches -------------------------------------------------------------------------------------
    def batch(self, idx: list[int]) -> dict[str, Any]:
        """Latents, captions and SDXL size conditioning for stream indices ``idx``; with prior preservation
        each instance image's class partner (same bucket) follows, from row ``n_instance`` on.

        One micro-batch holds both halves (diffusers' DreamBooth layout) rather than alternating instance
        and class micro-batches: every optimizer step then sees instance + weight x prior exactly, also
        at grad_accum 1, and the memory planner profiles the doubled micro-batch (Workload.prior);
        with gradient checkpointing the second image adds little to a LoRA step's peak.
        """
        out = self.images(self.data.dataset, self.data.latents, idx)
        if self.data.prior is not None:
            extra = self.images(self.data.prior.dataset, self.data.prior_latents, self.data.prior.pairs(idx))
            if "loss_weights" in out or "loss_weights" in extra:  # an unmasked half weighs 1 everywhere
                for part in (out, extra):
                    part.setdefault("loss_weights", torch.ones(len(part["captions"]), 1, *part["x0"].shape[-2:]))
            out = {k: torch.cat([v, extra[k]]) if isinstance(v, torch.Tensor) else v + extra[k] for k, v in out.items()}
        out["n_instance"] = len(idx)
        return out

    def images(self, ds: Any, latents: Any, idx: list[int]) -> dict[str, Any]:
        """Latents (cached or encoded now), captions and SDXL size conditioning of ``ds``'s stream indices."""
        from ..data.masks import batch_weights

        plans = [ds.plan(i) for i in idx]
        if latents is not None:
            items = [latents[i] for i in idx]
            x0 = torch.stack([it["latents"] for it in items]).float()
        else:
            from ..data.cache import encode_latents

            items = [ds[i] for i in idx]
            with self.frozen_models_on_device():
                x0 = encode_latents(self.c.vae, torch.stack([it["pixel_values"] for it in items])).float()
        out: dict[str, Any] = {"x0": x0, "captions": [p.caption for p in plans]}
        weights = batch_weights([it.get("mask") for it in items], x0.shape[-2:], self.cfg.data.unmasked_weight)
        if weights is not None:  # masked loss: at least one image of the batch has a loss mask
            out["loss_weights"] = weights
        if self.sdxl:
            target = (x0.shape[-2] * self.vae_factor(), x0.shape[-1] * self.vae_factor())
            records = getattr(ds, "records", None)
            ids = []
            for p in plans:
                rec = records[p.source] if records is not None else None
                original = (rec.height, rec.width) if rec is not None else target
                ids.append(sdxl_time_ids(original, target))
            out["time_ids"] = torch.tensor(ids)
        return out

    def vae_factor(self) -> int:
        return 2 ** (len(self.c.vae.config.block_out_channels) - 1)

    # -- text ----------------------------------------------------------------------------------------
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """What the pipeline feeds the UNet for ``captions`` (its own ``encode_prompt``, so training and
        inference condition alike): ``embeds`` and, for SDXL, the pooled ``pooled`` embedding."""
        from .text_cache import encode_device

        device = encode_device(self.text_place, self.device)
        if self.sdxl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
            return {"embeds": embeds, "pooled": pooled}
        embeds, _ = self.pipe.encode_prompt(captions, device, 1, False)
        return {"embeds": embeds}

    def text_identity(self) -> str:
        from ..data.cache import module_identity

        parts = []
        for name, te in self.text_encoders().items():
            tok = self.c.tokenizer if name == "text_encoder" else self.c.tokenizer_2
            # wrapped: module_identity reads ``config`` as a dict, a transformers config is not one
            parts.append(module_identity(nn.ModuleDict({name: te}), extra={
                "config": te.config.to_dict(), "encode": "pipeline.encode_prompt", "family": self.c.family,
                "pad": str(tok.pad_token), "max_length": tok.model_max_length}))
        return "+".join(parts)

    def preview_captions(self) -> set[str]:
        """What the previews encode (prompts, negatives, the empty prompt): cached with the captions."""
        from .text_cache import preview_strings

        specs = [parse_prompt_line(p) for p in self.sample_prompts]
        neg = self.cfg.sample.negative_prompt
        return preview_strings([s.prompt for s in specs], [s.negative if s.negative is not None else neg for s in specs])

    def cache_preview_text(self) -> None:
        """The preview prompts' text from the cache; the text encoders never come back to the card for previews."""
        from .text_cache import PreviewText

        self.preview_text = PreviewText.from_cache(self.data.text.get, self.preview_captions(), self.sdxl,
                                                   self.zero_negative())

    def zero_negative(self) -> bool:
        return self.sdxl and bool(self.pipe.config.get("force_zeros_for_empty_prompt", False))

    def conditioning(self, captions: list[str], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Text conditioning with guidance dropout: a share ``data.caption_dropout`` gets the empty prompt
        (SD 1.x/2.x: the embedding of ""; SDXL: zeros, as SDXL was trained and as its pipeline samples)."""
        keep = torch.rand(len(captions), generator=gen) >= self.cfg.data.caption_dropout
        if not self.sdxl:
            captions = [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]
        if self.data.text is not None:
            cond = self.data.text.get(captions)
            if isinstance(cond, torch.Tensor):  # a cache read back from disk has no structure names
                cond = {"embeds": cond}
            cond = {k: v.to(self.device) for k, v in cond.items()}
        else:
            grad = torch.enable_grad() if self.train_text and torch.is_grad_enabled() else torch.no_grad()
            ctx = nullcontext() if self.train_text else self.frozen_models_on_device()
            with grad, ctx:
                cond = self.encode_text(captions)
        if self.sdxl:
            mask = keep.to(self.device)
            cond = {k: v * mask.view(-1, *([1] * (v.dim() - 1))).to(v.dtype) for k, v in cond.items()}
        return cond

    # -- the loss ------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        cond = self.conditioning(batch["captions"], gen)
        kwargs = None
        if self.sdxl:
            kwargs = {"added_cond_kwargs": {"text_embeds": cond["pooled"],
                                            "time_ids": batch["time_ids"].to(self.device, cond["pooled"].dtype)}}
        prior = batch.get("n_instance", len(batch["captions"])) < len(batch["captions"])
        loss = compute_loss(self.unet, batch["x0"].to(self.device), cond["embeds"], alphas_cumprod=self.alphas_cumprod,
                            prediction=self.prediction, generator=gen, unet_kwargs=kwargs,
                            snr_gamma=self.cfg.train.snr_gamma, reduce=not prior, loss_weights=batch.get("loss_weights"))
        if not prior:
            return loss
        total, instance, prior_loss = prior_preservation_loss(loss, batch["n_instance"], self.cfg.train.prior_loss_weight)
        self.prior_losses.append((instance, prior_loss))  # read on the host only when a step is logged
        return total

    def prior_metrics(self) -> dict[str, float]:
        """Instance and prior (class) loss, averaged like ``loss`` over the last step's micro-batches."""
        if not self.prior_losses:
            return {}
        n = len(self.prior_losses)
        return {"instance_loss": sum(float(i) for i, _ in self.prior_losses) / n,
                "prior_loss": sum(float(p) for _, p in self.prior_losses) / n}

    def validate(self) -> float:
        raise RuntimeError("fine-tune jobs have no held-out validation set")

    # -- previews ------------------------------------------------------------------------------------
    def scheduler(self, name: str) -> Any:
        import diffusers

        if name not in SAMPLER_CLASSES:
            raise ConfigError(f"unknown sampler {name!r}", f"use one of {', '.join(SAMPLER_CLASSES)} (sample.sampler)")
        return getattr(diffusers, SAMPLER_CLASSES[name]).from_config(self.c.scheduler_config)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → pixels in [-1, 1] as the pipelines decode them (outside autocast: SDXL's VAE overflows)."""
        vae = self.c.vae
        cfg = vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        latents = latents.to(vae.dtype)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std_t / cfg.scaling_factor + mean_t
        else:
            latents = latents / cfg.scaling_factor
        with torch.no_grad():
            return vae.decode(latents).sample.float().cpu()

    def generate(self, specs: list[PromptSpec], guidance: float) -> list[torch.Tensor]:
        """Images [3, H, W] in [-1, 1] of prompts that share size, steps and guidance, in one pipeline call:
        ``pipe(prompts, negative_prompts, guidance_scale, steps, one generator per prompt)`` draws each image
        as its own call would (the initial noise comes from each prompt's own seed)."""
        s = self.cfg.sample
        res = self.cfg.data.resolution or 512
        first = specs[0]
        width, height = first.width or res, first.height or res
        negatives = [spec.negative if spec.negative is not None else s.negative_prompt for spec in specs]
        kw: dict[str, Any] = {"original_size": (height, width), "target_size": (height, width)} if self.sdxl else {}
        self.pipe.scheduler = self.scheduler(s.sampler)
        precision = self.cfg.train.precision
        autocast = torch.autocast(self.device.type, dtype=AUTOCAST[precision]) if precision in AUTOCAST else nullcontext()
        prompts = [spec.prompt for spec in specs]
        text: dict[str, Any] = {"prompt": prompts, "negative_prompt": negatives if any(negatives) else None}
        if self.preview_text is not None or self.text_place != "card":  # cached, or encoded off the card now
            from .text_cache import PreviewText

            known = self.preview_text
            if known is None or not set(prompts + negatives) <= known.rows.keys():
                known = PreviewText.from_cache(self.encode_text, prompts + negatives, self.sdxl, self.zero_negative())
            text = known.pipe_kwargs(prompts, negatives)
        with autocast:
            latents = self.pipe(
                **text, height=height, width=width, num_inference_steps=first.steps or s.steps, guidance_scale=guidance,
                generator=[torch.Generator().manual_seed(s.seed if spec.seed is None else spec.seed) for spec in specs],
                output_type="latent", **kw,
            ).images
        # one image at a time through the VAE: decoding is the memory peak of sampling at full size
        return [self.decode(latents[i : i + 1])[0] for i in range(len(specs))]

    def preview_batches(self, specs: list[PromptSpec], scales: list[float]) -> list[list[tuple[int, int]]]:
        """(row, column) cells drawn together: same size, steps, guidance and negative-or-not, at most
        ``train.batch_size`` prompts (a guided pass keeps no activations for backward, so it stays within
        what a training step of that batch held)."""
        res = self.cfg.data.resolution or 512
        groups: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
        for r, spec in enumerate(specs):
            negative = spec.negative if spec.negative is not None else self.cfg.sample.negative_prompt
            for c, w in enumerate([spec.cfg] if spec.cfg is not None else scales):
                key = (spec.width or res, spec.height or res, spec.steps or self.cfg.sample.steps, w, bool(negative))
                groups.setdefault(key, []).append((r, c))
        size = max(1, self.cfg.train.batch_size)
        return [cells[i : i + size] for cells in groups.values() for i in range(0, len(cells), size)]

    @contextmanager
    def sampling(self, adapters: bool = True) -> Iterator[None]:
        """Trained models in eval mode and the frozen ones on the device for a block; ``adapters=False``
        switches the adapters off too (the base model's own output, whatever the adapter type)."""
        modules = [self.unet, *self.text_encoders().values()]
        modes = [m.training for m in modules]
        off = [m for m in modules if not adapters and getattr(m, "peft_config", None)]
        for m in modules:
            m.eval()
        for m in off:
            m.disable_adapters()
        try:
            with self.frozen_models_on_device():
                yield
        finally:
            for m in off:
                m.enable_adapters()
            for m, mode in zip(modules, modes, strict=True):
                m.train(mode)

    @torch.no_grad()
    def draw_base(self, prompt: str, seed: int) -> torch.Tensor:
        """One image of the base model (adapters off) with the run's frozen dtype, attention kernel and
        sample.* settings (sampler, steps, guidance, negative prompt) at data.resolution: a class image."""
        with self.sampling(adapters=False):
            return self.generate([PromptSpec(prompt, seed=seed)], self.cfg.sample.guidance)[0]

    @torch.no_grad()
    def preview(self) -> Any:
        """Rows: prompts (kohya options honoured); columns: sample.cfg_scales (a row with --l has one image)."""
        from ..sample import make_grid

        specs = [parse_prompt_line(p) for p in self.sample_prompts]
        scales = list(self.cfg.sample.cfg_scales)
        drawn: dict[tuple[int, int], torch.Tensor] = {}
        with self.sampling():
            for cells in self.preview_batches(specs, scales):
                r, c = cells[0]
                spec = specs[r]
                images = self.generate([specs[i] for i, _ in cells], spec.cfg if spec.cfg is not None else scales[c])
                drawn.update(zip(cells, images, strict=True))
        rows = [[drawn[(r, c)] for c in range(1 if spec.cfg is not None else len(scales))]
                for r, spec in enumerate(specs)]
        height = max(img.shape[1] for row in rows for img in row)
        width = max(img.shape[2] for row in rows for img in row)
        cells = []
        for row in rows:
            for j in range(len(scales)):
                cell = torch.ones(3, height, width)  # white where a row has fewer images or smaller ones
                if j < len(row):
                    cell[:, : row[j].shape[1], : row[j].shape[2]] = row[j]
                cells.append(cell)
        return make_grid(torch.stack(cells), nrow=len(scales), labels=[f"cfg {w:g}" for w in scales])

    # -- saving --------------------------------------------------------------------------------------
    def metadata(self, step: int) -> dict[str, Any]:
        """kohya ``ss_*`` keys (A1111/ComfyUI LoRA browsers show them) plus lowvram's own."""
        cfg, ds = self.cfg, self.data.dataset
        report = ds.report
        dirs: dict[str, dict[str, int]] = {}
        tags: dict[str, Counter] = {}
        for rec in getattr(ds, "records", []):
            folder = Path(rec.rel).parent.name or Path(str(cfg.data.source)).name
            d = dirs.setdefault(folder, {"n_repeats": rec.repeats, "img_count": 0})
            d["img_count"] += 1
            tags.setdefault(folder, Counter()).update(t.strip() for t in rec.caption.split(",") if t.strip())
        res = cfg.data.resolution or 512
        meta: dict[str, Any] = {
            "ss_sd_model_name": Path(str(cfg.model.pretrained)).name,
            "ss_output_name": self.lora_name,
            "ss_resolution": f"({res}, {res})",
            "ss_num_train_images": str(report.samples),
            "ss_num_reg_images": str(report.class_data.used if getattr(report, "class_data", None) else 0),
            "ss_prior_loss_weight": str(cfg.train.prior_loss_weight),
            "ss_dataset_dirs": dirs,
            "ss_tag_frequency": {k: dict(v.most_common(200)) for k, v in tags.items()},
            "ss_max_train_steps": str(cfg.run.steps),
            "ss_steps": str(step),
            "ss_learning_rate": str(cfg.train.lr),
            "ss_unet_lr": str(cfg.train.lr),
            "ss_text_encoder_lr": str(cfg.train.lr if self.train_text else 0.0),
            "ss_network_train_unet_only": str(not self.train_text),
            "ss_lr_warmup_steps": str(cfg.train.warmup_steps),
            "ss_lr_scheduler": f"{cfg.train.lr_schedule}_with_warmup",
            "ss_optimizer": cfg.train.optimizer,
            "ss_batch_size_per_device": str(cfg.train.batch_size),
            "ss_gradient_accumulation_steps": str(cfg.train.grad_accum),
            "ss_mixed_precision": {"fp32": "no"}.get(cfg.train.precision, cfg.train.precision),
            "ss_gradient_checkpointing": str(cfg.train.gradient_checkpointing),
            "ss_seed": str(cfg.run.seed),
            "ss_caption_dropout_rate": str(cfg.data.caption_dropout),
            "ss_network_dropout": str(cfg.lora.dropout),
            "ss_v_parameterization": str(self.prediction == "v_prediction"),
            "ss_enable_bucket": str(cfg.data.buckets),
            "ss_cache_latents": str(self.data.latents is not None),
            "lowvram_family": self.c.family,
            "lowvram_base_model": str(cfg.model.pretrained),
            "lowvram_prediction": self.prediction,
            "lowvram_frozen_dtype": cfg.memory.frozen_dtype,
            "lowvram_ema_decay": str(cfg.train.ema_decay),
        }
        if self.sdxl:  # kohya's SDXL names need the UNet layout; export reads it from here
            meta["lowvram_unet_config"] = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        return meta

    def save_lora(self, step: int, kohya_path: Path | None = None) -> dict[str, Path]:
        """Write the LoRA as diffusers/peft (``lora/pytorch_lora_weights.safetensors``) and kohya files."""
        from ..lora import save_lora_diffusers, save_lora_kohya_from_models

        tes = self.text_encoders() if self.train_text else {}
        meta = self.metadata(step)
        diff = save_lora_diffusers(self.run_dir / LORA_FILE, self.unet, tes, self.c.family, meta)
        kohya = save_lora_kohya_from_models(kohya_path or self.run_dir / "lora" / f"{self.lora_name}.safetensors",
                                            self.unet, tes, self.c.family, meta, steps=step)
        return {"diffusers": diff, "kohya": kohya}

    def save_checkpoint_lora(self, step: int) -> None:
        """Every checkpoint: the current LoRA files, plus a kohya copy named by step (to pick an earlier one)."""
        if not self.lora:
            return
        from ..fsutil import write_bytes_atomic

        paths = self.save_lora(step)
        steps_dir = self.run_dir / STEP_LORA_DIR
        steps_dir.mkdir(parents=True, exist_ok=True)
        target = steps_dir / f"{self.lora_name}-step{step:08d}.safetensors"
        write_bytes_atomic(target, paths["kohya"].read_bytes())

    def save_final(self, step: int) -> Path:
        if self.lora:
            return self.save_lora(step)["diffusers"].parent
        return self.save_model(step)

    def save_model(self, step: int) -> Path:
        """Full fine-tune: the whole pipeline as a diffusers folder and as one A1111/ComfyUI file."""
        from ..fsutil import atomic_dir, save_safetensors_atomic
        from ..models.key_names import canonicalize_pipeline_folder
        from ..models.ldm_convert import pipeline_to_ldm

        out = self.run_dir / FINAL_DIR
        with atomic_dir(out) as tmp:  # both files of one step appear together, or neither
            self.pipe.save_pretrained(tmp / "diffusers")
            canonicalize_pipeline_folder(tmp / "diffusers")  # text_model.… keys, loadable by transformers 4.x too
            sd = pipeline_to_ldm(self.unet, self.c.vae, self.text_encoders(), self.c.family)
            meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata(step).items()
                    if k.startswith("lowvram_") and k != "lowvram_unet_config"}
            save_safetensors_atomic(sd, tmp / f"{self.lora_name}.safetensors", {**meta, "format": "pt"})
        return out


# ---- putting it together ------------------------------------------------------------------------------
def build_caches(cfg: RunConfig, job: FinetuneJob) -> None:
    """Encode latents (and text, when the text encoders stay frozen) once; then offload the frozen models
    if nothing needs them during training (previews bring them back for a moment)."""
    from ..data.cache import LatentCache, TextEmbeddingCache, dataset_captions, default_cache_dir
    from .text_cache import previews_from_cache

    ds = job.data.dataset
    root = default_cache_dir(cfg.data)
    if cfg.memory.cache_latents:
        cache = LatentCache(root, job.c.vae, dtype=job.c.vae.dtype)
        job.data.latents = cache.build(ds, batch_size=max(1, cfg.train.batch_size))
        st = cache.stats
        print(f"latent cache {cache.store.root}: {st.needed} latents, {st.hits} reused, {st.encoded} encoded")
        if job.data.prior is not None:  # class images: the same content-keyed cache
            job.data.prior_latents = cache.build(job.data.prior.dataset, batch_size=max(1, cfg.train.batch_size))
            st = cache.stats
            print(f"latent cache (class images): {st.needed} latents, {st.hits} reused, {st.encoded} encoded")
    if cfg.memory.cache_text and not job.train_text:
        text = TextEmbeddingCache(root, job.encode_text, job.text_identity())
        captions = dataset_captions(ds) | job.preview_captions()  # previews draw from the cache too
        if job.data.prior is not None:
            captions |= dataset_captions(job.data.prior.dataset)
        job.data.text = text.build(captions)
        print(f"text cache {text.store.root}: {text.stats.needed} captions, {text.stats.hits} reused")
    cached_text = job.data.text is not None
    cached_latents = job.data.latents is not None and (job.data.prior is None or job.data.prior_latents is not None)
    if cached_text and previews_from_cache(cfg.memory.cache_text, job.train_text, cfg.data.shuffle_tags):
        job.cache_preview_text()  # while the encoders are still where they encode (all strings are cached)
    if not frozen_stay_on_device(cfg.memory.offload_frozen, cached_latents, cached_text, job.train_text,
                                 cfg.data.shuffle_tags):
        for m in job.frozen:
            m.to("cpu")
        job.frozen_on_device = False
    if job.preview_text is not None:  # previews bring the VAE back, never the text encoders
        job.frozen = [m for m in job.frozen if m is job.c.vae]


def frozen_stay_on_device(offload: bool, cached_latents: bool, cached_text: bool, train_text: bool,
                          shuffle_tags: bool) -> bool:
    """Whether the frozen VAE and text encoders stay on the device while training (the profiler asks too).

    They leave it only together, and only when nothing encodes during training: latents and captions
    cached, no text-encoder LoRA, and no tag shuffling (it makes new captions every draw, encoded when drawn).
    """
    needs_text = not train_text and (not cached_text or shuffle_tags)
    return not offload or needs_text or not cached_latents


def prepare_models(cfg: RunConfig, comps: Any, device: torch.device) -> list[str]:
    """LoRA adapters (fp32), frozen UNet storage, trainable UNet for full fine-tunes, attention; returns notes."""
    from ..lora import attach_lora, attach_text_lora

    notes = []
    dt, vae_dt = helper_dtypes(cfg.train.precision, comps.family == "sdxl", bool(comps.vae.config.force_upcast))
    for name in ("text_encoder", "text_encoder_2"):
        te = getattr(comps, name, None)
        if te is not None and te.dtype != dt:
            te.to(dt)
    if comps.vae.dtype != vae_dt:
        nn.Module.to(comps.vae, vae_dt)  # diffusers' own .to(dtype) warns about an empty list of fp32 modules
    if cfg.memory.vae_tiling:  # caching, class images and previews (the pipeline decodes with this VAE)
        from ..models.vae_tiles import tile_vae

        notes.append(tile_vae(comps.vae))
    torch.manual_seed(cfg.run.seed)  # LoRA's random init: the same run gives the same adapter
    if cfg.run.task == "lora":
        lo = cfg.lora
        attach_lora(comps.unet, lo.rank, lo.alpha, lo.dropout, conv=lo.conv, adapter=lo.type)
        if lo.text_encoder:
            for name in ("text_encoder", "text_encoder_2"):
                if (te := getattr(comps, name, None)) is not None:
                    attach_text_lora(te, lo.rank, lo.alpha, lo.dropout, adapter=lo.type)
                    te.to(device).train()
        notes.append(f"frozen UNet weights: {store_frozen_unet(comps.unet, cfg)}")
    else:
        if comps.unet.dtype != torch.float32:
            comps.unet.to(torch.float32)
        comps.unet.requires_grad_(True)
    comps.unet.train()
    notes.append(f"attention: {install_attention([comps.unet], cfg, device)}")
    return notes  # the UNet stays where it loaded until the caches are built (train_finetune moves it)


def stream_unet(unet: nn.Module, cfg: RunConfig, device: torch.device) -> str:
    """Keep ``memory.stream_blocks`` of the frozen UNet block weights in host RAM, streamed per block;
    the rest of the UNet (adapters included) goes to ``device``. Returns a note for the log."""
    from ..streaming import stream_frozen_blocks

    if cfg.run.task != "lora":
        raise ConfigError("memory.stream_blocks streams frozen weights, and a full fine-tune trains them all",
                          "use --set memory.stream_blocks=0, or --task lora")
    streamer = stream_frozen_blocks(unet, device, cfg.memory.stream_blocks)
    where = "pinned host RAM" if streamer.pinned else "host RAM"
    return (f"streaming {len(streamer.units)} UNet blocks from {where} "
            f"({streamer.host_bytes / 2**30:.2f} GiB, {cfg.memory.stream_blocks:.0%} of the block weights)")


def open_finetune_data(cfg: RunConfig, run_dir: Path, cache_only: bool = False, scan_class: bool = True) -> FinetuneData:
    """The image folder (and class images, unless ``scan_class`` is off: some are still to be drawn) of a
    fine-tune, validated before any model loads."""
    from ..data.prior import open_class_images, scan_class_images

    if cfg.data.source == "builtin":
        raise ConfigError("lora/full fine-tunes need your images: data.source is 'builtin'",
                          "pass a folder of images with .txt captions (--data DIR)")
    # class images are validated before any model loads, and before open_dataset rewrites data_report.json
    # (a resumed run reuses their verdicts from it)
    class_scan = scan_class_images(cfg, run_dir) if cfg.data.class_data and scan_class else None
    ds, epoch_batches = open_dataset(cfg, run_dir)
    prior = open_class_images(cfg, ds, run_dir, scan=class_scan) if class_scan is not None else None
    if not cache_only:
        epoch_batches(0)  # fails now (DataError) when no bucket fills a batch, not mid-run
    return FinetuneData(ds, epoch_batches, prior=prior)


def default_prompts(ds: Any, n: int = 4) -> list[str]:
    caps = [ds.plan(i).caption for i in range(len(ds))]
    return list(dict.fromkeys(c for c in caps if c))[:n] or ["a photo"]


def train_finetune(cfg: RunConfig, run_dir: Path, device: torch.device, emit: Callable[[Event], None], *,
                   stop: Callable[[], bool] = lambda: False, resume: bool = False, cache_only: bool = False,
                   world: Any = None, clock: PhaseClock | None = None) -> Any:
    """Fine-tune ``model.pretrained`` on the folder ``data.source``; returns a ``RunResult``.

    ``cache_only`` stops after the latent/text caches are built (``lowvram cache``); ``world``: the
    processes of a multi-process run (the main one builds the caches, the others then read them);
    ``clock`` times the phases (data check, load, caching, then the loop's)."""
    from ..distributed import SINGLE, main_first
    from ..models.flux import is_flux_model

    world = world or SINGLE
    if is_flux_model(cfg.model.pretrained):  # FLUX.1 is its own family: a transformer, T5 + CLIP, flow matching
        from .flux_lora import train_flux_lora

        return train_flux_lora(cfg, run_dir, device, emit, stop=stop, resume=resume, cache_only=cache_only, world=world,
                               clock=clock)
    if cfg.memory.stream_blocks and world.distributed:
        raise ConfigError("memory.stream_blocks is not supported with several processes yet (DDP would see "
                          "UNet tensors in host memory)", "train in one process, or use --set memory.stream_blocks=0")
    clock = clock or PhaseClock(emit)

    from ..data.class_images import missing_numbers

    # class images to draw first (data.num_class_images): validated after they exist, with the base loaded
    to_draw = missing_numbers(cfg.data.class_data, cfg.data.num_class_images) if cfg.data.num_class_images else []
    with clock.phase("data check"):
        data = open_finetune_data(cfg, run_dir, cache_only, scan_class=not to_draw)
    with clock.phase("load"):
        comps = load_base(cfg)
        for note in comps.notes:
            print(f"note: {note}")
        notes = prepare_models(cfg, comps, device)
        prompts = cfg.sample.prompts or default_prompts(data.dataset)
        job = FinetuneJob(cfg, run_dir, comps, device, data, prompts)

    def unet_to_card() -> None:
        if cfg.memory.stream_blocks:
            notes.append(stream_unet(comps.unet, cfg, device))
        else:
            comps.unet.to(device)

    if to_draw:
        from ..data import class_images
        from ..data.prior import open_class_images, scan_class_images

        # drawing needs the whole base model on the card (memory/stages.py class_image_stage profiles it so);
        # it stays there through caching
        unet_to_card()
        # one process alone: Ctrl-C/SIGTERM stops between images (the others of a multi-process run would
        # wait for a folder that never fills, so there the drawing finishes and the first step stops)
        halt = stop if not world.distributed else (lambda: False)
        with clock.phase("class images"), main_first(world), phase_range("class images"):
            if world.is_main:  # one process draws; the others then read the folder
                class_images.generate(cfg.data.class_data, to_draw, cfg.data.class_prompt, cfg.run.seed,
                                      job.draw_base, stop=halt)
        if halt():  # nothing trained yet: no checkpoint to write; the next run draws the rest
            return RunResult(run_dir, "stopped", 0)
        with clock.phase("data check"):
            job.data.prior = open_class_images(cfg, data.dataset, run_dir, scan=scan_class_images(cfg, run_dir))
    with clock.phase("caching"), main_first(world), phase_range("cache"):
        build_caches(cfg, job)  # without class images to draw the UNet is not on the card yet: VAE and text encoders only
    if cache_only:
        data.dataset.write_report(run_dir)
        return RunResult(run_dir, "cached", 0)
    if not to_draw:
        unet_to_card()
    print(f"{cfg.run.task} fine-tune of {comps.family} ({comps.prediction_type}) from {cfg.model.pretrained}; "
          + "; ".join(notes))
    return fit_job(cfg, run_dir, job, data.epoch_batches, device, emit, stop=stop, resume=resume, world=world,
                   clock=clock)


def fit_job(cfg: RunConfig, run_dir: Path, job: FinetuneJob, epoch_batches: Callable[[int], list[list[int]]],
            device: torch.device, emit: Callable[[Event], None], *, stop: Callable[[], bool], resume: bool,
            world: Any, clock: PhaseClock) -> Any:
    """Train a fine-tune job with the Trainer: LoRA files at every checkpoint, prior losses in the metrics,
    the latest checkpoint resumed first; returns a ``RunResult``."""

    holder: dict[str, Trainer] = {}

    def emit_and_save(event: Event) -> None:
        if event.kind == "checkpoint" and "trainer" in holder:
            with holder["trainer"].ema_weights():
                job.save_checkpoint_lora(event.step)
        if event.kind == "step":  # prior preservation: instance and class losses beside the total
            event.data.update(job.prior_metrics())
        emit(event)

    with clock.phase("load"):
        trainer = Trainer(cfg, run_dir, job, job.batch, epoch_batches, device, emit_and_save, stop=stop,
                          world=world, clock=clock)
    holder["trainer"] = trainer
    if resume:
        trainer.resume_latest()
    status = trainer.fit()
    if world.is_main:
        job.data.dataset.write_report(run_dir)
    return RunResult(run_dir, status, trainer.step)
