"""Block streaming: frozen weights live in host memory and visit the device one block at a time.

A *unit* is a block that diffusers wraps in gradient checkpointing (a UNet's ResNet and transformer
blocks, FLUX.1's double and single blocks). Its frozen tensors (base weights in their storage dtype,
norms, fp8 scales) stay in host RAM, pinned on CUDA/ROCm; trainable tensors (LoRA adapters inside the
block) stay on the device. Around each unit's forward, hooks swap the module attributes to fresh device
copies (fetched on a side stream one unit ahead where there is one) and back to the host tensors after.

Why attribute swaps, not ``param.data`` swaps (what diffusers' group offloading does): autograd keeps
the tensors it saved for backward. A fresh copy saved by autograd stays valid until its backward ran and
is then freed; a ``.data`` swap changes the saved tensor itself (a device mismatch in backward on a GPU)
or, for a saved view, keeps the device bytes alive anyway. Backward gets the weights back two ways:

- gradient checkpointing: the recomputation calls the unit again, so its hooks fetch it again;
- saved outside a checkpoint (no checkpointing, or a block diffusers does not checkpoint, such as a
  UNet mid block's first ResNet): a saved-tensor hook replaces the saved copy by a token and fetches
  the weight again when backward unpacks it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .pinning import exact_pinning

# The blocks diffusers checkpoints one by one (``_gradient_checkpointing_func(block, ...)``): streaming at
# that granularity is what lets recomputation bring a block's weights back through its own hooks.
# Units copied ahead of the one computing: one hides the copy behind a block's compute; the card holds
# 1 + PREFETCH blocks of streamed weights at a time.
PREFETCH = 1
UNIT_CLASSES = ("ResnetBlock2D", "BasicTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


def stream_units(model: nn.Module, classes: Sequence[str] = UNIT_CLASSES) -> list[tuple[str, nn.Module]]:
    """The streamable blocks of ``model`` (outermost matches only), in registration order."""
    units: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if type(mod).__name__ in classes and not any(name.startswith(u + ".") for u, _ in units):
            units.append((name, mod))
    return units


@dataclass
class _Slot:
    """One frozen tensor of a unit: where it sits in the module tree, and its host-memory copy."""

    module: nn.Module
    kind: str  # "_parameters" or "_buffers"
    name: str
    host: torch.Tensor


@dataclass
class Unit:
    """A streamed block: its frozen tensors and their bytes."""

    name: str
    module: nn.Module
    slots: list[_Slot]

    @property
    def nbytes(self) -> int:
        return sum(s.host.numel() * s.host.element_size() for s in self.slots)


def _frozen_slots(module: nn.Module) -> list[_Slot]:
    """Every frozen parameter and buffer inside ``module`` (buffers are read-only in these models)."""
    slots = []
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None and not p.requires_grad:
                slots.append(_Slot(mod, "_parameters", name, p))
        for name, b in mod._buffers.items():
            if b is not None:
                slots.append(_Slot(mod, "_buffers", name, b))
    return slots


def unit_bytes(module: nn.Module) -> int:
    """Bytes of the frozen tensors a unit would stream."""
    return sum(s.host.numel() * s.host.element_size() for s in _frozen_slots(module))


def select_units(units: list[tuple[str, nn.Module]], fraction: float) -> list[tuple[str, nn.Module]]:
    """The units to stream for ``fraction`` (0-1) of their frozen bytes: largest first, fewest blocks.

    Bus time is proportional to the bytes streamed, whichever blocks carry them; taking the largest
    blocks first reaches the bytes with the fewest hooks. Returned in the original order.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"memory.stream_blocks = {fraction!r} is not a fraction",
                          "use a number from 0 (off) to 1 (stream every block)")
    if fraction == 0.0 or not units:
        return []
    sizes = {name: unit_bytes(mod) for name, mod in units}
    target = fraction * sum(sizes.values())
    chosen: set[str] = set()
    total = 0
    for name in sorted(sizes, key=lambda n: -sizes[n]):  # stable: ties keep registration order
        if total >= target - 0.5:
            break
        chosen.add(name)
        total += sizes[name]
    return [(n, m) for n, m in units if n in chosen]


@dataclass
class _Token:
    """What a saved-tensor hook keeps instead of a streamed weight: which one, and the saved view's shape."""

    unit: int
    slot: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass
class StreamStats:
    """Counters for tests and the profiler's bus estimate."""

    fetched_bytes: int = 0  # host -> device copies (whole units and single weights)
    unit_fetches: int = 0
    weight_fetches: int = 0  # single weights brought back by a saved-tensor unpack
    prefetch_misses: int = 0  # a prefetched unit dropped unused
    orders: dict[str, list[int]] = field(default_factory=dict)


