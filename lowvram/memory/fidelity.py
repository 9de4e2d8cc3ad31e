"""Check the profiler against reality: the same step on real CPU tensors, measured by the allocator.

The measurement is independent of the storage tracker: ``torch.profiler`` records every allocation and
free of the CPU allocator (``profile_memory=True``); their running sum's maximum inside the step is the
real peak. Only the model code and training step are shared — the same step, two ways of counting.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from .profiler import STEP_RANGE, MemoryProfile, profile_step
from .workloads import Knobs, Workload


def allocator_peak(fn: Any, window: str | None = STEP_RANGE) -> tuple[int, Any]:
    """Run ``fn()`` under the profiler; returns (peak bytes the CPU allocator held, fn's result).

    With ``window`` (a ``record_function`` name), the peak is taken inside that range only (all bytes
    allocated before it still count): the step, not the model building that precedes it.
    """
    # Frees of tensors allocated before the profiler started count as negative bytes and would lower the
    # peak: collect earlier garbage now and keep the collector from freeing any inside the window.
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    finally:
        if enabled:
            gc.enable()
    kineto = prof.profiler.kineto_results.events()
    events = sorted((e.start_ns(), e.nbytes()) for e in kineto if e.name() == "[memory]")
    start, end = 0, None
    ranges = [e for e in kineto if e.name() == window] if window else []
    if ranges:
        start, end = ranges[0].start_ns(), ranges[0].start_ns() + ranges[0].duration_ns()
    live = peak = 0
    for t, nbytes in events:
        live += nbytes
        if t >= start and (end is None or t <= end):
            peak = max(peak, live)
    return peak, result


def compare(workload: Workload, knobs: Knobs) -> tuple[MemoryProfile, int, MemoryProfile]:
    """(prediction on meta, peak measured on real CPU tensors, tracker's own count on CPU).

    The prediction uses the CPU autocast op lists so that fp16/bf16 plans compare like for like.
    """
    torch.manual_seed(0)
    predicted = profile_step(workload, knobs, device="meta", autocast_device="cpu")
    measured, on_cpu = allocator_peak(lambda: profile_step(workload, knobs, device="cpu"))
    return predicted, measured, on_cpu
