"""The data knobs of a run as the dataset reads them (``DataSettings``), checked and defaulted once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import ImageColor

from ..errors import DataError
from . import images, masks
from .captions import MISSING_CAPTION_RULES, CaptionRules


@dataclass(frozen=True)
class DataSettings:
    """Every data knob, read from ``cfg.data`` with defaults for fields config.py does not have yet."""

    source: str = "builtin"
    format: str = "auto"
    resolution: int = 32
    num_images: int = 4096
    caption_dropout: float = 0.0
    flip: bool = False
    workers: int = 2
    caption_ext: str = ".txt"
    crop: str = "center"
    buckets: bool = True
    bucket_step: int = 64
    bucket_max_ratio: float = 4.0
    keep_tokens: int = 0
    shuffle_tags: bool = False
    caption_prefix: str = ""
    caption_suffix: str = ""
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    min_size: int = images.DEFAULT_MIN_SIZE
    background: str = "white"
    celeba_split: str = "train"
    missing_caption: str = "auto"
    cache_dir: str = ""
    masked_loss: str = "auto"
    mask_dir: str = ""
    builtin_exclude: tuple[str, ...] = ()
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any, *, resolution: int | None = None) -> DataSettings:
        """From a RunConfig (uses ``cfg.data`` and ``cfg.run.seed``) or a DataSection alone.

        ``data.resolution = None`` means "the model's": pass it as ``resolution`` (else 32 is used).
        """
        data = getattr(cfg, "data", cfg)
        run = getattr(cfg, "run", None)
        values = {f: getattr(data, f) for f in cls.__dataclass_fields__ if hasattr(data, f)}
        values = {k: v for k, v in values.items() if v is not None}  # None: "use the default"
        if "builtin_exclude" in values:
            values["builtin_exclude"] = tuple(values["builtin_exclude"])
        if resolution is not None:
            values["resolution"] = resolution
        if run is not None and hasattr(run, "seed"):
            values["seed"] = run.seed
        out = cls(**values)
        out.check()
        return out

    def check(self) -> None:
        problems = []
        if self.crop not in ("center", "random"):
            problems.append(f"data.crop = {self.crop!r}: expected center or random")
        if self.masked_loss not in masks.MASKED_LOSS:
            problems.append(f"data.masked_loss = {self.masked_loss!r}: expected one of " + ", ".join(masks.MASKED_LOSS))
        if self.mask_dir and not Path(self.mask_dir).expanduser().is_dir():
            problems.append(f"data.mask_dir = {self.mask_dir!r}: not a folder")
        if self.missing_caption not in MISSING_CAPTION_RULES:
            problems.append(f"data.missing_caption = {self.missing_caption!r}: expected one of "
                            + ", ".join(MISSING_CAPTION_RULES))
        if self.bucket_step < 8 or self.bucket_step % 8:
            problems.append(f"data.bucket_step = {self.bucket_step}: expected a multiple of 8")
        if self.keep_tokens < 0:
            problems.append(f"data.keep_tokens = {self.keep_tokens}: expected 0 or more")
        if self.max_pixels <= 0 or self.min_size < 0:
            problems.append("data.max_pixels must be above 0 and data.min_size 0 or more")
        try:
            self.background_rgb()
        except ValueError:
            problems.append(f"data.background = {self.background!r}: expected a colour name, #rrggbb or r,g,b")
        if problems:
            raise DataError("invalid data settings: " + "; ".join(problems), "fix these data.* values")

    def background_rgb(self) -> tuple[int, int, int]:
        text = self.background.strip()
        if "," in text:
            parts = tuple(int(p) for p in text.split(","))
            if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
                raise ValueError(text)
            return parts  # type: ignore[return-value]
        return ImageColor.getrgb(text)[:3]

    def caption_rules(self) -> CaptionRules:
        return CaptionRules(self.caption_dropout, self.shuffle_tags, self.keep_tokens,
                            self.caption_prefix, self.caption_suffix)
