"""The Stable Diffusion 1.x/2.x family: a UNet on CLIP text, epsilon or v-prediction, the diffusers pipeline's previews.

Loading is ``models/pretrained.py``'s (diffusers folders, A1111/ComfyUI single files), LoRA targets and key
names are ``lora.py`` / ``models/key_names.py``'s; SDXL (``sdxl.py``) is this family plus pooled text and
size conditioning.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..run_folder import FINAL_DIR, LORA_FILE, MODEL_JSON
from .base import ModelFamily, register
from .sd_preview import draw_base, preview

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@lru_cache(maxsize=16)
def _variant(path: str, stamp: tuple[int, int], allow_pickle: bool) -> str | None:
    from ..models import pretrained as P

    p = Path(path)
    if p.is_dir():
        if (p / MODEL_JSON).is_file():  # its UNet folder looks like SD's, but it is the scratch family's model
            return None
        unet_cfg = p / "unet" / "config.json"
        if not unet_cfg.is_file() or P._read_json(unet_cfg).get("_class_name") not in (None, "UNet2DConditionModel"):
            return None
        return P.detect_family(p)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        keys = P._safetensors_keys(p)
    elif suffix in P.PICKLE_SUFFIXES:  # only SD loads pickles: read (with the opt-in) to say which SD
        keys = {k: list(v.shape) for k, v in P.read_single_file(p, allow_pickle).items()}
    else:
        return None
    text = (P.LDM_CLIP, P.LDM_OPEN_CLIP, P.LDM_XL_CLIP, P.LDM_XL_OPEN_CLIP)
    sd_unet = P.LDM_UNET + "input_blocks."  # FLUX.1 files under ComfyUI's prefix have no input_blocks
    if not any(k.startswith(text) or k.startswith(sd_unet) for k in keys):
        return None
    family = P._family_of_keys(keys, str(p))  # raises the clear refusals (refiner, UNet without text encoder)
    if family == "sd2" and suffix == ".safetensors" and P._sidecar_prediction(p) == "v_prediction":
        family = "sd2-v"
    return family


def sd_variant(path: Path, allow_pickle: bool = False) -> str | None:
    """sd1 / sd2 / sd2-v / sdxl of a Stable Diffusion checkpoint, None when ``path`` is not one (read once
    for SD and SDXL alike: keyed by the file's modification time and size)."""
    st = path.stat()
    return _variant(str(path), (st.st_mtime_ns, st.st_size), allow_pickle)


@register
class SDFamily(ModelFamily):
    """SD 1.x / 2.x: ``comps`` are ``models.pretrained.Components``; the job's ``unet`` is the UNet."""

    name = "sd"
    label = "Stable Diffusion 1.x/2.x"
    variants = ("sd1", "sd2", "sd2-v")
    vae_upcast = False  # whether the VAE stays fp32 under fp16 compute (SDXL's overflows)
    pooled_text = False  # whether the text conditioning carries a pooled embedding (SDXL)

    @classmethod
    def detect(cls, path: Path, allow_pickle: bool = False) -> bool:
        return sd_variant(path, allow_pickle) in cls.variants

    @classmethod
    def describe(cls, path: Path) -> str:
        from ..models.pretrained import detect_family

        return f"Stable Diffusion checkpoint, family {detect_family(path)}"

    @classmethod
    def check_config(cls, cfg: Any, world: Any = None) -> None:
        from ..errors import ConfigError

        if cfg.memory.stream_blocks and world is not None and world.distributed:
            raise ConfigError("memory.stream_blocks is not supported with several processes yet (DDP would see "
                              "UNet tensors in host memory)", "train in one process, or use --set memory.stream_blocks=0")

    @classmethod
    def workload(cls, cfg: Any, res: int, batch: int, extra: str, common: dict[str, Any]) -> Any:
        from ..memory.run_workload import sd_workload

        return sd_workload(cfg, res, batch, extra, common)

    # -- loading -------------------------------------------------------------------------------------
    def load(self) -> Any:
        from ..train.finetune_models import load_base

        return load_base(self.cfg)

    def prepare(self, comps: Any) -> list[str]:
        from ..train.finetune_models import prepare_unet, type_helpers

        notes = type_helpers(self.cfg, comps, self.text_encoders(comps), self.vae_upcast)
        return notes + prepare_unet(self.cfg, comps, self.text_encoders(comps), self.device)

    def bind(self, job: Any) -> list[nn.Module]:
        comps = job.c
        self.alphas_cumprod = comps.training_scheduler().alphas_cumprod.float()
        job.prediction = comps.prediction_type
        self.pipe = comps.pipeline()
        self.pipe.set_progress_bar_config(disable=True)
        # memory.text_encoders=sequential / cpu: the frozen text encoders stay off the card (train/text_cache.py)
        self.text_place = "card" if job.train_text else self.cfg.memory.text_encoders
        tes = [] if job.train_text or self.text_place != "card" else list(self.text_encoders(comps).values())
        frozen = [m for m in (comps.vae, *tes) if m is not None]
        for m in frozen:
            m.to(self.device)
        if self.text_place == "sequential":
            from ..train.text_cache import visit_device

            visit_device(self.text_encoders(comps).values(), self.device)
        self.preview_text: Any = None  # text_cache.PreviewText once the captions are cached
        return frozen

    def text_encoders(self, comps: Any) -> dict[str, nn.Module]:
        return {n: m for n in TEXT_ENCODERS if (m := getattr(comps, n, None)) is not None}

    def trainable_modules(self, job: Any) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"unet": job.unet}
        if job.train_text:
            mods.update(self.text_encoders(job.c))
        return mods

    def denoiser_to_card(self, job: Any) -> list[str]:
        from ..train.finetune_models import stream_unet

        if self.cfg.memory.stream_blocks:
            return [stream_unet(job.unet, self.cfg, self.device)]
        job.unet.to(self.device)
        return []

    def summary(self, job: Any, notes: list[str]) -> str:
        return (f"{self.cfg.run.task} fine-tune of {job.c.family} ({job.c.prediction_type}) from "
                f"{self.cfg.model.pretrained}; " + "; ".join(notes))

    # -- text ----------------------------------------------------------------------------------------
    def encode_text(self, job: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        """What the pipeline feeds the UNet for ``captions`` (its own ``encode_prompt``, so training and
        inference condition alike)."""
        embeds, _ = self.pipe.encode_prompt(captions, self.text_device(), 1, False)
        return {"embeds": embeds}

    def text_device(self) -> torch.device:
        """Where the frozen text encoders encode: the training device, or the CPU (``memory.text_encoders``)."""
        from ..train.text_cache import encode_device

        return encode_device(getattr(self, "text_place", "card"), self.device)

    def preview_captions(self, job: Any) -> set[str]:
        """What the previews encode (prompts, negatives, the empty prompt): cached with the captions."""
        from ..train.prompts import parse_prompt_line
        from ..train.text_cache import preview_strings

        specs = [parse_prompt_line(p) for p in job.sample_prompts]
        neg = self.cfg.sample.negative_prompt
        return preview_strings([s.prompt for s in specs], [s.negative if s.negative is not None else neg for s in specs])

    def cache_preview_text(self, job: Any) -> None:
        """The preview prompts' text from the cache; the text encoders never come back to the card for previews."""
        from ..train.text_cache import PreviewText

        self.preview_text = PreviewText.from_cache(job.data.text.get, self.preview_captions(job), self.pooled_text,
                                                   self.zero_negative())

    def zero_negative(self) -> bool:
        return self.pooled_text and bool(self.pipe.config.get("force_zeros_for_empty_prompt", False))

    def text_identity(self, job: Any) -> str:
        from ..data.cache import module_identity

        parts = []
        for name, te in self.text_encoders(job.c).items():
            tok = job.c.tokenizer if name == "text_encoder" else job.c.tokenizer_2
            # wrapped: module_identity reads ``config`` as a dict, a transformers config is not one
            parts.append(module_identity(nn.ModuleDict({name: te}), extra={
                "config": te.config.to_dict(), "encode": "pipeline.encode_prompt", "family": job.c.family,
                "pad": str(tok.pad_token), "max_length": tok.model_max_length}))
        return "+".join(parts)

    def drop(self, captions: list[str], keep: torch.Tensor) -> list[str]:
        """Guidance dropout before encoding: SD 1.x/2.x were trained with the embedding of ""."""
        return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]

    def drop_encoded(self, cond: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """Guidance dropout after encoding (SDXL zeroes the dropped rows); SD 1.x/2.x: nothing more."""
        return cond

    def conditioning(self, job: Any, captions: list[str], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Text conditioning with guidance dropout: a share ``data.caption_dropout`` gets the empty prompt."""
        from contextlib import nullcontext

        keep = torch.rand(len(captions), generator=gen) >= self.cfg.data.caption_dropout
        captions = self.drop(captions, keep)
        if job.data.text is not None:
            cond = job.data.text.get(captions)
            if isinstance(cond, torch.Tensor):  # a cache read back from disk has no structure names
                cond = {"embeds": cond}
            cond = {k: v.to(self.device) for k, v in cond.items()}
        else:
            grad = torch.enable_grad() if job.train_text and torch.is_grad_enabled() else torch.no_grad()
            ctx = nullcontext() if job.train_text else job.frozen_models_on_device()
            with grad, ctx:
                cond = self.encode_text(job, captions)
        return self.drop_encoded(cond, keep)

    # -- the loss ------------------------------------------------------------------------------------
    def unet_kwargs(self, batch: dict[str, Any], cond: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        return None

    def loss(self, job: Any, batch: dict[str, Any], gen: torch.Generator, reduce: bool) -> torch.Tensor:
        from ..train.step import compute_loss

        cond = self.conditioning(job, batch["captions"], gen)
        return compute_loss(job.unet, batch["x0"].to(self.device), cond["embeds"], alphas_cumprod=self.alphas_cumprod,
                            prediction=job.prediction, generator=gen, unet_kwargs=self.unet_kwargs(batch, cond),
                            snr_gamma=self.cfg.train.snr_gamma, reduce=reduce, loss_weights=batch.get("loss_weights"))

    # -- previews ------------------------------------------------------------------------------------
    def pipeline_kwargs(self, height: int, width: int) -> dict[str, Any]:
        """What else the pipeline is called with for an image of this size (SDXL: its size conditioning)."""
        return {}

    def preview(self, job: Any) -> Any:
        return preview(job, self)

    def draw_base(self, job: Any, prompt: str, seed: int) -> torch.Tensor:
        return draw_base(job, self, prompt, seed)

    # -- saving --------------------------------------------------------------------------------------
    def save_lora(self, job: Any, step: int, kohya_path: Path | None = None) -> dict[str, Path]:
        """Write the LoRA as diffusers/peft (``lora/pytorch_lora_weights.safetensors``) and kohya files."""
        from ..lora import save_lora_diffusers, save_lora_kohya_from_models

        tes = self.text_encoders(job.c) if job.train_text else {}
        meta = job.metadata(step)
        diff = save_lora_diffusers(job.run_dir / LORA_FILE, job.unet, tes, job.c.family, meta)
        kohya = save_lora_kohya_from_models(kohya_path or job.run_dir / "lora" / f"{job.lora_name}.safetensors",
                                            job.unet, tes, job.c.family, meta, steps=step)
        return {"diffusers": diff, "kohya": kohya}

    def save_model(self, job: Any, step: int) -> Path:
        """Full fine-tune: the whole pipeline as a diffusers folder and as one A1111/ComfyUI file."""
        from ..fsutil import atomic_dir, save_safetensors_atomic
        from ..models.key_names import canonicalize_pipeline_folder
        from ..models.ldm_convert import pipeline_to_ldm

        out = job.run_dir / FINAL_DIR
        with atomic_dir(out) as tmp:  # both files of one step appear together, or neither
            self.pipe.save_pretrained(tmp / "diffusers")
            canonicalize_pipeline_folder(tmp / "diffusers")  # text_model.… keys, loadable by transformers 4.x too
            sd = pipeline_to_ldm(job.unet, job.c.vae, self.text_encoders(job.c), job.c.family)
            meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in job.metadata(step).items()
                    if k.startswith("lowvram_") and k != "lowvram_unet_config"}
            save_safetensors_atomic(sd, tmp / f"{job.lora_name}.safetensors", {**meta, "format": "pt"})
        return out
