"""Where a run's wall time goes: every phase (startup, imports, resolve, plan, data check, load, caching, steps,
validation, previews, checkpoints, final saves) timed, announced to the listeners, and summed up at the end.

Exactly one phase is current at a time: a phase entered inside another pauses it (a checkpoint during
the steps is checkpoint time, not step time), so the phases add up to the run's wall time. Listeners
get an event ``phase`` whenever the current phase changes (the progress bar shows its name) and one
row per finished phase (``metrics.jsonl``); the end-of-run summary is :meth:`PhaseClock.summary`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .events import Event

# the order of the summary; phases not listed (e.g. "autoencoder") follow in the order they happened
PHASES = ("startup", "imports", "resolve", "plan", "data check", "load", "class images", "caching", "autoencoder", "steps", "validation",
          "previews", "checkpoints", "final saves")


def process_age_s() -> float | None:
    """Seconds since this process started (interpreter start and imports included), where the OS says."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class PhaseClock:
    """Times the phases of one run (one object per run: nothing process-global).

    Events emitted before a listener is attached (resolve and plan run before the run folder exists)
    are kept and replayed by :meth:`attach`.
    """

    def __init__(self, emit: Callable[[Event], None] | None = None, *, since_process_start: bool = False) -> None:
        self._emit = emit
        self._pending: list[Event] = []
        self.totals: dict[str, float] = {}
        self.started = time.perf_counter()
        self._stack: list[list[Any]] = []  # [name, seconds so far, running since (perf_counter) or None]
        self.first_step_s: float | None = None
        self.step = 0
        if since_process_start and (age := process_age_s()) is not None:
            self.count_before({"startup": age})

    def count_before(self, seconds: dict[str, float]) -> None:
        """Count time spent before this clock existed as finished phases, and start the run that much earlier.

        The process's own start (``since_process_start``), or what the panel's spare training process still
        had to do after the panel handed it the job: the user waited through both.
        """
        for name, s in seconds.items():
            self.started -= s
            self.totals[name] = self.totals.get(name, 0.0) + s
            self._send(Event("phase", 0, {"phase": name, "seconds": s, "state": "end"}))

    # ---- listeners ---------------------------------------------------------------------------------
    def attach(self, emit: Callable[[Event], None]) -> None:
        """Send events from now on to ``emit``, first the ones kept while nobody listened."""
        self._emit = emit
        pending, self._pending = self._pending, []
        for event in pending:
            emit(event)

    def _send(self, event: Event) -> None:
        if self._emit is None:
            self._pending.append(event)
        else:
            self._emit(event)

    # ---- timing ------------------------------------------------------------------------------------
    def _pause_current(self, now: float) -> None:
        if self._stack and self._stack[-1][2] is not None:
            top = self._stack[-1]
            top[1] += now - top[2]
            top[2] = None

    def _resume_current(self, now: float) -> None:
        if self._stack:
            top = self._stack[-1]
            top[2] = now
            self._send(Event("phase", self.step, {"phase": top[0], "state": "start"}))

    def enter(self, name: str) -> None:
        """Make ``name`` the current phase (pausing the one before it) until :meth:`leave`."""
        now = time.perf_counter()
        self._pause_current(now)
        self._stack.append([name, 0.0, now])
        self._send(Event("phase", self.step, {"phase": name, "state": "start"}))

    def leave(self) -> float:
        """End the current phase; the one it interrupted resumes. Returns the phase's seconds."""
        now = time.perf_counter()
        name, seconds, since = self._stack.pop()
        if since is not None:
            seconds += now - since
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        self._send(Event("phase", self.step, {"phase": name, "seconds": seconds, "state": "end"}))
        self._resume_current(now)
        return seconds

    @contextmanager
    def phase(self, name: str, step: int | None = None) -> Iterator[None]:
        """``with clock.phase("checkpoints"):`` times the block as that phase."""
        if step is not None:
            self.step = step
        self.enter(name)
        try:
            yield
        finally:
            self.leave()

    def mark_first_step(self) -> None:
        """Remember the time to the first training step (what a user waits before anything trains)."""
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.started

    # ---- the account -------------------------------------------------------------------------------
    def wall_s(self) -> float:
        return time.perf_counter() - self.started

    def ordered(self) -> dict[str, float]:
        """Finished phases' seconds in the summary order (phases still running are not counted yet)."""
        known = {name: self.totals[name] for name in PHASES if name in self.totals}
        return {**known, **{n: s for n, s in self.totals.items() if n not in known}}

    def summary(self, step: int) -> Event:
        """The whole account as one event (a ``metrics.jsonl`` row): seconds per phase, wall time, and
        ``other`` (what no phase covered: between phases, and imports outside them)."""
        wall = self.wall_s()
        seconds = self.ordered()
        data: dict[str, Any] = {"seconds": seconds, "wall_s": wall, "other_s": max(0.0, wall - sum(seconds.values()))}
        if self.first_step_s is not None:
            data["first_step_s"] = self.first_step_s
        return Event("phases", step, data)


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The printed end-of-run table of a ``phases`` event's data."""
    wall = float(data["wall_s"])
    rows = list(data["seconds"].items()) + [("other", float(data.get("other_s", 0.0)))]
    out = [f"time: {wall:.1f} s in all" + (f"; first training step after {data['first_step_s']:.1f} s"
                                             if data.get("first_step_s") is not None else "")]
    for name, seconds in rows:
        if seconds >= 0.05 or name == "steps":
            out.append(f"  {name:<12} {seconds:8.1f} s  {100 * seconds / wall if wall else 0:5.1f} %")
    return out
