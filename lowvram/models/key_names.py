"""Canonical names and files for what lowvram saves from transformers CLIP models, whatever transformers is installed.

Real SD checkpoints, the diffusers hub folders and transformers 4.x name a CLIP text encoder's weights
``text_model.encoder.layers.N…``; transformers 5.x dropped the ``text_model`` level from ``CLIPTextModel``
(not from ``CLIPTextModelWithProjection``), so its live module tree and its ``save_pretrained`` say
``encoder.layers.N…``. A file keyed that way fails in diffusers 0.35 + transformers 4.57 and ComfyUI drops
those keys. Every file lowvram writes uses the canonical names; loading maps them back to the live tree.
Likewise a 5.x tokenizer folder holds only ``tokenizer.json``, which 4.x's ``CLIPTokenizer`` (the class
diffusers' ``model_index.json`` names) cannot read: the hub's ``vocab.json`` + ``merges.txt`` are added.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..fsutil import save_safetensors_atomic, write_text_atomic

TEXT_MODEL = "text_model."
# the submodules of CLIP's text transformer: what sits under ``text_model.`` in the canonical layout
TEXT_MODEL_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def canonical_text_key(key: str) -> str:
    """A CLIP text-model parameter or module name in the canonical layout (``text_model.encoder…``)."""
    return TEXT_MODEL + key if key.startswith(TEXT_MODEL_ROOTS) else key


def live_text_key(key: str, model: Any) -> str:
    """A canonical name as the installed transformers names it in ``model`` (without ``text_model.`` on 5.x)."""
    has_level = isinstance(getattr(model, "text_model", None), torch.nn.Module)
    return key if has_level or not key.startswith(TEXT_MODEL) else key[len(TEXT_MODEL):]


def target_suffix(name: str) -> str:
    """A module name that matches on either layout: peft matches ``target_modules`` as name suffixes."""
    return name[len(TEXT_MODEL):] if name.startswith(TEXT_MODEL) else name


def canonical_pipeline_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Component-prefixed keys (``text_encoder.encoder…``, ``unet.…``) with the text encoders' canonical."""
    out = {}
    for key, value in state.items():
        comp, dot, rest = key.partition(".")
        out[comp + dot + canonical_text_key(rest) if comp in TEXT_ENCODERS else key] = value
    return out


def _rewrite_safetensors(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        if all(canonical_text_key(k) == k for k in keys):
            return False
        tensors = {canonical_text_key(k): f.get_tensor(k) for k in keys}
    save_safetensors_atomic(tensors, path, meta)
    return True


def canonicalize_text_encoder_folder(folder: str | Path) -> int:
    """Rename a saved transformers text encoder's weights (``model*.safetensors`` and a shard index) to the
    canonical layout, in place and atomically per file; returns how many files changed."""
    folder = Path(folder)
    changed = sum(_rewrite_safetensors(p) for p in sorted(folder.glob("model*.safetensors")))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {canonical_text_key(k): v for k, v in data.get("weight_map", {}).items()}
        write_text_atomic(index, json.dumps(data, indent=2))
    return changed


def complete_tokenizer_folder(folder: str | Path) -> bool:
    """Add ``vocab.json`` + ``merges.txt`` (the hub layout every transformers version reads) to a tokenizer folder
    that has only a BPE ``tokenizer.json``; returns whether files were added."""
    folder = Path(folder)
    fast = folder / "tokenizer.json"
    if not fast.is_file() or (folder / "vocab.json").is_file():
        return False
    model = json.loads(fast.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE":
        return False
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    for name, text in (("vocab.json", json.dumps(model["vocab"], ensure_ascii=False)),
                       ("merges.txt", "#version: 0.2\n" + "".join(m + "\n" for m in merges))):
        write_text_atomic(folder / name, text)
    return True


def canonicalize_pipeline_folder(folder: str | Path) -> int:
    """Canonical text-encoder weights and complete tokenizer folders in a saved diffusers pipeline folder;
    returns how many files changed."""
    folder = Path(folder)
    changed = sum(canonicalize_text_encoder_folder(folder / n) for n in TEXT_ENCODERS if (folder / n).is_dir())
    return changed + sum(complete_tokenizer_folder(folder / n) for n in ("tokenizer", "tokenizer_2"))
