"""Send this process SIGINT/SIGTERM at a named point of a training run (the real `lowvram` executable).

``LOWVRAM_SIGNAL_POINT=name:N`` picks the point, ``LOWVRAM_SIGNAL`` the signal, ``LOWVRAM_SIGNAL_COUNT``
how many are sent one after the other (2: the second arrives while the first is being handled).
The points wrap the real functions; the signal is delivered by the kernel like one from a terminal.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import Any

calls: Counter = Counter()


def fire() -> None:
    sig = getattr(signal, os.environ.get("LOWVRAM_SIGNAL", "SIGINT"))
    for _ in range(int(os.environ.get("LOWVRAM_SIGNAL_COUNT", "1"))):
        os.kill(os.getpid(), sig)  # Python runs the handler before the next line: one handler call each


def _wrap(owner: Any, name: str, when: Any, after: bool = False) -> None:
    real = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        hit = when(calls[name], args)
        if hit and not after:
            fire()
        out = real(*args, **kwargs)
        if hit and after:
            fire()
        return out

    setattr(owner, name, wrapped)


def install() -> None:
    from lowvram.train import checkpoint, jobs, loop

    point, _, n = os.environ["LOWVRAM_SIGNAL_POINT"].partition(":")
    n = int(n or 0)
    accum = int(os.environ.get("LOWVRAM_SIGNAL_ACCUM", "1"))
    if point == "startup":  # models built, nothing trained yet
        _wrap(loop.Trainer, "__init__", lambda c, a: c == 1, after=True)
    elif point == "loss":  # inside the forward of the last micro-batch of step n (1-based)
        _wrap(jobs.ScratchJob, "loss", lambda c, a: c == n * accum)
    elif point == "first-micro":  # inside the first micro-batch of step n: the others are still to come
        _wrap(jobs.ScratchJob, "loss", lambda c, a: c == (n - 1) * accum + 1)
    elif point == "after-optimizer":  # the weights moved, the step counter not yet
        _wrap(loop, "optimizer_step", lambda c, a: c == n, after=True)
    elif point == "after-take":  # the data position moved past the batch of step n, nothing computed yet
        _wrap(loop.Trainer, "take", lambda c, a: c == (n - 1) * accum + 1, after=True)
    elif point == "validate":  # during the held-out loss after step n
        _wrap(loop.Trainer, "validate", lambda c, a: a[0].step == n)
    elif point == "save":  # while checkpoint step-n is taken: its tensors read, their copy and write to come
        # (the training thread's part of a save; a periodic checkpoint's files are written in the background)
        _wrap(loop.Trainer, "state", lambda c, a: a[0].step == n, after=True)
    elif point == "write":  # while checkpoint step-n's files are written (between them), in whichever thread
        _wrap(checkpoint, "save_file",
              lambda c, a: f"step-{n:08d}" in str(a[1]) and str(a[1]).endswith("optimizer.safetensors"))
    else:
        raise ValueError(f"unknown signal point {point!r}")
