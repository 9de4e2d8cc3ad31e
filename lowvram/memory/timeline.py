"""The run being replayed on the profiler's device: the storage tracker, the autocast emulation, where tensors
are placed, and the stage each allocation is counted in."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .autocast import MetaAutocast
from .tracker import StorageTracker


class Timeline:
    """The run being replayed: the tracker, the device, the autocast emulation, and placement helpers."""

    def __init__(self, tracker: StorageTracker, device: str | torch.device, compute: torch.dtype,
                 autocast_device: str) -> None:
        self.tracker, self.device, self.compute, self.autocast_device = tracker, device, compute, autocast_device
        self.meta = str(device) == "meta"
        self.keep: list[Any] = []  # what the run keeps alive to its end (optimizer state of unstepped tensors)
        self.bus_bytes = 0  # streamed weights copied to the card in one micro-batch of the training step
        # what the card has free before the run loads anything (vram - context); None: the CPU is the card, or
        # the card's size is not known
        self.free_bytes: int | None = None

    def autocast(self, on: bool = True) -> Any:
        """The trainer's ``torch.autocast`` (emulated on meta, where real autocast does nothing)."""
        if not on or self.compute == torch.float32:
            return contextlib.nullcontext()
        if self.meta:
            return MetaAutocast(self.compute, self.autocast_device)
        return torch.autocast(torch.device(self.device).type, dtype=self.compute)

    def recompute(self) -> Callable[[], Any] | None:
        if not self.meta or self.compute == torch.float32:
            return None
        return lambda: MetaAutocast(self.compute, self.autocast_device, cache=False)

    def place(self, modules: list[nn.Module], host: bool) -> None:
        for m in modules:
            self.tracker.place([*m.parameters(), *m.buffers()], host)

    @contextlib.contextmanager
    def stage(self, name: str, counting: bool = True) -> Iterator[None]:
        self.tracker.stage, self.tracker.counting = name, counting
        self.tracker.phase = name
        try:
            yield
        finally:
            self.tracker.stage, self.tracker.counting = "setup", False


@contextlib.contextmanager
def rng_states_tracked(tracker: StorageTracker) -> Iterator[None]:
    """Gradient checkpointing saves the CPU generator's state (5 KB) per checkpointed block until backward
    recomputes it; ``torch.get_rng_state`` makes that tensor outside the dispatcher, so it is registered
    here: host memory beside a card, the card's own memory when the card is the CPU."""
    original = torch.get_rng_state

    def tracked() -> torch.Tensor:
        state = original()
        tracker.register(state, "activations", host=True)
        return state

    torch.get_rng_state = tracked
    try:
        yield
    finally:
        torch.get_rng_state = original


def empty(shape: tuple[int, ...], device: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor: the stages need shapes and dtypes, never values."""
    return torch.empty(shape, device=device, dtype=dtype)


def token_ids(batch: int, tokens: int, device: Any) -> torch.Tensor:
    """A batch of token ids as the tokenizer pads them (the text encoders' input)."""
    return torch.zeros(batch, tokens, dtype=torch.long, device=device)
