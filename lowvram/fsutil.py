"""Files and folders that appear whole or not at all, and the leftovers of writes that were killed.

A file is written to a temporary name beside it (``.NAME.PID.RANDOM.tmp``: two writers never share one)
and renamed over its final name (``atomic_write`` and its text/bytes/safetensors forms). A folder is
written beside its final name (``.tmp-NAME-PID``) and renamed into place; a folder it
replaces is first renamed aside (``.old-NAME-PID``) and removed after. A kill at any moment leaves
either the old folder or the new one under the real name, plus a leftover that the next start of the
run sweeps (``sweep_leftovers``).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LowvramError

if TYPE_CHECKING:
    import torch

LEFTOVER = re.compile(r"^\.(tmp|old)-.+-(\d+)$")
# errors that mean "the disk cannot take this write", not "the program is wrong"
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are from a write that failed earlier in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers(*folders: Path) -> list[Path]:
    """Remove ``.tmp-…-PID`` / ``.old-…-PID`` entries of ``folders`` whose writer is gone; returns them."""
    removed = []
    for folder in folders:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for p in entries:
            m = LEFTOVER.match(p.name)
            if m is None or _alive(int(m.group(2))):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def temp_name(path: Path) -> Path:
    """A hidden name beside ``path`` that no other writer (process or thread) picks."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], Any], *, fsync: bool = False) -> Path:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` in one rename:
    readers see the old file or the new one, never half of one. ``fsync``: flush the data to disk before
    the rename (a power cut must not publish an empty file). A failed write leaves no temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not stay full because of our half-written copy
        raise
    return path


def write_text_atomic(path: str | Path, text: str, *, encoding: str = "utf-8", fsync: bool = False) -> Path:
    """``path.write_text(text)``, atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding), fsync=fsync)


def write_bytes_atomic(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """``path.write_bytes(data)``, atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | Path,
                            metadata: Mapping[str, str] | None = None, *, fsync: bool = False) -> Path:
    """A ``.safetensors`` file of contiguous CPU copies of ``tensors``, written atomically."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=None if metadata is None else dict(metadata)),
                        fsync=fsync)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` to disk (a rename must not publish unwritten data)."""
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            with open(Path(dirpath) / name, "rb") as fh:
                os.fsync(fh.fileno())


def replace_dir(tmp: Path, final: Path) -> None:
    """Publish the complete folder ``tmp`` as ``final``, replacing what was there."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_bytes(run_dir: Path) -> int:
    """Bytes of the run's newest complete checkpoint: about what the next one needs."""
    from .run_folder import CHECKPOINTS_DIR
    from .train.checkpoint import latest_checkpoint

    try:
        ckpt = latest_checkpoint(run_dir / CHECKPOINTS_DIR)
    except LowvramError:
        return 0
    return sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file()) if ckpt else 0


# how writers that are not Python file objects (safetensors' Rust writer) report the same errors
FOREIGN = {"os error 28": errno.ENOSPC, "no space left": errno.ENOSPC, "storagefull": errno.ENOSPC,
           "os error 30": errno.EROFS, "read-only file system": errno.EROFS, "readonlyfilesystem": errno.EROFS,
           "os error 122": errno.EDQUOT}


def storage_errno(e: BaseException) -> int | None:
    """The errno of a storage failure (an OSError, or another library's error that wraps one), or None."""
    if isinstance(e, OSError):
        return e.errno if e.errno in STORAGE_ERRNOS else None
    text = str(e).lower()
    return next((code for needle, code in FOREIGN.items() if needle in text), None)


def storage_error(e: BaseException, run_dir: str | Path | None = None) -> LowvramError | None:
    """A one-line error for a write the disk refused (full, read-only, no permission), or None."""
    code = storage_errno(e)
    if code is None:
        return None
    filename = getattr(e, "filename", None)
    where = Path(filename) if filename else Path(run_dir or ".")
    folder = where if where.is_dir() else where.parent
    while (LEFTOVER.match(folder.name) or not folder.exists()) and folder != folder.parent:
        folder = folder.parent  # name the real folder, not the temporary one the failed write removed
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EROFS: "the file system is read-only", errno.EFBIG: "the file is too large for the file system"}
    problem = f"cannot write to '{folder}': {what.get(code, 'permission denied')}"
    try:
        free = shutil.disk_usage(folder if folder.exists() else Path(run_dir or ".")).free
        problem += f" ({free / 2**20:.0f} MiB free"
        need = checkpoint_bytes(Path(run_dir)) if run_dir is not None else 0
        problem += f"; a checkpoint of this run needs about {need / 2**20:.0f} MiB)" if need else ")"
    except OSError:
        pass
    fix = "free some space or choose a writable --out"
    if run_dir is not None:
        fix += f"; nothing already saved was lost: resume with `lowvram train --resume {run_dir}`"
    return LowvramError(problem, fix)
