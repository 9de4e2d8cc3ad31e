"""Training events and the listeners that show or store them (progress bar, JSONL, TensorBoard).

The loop only emits events; how they are shown is up to the listeners, so the CLI and the web panel
watch the same run the same way.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class Event:
    """Something that happened in a run: ``kind`` is start, step, val, sample, checkpoint, warning, note, end;
    ``phase`` when the run enters or finishes a phase (train/phases.py), ``phases`` for the time account.
    A ``note`` is a line for the user about what the run decided or did (loading, caches, resume), in
    ``data["message"]``: the CLI prints it, the panel's training process records it with the other events."""

    kind: str
    step: int
    data: dict[str, Any] = field(default_factory=dict)


def note(message: str, step: int = 0) -> Event:
    """A note event: one line for the user (printed by the CLI as it is)."""
    return Event("note", step, {"message": message})


def print_notes(event: Event) -> None:
    """A listener that prints note events to stdout (without a progress bar, which writes them itself)."""
    if event.kind == "note":
        print(event.data.get("message", ""), flush=True)


class Listener(Protocol):
    def __call__(self, event: Event) -> None: ...


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; a non-finite loss is logged as a string so the line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlLogger:
    """Appends step, loss, lr, peak memory, it/s, validation numbers and each finished phase's seconds to
    ``metrics.jsonl``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __call__(self, event: Event) -> None:
        if event.kind not in ("step", "val", "eval", "nonfinite", "end", "phases") and not (
                event.kind == "phase" and event.data.get("state") == "end"):
            return
        row = {"kind": event.kind, "step": event.step, **{k: _clean(v) for k, v in event.data.items()}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class TensorBoardLogger:
    """Scalars to TensorBoard event files in the run folder (optional dependency at run time).

    The writer (TensorBoard and protobuf: ~0.3 s of imports) opens with the first scalar, after the first
    step, so it does not hold the first step back.
    """

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self.writer: Any = None

    def __call__(self, event: Event) -> None:
        if event.kind in ("step", "val"):
            for key, value in event.data.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._writer().add_scalar(f"{event.kind}/{key}", value, event.step)
        if self.writer is None:
            return
        if event.kind == "end":
            self.writer.close()
        elif event.kind == "val":
            self.writer.flush()

    def _writer(self) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.logdir))
        return self.writer


class ProgressBar:
    """A tqdm bar with the current phase, step, loss, it/s, ETA and peak memory."""

    def __init__(self, total: int, initial: int = 0, disable: bool = False) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True)

    def __call__(self, event: Event) -> None:
        if event.kind == "step":
            self.bar.n = event.step
            d = event.data
            post = {"loss": f"{d.get('loss', float('nan')):.4f}"}
            if "peak_mem_mib" in d:
                post["mem"] = f"{d['peak_mem_mib']:.0f}MiB"
            if "effective_batch" in d:  # micro-batch x accumulation x processes
                post["batch"] = str(d["effective_batch"])
            self.bar.set_postfix(post, refresh=False)
            self.bar.refresh()
        elif event.kind in ("warning", "nonfinite"):
            self.bar.write(f"warning: {event.data.get('message', event.data)}")
        elif event.kind == "note":
            self.bar.write(str(event.data.get("message", "")), file=sys.stdout)  # where print() put it
        elif event.kind == "checkpoint":
            took = event.data.get("write_s")
            self.bar.write(f"checkpoint: {event.data.get('path')}" + (f" (written in {took:.1f} s)" if took is not None else ""))
        elif event.kind == "val":
            self.bar.write(f"step {event.step}: validation loss {event.data.get('val_loss', float('nan')):.4f}")
        elif event.kind == "phase" and event.data.get("state") == "start":
            self.bar.set_description_str(str(event.data.get("phase", "")), refresh=True)
        elif event.kind == "end":
            self.bar.close()


def event_dict(event: Event) -> dict[str, Any]:
    return asdict(event)
