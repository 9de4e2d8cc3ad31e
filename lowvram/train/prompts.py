"""kohya-style sample-prompt lines (``prompt --n negative --w 512 --d seed``) parsed into preview specs."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


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
