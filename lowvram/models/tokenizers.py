"""The CLIP tokenizers of a local checkpoint: found beside it (or named by model.tokenizer), loaded offline, and
checked against the text encoder they feed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .detect import CONFIGS_DIR

TOKENIZER_NAMES = {"sd1": ("tokenizer",), "sd2": ("tokenizer",), "sd2-v": ("tokenizer",),
                   "sdxl": ("tokenizer", "tokenizer_2"),
                   # FLUX.1's CLIP-L; its T5 tokenizer is not CLIP's (models/flux.py)
                   "flux-dev": ("tokenizer",), "flux-schnell": ("tokenizer",)}


def _find_vocab(folder: Path, sub: str) -> Path | None:
    for cand in (folder / sub, folder / "tokenizer", folder):
        if (cand / "vocab.json").is_file() and (cand / "merges.txt").is_file():
            return cand
    return None


def _tokenizer_settings(family: str, name: str, config_dir: Path) -> Path:
    """The ``tokenizer_config.json`` of ``name``: the config folder's, else the family's shipped one (pad token)."""
    own = config_dir / name / "tokenizer_config.json"
    return own if own.is_file() else CONFIGS_DIR / family / name / "tokenizer_config.json"


def _load_tokenizer(family: str, name: str, tokenizer: str | Path | None, config_dir: Path) -> Any:
    from .clip_vocab import clip_tokenizer

    settings = _tokenizer_settings(family, name, config_dir)
    if tokenizer is None:  # the config folder's vocabulary if it has one, else CLIP's, shipped with lowvram
        return clip_tokenizer(settings, _find_vocab(config_dir, name) if (config_dir / name).is_dir() else None)
    tdir = Path(tokenizer).expanduser()
    fix = ("pass a diffusers SD folder (its tokenizer/ is used) or a folder with CLIP's vocab.json and merges.txt; "
           "or leave model.tokenizer unset to use the CLIP vocabulary shipped with lowvram")
    if not tdir.is_dir():
        raise ModelLoadError(f"tokenizer folder '{tdir}' does not exist", fix)
    if (tdir / name / "tokenizer_config.json").is_file():  # a diffusers folder: use its own settings
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(tdir), subfolder=name, local_files_only=True)
    vocab = _find_vocab(tdir, name)
    if vocab is None:
        raise ModelLoadError(f"tokenizer folder '{tdir}' has no vocab.json + merges.txt", fix)
    return clip_tokenizer(settings, vocab)


def load_tokenizers(family: str, tokenizer: str | Path | None, config_dir: Path) -> tuple[Any, Any | None]:
    """CLIP tokenizers for a single-file checkpoint: from ``tokenizer`` (a folder) when given, else CLIP's vocabulary.

    Settings (pad token, max length) come from the family's ``tokenizer_config.json``: the pad token changes
    the text embeddings, so it must be what the checkpoint was trained with.
    """
    out = [_load_tokenizer(family, n, tokenizer, config_dir) for n in TOKENIZER_NAMES[family]]
    return out[0], (out[1] if len(out) > 1 else None)


def check_tokenizer_fits(tokenizer: Any, text_encoder: Any, what: str) -> None:
    """A tokenizer whose ids or length exceed the text encoder's embeddings would fail mid-run: say so now."""
    cfg = text_encoder.config
    if len(tokenizer) > cfg.vocab_size or tokenizer.model_max_length > cfg.max_position_embeddings:
        raise ModelLoadError(
            f"the {what}'s tokenizer ({len(tokenizer)} tokens, length {tokenizer.model_max_length}) does not fit its "
            f"text encoder ({cfg.vocab_size} token embeddings, {cfg.max_position_embeddings} positions)",
            "pass the tokenizer the checkpoint was trained with (model.tokenizer / --tokenizer)",
        )
