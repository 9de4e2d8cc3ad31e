"""Reference token ids for tests/test_clip_tokenizer.py, from open_clip's own CLIP tokenizer.

    pip install ftfy open_clip_torch --no-deps      # its tokenizer module needs only ftfy, regex, numpy, torch
    python tools/clip_reference_ids.py > tests/data/clip_reference_ids.json

open_clip's ``SimpleTokenizer`` is an independent implementation of CLIP's BPE (OpenAI's original code) over
the same vocabulary file lowvram ships, so equal ids show that lowvram's tokenizers (transformers' CLIPTokenizer
over the vocabulary derived in ``lowvram/models/clip_vocab.py``) tokenize as CLIP does. Prompts where the two
reference tokenizers themselves differ are left out: open_clip un-escapes HTML entities and ftfy straightens
curly quotes, which transformers' tokenizer (and so every diffusers pipeline) does not; and the OpenCLIP pad
token ``!`` is a special token in the hub's SD 2.x / SDXL ``tokenizer_2`` folders.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys

PROMPTS = [
    "a photo of a cat",
    "a photo of sks dog on the beach, highly detailed, 8k",
    "masterpiece, best quality, (1girl:1.2), [red hair], {smile}",
    "  leading and trailing   spaces\tand\ttabs\nand newlines  ",
    "UPPER case and MiXeD CaSe",
    "Café naïve résumé façade Ångström",
    "cafe\u0301 with a decomposed accent",
    "東京の猫 🐱🐶 emoji ✨",
    "Привет мир, γειά σου κόσμε",
    "don't can't we're I'll you've it's",
    "numbers 1234 3.14 1,000,000",
    "a photo of " + ", ".join(f"a {c} cube number {i}" for i, c in enumerate(["red", "green", "blue"] * 8)),
]


def main() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    source = (f"open_clip_torch {importlib.metadata.version('open_clip_torch')} SimpleTokenizer.encode "
              "(no start/end tokens, no truncation)")
    rows = [f"  {json.dumps(p, ensure_ascii=False)}: {json.dumps(tok.encode(p))}" for p in PROMPTS]
    sys.stdout.write(f'{{"source": {json.dumps(source)},\n "ids": {{\n' + ",\n".join(rows) + "\n }\n}\n")


if __name__ == "__main__":
    main()
