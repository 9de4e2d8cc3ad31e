"""Captions: reading sidecar files safely, and the per-sample rules (dropout, tag shuffle, prefix/suffix).

Reading rule (documented in docs/datasets.md): a sidecar is decoded as UTF-8 (a BOM is dropped);
text that is not valid UTF-8 is decoded with U+FFFD replacement characters and a warning; lines are
joined with a space and surrounding whitespace is stripped. A missing or empty caption falls back to
the ``missing_caption`` rule.
"""

from __future__ import annotations

import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path

MISSING_CAPTION_RULES = ("auto", "empty", "folder", "filename", "skip")
CAPTION_MAX_BYTES = 64 << 10  # a caption is a sentence or a tag list; the text encoder reads 77 tokens of it


@dataclass(frozen=True)
class CaptionText:
    """A caption read from disk, with what went wrong on the way (for the report)."""

    text: str | None  # None: no usable caption (missing file or empty text)
    warning: tuple[str, str] | None = None  # (kind, detail)


def read_caption_file(path: Path) -> CaptionText:
    """Read one sidecar; never raises for content problems (see the module docstring for the rule).

    Only a regular file is read (a FIFO would block the run, a device never end), and at most
    ``CAPTION_MAX_BYTES`` of it."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return CaptionText(None, ("caption_unreadable", f"{path.name} is not a regular file (a pipe or device)"))
        with open(path, "rb") as f:
            raw = f.read(CAPTION_MAX_BYTES + 1)
    except FileNotFoundError:
        return CaptionText(None, None)
    except OSError as e:
        return CaptionText(None, ("caption_unreadable", f"{path.name}: {e}"))
    warning = None
    if len(raw) > CAPTION_MAX_BYTES:
        raw = raw[:CAPTION_MAX_BYTES]
        warning = ("caption_too_long", f"{path.name} is over {CAPTION_MAX_BYTES} bytes; only the start is used")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8", errors="replace")
        warning = ("caption_not_utf8", f"{path.name} is not UTF-8 (byte {e.start}); decoded with replacement characters")
    text = normalize_caption(text)
    if not text:
        return CaptionText(None, warning or ("empty_caption", f"{path.name} is empty"))
    return CaptionText(text, warning)


def normalize_caption(text: str) -> str:
    """Join lines with a space and squeeze runs of whitespace (sidecars often end with a newline)."""
    return " ".join(text.replace("\x00", " ").split())


def fallback_caption(rule: str, *, folder_caption: str | None, path: Path) -> str | None:
    """The caption of an image without one; None means the image is skipped (rule 'skip').

    auto: the kohya folder name where there is one, else the empty caption; empty: always "";
    folder: the folder name (kohya name without the repeats prefix, else the parent folder's name);
    filename: the file name without extension, '_' and '-' read as spaces.
    """
    if rule == "skip":
        return None
    if rule == "empty":
        return ""
    if rule == "filename":
        return normalize_caption(path.stem.replace("_", " ").replace("-", " "))
    if rule == "folder":
        return folder_caption if folder_caption is not None else normalize_caption(path.parent.name.replace("_", " "))
    return folder_caption if folder_caption is not None else ""


@dataclass(frozen=True)
class CaptionRules:
    """What happens to a caption each time it is drawn: dropout, tag shuffle (keep first N), prefix/suffix."""

    dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0
    prefix: str = ""
    suffix: str = ""
    separator: str = ","

    def apply(self, caption: str, rng: random.Random) -> str:
        """The caption as trained on this draw; dropout gives the empty prompt (for guidance)."""
        # Draw the dropout number first and always, so the random stream does not depend on text.
        dropped = rng.random() < self.dropout
        if self.shuffle_tags:
            caption = shuffle_tags(caption, rng, keep=self.keep_tokens, separator=self.separator)
        if dropped:
            return ""
        return f"{self.prefix}{caption}{self.suffix}"

    def is_static(self) -> bool:
        """True when every draw of a caption gives one of two texts (itself or "")."""
        return not self.shuffle_tags


def shuffle_tags(caption: str, rng: random.Random, *, keep: int = 0, separator: str = ",") -> str:
    """Shuffle comma-separated tags, keeping the first ``keep`` in place (kohya's keep_tokens)."""
    tags = [t.strip() for t in caption.split(separator)]
    tags = [t for t in tags if t]
    if len(tags) <= max(keep, 1):
        return caption
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return f"{separator} ".join(head + tail)
