"""Loading a folder a run wrote (final model, tokenizer, autoencoder) without ever reaching a hub.

``from_pretrained`` treats a path that is not an existing folder as a hub repo id; with
``local_files_only`` that ends in a confusing "Repo id" or cache error. Here the folder and its files
are checked first, and any failure of a damaged file becomes one ``CheckpointError`` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

FIX = "the run's saved model is damaged: train again, or resume the run so it writes its final model anew"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin")
JSON_MAX_BYTES = 16 << 20


def read_json(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object from a regular file of a run folder, with its ``required`` keys."""
    from ..validate import read_regular_file

    raw = read_regular_file(path, "model file", JSON_MAX_BYTES, CheckpointError)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{path}' is not valid JSON ({e})", FIX) from None
    if not isinstance(data, dict) or any(k not in data for k in required):
        raise CheckpointError(f"'{path}' lacks {', '.join(required) or 'a JSON object'}", FIX)
    return data


def load_local(cls: Any, folder: Path, *, weights: bool = True) -> Any:
    """``cls.from_pretrained(folder)`` for a folder that must exist here (config and, if ``weights``, weights)."""
    if not folder.is_dir():
        raise CheckpointError(f"model folder '{folder}' is missing", FIX)
    if weights:
        read_json(folder / "config.json")
        if not any((folder / name).is_file() for name in WEIGHT_NAMES):
            raise CheckpointError(f"model folder '{folder}' has no weights file ({WEIGHT_NAMES[0]})", FIX)
    from .quiet import no_loading_bars

    try:
        with no_loading_bars():
            return cls.from_pretrained(str(folder.resolve()), local_files_only=True)
    except Exception as e:  # damaged weights surface as OSError, ValueError, SafetensorError, EnvironmentError...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot load '{folder}': {first[:300]}", FIX) from None
