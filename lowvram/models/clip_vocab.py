"""CLIP's BPE vocabulary, shipped with lowvram, and the Stable Diffusion tokenizers built from it.

A single-file checkpoint carries no tokenizer, yet every SD 1.x, 2.x and SDXL text encoder reads the
same vocabulary: OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (``clip/``, MIT licence beside it;
byte-identical to the copy in open_clip_torch). lowvram ships that 1.3 MB file instead of depending on
open_clip_torch, which would pull torchvision and timm builds that must match the user's torch (CUDA,
ROCm, CPU) for one data file. The tokenizer is then loaded the way transformers loads a diffusers
``tokenizer/`` folder (``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``), so token ids equal
those of the hub folders on the installed transformers, pad-token conventions included (SD 1.x and
SDXL's first encoder pad with ``<|endoftext|>``, the OpenCLIP encoders of SD 2.x and SDXL with ``!``).
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

BPE_FILE = Path(__file__).with_name("clip") / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408  # 256 bytes, 256 bytes + "</w>", 48,894 merges, 2 specials
N_MERGES = VOCAB_SIZE - 2 * 256 - 2
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte → printable character table, which its BPE vocabulary is built on."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


@lru_cache(maxsize=2)
def clip_vocab(bpe_gz: str | Path = BPE_FILE) -> tuple[dict[str, int], tuple[str, ...]]:
    """(token → id, merges) derived from a CLIP BPE file exactly as CLIP does: bytes, bytes + ``</w>``,
    one token per merge (the file's lines 1..48,894), then the two special tokens."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = tuple(m for m in lines[1 : N_MERGES + 1] if m.strip())
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + list(SPECIALS)
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_vocab(out_dir: str | Path, bpe_gz: str | Path = BPE_FILE) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` (the files of a hub CLIP tokenizer folder) into ``out_dir``."""
    vocab, merges = clip_vocab(bpe_gz)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


def clip_tokenizer(settings: str | Path, vocab_dir: str | Path | None = None) -> Any:
    """A ``CLIPTokenizer`` loaded as from a diffusers tokenizer folder: the ``tokenizer_config.json`` at
    ``settings`` (pad token, max length) with ``vocab_dir``'s vocab.json/merges.txt (default: the shipped CLIP
    vocabulary). Loading through ``from_pretrained`` keeps transformers' own handling of the settings (e.g.
    a ``!`` pad token is a special token, as in the hub's OpenCLIP tokenizer folders)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if vocab_dir is None:
            write_clip_vocab(folder)
        else:
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(Path(vocab_dir) / name, folder / name)
        shutil.copy(settings, folder / "tokenizer_config.json")
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
