"""The built-in dataset: coloured shapes on coloured backgrounds, generated procedurally (no download).

It is what ``lowvram train`` uses out of the box, and it comes with an attribute *decoder* so that
prompt adherence of a trained model can be measured honestly (``lowvram eval``).

Caption template (the only one): ``"a {colour} {shape} on a {background} background"``, e.g.
``"a red circle on a white background"``. Attributes:

- shape: circle, square, triangle (upright, isosceles)
- colour (of the shape): red, green, blue, yellow
- background: black, white, gray

Shape and background palettes are disjoint, so every one of the 36 combinations is a valid image.
Each image jitters the shape's size (65-75 % of the side) and its position around the centre (a margin
of 2 pixels at 32 px is kept free, so the border always shows the background). Large shapes are on
purpose: a square's corners then span several pixels, so a model trained for minutes draws them and
the decoder can tell a square from a circle (at 55-65 % the default job reached 77 % adherence at
1,200 steps, at 65-75 % 81 % by step 600).
"""

from __future__ import annotations

import re
from collections import deque

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..errors import DataError

CAPTION_TEMPLATE = "a {colour} {shape} on a {background} background"

# RGB in 0..255; shape colours are saturated, backgrounds neutral, so every pair is far apart.
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# The vocabulary: attribute name -> allowed values.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(SHAPE_COLOURS),
    "background": tuple(BACKGROUNDS),
}

# Holdout items come from a different seed stream, so they never coincide with training items.
HOLDOUT_SEED_OFFSET = 1_000_003
_SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges like a real photo of a shape
_MARGIN = 2  # pixels kept free at the border (at 32 px); the decoder reads the background there
_SIZE = (0.65, 0.75)  # shape side as a share of the image side
_SHIFT = 0.06  # largest offset of the shape from the centre, as a share of the image side

_CAPTION_RE = re.compile(r"^\s*a (\w+) (\w+) on a (\w+) background\s*$")


def caption_of(attrs: dict[str, str]) -> str:
    """The caption of an attribute dict, in the one template."""
    return CAPTION_TEMPLATE.format(**attrs)


def attributes_of_caption(caption: str) -> dict[str, str]:
    """Parse a caption of the template back into ``{"shape", "colour", "background"}``.

    Raises ``DataError`` for text that is not of the template or names an unknown attribute value.
    """
    m = _CAPTION_RE.match(caption.lower())
    if not m:
        raise DataError(
            f"prompt {caption!r} is not of the built-in dataset's form",
            f"write prompts like {CAPTION_TEMPLATE!r}, e.g. 'a red circle on a white background'",
        )
    attrs = {"colour": m.group(1), "shape": m.group(2), "background": m.group(3)}
    for key, value in attrs.items():
        if value not in ATTRIBUTES[key]:
            raise DataError(
                f"prompt {caption!r} names an unknown {key} '{value}'",
                f"use one of: {', '.join(ATTRIBUTES[key])}",
            )
    return attrs


def all_captions() -> list[str]:
    """Every caption the dataset can produce (36), used to build the tokenizer's vocabulary."""
    return [
        caption_of({"shape": s, "colour": c, "background": b})
        for s in SHAPES
        for c in SHAPE_COLOURS
        for b in BACKGROUNDS
    ]


