"""Check the profiler against reality: the same step on real CPU tensors, measured by the allocator.

The measurement is independent of the storage tracker: ``torch.profiler`` records the allocations and frees
of the CPU allocator (``profile_memory=True``) with the allocator's own count of the bytes it holds (every
thread's, not only the threads the profiler follows) and the storages mapped from files; the maximum inside
the step is the real peak. Only the model code and training step are shared — the same step, two ways of
counting.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from .profiler import MemoryProfile, profile_step
from .stages import STEP_RANGE
from .workloads import Knobs, Workload


@contextmanager
def _every_thread_counted() -> Iterator[bool]:
    """While open, the CPU allocator keeps its byte count for allocations on every thread; yields whether it
    does.

    ``torch.profiler`` reports an allocation only on threads the profiler follows (the one that started it,
    autograd's and intra-op workers): a Python thread pool's allocations — transformers loads a checkpoint's
    tensors and casts them to the load dtype on one — are not reported, although the tensors then live in the
    model for the whole run. With c10's ``caffe2_report_cpu_memory_usage`` flag (no Python setter: it is set
    in libc10's data) the allocator counts every thread's bytes, and each event it reports carries that count.
    Outside the measure the flag is as it was, as the profiler's own counting is: only bytes allocated while
    measuring are ever counted.
    """
    name = {"win32": "c10.dll", "darwin": "libc10.dylib"}.get(sys.platform, "libc10.so")
    try:
        flag = ctypes.c_bool.in_dll(ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / name)),
                                    "FLAGS_caffe2_report_cpu_memory_usage")
    except (OSError, ValueError):
        warnings.warn("the fidelity measure cannot count tensors made on threads torch.profiler does not follow "
                      f"(no FLAGS_caffe2_report_cpu_memory_usage in {name}); it may read low", stacklevel=3)
        yield False
        return
    before = flag.value
    flag.value = True
    try:
        yield True
    finally:
        flag.value = before


def _allocations(prof: Any, every_thread: bool) -> list[tuple[int, int]]:
    """(time, live bytes after it) of each CPU allocation or free the profiler reported, in time order.

    Two kinds of reports: the CPU allocator's, each with the allocator's running total, and those of storages
    mapped from files (a safetensors checkpoint's tensors until they are copied or cast: the whole file),
    reported with a total of 0. Live bytes: the allocator's total (every thread's bytes with
    ``every_thread``, from the first report's) plus the mapped storages held; without ``every_thread``, the
    running sum of all reports (the profiled threads' bytes only).
    """
    if not every_thread:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        out, live = [], 0
        for t, nbytes in events:
            live += nbytes
            out.append((t, live))
        return out
    found: list[tuple[int, int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        extra = node.extra_fields
        if type(extra).__name__ == "_ExtraFields_Allocation" and extra.device.type == "cpu":
            found.append((node.start_time_ns, extra.alloc_size, extra.total_allocated, extra.ptr))
    found.sort(key=lambda f: f[0])
    out = []
    base = None  # the allocator's total before the measured function
    total = mapped = 0
    mapped_at: set[int] = set()
    for t, nbytes, allocated, ptr in found:
        if (nbytes > 0 and allocated == 0) or (nbytes < 0 and ptr in mapped_at):  # a mapped file's storage
            mapped += nbytes
            (mapped_at.add if nbytes > 0 else mapped_at.discard)(ptr)
        else:
            if base is None:
                base = allocated - nbytes
            total = allocated - base
        out.append((t, total + mapped))
    return out


def allocator_peak(fn: Any, window: str | None = STEP_RANGE) -> tuple[int, Any]:
    """Run ``fn()`` under the profiler; returns (peak bytes the CPU allocator held, fn's result).

    With ``window`` (a ``record_function`` name, or a prefix ending in ``.`` for every range named so),
    the peak is taken inside those ranges only (all bytes allocated before them still count): the
    step, not the model building that precedes it. Bytes allocated on threads the profiler does not follow
    count too (see ``_every_thread_counted``), read at the next event the profiled threads report.
    """
    # Frees of tensors allocated before the profiler started would lower the peak where the fallback counts
    # events: collect earlier garbage now and keep the collector from freeing any inside the window.
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with _every_thread_counted() as every_thread, \
                profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            torch.empty(1)  # the first report: the allocator's total before fn (other threads may allocate first)
            result = fn()
    finally:
        if enabled:
            gc.enable()
    kineto = prof.profiler.kineto_results.events()

    def named(name: str) -> bool:
        return name == window or (window is not None and window.endswith(".") and name.startswith(window))

    merged: list[list[int]] = []  # the windows as disjoint [start, end] intervals, in time order
    for start, end in sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in kineto if named(e.name())):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    peak = 0
    j = 0
    for t, live in _allocations(prof, every_thread):
        if window is None:
            peak = max(peak, live)
            continue
        while j < len(merged) and merged[j][1] < t:
            j += 1
        if j < len(merged) and merged[j][0] <= t:
            peak = max(peak, live)
    return peak, result


def run_peak(argv: list[str]) -> tuple[int, int]:
    """``lowvram <argv>`` (a ``train`` command) in this process: (the allocator's peak inside the run's
    memory ranges — steps, previews, validation, caching, the autoencoder stage —, exit code)."""
    import gc

    from ..cli import main
    from ..train.step import RANGE_PREFIX

    # what earlier work left for the garbage collector must not be freed inside the measured run (the
    # allocator would report those frees, of bytes it never saw allocated, as negative live bytes)
    gc.collect()
    gc.freeze()
    try:
        return allocator_peak(lambda: main(argv), window=RANGE_PREFIX)
    finally:
        gc.unfreeze()


def compare(workload: Workload, knobs: Knobs) -> tuple[MemoryProfile, int, MemoryProfile]:
    """(prediction on meta, peak measured on real CPU tensors, tracker's own count on CPU).

    The prediction uses the CPU autocast op lists so that fp16/bf16 plans compare like for like.
    """
    torch.manual_seed(0)
    predicted = profile_step(workload, knobs, card=CPU_CARD, device="meta")
    measured, on_cpu = allocator_peak(lambda: profile_step(workload, knobs, card=CPU_CARD, device="cpu"))
    return predicted, measured, on_cpu


# The CPU as the card: host memory is its memory (nothing offloaded leaves it), CPU autocast rules, and
# torch's CPU SDPA kernel (flash-style, O(N)).
CPU_CARD = SimpleNamespace(name="CPU", backend="cpu", arch="any", flash_attention=True, bf16=True, fp16=False,
                           bitsandbytes=True, xformers=False, context_gib=0.0, margin_gib=0.0)


# ---- the run-level check: `lowvram plan`'s prediction vs `lowvram train` on the CPU -------------------------

# Every job kind, as the `--set` items over a short tiny run (tests/test_plan_fidelity.py and
# bench/plan_fidelity.py): "model" is a tiny checkpoint family or a from-scratch task.
RUN_CASES: dict[str, dict[str, Any]] = {
    "scratch pixel (EMA on the card, validation)": {"model": "text2img", "sets": {}},
    "scratch latent + autoencoder stage (EMA on CPU)": {"model": "latent", "sets": {
        "train.autoencoder_steps": 2, "train.ema_on_cpu": True}},
    "LoRA SD1 (EMA on the card)": {"model": "sd1", "sets": {}},
    "LoRA SD1 + text encoder, fused backward": {"model": "sd1", "sets": {
        "lora.text_encoder": True, "memory.fused_backward": True}},
    "LoRA SDXL": {"model": "sdxl", "sets": {}},
    "LoRA SDXL, text encoders on the CPU (previews from the text cache)": {"model": "sdxl", "sets": {
        "memory.text_encoders": "cpu"}},
    "LoRA SDXL + text encoders, bf16, fp16 frozen": {"model": "sdxl", "sets": {
        "lora.text_encoder": True, "train.precision": "bf16", "memory.frozen_dtype": "fp16"}},
    "full fine-tune SD1, fused backward + accumulation": {"model": "sd1", "task": "full", "sets": {
        "memory.fused_backward": True, "train.grad_accum": 2, "train.batch_size": 1}},
    "prior preservation SD1 (EMA on CPU)": {"model": "sd1", "sets": {
        "data.class_data": "{class_data}", "train.ema_on_cpu": True}},
    "class images drawn by the base SD1 first": {"model": "sd1", "sets": {
        "data.class_data": "{new_folder}", "data.num_class_images": 2, "data.class_prompt": "a photo of a dog"}},
    # 4 images a batch: the run maps its cache files (~80 KiB of 16-channel latents and T5 rows, host memory the
    # profile does not model) and they stay under 5 % of a tiny FLUX.1 run only beside a larger step
    "LoRA FLUX.1-dev (caching pass, flow-matching preview)": {"model": "flux", "sets": {"train.batch_size": 4}},
}

TINY_RUN_SETS = {  # a short run: 2 steps (the second is the steady state), one preview at the end
    "run.checkpoint_every": 0, "run.sample_every": 0, "run.tensorboard": False, "run.log_every": 1,
    "sample.steps": 1, "sample.cfg_scales": "3", "train.warmup_steps": 0,
}


def case_argv(case: dict[str, Any], out: Path, models: dict[str, Path], data: Path, class_data: Path,
              cache: Path) -> list[str]:
    """``lowvram train`` arguments of a RUN_CASES entry on the CPU preset (tiny models and images)."""
    model = case["model"]
    argv = ["train", "--preset", "cpu", "--steps", "2", "--out", str(out), "--no-progress"]
    sets: dict[str, Any] = dict(TINY_RUN_SETS)
    if model in ("text2img", "latent"):
        argv += ["--task", model, "--model", "tiny"]
        sets.update({"data.num_images": 24, "data.resolution": 16, "train.batch_size": 4, "run.val_every": 2,
                     "sample.prompts": "a red circle on a blue background"})
    else:
        argv += ["--task", case.get("task", "lora"), "--model", str(models[model]), "--data", str(data)]
        sets.update({"data.resolution": 32, "train.batch_size": 2, "data.cache_dir": str(cache), "lora.rank": 4,
                     "sample.prompts": "a photo of sks dog"})
    sets.update(case["sets"])
    for key, value in sets.items():
        text = str(value).format(class_data=class_data, new_folder=out.with_name(f"{out.name}-drawn")) \
            if isinstance(value, str) else str(value).lower() \
            if isinstance(value, bool) else str(value)
        argv += ["--set", f"{key}={text}"]
    return argv


def predict_and_measure(argv: list[str]) -> tuple[int, int, dict[str, Any]]:
    """(the plan's peak, the allocator's peak of the run, the plan record) of ``lowvram train <argv>`` in this
    process. The prediction is the plan the run itself made and saved (``plan.yaml``), which is what
    ``lowvram plan`` prints for the same arguments (tests/test_plan_fields.py holds that)."""
    from ..cli import build_parser
    from .run_plan import read_plan

    measured, code = run_peak(argv)
    if code != 0:
        raise RuntimeError(f"lowvram {' '.join(argv)} exited with {code}")
    record = read_plan(build_parser().parse_args(argv).out).record
    return int(record["peak_bytes"]), measured, record
