"""DreamBooth class images drawn by the base model when the class folder holds fewer than ``data.num_class_images``.

What diffusers' DreamBooth scripts do, made resumable: the generated images are numbered
(``class-00000.png`` …, each with its prompt in ``class-00000.txt``), image ``k`` is drawn with the seed
``(run.seed, k)``, and every file is written to a hidden temporary name and renamed, so a folder never
holds half an image. A later run counts the usable images there (the user's own included) and draws
only the missing numbers: an interrupted generation continues where it stopped, with the very images an
uninterrupted one would have drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..errors import DataError
from ..fsutil import atomic_write, write_text_atomic
from . import images
from .sources import _walk_images

NAME = "class-{:05d}"
PREFIX = "class-"


def usable_images(folder: Path) -> int:
    """Image files in ``folder`` (nested, hidden ones and loss masks aside) whose header reads."""
    n = 0
    for path in _walk_images(folder) if folder.is_dir() else []:
        try:
            images.check_image(path, full=False, min_size=0)
            n += 1
        except images.ImageProblem:
            pass
    return n


def missing_numbers(folder: str | Path, wanted: int) -> list[int]:
    """The numbers of the class images to draw so that ``folder`` holds ``wanted`` usable images: the
    smallest numbers whose ``class-NNNNN.png`` is not there yet."""
    folder = Path(folder).expanduser()
    need = wanted - usable_images(folder)
    out: list[int] = []
    k = 0
    while len(out) < need:
        if not (folder / f"{NAME.format(k)}.png").is_file():
            out.append(k)
        k += 1
    return out


def image_seed(seed: int, k: int) -> int:
    """The sampling seed of class image ``k``: a function of the run seed and the number only."""
    return (seed * 1_000_003 + k) % (2**63)


def to_pil(image: torch.Tensor) -> object:
    """[3, H, W] in [-1, 1] -> an 8-bit RGB PIL image."""
    from PIL import Image

    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(arr.numpy(), "RGB")


def generate(folder: str | Path, numbers: Iterable[int], prompt: str, seed: int,
             draw: Callable[[str, int], torch.Tensor], echo: Callable[[str], None] | None = print,
             stop: Callable[[], bool] = lambda: False) -> list[Path]:
    """Draw class image ``k`` for each number with ``draw(prompt, image_seed(seed, k))`` ([3, H, W] in
    [-1, 1]) and write it with its caption; returns the images written. ``stop`` (Ctrl-C, SIGTERM) is
    polled between images: the images written so far stay, a later run draws the rest."""
    if not prompt.strip():
        raise DataError("class images cannot be generated without a prompt (data.class_prompt is empty)",
                        "set data.class_prompt, e.g. 'a photo of a dog'")
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{PREFIX}*.tmp"):  # a killed run's half-written file
        stale.unlink(missing_ok=True)
    from tqdm import tqdm

    numbers = list(numbers)
    if echo is not None:
        echo(f"class images: drawing {len(numbers)} with the base model into {folder} ({prompt!r})")
    written = []
    for k in tqdm(numbers, desc="class images", unit="img", disable=echo is None):
        if stop():
            break
        base = folder / NAME.format(k)
        # temp files are hidden (".class-….tmp"): never listed as an image, even if left behind
        write_text_atomic(base.with_suffix(".txt"), prompt + "\n", fsync=True)
        img = to_pil(draw(prompt, image_seed(seed, k)))
        atomic_write(base.with_suffix(".png"), lambda p, img=img: img.save(p, format="PNG"), fsync=True)  # type: ignore[attr-defined]
        written.append(base.with_suffix(".png"))
    return written
