"""Safe image loading: header checks, full decode, and conversion of every PIL mode to 8-bit RGB.

A file either becomes an RGB ``PIL.Image`` or raises ``ImageProblem`` with a short reason code that
the data report counts (``empty_file``, ``not_an_image``, ``truncated`` …); nothing else escapes.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"}
)
# What each extension claims; a mismatch with the decoded format is only a warning (content decides).
_EXT_FORMATS = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".webp": "WEBP",
    ".bmp": "BMP", ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF", ".avif": "AVIF",
}
_EQUIVALENT_FORMATS = {"MPO": "JPEG"}  # phone cameras write MPO; it is a JPEG with extra frames

# warnings.catch_warnings swaps process-wide filters and is not thread-safe: validation opens files
# from several threads, so the (cheap, header-only) open is serialised.
_OPEN_LOCK = threading.Lock()

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own warning threshold (~ 9459 x 9459)
DEFAULT_MIN_SIZE = 16
DEFAULT_BACKGROUND = (255, 255, 255)

# Reason codes: a file with one of these is skipped and listed in data_report.json.
EMPTY_FILE = "empty_file"
UNREADABLE = "unreadable"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
TOO_LARGE = "too_large"
TOO_SMALL = "too_small"


class ImageProblem(Exception):
    """An image file that cannot be used; ``reason`` is one of the codes above."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass
class ImageInfo:
    """What a full check learned about one usable file: its size after EXIF rotation and any notes."""

    width: int
    height: int
    format: str
    notes: list[tuple[str, str]] = field(default_factory=list)  # (warning kind, detail)


def file_sha256(path: str | Path) -> str:
    """The content hash used as the image's identity in the report and the latent cache."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _allow_pixels(max_pixels: int) -> None:
    # PIL's bomb limit is process-wide; we only ever raise it (to honour a larger data.max_pixels),
    # never lower it nor switch it off. Our own per-call check below enforces max_pixels.
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only), mapping every failure to an ImageProblem."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageProblem(UNREADABLE, str(e)) from None
    if size == 0:
        raise ImageProblem(EMPTY_FILE, "the file is 0 bytes")
    _allow_pixels(max_pixels)
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageProblem(TOO_LARGE, f"declared size over the pixel limit ({e})") from None
    except UnidentifiedImageError:
        raise ImageProblem(NOT_AN_IMAGE, "not an image format Pillow can read") from None
    except PermissionError as e:
        raise ImageProblem(UNREADABLE, str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageProblem(_decode_reason(e), f"cannot read the header: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageProblem(TOO_LARGE, f"{w}x{h} = {w * h} pixels, over the limit of {max_pixels} (data.max_pixels)")
    return img


def _decode_reason(e: BaseException) -> str:
    text = str(e).lower()
    if any(s in text for s in ("truncated", "broken data stream", "premature end", "unexpected end")):
        return TRUNCATED
    if isinstance(e, EOFError):
        return TRUNCATED
    return CORRUPT


def _full_decode(img: Image.Image) -> None:
    try:
        img.load()  # the bomb check already ran in Image.open, from the header
    except Image.DecompressionBombError as e:
        raise ImageProblem(TOO_LARGE, str(e)) from None
    except MemoryError:
        raise ImageProblem(TOO_LARGE, "out of memory while decoding") from None
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, …
        raise ImageProblem(_decode_reason(e), f"decode failed: {e}") from None


def to_rgb(img: Image.Image, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha composited on ``background``, 16-bit scaled, CMYK/P/L mapped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit sources (I;16*, and PNG 16-bit opened as "I") span 0..65535; "F" is assumed 0..255.
        scale = 1.0 if mode == "F" else (257.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0)
        arr = np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def check_image(
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
    full: bool = True,
) -> ImageInfo:
    """Validate one file (header, then a full decode when ``full``); raises ImageProblem if unusable."""
    path = Path(path)
    img = _open(path, max_pixels)
    with img:
        notes: list[tuple[str, str]] = []
        fmt = img.format or "?"
        claimed = _EXT_FORMATS.get(path.suffix.lower())
        if claimed and _EQUIVALENT_FORMATS.get(fmt, fmt) != claimed:
            notes.append(("extension_mismatch", f"named {path.suffix} but the content is {fmt}; the content is used"))
        frames = getattr(img, "n_frames", 1)
        if frames > 1 and fmt != "MPO":
            notes.append(("animated", f"{frames} frames; the first frame is used"))
        if full:
            _full_decode(img)
        w, h = _oriented_size(img)
    if min(w, h) < min_size:
        raise ImageProblem(TOO_SMALL, f"{w}x{h}, shorter side below the minimum of {min_size} (data.min_size)")
    return ImageInfo(w, h, fmt, notes)


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not a reason to drop the picture
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_rgb(
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode a file to an upright 8-bit RGB image (EXIF rotation applied, first frame of animations).

    ``draft_size`` lets JPEG decode at a reduced scale that still covers that size: much faster for
    large photos that are about to be downscaled anyway.
    """
    path = Path(path)
    img = _open(path, max_pixels)
    with img:
        if draft_size is not None and img.format in ("JPEG", "MPO"):
            side = max(draft_size)
            try:
                img.draft(img.mode if img.mode in ("RGB", "L") else None, (side, side))
            except Exception:  # draft is only an optimisation
                pass
        _full_decode(img)
        try:
            upright = ImageOps.exif_transpose(img)
        except Exception:  # malformed EXIF: keep the pixels as stored
            upright = img
        rgb = to_rgb(upright, background)
        rgb.load()
        return rgb.copy() if rgb is img else rgb


def resize_cover_crop(
    img: Image.Image, size: tuple[int, int], crop: str = "center", rng: random.Random | None = None
) -> Image.Image:
    """Resize so the image covers ``size`` (w, h) keeping its aspect ratio, then crop to exactly ``size``."""
    tw, th = size
    w, h = img.size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, math.ceil(w * scale - 1e-6)), max(th, math.ceil(h * scale - 1e-6))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0 if scale < 0.5 else None)
    if crop == "random" and rng is not None:
        left, top = rng.randint(0, nw - tw), rng.randint(0, nh - th)
    else:
        left, top = (nw - tw) // 2, (nh - th) // 2
    if (left, top, nw, nh) != (0, 0, tw, th):
        img = img.crop((left, top, left + tw, top + th))
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB uint8 image -> float32 tensor [3, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def is_image_name(path: str | Path) -> bool:
    """True for file names with an image extension (case-insensitive)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS
