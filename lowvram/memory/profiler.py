"""Profile a training run of a workload under a plan, on the ``meta`` device: bytes, not guesses.

The models are built on ``meta`` with the plan applied, then the run is replayed stage by stage under
the storage tracker, through the training code itself (``lowvram.train.step``, the trainer's
``FusedBackward``, the real optimizers and EMA): the cache stage (VAE / text encoders encode one batch;
FLUX.1's caching pass and flow-matching previews in ``flux_stages``),
the autoencoder stage of a latent job, a steady-state training step (forward, backward, optimizer, EMA
update), validation and the sample previews, each with what the trainer keeps on the card at that
moment. Shapes and dtypes decide memory, so the peak is exact for the tensors; the card's context and
a margin are added apart.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..card import GIB, CardSpec, tensor_budget
from ..errors import ConfigError
from ..pinning import round_threshold
from .drawing import class_image_stage, preview_stage
from .encoding import text_place
from .flux_stages import flux_load_and_cache, flux_preview_stage
from .knobs import effective_attention
from .optimizer_state import state_bytes
from .stages import autoencoder_stage, cache_stage, host_data, train_stage, validation_stage
from .streaming import pinned, pinned_overhead, stream_note
from .timeline import Timeline, rng_states_tracked
from .tracker import StorageTracker
from .workloads import PRECISIONS, Built, Knobs, Workload, build

# A card's defaults when only --vram is given: what the runtime takes beyond tensors (context) and the
# allocator's fragmentation / the desktop (margin). Presets carry measured values per card.
DEFAULT_CONTEXT_GIB = {"cpu": 0.0, "cuda": 0.35, "rocm": 0.5}
DEFAULT_MARGIN_GIB = 0.3


@dataclass
class MemoryProfile:
    """What the run of ``workload`` under ``knobs`` holds at its peak, by category, against a budget."""

    workload: str
    knobs: dict[str, Any]
    peak_bytes: int
    by_category: dict[str, int]
    peak_phase: str
    context_bytes: int = 0
    margin_bytes: int = 0
    vram_bytes: int | None = None
    budget_bytes: int | None = None  # vram - context - margin: what tensors may use
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    host_bytes: dict[str, int] = field(default_factory=dict)  # in host RAM at the card's peak (streamed, parked, offloaded)
    bus_bytes: int = 0  # host -> card copies of streamed weights per micro-batch (measured in the step)
    resident_blocks: int = 0  # most streamed blocks on the card at one instant (the tracker's replay)
    stages: dict[str, int] = field(default_factory=dict)  # the card's peak in each stage of the run

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.peak_bytes <= self.budget_bytes

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.budget_bytes is None else self.budget_bytes - self.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(fits=self.fits, headroom_bytes=self.headroom_bytes)
        return d

    def format(self) -> str:
        """A few lines for people: peak, the categories, and the verdict against the budget."""
        lines = [f"{self.workload}: peak {self.peak_bytes / GIB:.2f} GiB of tensors (during {self.peak_phase})"]
        for cat, b in self.by_category.items():
            if b:
                lines.append(f"  {cat:<18} {b / GIB:8.3f} GiB")
        if self.budget_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(
                f"  budget {self.budget_bytes / GIB:.2f} GiB = {self.vram_bytes / GIB:.2f} GiB card"
                f" - {self.context_bytes / GIB:.2f} context - {self.margin_bytes / GIB:.2f} margin:"
                f" {verdict}, headroom {self.headroom_bytes / GIB:+.2f} GiB"
            )
        for cat, b in self.host_bytes.items():
            lines.append(f"  {cat:<18} {b / GIB:8.3f} GiB in host memory (not on the card)")
        if len(self.stages) > 1:
            lines.append("  stages: " + ", ".join(f"{s} {b / GIB:.2f}" for s, b in self.stages.items()) + " GiB")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def card_budget(card: CardSpec | None = None, vram_gib: float | None = None) -> tuple[int | None, int, int, int | None]:
    """(vram, context, margin, budget) in bytes from a preset card and/or a ``--vram`` override."""
    backend = getattr(card, "backend", "cuda") if card is not None else "cuda"
    context = float(getattr(card, "context_gib", DEFAULT_CONTEXT_GIB.get(backend, 0.35)))
    margin = float(getattr(card, "margin_gib", DEFAULT_MARGIN_GIB))
    vram = vram_gib if vram_gib is not None else getattr(card, "vram_gib", None)
    if vram is None:
        return None, int(context * GIB), int(margin * GIB), None
    if vram - context - margin <= 0:
        raise ConfigError(f"--vram {vram:g} GiB leaves nothing after {context:g} GiB context + {margin:g} GiB margin",
                          "give the card's full memory in GiB, e.g. --vram 4")
    return int(vram * GIB), int(context * GIB), int(margin * GIB), tensor_budget(vram, context, margin)


def zero_scale(knobs: Knobs) -> tuple[dict[str, float], str]:
    """What DeepSpeed ZeRO-2 leaves on each card, as category scales, and a note saying so.

    Each of N processes keeps 1/N of the gradients (reduce-scatter) and of the optimizer state; with
    ``offload_optimizer`` the optimizer state (and its update) lives in host memory instead.
    DeepSpeed's communication buckets (``reduce_bucket_size``) come on top and are not modelled.
    """
    n = max(1, knobs.processes)
    where = "in host memory" if knobs.offload_optimizer else f"partitioned 1/{n}"
    note = (f"ZeRO-2 over {n} process(es): gradients partitioned 1/{n}, optimizer state {where} "
            "(DeepSpeed's reduce buckets not counted)")
    return {"gradients": 1 / n, "optimizer_state": 0.0 if knobs.offload_optimizer else 1 / n}, note


def card_backend(card: CardSpec | None) -> str:
    return getattr(card, "backend", "cuda") if card is not None else "cuda"


def profile_step(
    workload: Workload,
    knobs: Knobs,
    *,
    card: CardSpec | None = None,
    vram_gib: float | None = None,
    device: str | torch.device = "meta",
    autocast_device: str | None = None,
) -> MemoryProfile:
    """Replay the run of ``workload`` under ``knobs`` and return its memory profile (the peak of its stages).

    ``card`` (a preset's CardSpec) sets the budget, which attention kernel really runs and which autocast
    rules apply (a CPU card: CPU's, and host memory is the card's); ``device`` is ``meta`` for planning or
    ``cpu`` (with ``autocast_device="cpu"``) for the fidelity check.
    """
    start = time.perf_counter()
    notes: list[str] = []
    knobs, helper_kernel = _card_knobs(knobs, card, notes)
    backend = card_backend(card)
    autocast_device = autocast_device or ("cpu" if backend == "cpu" else "cuda")
    meta = str(device) == "meta"
    tracker = StorageTracker(unified=backend == "cpu" or not meta, device_type="meta" if meta else None)
    tl = Timeline(tracker, device, PRECISIONS[knobs.precision], autocast_device)
    vram, context, _, _ = card_budget(card, vram_gib)
    tl.free_bytes = None if backend == "cpu" or vram is None else vram - context
    if workload.task == "autoencoder":  # the autoencoder task: that stage alone
        built = None
    else:  # built outside the tracker: what it keeps is registered below, in the order training loads it
        built = build(workload, knobs, device, recompute_context=tl.recompute(), helper_kernel=helper_kernel,
                      cpu_card=backend == "cpu")
        notes += built.notes
    with tracker, rng_states_tracked(tracker):
        tracker.counting = False
        data = host_data(workload, built.latent_shape if built else None, tl)
        if workload.from_scratch and workload.autoencoder_stage:
            autoencoder_stage(workload, knobs, tl)
        if built is None:
            result = tracker.result()
            return _finish(workload, knobs, card, vram_gib, tracker, result, notes, [], start)
        streamer = built.streamer
        back, cached_text = _brought_back(built, workload, knobs, _load_and_cache(built, workload, knobs, tl, tracker))
        if knobs.zero_stage:
            tracker.reset_peak()  # ZeRO's rescaled replay starts at the training step
        ema, optimizers = train_stage(built, workload, knobs, tl, notes)
        if workload.validation_items:
            validation_stage(built, workload, knobs, tl, ema)
        if workload.preview is not None and built.prediction == "flow":  # FLUX.1's flow-matching sampler
            flux_preview_stage(built, workload, tl, ema, back)
        elif workload.preview is not None:
            preview_stage(built, workload, knobs, tl, ema, back, cached_text)
        result = tracker.result()
        resident = tracker.residency("streamed_weights")[0] if streamer is not None else 0
        del data
    if streamer is not None:
        notes.append(stream_note(streamer, tl.bus_bytes, knobs, card))
        streamer.close()
    return _finish(workload, knobs, card, vram_gib, tracker, result, notes, optimizers, start, tl.keep,
                   streamer=streamer, resident=resident, bus=tl.bus_bytes)


def _card_knobs(knobs: Knobs, card: CardSpec | None, notes: list[str]) -> tuple[Knobs, str]:
    """``knobs`` with the attention kernel the card really runs (and why, in ``notes``), and the kernel of
    the helper models; refuses fused backward with several processes."""
    kernel, why = effective_attention(knobs.attention, card)
    if why:
        notes.append(why)
    helper_kernel, _ = effective_attention("sdpa", card)
    knobs = knobs.with_(attention=kernel)
    if knobs.fused_backward and (knobs.processes > 1 or knobs.zero_stage):
        raise ConfigError("memory.fused_backward steps the optimizer before the gradients are averaged over "
                          "processes (DDP / ZeRO)", "use memory.fused_backward=false with several processes")
    return knobs, helper_kernel


def _load_and_cache(built: Built, workload: Workload, knobs: Knobs, tl: Timeline,
                    tracker: StorageTracker) -> list[nn.Module]:
    """The models reach the card in the order training loads them, the caches (and class images) are
    built, and what leaves the card afterwards goes to host memory; returns what was offloaded."""
    from ..train.finetune_data import frozen_stay_on_device

    trainable_ids = {id(p) for p in built.trainable}

    def register(mod: nn.Module, host: bool = False) -> None:
        for p in mod.parameters():
            tracker.register(p, "trainable_weights" if id(p) in trainable_ids else "frozen_weights", host)
        for b in mod.buffers():
            tracker.register(b, "frozen_weights", host)

    streamer = built.streamer

    def unet_to_card() -> None:  # train_finetune: stream_unet, or .to(device)
        tl.place([built.unet], host=False)
        if streamer is not None:  # the streamed blocks stay in host RAM; their copies are the card's share
            streamer.on_fetch = lambda unit, copies: [tracker.mark(c, "streamed_weights", group=unit)
                                                      for c in copies]
            tracker.place(streamer.host_tensors(), host=True)

    if built.prediction == "flow":  # FLUX.1: its transformer loads after caching (memory/flux_stages.py)
        return flux_load_and_cache(built, workload, knobs, tl, register, unet_to_card)
    # the caches are encoded before the UNet reaches the card: a from-scratch job encodes its latents before it
    # builds the UNet and text encoder, a fine-tune with its VAE and text encoders alone (its UNet in host memory)
    if workload.from_scratch:
        if built.vae is not None:
            register(built.vae)
    else:  # memory.text_encoders off the card: the frozen encoders wait in host RAM (train/text_cache.py)
        te_host = text_place(built, workload, knobs) != "card"
        for mod in built.text_encoders:
            register(mod, host=te_host)
        for mod in [built.vae] if built.vae is not None else []:
            register(mod)
        register(built.unet, host=True)
    drawing = workload.class_images and not workload.from_scratch
    if drawing:  # the missing class images are drawn with the base model: the UNet is on the card already
        unet_to_card()
        class_image_stage(built, workload, knobs, tl)
    cache_stage(built, workload, knobs, tl)
    if workload.from_scratch:
        for mod in (built.unet, *built.text_encoders):
            register(mod)
        if streamer is not None:
            unet_to_card()
    elif not drawing:
        unet_to_card()  # after caching, as train_finetune moves it
    # what leaves the card after the caches are built (and comes back for previews)
    frozen_tes = [] if built.text_trained else built.text_encoders
    if workload.from_scratch:
        offloaded = [built.vae] if built.vae is not None and knobs.offload_frozen else []
    elif not frozen_stay_on_device(knobs.offload_frozen, knobs.cache_latents, knobs.cache_text,
                                   built.text_trained, workload.text_every_step):
        offloaded = [built.vae, *frozen_tes]
    else:
        offloaded = []
    tl.place(offloaded, host=True)
    return offloaded


def _brought_back(built: Built, workload: Workload, knobs: Knobs, offloaded: list[nn.Module]) -> tuple[list, bool]:
    """What previews bring back to the card of what left it after caching, and whether they read the prompts
    from the text cache (then the frozen text encoders stay where they are)."""
    from ..train.text_cache import previews_from_cache

    cached_text = not workload.from_scratch and previews_from_cache(knobs.cache_text, built.text_trained,
                                                                    workload.text_every_step)
    return [m for m in offloaded if not (cached_text and any(m is te for te in built.text_encoders))], cached_text


def _finish(workload: Workload, knobs: Knobs, card: CardSpec | None, vram_gib: float | None, tracker: StorageTracker,
            result: Any, notes: list[str], optimizers: list[torch.optim.Optimizer], start: float,
            copies: list[dict[str, Any]] = (), streamer: Any = None, resident: int = 0,
            bus: int = 0) -> MemoryProfile:
    """The profile of a replayed run: ZeRO's rescaled peak, the notes, the card's budget, host memory."""
    backend = card_backend(card)
    if knobs.fused_backward:
        notes.append("fused backward: no global gradient clipping (each tensor steps as its gradient arrives)")
    if knobs.precision == "fp16":
        notes.append("fp16: GradScaler's scale factors are a few scalars, not counted")
    peak, by_category, host = result.peak_bytes, result.by_category, dict(result.host_by_category)
    if streamer is not None and not tracker.unified:  # the streamed blocks apart from the parked helpers
        rest = host.pop("frozen_weights", 0) - streamer.host_bytes
        if rest > 0:
            host["frozen_weights"] = rest
        host["streamed_weights"] = streamer.host_bytes
        if pinned(card):
            rounding = pinned_overhead(streamer.host_tensors(), round_threshold())
            if rounding:
                host["pinned_rounding"] = rounding
    if knobs.zero_stage:
        scale, note = zero_scale(knobs)
        peak, by_category = tracker.scaled_peak(scale)
        notes.append(f"{note}: {(result.peak_bytes - peak) / GIB:.3f} GiB less at the peak")
        if knobs.offload_optimizer:
            host["optimizer_state"] = -(-state_bytes(optimizers, copies) // max(1, knobs.processes))
    elif knobs.processes > 1:
        notes.append(f"DDP over {knobs.processes} processes: each card holds all of the above (nothing is divided)")
    if backend == "cpu":
        notes.append("the CPU is the card: host-resident tensors (data, offloaded models, EMA on CPU) are counted")
    vram, context, margin, budget = card_budget(card, vram_gib)
    phase = result.peak_phase
    return MemoryProfile(
        workload=workload.id,
        knobs=asdict(knobs),
        peak_bytes=peak,
        by_category=by_category,
        peak_phase=phase,
        context_bytes=context,
        margin_bytes=margin,
        vram_bytes=vram,
        budget_bytes=budget,
        seconds=time.perf_counter() - start,
        notes=list(dict.fromkeys(notes)),  # per-tensor optimizers (fused backward) repeat theirs
        host_bytes=host,
        bus_bytes=bus,
        resident_blocks=resident,
        stages=dict(result.stage_peaks),
    )
