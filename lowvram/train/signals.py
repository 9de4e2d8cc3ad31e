"""Ctrl-C and SIGTERM as a graceful stop: the run saves at the next step boundary, then exits.

``GracefulStop`` is the ``stop`` callable that ``train()`` polls (the web panel's Stop button is another
one). Only the ``lowvram`` command installs it as a signal handler, for the length of one command, and
puts the previous handlers back afterwards: library code never touches process-wide signal state, so
two runs in one process (the panel, tests) do not interfere.

First signal: stop at the end of the current step and write a checkpoint of that step (weights, EMA,
optimizer, data position and RNG all of the same step). A second signal while a checkpoint is being
taken or waited for (the training thread's part of a save, or its wait for a write in the background)
is deferred: the save finishes, and the message says so. A second signal at any other time ends the
command at once without saving this step (the newest checkpoint on disk is untouched; a periodic one
still being written in the background is finished first). Processes started
by a launcher (``--processes N``) ignore repeated signals: the launcher forwards one to each of them and
ends them itself if they take too long.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from types import FrameType
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopNow(KeyboardInterrupt):
    """A second signal outside a checkpoint write: quit without saving."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


class GracefulStop:
    """A stop flag set by SIGINT/SIGTERM; call it to poll (``train(..., stop=graceful)``)."""

    def __init__(self, *, ignore_repeats: bool = False, announce: bool = True) -> None:
        self.signum: int | None = None  # the first signal received
        self.repeated: int | None = None  # a later signal that arrived while a checkpoint was written
        self.ignore_repeats = ignore_repeats
        self.announce = announce  # print what happens (the main process of a run only)
        self._saving = 0

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @contextmanager
    def critical(self) -> Iterator[None]:
        """A block (a checkpoint write) that a second signal does not cut short."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            self._say(f"\n{name}: stopping at the next step boundary and saving a checkpoint "
                      "(send it again to quit at once without saving)")
            return
        if self._saving or self.ignore_repeats:
            if self._saving:
                self.repeated = signum
            why = "the checkpoint being written is finished first" if self._saving else "already stopping"
            self._say(f"{name} again: {why}")
            return
        raise StopNow(signum)

    def _say(self, text: str) -> None:
        if self.announce:
            print(text, file=sys.stderr, flush=True)

    @contextmanager
    def installed(self) -> Iterator[GracefulStop]:
        """Handle SIGINT and SIGTERM for the block (main thread only); restore the previous handlers."""
        with handling(self.handle):
            yield self


@contextmanager
def forwarded_to(proc: Any) -> Iterator[GracefulStop]:
    """While ``proc`` (the launcher of ``--processes N``, in its own session so a terminal's Ctrl-C reaches
    only us) runs: pass it the first SIGINT/SIGTERM, once; it forwards that to each training process."""
    stop = GracefulStop()

    def handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.signum is None:
            stop.signum = signum
            print(f"\n{name}: asking every training process to stop at the next step boundary and save",
                  file=sys.stderr, flush=True)
            proc.send_signal(signum)
        else:
            print(f"{name} again: still waiting for the training processes to save", file=sys.stderr, flush=True)

    with handling(handle):
        yield stop


@contextmanager
def handling(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM during the block, the previous handlers restored after. Outside
    the main thread Python refuses to set handlers: signals are then left alone."""
    previous: dict[int, Any] = {}
    try:
        for sig in HANDLED:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def critical(stop: Any) -> Any:
    """``stop.critical()`` when the stop callable protects saves (a ``GracefulStop``), else a no-op."""
    guard = getattr(stop, "critical", None)
    return guard() if callable(guard) else nullcontext()
