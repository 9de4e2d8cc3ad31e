"""Resumable checkpoints: safetensors + JSON in a folder, written atomically, never pickle.

A checkpoint is written into a temporary folder and renamed into place, so a crash mid-save leaves
the previous checkpoint intact and never a half-written one under a real name.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..fsutil import atomic_dir

PREFIX = "step-"
NAME = re.compile(r"^step-(\d{1,12})$")
# what every checkpoint holds; ``ema`` only when the run keeps an EMA
REQUIRED_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
REQUIRED_STATE = ("step", "epoch", "batch_in_epoch")


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or strided storage; a contiguous CPU copy is what goes to disk. One copy
    # each (a card's tensor is copied by the move to the host, not a second time).
    return {k: v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for k, v in tensors.items()}


def snapshot(tensors: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Contiguous CPU copies of every group: what a write that runs beside the next steps (which change
    the live tensors in place) is given."""
    return {name: _contiguous(group) for name, group in tensors.items()}


def snapshot_bytes(tensors: dict[str, dict[str, torch.Tensor]]) -> int:
    """Bytes the copies of ``snapshot(tensors)`` take in host RAM."""
    return sum(t.numel() * t.element_size() for group in tensors.values() for t in group.values())


def save_checkpoint(
    root: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    meta: dict[str, Any],
    keep: int = 2,
    *,
    copied: bool = False,
) -> Path:
    """Write ``{name}.safetensors`` for each tensor group and ``state.json``; return the folder.

    The folder appears under its final name only once complete (write to a temp dir, fsync, rename).
    ``copied``: ``tensors`` are a ``snapshot`` already (else each group is copied just before its file
    is written, so only one group's copy is in host RAM at a time).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    # on failure the half-written copy is removed (a full disk must not stay full because of it);
    # re-saving the same step replaces it whole
    with atomic_dir(final) as tmp:
        for name, group in tensors.items():
            save_file(group if copied else _contiguous(group), str(tmp / f"{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=1))
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_step(path: Path) -> int | None:
    """The step of a folder named ``step-N`` (exactly: ``step-400.bak`` or ``step-abc`` are not checkpoints)."""
    m = NAME.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders and stray names are ignored)."""
    root = Path(root)
    try:
        entries = list(root.iterdir()) if root.is_dir() else []
    except OSError as e:
        raise CheckpointError(f"cannot list the checkpoints in '{root}': {e.strerror}", "check the folder's permissions") from None
    found = [p for p in entries
             if checkpoint_step(p) is not None and p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def find_checkpoint(root: str | Path, name: str) -> Path:
    """The checkpoint ``name`` (``step-N``, ``N`` or a checkpoint folder's path) of the folder ``root``."""
    root = Path(root)
    ckpts = list_checkpoints(root)
    text = str(name).strip()
    if text.isdigit():
        text = f"{PREFIX}{int(text):08d}"
    want = checkpoint_step(Path(text))
    for p in ckpts:
        if p.name == Path(text).name or (want is not None and checkpoint_step(p) == want):
            return p
    available = ", ".join(p.name for p in ckpts) or "none"
    raise CheckpointError(f"no checkpoint '{name}' in '{root}' (available: {available})",
                          "pass one of the available names to --from-checkpoint")


def _damaged(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint file '{path}' {problem}",
                           f"resume from an older checkpoint: --from-checkpoint step-N (see {path.parent.parent})")


def _read_state(state_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(state_path, f"is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), int) for k in REQUIRED_STATE):
        raise _damaged(state_path, f"lacks {', '.join(REQUIRED_STATE)}")
    return meta


def check_checkpoint(folder: str | Path, ema: bool = False) -> None:
    """Refuse a damaged checkpoint before a resume does any work: files present, state complete, every
    safetensors header readable and covering its file (what a truncated or zeroed file breaks)."""
    from safetensors import safe_open

    folder = Path(folder)
    for name in (*REQUIRED_FILES, *(("ema.safetensors",) if ema else ())):
        if not (folder / name).is_file():
            raise _damaged(folder / name, "is missing")
    _read_state(folder / "state.json")
    for p in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(p), framework="pt") as f:
                f.keys()
        except Exception as e:  # SafetensorError: header damaged, file shorter than its header says
            raise _damaged(p, f"is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def load_checkpoint(folder: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read every tensor group and the JSON state of a checkpoint folder; a damaged file is named."""
    folder = Path(folder)
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise CheckpointError(f"'{folder}' is not a lowvram checkpoint (no state.json)", "point --resume at a run folder")
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise _damaged(folder / name, "is missing")
    meta = _read_state(state_path)
    tensors = {}
    for p in sorted(folder.glob("*.safetensors")):
        try:
            tensors[p.stem] = load_file(str(p))
        except Exception as e:  # safetensors raises its own SafetensorError on a damaged header
            raise _damaged(p, f"is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return tensors, meta