def eval_prompts() -> list[str]:
    """12 fixed prompts: each shape 4x, each colour 3x, each background 4x, each (colour, background) once."""
    shapes, colours, bgs = SHAPES, tuple(SHAPE_COLOURS), tuple(BACKGROUNDS)
    return [
        caption_of({"shape": shapes[i % 3], "colour": colours[i % 4], "background": bgs[i // 4]})
        for i in range(12)
    ]


def render(attrs: dict[str, str], resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one image (uint8 HxWx3) with the given attributes and random size/position jitter."""
    s = _SUPERSAMPLE
    side = resolution * s
    img = Image.new("RGB", (side, side), BACKGROUNDS[attrs["background"]])
    draw = ImageDraw.Draw(img)
    margin = max(1, round(_MARGIN * resolution / 32))
    lo, hi = round(_SIZE[0] * resolution), round(_SIZE[1] * resolution)
    size = int(rng.integers(lo, hi + 1))
    # the shape sits near the centre: position varies, but a few-minute CPU run can still learn the shapes
    shift = round(_SHIFT * resolution)
    centre = (resolution - size) // 2
    x0 = int(np.clip(centre + rng.integers(-shift, shift + 1), margin, resolution - margin - size))
    y0 = int(np.clip(centre + rng.integers(-shift, shift + 1), margin, resolution - margin - size))
    box = (x0 * s, y0 * s, (x0 + size) * s - 1, (y0 + size) * s - 1)
    colour = SHAPE_COLOURS[attrs["colour"]]
    if attrs["shape"] == "circle":
        draw.ellipse(box, fill=colour)
    elif attrs["shape"] == "square":
        draw.rectangle(box, fill=colour)
    else:
        left, top, right, bottom = box
        draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=colour)
    img = img.resize((resolution, resolution), Image.Resampling.BOX)
    return np.array(img, dtype=np.uint8)


def exclude_problem(exclude: tuple[str, ...] | list[str]) -> tuple[str, str] | None:
    """(problem, what is expected) when ``exclude`` names an unknown value or leaves an attribute with none."""
    known = {v for values in ATTRIBUTES.values() for v in values}
    unknown = sorted(set(exclude) - known)
    if unknown:
        return (f"data.builtin_exclude names unknown attribute values: {', '.join(unknown)}",
                "shapes, colours or backgrounds of the builtin data: " + ", ".join(sorted(known)))
    empty = [key for key, values in ATTRIBUTES.items() if set(values) <= set(exclude)]
    if empty:
        return f"data.builtin_exclude leaves no {empty[0]} to draw", "at least one value of each attribute left out of it"
    return None


def allowed_values(exclude: tuple[str, ...] | list[str] = ()) -> dict[str, tuple[str, ...]]:
    """``ATTRIBUTES`` without the values in ``exclude`` (e.g. ``["yellow"]``: a concept held out of a base model).

    Every value names one attribute (the palettes are disjoint), so a bare value is unambiguous.
    """
    problem = exclude_problem(exclude)
    if problem:
        raise DataError(problem[0], f"set data.builtin_exclude to {problem[1]}")
    return {key: tuple(v for v in values if v not in exclude) for key, values in ATTRIBUTES.items()}


class ShapesDataset(Dataset):
    """``num_images`` shape images; item ``i`` depends only on ``(seed, i)``, so it is deterministic.

    Items: ``{"pixel_values": float32 [3, H, W] in [-1, 1], "caption": str, "key": str}``. Attributes
    are drawn uniformly, so all 36 combinations appear about equally often. ``exclude``: attribute values
    never drawn (the others keep their uniform share; without exclusions the items are unchanged).
    """

    def __init__(self, num_images: int, resolution: int = 32, seed: int = 0, exclude: tuple[str, ...] = ()) -> None:
        if num_images <= 0:
            raise DataError(f"the built-in dataset needs at least 1 image, got {num_images}",
                            "set data.num_images to a positive number")
        if resolution < 16:
            raise DataError(f"the built-in dataset needs a resolution of 16 or more, got {resolution}",
                            "set data.resolution to 16, 32 or 64")
        self.num_images = num_images
        self.resolution = resolution
        self.seed = seed
        self.values = allowed_values(exclude)

    def __len__(self) -> int:
        return self.num_images

    def attributes(self, index: int) -> dict[str, str]:
        """The attributes of item ``index`` (cheap: no drawing)."""
        return self._draw(index)[0]

    def _draw(self, index: int) -> tuple[dict[str, str], np.random.Generator]:
        rng = np.random.default_rng([self.seed, index])
        attrs = {key: values[int(rng.integers(len(values)))] for key, values in self.values.items()}
        return attrs, rng

    def __getitem__(self, index: int) -> dict[str, object]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        attrs, rng = self._draw(index)
        pixels = render(attrs, self.resolution, rng)
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0)
        return {"pixel_values": tensor, "caption": caption_of(attrs), "key": f"shapes-{self.seed}-{index:06d}"}


def holdout(num_images: int, resolution: int = 32, seed: int = 0, exclude: tuple[str, ...] = ()) -> ShapesDataset:
    """A validation split disjoint from ``ShapesDataset(..., seed=seed)`` (a different seed stream)."""
    return ShapesDataset(num_images, resolution, seed=seed + HOLDOUT_SEED_OFFSET, exclude=exclude)


def image_for_prompt(prompt: str, resolution: int = 32, seed: int = 0) -> torch.Tensor:
    """A generator image of the prompt's attributes ([3, H, W] in [-1, 1]); for tests and references."""
    pixels = render(attributes_of_caption(prompt), resolution, np.random.default_rng(seed))
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0)


# ---------------------------------------------------------------------------------------------------
# Decoding attributes back from an image (generated samples included).
# Thresholds were tuned on the generator's own images, then checked with Gaussian noise sigma 0.1.

_FG_DISTANCE = 0.30  # RGB distance (0..1 units) from the background that counts as shape; palette gaps >= 0.6
_MAX_COLOUR_DISTANCE = 0.35  # a colour farther than this from every palette entry is "no colour"
_MIN_AREA = 0.04  # shape area below this share of the image: no shape was drawn
_CIRCLE_MIN_FILL = 0.66  # mask area / bounding-box area: triangle ~0.6, circle ~0.76-0.88, square ~0.96+
_CORNER_SIZE = 0.3  # corner regions u + v < 0.3 (box-relative); a circle's edge passes at u + v ~ 0.29
_SQUARE_MIN_CORNER_FILL = 0.5  # share of corner pixels set: square ~1, circle ~0-0.1, triangle ~0.25
_TRIANGLE_MIN_FILL = 0.38
_TRIANGLE_MAX_TAPER = 0.6  # mean width of the top third / bottom third: triangle ~0.3, circle/square ~1


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str | None:
    names = list(palette)
    colours = np.array([palette[n] for n in names], dtype=np.float32) / 255.0
    dist = np.linalg.norm(colours - rgb[None, :], axis=1)
    best = int(dist.argmin())
    return names[best] if dist[best] <= _MAX_COLOUR_DISTANCE else None


def _majority_3x3(mask: np.ndarray) -> np.ndarray:
    """3x3 majority vote: removes isolated noisy pixels without moving the shape's edges much."""
    padded = np.pad(mask.astype(np.int32), 1)
    h, w = mask.shape
    total = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    return total >= 5


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (small images: a plain BFS is enough)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if labels[y, x]:
            continue
        label += 1
        labels[y, x] = label
        queue, size = deque([(y, x)]), 0
        while queue:
            cy, cx = queue.popleft()
            size += 1
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_label else np.zeros_like(mask)


def _shape_of(mask: np.ndarray) -> str | None:
    ys, xs = np.nonzero(mask)
    if len(ys) < _MIN_AREA * mask.size:
        return None
    top, left = ys.min(), xs.min()
    height, width = ys.max() - top + 1, xs.max() - left + 1
    if not 0.6 <= height / width <= 1.6:  # every shape of the generator has a square bounding box
        return None
    box = mask[top : top + height, left : left + width]
    fill = box.mean()
    rows = box.sum(axis=1)
    third = max(1, len(rows) // 3)
    # Upright triangle: the top third is much narrower than the bottom third (circle/square: equal).
    taper = rows[:third].mean() / max(rows[-third:].mean(), 1.0)
    if taper < _TRIANGLE_MAX_TAPER:
        return "triangle" if fill >= _TRIANGLE_MIN_FILL else None
    # Square vs circle: the box's corners. A circle leaves them empty, a square fills them — even
    # when a blurry sample rounds its corners a little (fill ratio alone confuses the two then).
    v = (np.arange(height) + 0.5)[:, None] / height
    u = (np.arange(width) + 0.5)[None, :] / width
    near = np.minimum(u, 1 - u) + np.minimum(v, 1 - v) < _CORNER_SIZE
    corner_fill = box[near].mean() if near.any() else 0.0
    if corner_fill >= _SQUARE_MIN_CORNER_FILL and fill >= _CIRCLE_MIN_FILL:
        return "square"
    if fill >= _CIRCLE_MIN_FILL:
        return "circle"
    return None


def decode_attributes(image: torch.Tensor) -> dict[str, str | None]:
    """Read ``{"shape", "colour", "background"}`` off an image [3, H, W] in [-1, 1]; None where unclear.

    Background: median of the 2-pixel border. Shape mask: pixels far from that colour (cleaned by a
    majority filter, largest component). Colour: median inside the eroded mask. Shape: an upright
    triangle narrows to the top; a square fills its box's corners, a circle does not.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise DataError(f"expected an image tensor [3, H, W], got shape {tuple(image.shape)}",
                        "pass one image at a time")
    rgb = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    h, w, _ = rgb.shape
    b = max(1, round(2 * h / 32))
    border = np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                             rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    far = np.linalg.norm(rgb - bg_rgb[None, None, :], axis=2) > _FG_DISTANCE
    mask = _largest_component(_majority_3x3(far))
    if not mask.any():
        return {"shape": None, "colour": None, "background": background}
    inner = _erode(mask)
    fg_rgb = np.median(rgb[inner if inner.sum() >= 4 else mask], axis=0)
    colour = _nearest(fg_rgb, SHAPE_COLOURS)
    # Second pass: each pixel's coverage = its position on the background->shape colour line; the
    # 0.5 contour is where the edge really is, also in blurry samples (a fixed distance is not).
    axis = fg_rgb - bg_rgb
    if float(axis @ axis) > _FG_DISTANCE**2:
        coverage = (rgb - bg_rgb) @ axis / float(axis @ axis)
        mask = _largest_component(_majority_3x3(coverage > 0.5))
    shape = _shape_of(mask)
    return {"shape": shape, "colour": colour, "background": background}


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion: drops the anti-aliased rim whose colour is a blend with the background."""
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def matches(caption: str, image: torch.Tensor) -> bool:
    """True when every attribute decoded from ``image`` equals the caption's."""
    want = attributes_of_caption(caption)
    got = decode_attributes(image)
    return all(got[k] == v for k, v in want.items())
