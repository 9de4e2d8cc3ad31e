"""The SDXL family: SD's UNet objective plus two text encoders (pooled text) and size conditioning (time ids).

Everything else (loading, LoRA targets and kohya names, previews, saving) is the SD family's with SDXL's
pipeline, which ``models/pretrained.py`` builds from the loaded components.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .base import register
from .sd import SDFamily, sd_variant


def sdxl_time_ids(original: tuple[int, int], target: tuple[int, int]) -> list[float]:
    """SDXL's size conditioning (orig h, w, crop top, left, target h, w) for a resize-to-cover + centre crop."""
    (oh, ow), (th, tw) = original, target
    scale = max(tw / ow, th / oh)
    nw, nh = max(tw, round(ow * scale)), max(th, round(oh * scale))
    return [float(oh), float(ow), float((nh - th) // 2), float((nw - tw) // 2), float(th), float(tw)]


@register
class SDXLFamily(SDFamily):
    """SDXL base: CLIP-L + OpenCLIP bigG text (``embeds`` and the pooled ``pooled``), time ids per image."""

    name = "sdxl"
    label = "SDXL"
    variants = ("sdxl",)
    vae_upcast = True  # SDXL's VAE overflows in fp16 and stays fp32 there (the profiler builds it so too)
    pooled_text = True  # its text conditioning carries CLIP bigG's pooled embedding (and time ids)

    @classmethod
    def detect(cls, path: Path, allow_pickle: bool = False) -> bool:
        return sd_variant(path, allow_pickle) in cls.variants

    def encode_text(self, job: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own ``encode_prompt``: ``embeds`` and the pooled ``pooled`` embedding."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(captions, device=self.text_device(), num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return {"embeds": embeds, "pooled": pooled}

    def drop(self, captions: list[str], keep: torch.Tensor) -> list[str]:
        return captions  # dropped after encoding, as zeros

    def drop_encoded(self, cond: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """The dropped rows become zeros, as SDXL was trained and as its pipeline samples."""
        mask = keep.to(self.device)
        return {k: v * mask.view(-1, *([1] * (v.dim() - 1))).to(v.dtype) for k, v in cond.items()}

    def batch_extras(self, job: Any, ds: Any, plans: list[Any], x0: torch.Tensor) -> dict[str, Any]:
        """Each image's size conditioning: its original size (from the folder's records) and the crop."""
        target = (x0.shape[-2] * job.vae_factor(), x0.shape[-1] * job.vae_factor())
        records = getattr(ds, "records", None)
        ids = []
        for p in plans:
            rec = records[p.source] if records is not None else None
            original = (rec.height, rec.width) if rec is not None else target
            ids.append(sdxl_time_ids(original, target))
        return {"time_ids": torch.tensor(ids)}

    def unet_kwargs(self, batch: dict[str, Any], cond: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        return {"added_cond_kwargs": {"text_embeds": cond["pooled"],
                                      "time_ids": batch["time_ids"].to(self.device, cond["pooled"].dtype)}}

    def pipeline_kwargs(self, height: int, width: int) -> dict[str, Any]:
        return {"original_size": (height, width), "target_size": (height, width)}

    def metadata(self, job: Any, meta: dict[str, Any]) -> dict[str, Any]:
        """kohya's SDXL names need the UNet layout; export reads it from here."""
        meta["lowvram_unet_config"] = {k: v for k, v in dict(job.unet.config).items() if not k.startswith("_")}
        return meta
