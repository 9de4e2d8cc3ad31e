"""Loss masks (masked loss): which pixels of a training image the loss counts, and how much.

Where an image's mask comes from, first match wins (the peers' conventions):

- ``<stem>-masklabel.png`` beside the image (OneTrainer's name);
- a file with the image's relative path and stem, any image extension, under ``data.mask_dir`` (kohya's
  ``conditioning_data_dir`` and SimpleTuner's mask dataset: same file names in another folder);
- with ``data.masked_loss = alpha``, the image's own transparency (kohya's ``alpha_mask``).

White (255) trains fully, black (0) not at all, gray in between (the mask's luminance / 255, as kohya reads
a grayscale mask). A mask is resized and cropped exactly like its image, flipped with it, and reduced to the
latent grid by area averaging (``F.interpolate(mode="area")``, what kohya and SimpleTuner do): a latent
cell's weight is the mean weight of the pixels it covers. Masked-out cells then weigh
``data.unmasked_weight`` (OneTrainer's floor; 0 by default: they do not count at all).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from . import images

MASK_SUFFIX = "-masklabel"
ALPHA = "alpha"  # ImageRecord.mask of an image masked by its own transparency
MASKED_LOSS = ("auto", "alpha", "off")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def is_mask_name(name: str | Path) -> bool:
    """True for OneTrainer-style mask files (``x-masklabel.png``): never a training image."""
    return Path(name).stem.endswith(MASK_SUFFIX)


def mask_dir_index(mask_dir: str) -> dict[str, Path]:
    """The image files under ``mask_dir`` by their relative path without extension (``sub/cat``), read once."""
    root = Path(mask_dir).expanduser()
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*")) if mask_dir and root.is_dir() else []:
        if path.is_file() and images.is_image_name(path) and not path.name.startswith("."):
            out.setdefault(path.relative_to(root).with_suffix("").as_posix(), path)
    return out


def mask_file(image: Path, rel: str, mask_dir_files: dict[str, Path] | None = None) -> Path | None:
    """The mask file of ``image`` (``rel``: its path relative to the data folder), or None.
    ``mask_dir_files``: ``mask_dir_index(data.mask_dir)``."""
    beside = image.with_name(image.stem + MASK_SUFFIX + ".png")
    if beside.is_file():
        return beside
    return (mask_dir_files or {}).get(Path(rel).with_suffix("").as_posix())


def has_alpha(path: str | Path) -> bool:
    """Whether the image file carries transparency (header only)."""
    try:
        with Image.open(path) as img:
            return img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)
    except Exception:  # the image check reports unreadable files; no mask is not an error here
        return False


def _mask_image(source: str, image_path: str, max_pixels: int) -> Image.Image:
    """The mask as an 8-bit gray image, upright (EXIF), before any resizing."""
    path = image_path if source == ALPHA else source
    img = images._open(Path(path), max_pixels)
    with img:
        images._full_decode(img)
        try:
            upright = ImageOps.exif_transpose(img)
        except Exception:  # malformed EXIF: keep the pixels as stored, as load_rgb does
            upright = img
        if source == ALPHA:
            return upright.convert("RGBA").getchannel("A")
        return upright.convert("L")


def load_mask(source: str, image_path: str, image_size: tuple[int, int], size: tuple[int, int],
              crop: str = "center", rng: random.Random | None = None,
              max_pixels: int = images.DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """A mask [1, H, W] in [0, 1] at bucket ``size`` (w, h), cropped as the image of ``image_size`` (w, h) is.

    ``source``: a mask file path or ``ALPHA``; ``rng``: the image's crop generator (a fresh one seeded
    alike), so a random crop cuts the same window. A mask of another size is first stretched to the image's.
    """
    img = _mask_image(source, image_path, max_pixels)
    if img.size != tuple(image_size):
        img = img.resize(tuple(image_size), Image.Resampling.BILINEAR)
    img = images.resize_cover_crop(img, size, crop, rng)
    arr = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, size[1], size[0])
    return arr.float().div_(255.0)


def to_latent_grid(mask: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Masks [B, 1, H, W] reduced to the latent grid ``size`` (h, w) by area averaging (kohya, SimpleTuner)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask.float(), size=tuple(size), mode="area")


def loss_weights(mask: torch.Tensor, unmasked_weight: float = 0.0) -> torch.Tensor:
    """Per-cell loss weights: the mask, raised to at least ``unmasked_weight`` (OneTrainer's clamp)."""
    return mask.clamp(min=float(unmasked_weight), max=1.0) if unmasked_weight > 0 else mask


def batch_weights(batch_masks: list[torch.Tensor | None], grid: tuple[int, int] | torch.Size,
                  unmasked_weight: float = 0.0) -> torch.Tensor | None:
    """Loss weights [B, 1, h, w] on the latent ``grid`` for a batch whose images may have a mask (None: no
    mask, weight 1 everywhere); None when no image of the batch has one (the plain loss is used)."""
    if all(m is None for m in batch_masks):
        return None
    h, w = tuple(grid)
    rows = [torch.ones(1, 1, h, w) if m is None else to_latent_grid(m.float()[None], (h, w)) for m in batch_masks]
    return loss_weights(torch.cat(rows), unmasked_weight)
