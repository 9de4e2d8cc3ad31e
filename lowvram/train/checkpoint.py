"""Resumable checkpoints: safetensors + JSON in a folder, written atomically, never pickle.

A checkpoint is written into a temporary folder and renamed into place, so a crash mid-save leaves
the previous checkpoint intact and never a half-written one under a real name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

PREFIX = "step-"


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or strided storage; a contiguous CPU copy is what goes to disk.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(
    root: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``{name}.safetensors`` for each tensor group and ``state.json``; return the folder.

    The folder appears under its final name only once complete (write to a temp dir, fsync, rename).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, group in tensors.items():
        save_file(_contiguous(group), str(tmp / f"{name}.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def load_checkpoint(folder: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read every tensor group and the JSON state of a checkpoint folder."""
    folder = Path(folder)
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise CheckpointError(f"'{folder}' is not a lowvram checkpoint (no state.json)", "point --resume at a run folder")
    try:
        meta = json.loads(state_path.read_text())
        tensors = {p.stem: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}
    except Exception as e:  # safetensors raises its own SafetensorError on a damaged header
        raise CheckpointError(f"checkpoint '{folder}' is damaged: {e}", "resume from an older checkpoint folder") from None
    return tensors, meta
