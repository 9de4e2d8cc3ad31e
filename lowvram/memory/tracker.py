"""Live tensor bytes per storage, tracked under a ``TorchDispatchMode``: the profiler's measuring tape.

Every op's output storages are recorded once, with a weakref finalizer that logs their release, so
the log replays the exact live set at any instant. Works on ``meta`` (no bytes exist) and on real
tensors alike; categories are decided at the end, when it is known which storages became gradients.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

CATEGORIES = (
    "frozen_weights",
    "streamed_weights",  # device copies of frozen weights that live in host memory (lowvram.streaming)
    "trainable_weights",
    "gradients",
    "optimizer_state",
    "ema",
    "inputs",
    "activations",
    "temporaries",
)

# what a storage born in a phase is, when no category claimed it: born in forward and alive at the peak
# it is an activation (saved for backward); anything else unclaimed is a temporary
PHASE_CATEGORY = {"setup": "temporaries", "forward": "activations", "backward": "temporaries",
                  "optimizer": "temporaries", "autoencoder": "activations"}


def category_of(label: str, relabel: dict[str, str] | None = None) -> str:
    """The category of a storage labelled ``label`` (a category, or the phase it was born in)."""
    if label in CATEGORIES:
        return label
    return {**PHASE_CATEGORY, **(relabel or {})}.get(label, "temporaries")


_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default
_NONZERO = torch.ops.aten.nonzero.default


@dataclass
class _Record:
    nbytes: int
    label: str  # a category, or the phase ("forward", "backward", "optimizer") it was born in
    host: bool = False  # resident in host memory (offloaded, streamed): not on the card
    group: int | None = None  # e.g. the streamed block a copy belongs to


@dataclass
class TrackerResult:
    """Peak live bytes, the live bytes per category at that instant, and the phase it happened in."""

    peak_bytes: int
    by_category: dict[str, int]
    peak_phase: str
    end_bytes: int
    storages: int = 0
    notes: list[str] = field(default_factory=list)
    host_by_category: dict[str, int] = field(default_factory=dict)  # in host memory at the card's peak
    stage_peaks: dict[str, int] = field(default_factory=dict)  # the card's peak within each stage of the run


class StorageTracker(TorchDispatchMode):
    """Counts every storage an op creates until it is freed; ``register`` adds pre-existing tensors.

    On ``meta`` a ``.item()`` has no value; the tracker answers it with a neutral one (1 / True), and
    ``nonzero`` with one hit, so code that checks finiteness or looks up a code value runs through —
    values never decide memory in a training step.

    ``unified`` (a CPU "card": host memory is the device) counts offloaded storages like the others;
    otherwise ``place(..., host=True)`` moves a storage's bytes out of the card's count into host memory.
    ``stage`` names the part of the run (cache, train, preview, ...) whose peak ``stage_peaks`` keeps.
    """

    def __init__(self, unified: bool = False, device_type: str | None = None) -> None:
        super().__init__()
        self.unified = unified
        self.device_type = device_type  # tensors born on another device are host memory (profiling on meta)
        self.host_live = 0
        self._host_by_cat: dict[str, int] = {}
        self._host_at_peak: dict[str, int] = {}
        self.stage = "setup"
        self.stage_peaks: dict[str, int] = {}
        self.counting = True  # off while setting up (state creation): its temporaries are not a peak of the run
        self.host_births = False  # on: what ops create now is made in host memory (a copy to the CPU)
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._records: dict[int, _Record] = {}
        self._events: list[tuple[int, int]] = []  # (+key | -key, running total after the event)
        self._next = 1
        self.live = 0
        self.peak = 0
        self._peak_event = -1
        self._peak_phase = "setup"
        self._reset_event = -1
        self.phase = "setup"

    # --- recording -------------------------------------------------------------------------------
    def _grew(self) -> None:
        """Called whenever the card's live bytes rose: keep the peak (and the stage's)."""
        if not self.counting:
            return
        if self.live > self.stage_peaks.get(self.stage, -1):
            self.stage_peaks[self.stage] = self.live
        if self.live > self.peak:
            self.peak, self._peak_event, self._peak_phase = self.live, len(self._events) - 1, self.phase
            self._host_at_peak = dict(self._host_by_cat)

    def _host_add(self, rec: _Record, sign: int) -> None:
        cat = category_of(rec.label)
        self.host_live += sign * rec.nbytes
        self._host_by_cat[cat] = self._host_by_cat.get(cat, 0) + sign * rec.nbytes

    def _add(self, storage: torch.UntypedStorage, label: str, host: bool = False) -> int | None:
        key = self._seen.get(storage)
        if key is not None:
            return key
        nbytes = storage.nbytes()
        key = self._next
        self._next += 1
        self._seen[storage] = key
        rec = self._records[key] = _Record(nbytes, label, host and not self.unified)
        if rec.host:
            self._host_add(rec, +1)
        else:
            self.live += nbytes
            self._events.append((key, self.live))
            self._grew()
        weakref.finalize(storage, self._free, key)
        return key

    def _free(self, key: int) -> None:
        rec = self._records.get(key)
        if rec is None:
            return
        if rec.host:
            self._host_add(rec, -1)
            rec.host = False
            return
        self.live -= rec.nbytes
        self._events.append((-key, self.live))

    def register(self, tensor: torch.Tensor, label: str, host: bool = False) -> None:
        """Count a tensor that exists already (weights, inputs, optimizer state) under ``label``; ``host``:
        it lives in host memory (counted on the card only when the card is the CPU)."""
        if isinstance(tensor, torch.Tensor):
            key = self._add(tensor.untyped_storage(), label, host)
            rec = self._records[key]
            if rec.host:
                self._host_add(rec, -1)
            rec.label = label
            if rec.host:
                self._host_add(rec, +1)
            if rec.host != (host and not self.unified):  # tracked already, on the other side
                self.place([tensor], host)

    def place(self, tensors: Any, host: bool) -> None:
        """Move tracked storages between the card and host memory (what ``.to("cpu")`` / ``.to(card)`` do
        in training; on ``meta`` nothing moves, the bytes change sides in the count)."""
        if self.unified:
            return
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            key = self._seen.get(t.untyped_storage())
            if key is None:
                self.register(t, "frozen_weights", host)
                continue
            rec = self._records[key]
            if rec.host == host:
                continue
            if host:
                self.live -= rec.nbytes
                self._events.append((-key, self.live))
                rec.host = True
                self._host_add(rec, +1)
            else:
                self._host_add(rec, -1)
                rec.host = False
                self.live += rec.nbytes
                self._events.append((key, self.live))
                self._grew()

    def mark(self, tensor: torch.Tensor, label: str, group: int | None = None) -> None:
        """Re-label a tracked tensor's storage (e.g. an op output that became a ``.grad``); ``group``
        ties it to a unit (a streamed block) for ``residency``."""
        key = self._seen.get(tensor.untyped_storage())
        if key is None:
            self.register(tensor, label)
            key = self._seen.get(tensor.untyped_storage())
        rec = self._records[key]
        rec.group = group
        if rec.host:
            self._host_add(rec, -1)
        rec.label = label
        if rec.host:
            self._host_add(rec, +1)

    def to_host(self, tensor: torch.Tensor) -> None:
        """Count a tensor as host memory from now on (a streamed block's weights): off the device."""
        self.place([tensor], True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LOCAL_SCALAR and args[0].device.type == "meta":
            return True if args[0].dtype == torch.bool else 1
        if func is _NONZERO and args[0].device.type == "meta":  # data-dependent size: say "one hit"
            return torch.zeros((1, args[0].dim()), dtype=torch.long, device="meta")
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = self._seen.get(st)
                if key is None:  # profiling on meta, a CPU tensor (a generator's noise) is host memory
                    self._add(st, self.phase, host=self.host_births or (
                        self.device_type is not None and t.device.type != self.device_type))
                elif st.nbytes() != self._records[key].nbytes:  # resized in place (out= ops)
                    rec = self._records[key]
                    if rec.host:
                        self._host_add(rec, -1)
                        rec.nbytes = st.nbytes()
                        self._host_add(rec, +1)
                        continue
                    self.live += st.nbytes() - rec.nbytes
                    rec.nbytes = st.nbytes()
                    self._events.append((key, self.live))
                    self._grew()
        return out

    # --- reading ---------------------------------------------------------------------------------
    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now (e.g. after a warm-up step)."""
        self.peak = self.live
        self._peak_event = len(self._events) - 1
        self._reset_event = self._peak_event
        self._peak_phase = self.phase
        self._host_at_peak = dict(self._host_by_cat)
        self.stage_peaks = {self.stage: self.live}

    def result(self, relabel: dict[str, str] | None = None) -> TrackerResult:
        """Replay the log to the peak and sum the live storages there by category.

        ``relabel`` maps a birth phase to its category: what was born in forward and is alive at the
        peak is an activation (saved for backward); anything else unclaimed is a temporary.
        """
        live: set[int] = set()
        for key, _total in self._events[: self._peak_event + 1]:
            if key > 0:
                live.add(key)
            else:
                live.discard(-key)
        by_cat = dict.fromkeys(CATEGORIES, 0)
        for key in live:
            rec = self._records[key]
            by_cat[category_of(rec.label, relabel)] += rec.nbytes
        host = {k: v for k, v in self._host_at_peak.items() if v}
        return TrackerResult(self.peak, by_cat, self._peak_phase, self.live, storages=len(self._records),
                             host_by_category=host, stage_peaks=dict(self.stage_peaks))

    def residency(self, label: str) -> tuple[int, int]:
        """(most groups, most bytes) of storages labelled ``label`` alive at one instant since
        ``reset_peak``, replayed from the log: e.g. how many streamed blocks were ever on the device."""
        live: set[int] = set()
        per_group: dict[int | None, int] = {}
        nbytes = most_groups = most_bytes = 0
        for i, (key, _running) in enumerate(self._events):
            rec = self._records[abs(key)]
            if rec.label == label:
                if key > 0 and key not in live:
                    live.add(key)
                    per_group[rec.group] = per_group.get(rec.group, 0) + 1
                    nbytes += rec.nbytes
                elif key < 0 and -key in live:
                    live.discard(-key)
                    per_group[rec.group] -= 1
                    if not per_group[rec.group]:
                        del per_group[rec.group]
                    nbytes -= rec.nbytes
            if i >= self._reset_event:
                most_groups, most_bytes = max(most_groups, len(per_group)), max(most_bytes, nbytes)
        return most_groups, most_bytes

    def scaled_peak(self, scale: dict[str, float]) -> tuple[int, dict[str, int]]:
        """Replay the log with the bytes of some categories scaled (e.g. gradients x 1/N when ZeRO
        partitions them): the peak since ``reset_peak`` and the categories at it, as if measured so."""
        def category(key: int) -> str:
            return category_of(self._records[key].label)

        def size(key: int) -> int:
            return int(self._records[key].nbytes * scale.get(category(key), 1.0))

        live: set[int] = set()
        total, best, best_live = 0, -1, set()
        for i, (key, _running) in enumerate(self._events):
            if key > 0 and key not in live:
                live.add(key)
                total += size(key)
            elif key < 0 and -key in live:
                live.discard(-key)
                total -= size(-key)
            if i >= self._reset_event and total > best:
                best, best_live = total, set(live)
        by_cat = dict.fromkeys(CATEGORIES, 0)
        for key in best_live:
            by_cat[category(key)] += size(key)
        return max(best, 0), by_cat