class BlockStreamer:
    """Streams the frozen tensors of ``units`` (default: every unit of ``model``) between host and ``device``.

    ``prefetch``: how many units ahead to copy (on a side stream on CUDA/ROCm); the device holds at most
    ``1 + prefetch`` units of streamed weights at a time. ``host`` is where the streamed tensors live (the
    CPU; ``meta`` when ``device`` is). ``on_fetch(unit_index, copies)`` is told of every copy made (the
    profiler labels them). Call ``close()`` to remove the hooks.
    """

    def __init__(self, model: nn.Module, device: str | torch.device,
                 units: Iterable[tuple[str, nn.Module]] | None = None, *, prefetch: int = PREFETCH,
                 pin: bool | None = None, host: str | torch.device | None = None,
                 on_fetch: Callable[[int, list[torch.Tensor]], None] | None = None) -> None:
        self.model = model
        self.device = torch.device(device)
        self.prefetch = max(0, int(prefetch))
        self.on_fetch = on_fetch
        self.stats = StreamStats()
        chosen = list(stream_units(model) if units is None else units)
        self.units = [Unit(name, mod, _frozen_slots(mod)) for name, mod in chosen]
        self._trainable = [any(p.requires_grad for p in u.module.parameters()) for u in self.units]
        seen: set[int] = set()
        for u in self.units:
            for s in u.slots:
                if id(s.host) in seen:
                    raise ConfigError(f"a frozen tensor of block {u.name} is shared with another streamed block",
                                      "stream blocks that own their weights (memory.stream_blocks=0 for this model)")
                seen.add(id(s.host))
        self.pinned = (self.device.type == "cuda") if pin is None else pin
        if self.pinned:
            exact_pinning()  # the weights are pinned once for the run: rounding them up would only waste RAM
        self._host_device = torch.device(host) if host is not None else \
            torch.device("meta") if self.device.type == "meta" else torch.device("cpu")
        self._cache: dict[int, list[torch.Tensor]] = {}  # unit -> device copies (fetched or prefetched)
        self._events: dict[int, Any] = {}  # unit -> side-stream event its copies are ready at
        self._live: dict[int, tuple[int, int]] = {}  # storage id of a cached copy -> (unit, slot)
        self._orders: dict[str, list[int]] = {"forward": [], "backward": []}
        self._learning = {"forward": True, "backward": True}
        # of the last forward with autograd: units that will see backward, and units whose weights
        # autograd saved outside a checkpoint (those are not recomputed: no hooks fire in backward)
        self._needs_grad: set[int] = set()
        self._packed: set[int] = set()
        self._in_backward_pass = False
        self._saving: Any = None
        self._stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self._place()
        self._handles = []
        for i, u in enumerate(self.units):
            self._handles.append(u.module.register_forward_pre_hook(partial(self._before_unit, i), with_kwargs=True))
            self._handles.append(u.module.register_forward_hook(partial(self._after_unit, i), always_call=True))
        self._handles.append(model.register_forward_pre_hook(self._before_model))
        self._handles.append(model.register_forward_hook(self._after_model, always_call=True))

    # --- placement -------------------------------------------------------------------------------
    def _place(self) -> None:
        """Everything but the streamed tensors to the device; those to host memory (pinned on a GPU)."""
        for u in self.units:
            for s in u.slots:
                getattr(s.module, s.kind)[s.name] = None  # hidden from .to(): it skips None entries
        self.model.to(self.device)
        for u in self.units:
            for s in u.slots:
                data = s.host.data.to(self._host_device)
                if self.pinned and not data.is_pinned():
                    data = data.pin_memory()
                if isinstance(s.host, nn.Parameter):
                    s.host.data = data  # keeps the Parameter (state_dict and peft refer to it)
                else:
                    s.host = data
                getattr(s.module, s.kind)[s.name] = s.host

    def host_tensors(self) -> list[torch.Tensor]:
        """The streamed tensors as they live in host memory."""
        return [s.host for u in self.units for s in u.slots]

    @property
    def host_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    # --- copies ----------------------------------------------------------------------------------
    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self._stream is not None, copy=True)

    def _fetch(self, i: int) -> list[torch.Tensor]:
        """Copy unit ``i`` to the device (on the side stream if any) and keep the copies in the cache."""
        unit = self.units[i]
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with ctx:
            copies = [self._copy(s.host) for s in unit.slots]
        if self._stream is not None:
            event = torch.cuda.Event()
            event.record(self._stream)
            self._events[i] = event
        self._cache[i] = copies
        for j, c in enumerate(copies):
            self._live[_storage_id(c)] = (i, j)
        self.stats.fetched_bytes += unit.nbytes
        self.stats.unit_fetches += 1
        if self.on_fetch is not None:
            self.on_fetch(i, copies)
        return copies

    def _drop(self, i: int) -> None:
        """Forget unit ``i``'s copies: autograd may still hold some, and frees them after their backward."""
        for c in self._cache.pop(i, []):
            self._live.pop(_storage_id(c), None)
        self._events.pop(i, None)

    def _ready(self, i: int) -> list[torch.Tensor]:
        copies = self._cache.get(i) or self._fetch(i)
        event = self._events.pop(i, None)
        if event is not None:  # compute waits for the side-stream copy; the allocator for compute
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for c in copies:
                c.record_stream(current)
        return copies

    # --- hooks -----------------------------------------------------------------------------------
    def _phase(self) -> str:
        # inside backward (a checkpoint recomputation) the autograd engine runs a graph task
        return "backward" if torch._C._current_graph_task_id() != -1 else "forward"

    def _before_unit(self, i: int, module: nn.Module, args: Any, kwargs: Any) -> None:
        phase = self._phase()
        if phase == "forward" and torch.is_grad_enabled() and (
                self._trainable[i] or any(t.requires_grad for t in _tensors((args, kwargs)))):
            self._needs_grad.add(i)
        if phase == "backward" and not self._in_backward_pass:
            self._in_backward_pass = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)
        order = self._orders[phase]
        if self._learning[phase]:
            order.append(i)
        ahead = self._ahead(phase, i)
        for j in list(self._cache):  # a prefetch the order did not bring: drop it before fetching more
            if j != i and j not in ahead:
                self._drop(j)
                self.stats.prefetch_misses += 1
        copies = self._ready(i)
        for s, c in zip(self.units[i].slots, copies, strict=True):
            getattr(s.module, s.kind)[s.name] = c
        for j in ahead:
            if j not in self._cache:
                self._fetch(j)

    def _after_unit(self, i: int, module: nn.Module, args: Any, output: Any) -> None:
        for s in self.units[i].slots:
            getattr(s.module, s.kind)[s.name] = s.host
        self._drop(i)

    def _ahead(self, phase: str, i: int) -> list[int]:
        """The next ``prefetch`` units after ``i`` in the order this phase ran last time (or is predicted)."""
        order = self._orders[phase]
        if phase == "backward" and self._learning["backward"]:
            # first backward: recomputation runs the checkpointed units that need grad, backwards
            order = [] if self._learning["forward"] else [
                j for j in self._orders["forward"][::-1] if j in self._needs_grad and j not in self._packed]
        elif self._learning[phase]:
            return []
        if i not in order or not self.prefetch:
            return []
        at = order.index(i)
        return order[at + 1: at + 1 + self.prefetch]

    def _before_model(self, module: nn.Module, args: Any) -> None:
        self._drop_all()
        if torch.is_grad_enabled():
            self._needs_grad, self._packed = set(), set()
            self._saving = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._saving.__enter__()

    def _after_model(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._saving is not None:
            self._saving.__exit__(None, None, None)
            self._saving = None
        self._end_pass("forward")

    def _after_backward(self) -> None:
        self._in_backward_pass = False
        self._end_pass("backward")

    def _end_pass(self, phase: str) -> None:
        """A forward or backward is over: its order is learned (once), and nothing stays on the device."""
        if self._learning[phase] and self._orders[phase]:
            self._learning[phase] = False
            self.stats.orders[phase] = list(self._orders[phase])
        self._drop_all()

    def _drop_all(self) -> None:
        for j in list(self._cache):
            self._drop(j)

    # --- weights saved for backward outside a checkpoint -----------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        hit = self._live.get(_storage_id(t))
        if hit is None or t.dtype != self._cache[hit[0]][hit[1]].dtype:
            return t
        self._packed.add(hit[0])
        return _Token(hit[0], hit[1], tuple(t.size()), tuple(t.stride()), t.storage_offset())

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Token):
            return saved
        cached = self._cache.get(saved.unit)
        if cached is not None:
            base = self._ready(saved.unit)[saved.slot]
        else:
            with torch.no_grad():
                base = self._copy(self.units[saved.unit].slots[saved.slot].host)
            host = self.units[saved.unit].slots[saved.slot].host
            self.stats.fetched_bytes += host.numel() * host.element_size()
            self.stats.weight_fetches += 1
            if self.on_fetch is not None:
                self.on_fetch(saved.unit, [base])
        return base.as_strided(saved.size, saved.stride, saved.offset)

    # --- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the hooks; the streamed tensors stay in host memory."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._drop_all()


def _tensors(tree: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def stream_frozen_blocks(model: nn.Module, device: str | torch.device, fraction: float = 1.0, *,
                         prefetch: int = PREFETCH, pin: bool | None = None) -> BlockStreamer:
    """Stream ``fraction`` of the frozen block bytes of ``model`` (after LoRA and frozen dtypes are set).

    Moves the rest of the model to ``device``; returns the streamer (keep it: it owns the hooks).
    """
    units = select_units(stream_units(model), fraction)
    if not units:
        raise ConfigError(f"{type(model).__name__} has no blocks to stream (memory.stream_blocks={fraction:g})",
                          "use memory.stream_blocks=0 for this model")
    return BlockStreamer(model, device, units, prefetch=prefetch, pin=pin)


def blocks_for(fraction: float, model: nn.Module) -> tuple[int, int]:
    """(blocks streamed, blocks streamable) for ``fraction`` — for plans and notes."""
    units = stream_units(model)
    return len(select_units(units, fraction)), len(units)


__all__ = ["PREFETCH", "BlockStreamer", "StreamStats", "Unit", "UNIT_CLASSES", "blocks_for", "select_units",
           "stream_frozen_blocks", "stream_units", "unit_bytes"]
