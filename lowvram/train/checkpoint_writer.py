"""One checkpoint write at a time in a background thread, so that the training steps go on while the disk works."""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
# Host RAM left free beside a snapshot and the steps' own needs: the OS, page cache, the data loader.
SPARE_BYTES = GIB // 2


@dataclass
class Written:
    """A finished background write: the checkpoint's step and folder, and the seconds the writer took."""

    step: int
    path: Path
    seconds: float


class CheckpointWriter:
    """Runs ``write()`` (``save_checkpoint`` of a snapshot) in one thread; ``join`` waits for it and raises,
    in the caller's thread, the error the write raised (disk full, permission: what the CLI turns into
    one clear line). The caller joins before it submits again: at most one write is in flight."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._step = 0
        self._path: Path | None = None
        self._error: BaseException | None = None
        self._seconds = 0.0

    @property
    def in_flight(self) -> bool:
        """A write was submitted and not joined yet (it may have finished)."""
        return self._thread is not None

    def finished(self) -> bool:
        """A submitted write is over: ``join`` returns at once."""
        return self._thread is not None and not self._thread.is_alive()

    def submit(self, step: int, write: Callable[[], Path]) -> None:
        if self._thread is not None:
            raise RuntimeError("join the checkpoint write in flight before submitting another")
        self._step, self._path, self._error = step, None, None

        def run() -> None:
            start = time.perf_counter()
            try:
                self._path = write()
            except BaseException as e:  # raised again in the training thread by join()
                self._error = e
            finally:
                self._seconds = time.perf_counter() - start

        # not a daemon: an interpreter that exits still lets the write finish (atomic_dir covers a kill)
        self._thread = threading.Thread(target=run, name=f"lowvram-checkpoint-{step}")
        self._thread.start()

    def join(self) -> Written | None:
        """Wait for the write in flight; what it wrote (None when nothing was in flight), or its error."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        assert self._path is not None  # a write that returned
        return Written(self._step, self._path, self._seconds)


def available_ram_bytes() -> int | None:
    """Host RAM the OS can give without swapping (``MemAvailable``), or None where it does not say."""
    from ..hardware.facts import system_ram  # read where `lowvram doctor` and the planner's probe read it

    return system_ram()[1]


def step_transient_bytes() -> int:
    """What this process took above its present size at its peak so far: the host memory a step (or the
    load) needs on top of what stays, which must stay free beside a snapshot."""
    try:
        with open("/proc/self/statm", encoding="utf-8") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return max(0, peak - rss)


def room_for_snapshot(nbytes: int) -> bool:
    """Whether host RAM holds a snapshot of ``nbytes`` while the next steps run. Where it does not (or
    the OS does not say), the checkpoint is written in the steps' pause as before: one group's copy at a
    time, nothing kept after."""
    available = available_ram_bytes()
    return available is not None and nbytes + step_transient_bytes() + SPARE_BYTES <= available
