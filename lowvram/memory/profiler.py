"""Profile one real training step of a workload under a plan, on the ``meta`` device: bytes, not guesses.

The models are built on ``meta`` with the plan applied, then one forward + backward + optimizer step
runs through the training code (``lowvram.train.step``) under the storage tracker. Shapes and dtypes
decide memory, so the peak is exact for the tensors; the card's context and a margin are added apart.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .autocast import MetaAutocast
from .streaming import parked_models, pinned, pinned_overhead, stream_note
from .tracker import StorageTracker
from .workloads import PRECISIONS, Built, Knobs, Workload, build

GIB = 2**30
STEP_RANGE = "lowvram.profile_step"
# A card's defaults when only --vram is given: what the runtime takes beyond tensors (context) and the
# allocator's fragmentation / the desktop (margin). Presets carry measured values per card.
DEFAULT_CONTEXT_GIB = {"cpu": 0.0, "cuda": 0.35, "rocm": 0.5}
DEFAULT_MARGIN_GIB = 0.3


@dataclass
class MemoryProfile:
    """What one step of ``workload`` under ``knobs`` holds at its peak, by category, against a budget."""

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
    host_bytes: dict[str, int] = field(default_factory=dict)  # in host RAM (streamed, parked, offloaded): not in the peak
    bus_bytes: int = 0  # host -> card copies of streamed weights per micro-batch (measured in the step)
    resident_blocks: int = 0  # most streamed blocks on the card at one instant (the tracker's replay)

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
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def card_budget(card: Any = None, vram_gib: float | None = None) -> tuple[int | None, int, int, int | None]:
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
    return int(vram * GIB), int(context * GIB), int(margin * GIB), int((vram - context - margin) * GIB)


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


def register_weights(tracker: StorageTracker, built: Built, trainable_ids: set[int]) -> None:
    """Every weight of ``built`` in the tracker by category; the host copies of a streamer's blocks are in
    host RAM, and its fetches count as ``streamed_weights`` (the card's share of the streamed weights)."""
    streamer = built.streamer
    on_host: set[int] = set()
    if streamer is not None:
        streamer.on_fetch = lambda unit, copies: [tracker.mark(c, "streamed_weights", group=unit) for c in copies]
        on_host = {id(t) for t in streamer.host_tensors()}
    for mod in [built.unet, *built.frozen_modules.values()] + (
            [built.train_text_encoder] if built.train_text_encoder is not None else []):
        for p in mod.parameters():
            tracker.register(p, "trainable_weights" if id(p) in trainable_ids else "frozen_weights")
        for b in mod.buffers():
            tracker.register(b, "frozen_weights")
        for t in [*mod.parameters(), *mod.buffers()]:
            if id(t) in on_host:
                tracker.to_host(t)


def effective_attention(kind: str, card: Any = None) -> tuple[str, str | None]:
    """The kernel the card really runs for ``kind``: SDPA without a fused kernel is the math kernel."""
    from ..attention import resolve_attention

    kind = resolve_attention(kind, card)
    if kind == "sdpa" and card is not None and not getattr(card, "flash_attention", True):
        return "math", "sdpa on a card without flash / memory-efficient kernels runs the math kernel (O(N²))"
    return kind, None


def _optimizer(params: list[nn.Parameter], name: str, notes: list[str]) -> torch.optim.Optimizer:
    from ..optim import build_optimizer

    if name == "adamw8bit" and params and params[0].device.type == "meta":
        # bitsandbytes' kernels cannot run on meta; the portable 8-bit AdamW keeps the same state layout
        # (uint8 moments + fp32 absmax per 256-element block, fp32 state below 4096 elements).
        notes.append("adamw8bit: state modelled by the portable 8-bit AdamW (same bytes as bitsandbytes)")
        name = "adamw8bit_portable"
    # foreach=False: the per-tensor loop, the leanest (the multi-tensor path is faster, a few temporaries more)
    if name == "adamw":
        return build_optimizer(params, name, lr=1e-4, foreach=False)
    return build_optimizer(params, name, lr=1e-4)


def _state_tensors(optimizers: list[torch.optim.Optimizer]) -> list[torch.Tensor]:
    return [t for o in optimizers for s in o.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def _inputs(built: Built, wl: Workload, knobs: Knobs, device: str | torch.device) -> dict[str, torch.Tensor]:
    b = knobs.batch_size
    tokens, width = built.text_shape
    inp: dict[str, torch.Tensor] = {}
    if "vae" in built.frozen_modules and not knobs.cache_latents:
        inp["pixels"] = torch.empty(b, 3, wl.resolution, wl.resolution, device=device)
    else:
        inp["x0"] = torch.empty(b, *built.latent_shape, device=device)
    encoders = any(k.startswith("text_encoder") for k in built.frozen_modules)
    if built.train_text_encoder is not None or (encoders and not knobs.cache_text):
        inp["ids"] = torch.zeros(b, tokens, dtype=torch.long, device=device)
    else:
        inp["cond"] = torch.empty(b, tokens, width, device=device)
    return inp


def _encode(built: Built, inp: dict[str, torch.Tensor], knobs: Knobs) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and text context for the step: from the cache, or encoded now by the frozen models."""
    if "pixels" in inp:
        with torch.no_grad():
            x0 = built.frozen_modules["vae"].encode(inp["pixels"]).latent_dist.sample().float()
    else:
        x0 = inp["x0"]
    if "cond" in inp:
        cond = inp["cond"]
    elif built.train_text_encoder is not None:
        cond = built.train_text_encoder(inp["ids"])[0]
    else:
        with torch.no_grad():
            encoders = [m for k, m in built.frozen_modules.items() if k.startswith("text_encoder")]
            states = [m(inp["ids"], output_hidden_states=True).hidden_states[-2] for m in encoders]
            cond = torch.cat(states, dim=-1).float()
    return x0, cond


def _trainable_module(built: Built) -> nn.Module:
    mods = {"unet": built.unet}
    if built.train_text_encoder is not None:
        mods["text_encoder"] = built.train_text_encoder
    return nn.ModuleDict(mods)


def profile_step(
    workload: Workload,
    knobs: Knobs,
    *,
    card: Any = None,
    vram_gib: float | None = None,
    device: str | torch.device = "meta",
    autocast_device: str = "cuda",
) -> MemoryProfile:
    """Run one training step of ``workload`` under ``knobs`` and return its memory profile.

    ``card`` (a preset's CardSpec) sets the budget and which attention kernel really runs; ``device``
    is ``meta`` for planning or ``cpu`` (with ``autocast_device="cpu"``) for the fidelity check.
    """
    from ..train.step import compute_loss, optimizer_step

    start = time.perf_counter()
    notes: list[str] = []
    kernel, why = effective_attention(knobs.attention, card)
    if why:
        notes.append(why)
    knobs = knobs.with_(attention=kernel)
    if knobs.fused_backward and knobs.grad_accum > 1:
        raise ConfigError("memory.fused_backward steps the optimizer inside backward, so it cannot accumulate",
                          "use train.grad_accum=1 with fused backward")
    if knobs.fused_backward and (knobs.processes > 1 or knobs.zero_stage):
        raise ConfigError("memory.fused_backward steps the optimizer before the gradients are averaged over "
                          "processes (DDP / ZeRO)", "use memory.fused_backward=false with several processes")
    tracker = StorageTracker()
    meta = str(device) == "meta"
    compute = PRECISIONS[knobs.precision]
    emulated = compute != torch.float32 and meta
    recompute = (lambda: MetaAutocast(compute, autocast_device, cache=False)) if emulated else None
    with tracker:
        built = build(workload, knobs, device, recompute_context=recompute)
        notes += built.notes
        trainable = built.trainable
        trainable_ids = {id(p) for p in trainable}
        streamer = built.streamer
        register_weights(tracker, built, trainable_ids)
        # Optimizer state exists before a steady-state step: create it with one zero-gradient step.
        # Per-tensor optimizers give every tensor of one shape the same state and the same temporaries,
        # so only one tensor per (shape, dtype) is stepped; the others get copies of its state.
        reps: dict[tuple, nn.Parameter] = {}
        for p in trainable:
            reps.setdefault((tuple(p.shape), p.dtype), p)
        stepped = list(reps.values())
        stepped_ids = {id(p) for p in stepped}
        if knobs.fused_backward:
            per_param = {id(p): _optimizer([p], knobs.optimizer, notes) for p in stepped}
            optimizers = list(per_param.values())
        else:
            optimizers = [_optimizer(stepped, knobs.optimizer, notes)]
        for p in stepped:
            p.grad = torch.zeros_like(p)
        with torch.no_grad():
            for o in optimizers:
                o.step()
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        rep_state = {id(p): o.state[p] for o in optimizers for p in o.state}
        copied_state = [
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in rep_state[id(reps[(tuple(p.shape), p.dtype)])].items()}
            for p in trainable if id(p) not in stepped_ids
        ]
        for t in _state_tensors(optimizers) + [v for st in copied_state for v in st.values() if isinstance(v, torch.Tensor)]:
            tracker.mark(t, "optimizer_state")
        ema = None
        if workload.ema:
            if knobs.ema_on_cpu:
                notes.append("EMA kept in CPU memory: not on the card")
            else:
                from ..ema import EMA

                ema = EMA(_trainable_module(built), decay=0.999)
                for t in ema.shadow.values():
                    tracker.mark(t, "ema")
        if knobs.grad_accum > 1:  # later micro-batches run with the accumulated gradients alive
            for p in trainable:
                p.grad = torch.zeros_like(p)
                tracker.mark(p.grad, "gradients")
        inp = _inputs(built, workload, knobs, device)
        for t in inp.values():
            tracker.mark(t, "inputs")
        acp = torch.linspace(0.9999, 0.005, 1000, device=device)
        tracker.mark(acp, "inputs")

        def on_grad(p: torch.Tensor) -> None:
            tracker.mark(p.grad, "gradients")
            if knobs.fused_backward:
                if id(p) in per_param:
                    per_param[id(p)].step()
                p.grad = None

        hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in trainable]
        def autocast() -> contextlib.ExitStack:
            """Autocast for one forward: real on CPU tensors, emulated on meta (a fresh cast cache each)."""
            stack = contextlib.ExitStack()
            if emulated:
                stack.enter_context(MetaAutocast(compute, autocast_device))
            elif compute != torch.float32 and not meta:
                stack.enter_context(torch.autocast(torch.device(device).type, dtype=compute))
            return stack

        def step_loss() -> torch.Tensor:
            if built.step_loss is not None:  # a family with its own objective (FLUX.1: flow matching)
                return built.step_loss(built, inp)
            x0, cond = _encode(built, inp, knobs)
            return compute_loss(built.unet, x0, cond, alphas_cumprod=acp, prediction=built.prediction,
                                unet_kwargs=built.unet_kwargs or None)

        fetched = 0
        if streamer is not None:  # profile the steady state: a forward teaches the streamer the blocks' order
            with torch.no_grad(), autocast():
                step_loss()
            fetched = streamer.stats.fetched_bytes
        tracker.reset_peak()
        window = torch.profiler.record_function(STEP_RANGE)  # lets the fidelity check find the step
        window.__enter__()
        try:
            tracker.phase = "forward"
            # Like the training loop: autocast around the forward only (checkpoint recomputation
            # re-enters it); the emulation's cast cache ends with it, as real autocast's does.
            with autocast():
                loss = step_loss()
            tracker.phase = "backward"
            loss.backward()
            del loss
            tracker.phase = "optimizer"
            if not knobs.fused_backward:
                # Clips every gradient, steps the representatives; the rest are freed as zero_grad would.
                optimizer_step(optimizers[0], trainable, grad_clip=1.0)
                for p in trainable:
                    p.grad = None
            if ema is not None:
                ema.update(_trainable_module(built))
        finally:
            window.__exit__(None, None, None)
            for h in hooks:
                h.remove()
        result = tracker.result()
        resident = tracker.residency("streamed_weights")[0] if streamer is not None else 0
    host: dict[str, int] = {}
    bus = 0
    if streamer is not None:
        bus = streamer.stats.fetched_bytes - fetched
        host["streamed_weights"] = streamer.host_bytes
        if pinned(card):
            host["pinned_rounding"] = pinned_overhead(streamer.host_tensors())
        notes.append(stream_note(streamer, bus, knobs, card))
        streamer.close()
    parked, why = parked_models(workload, knobs)
    if parked:
        host["parked_models"] = parked
    if why:
        notes.append(why)
    if knobs.fused_backward:
        notes.append("fused backward: no global gradient clipping (each tensor steps as its gradient arrives)")
    if knobs.precision == "fp16":
        notes.append("fp16: GradScaler's scale factors are a few scalars, not counted")
    peak, by_category = result.peak_bytes, result.by_category
    if knobs.zero_stage:
        scale, note = zero_scale(knobs)
        peak, by_category = tracker.scaled_peak(scale)
        notes.append(f"{note}: {(result.peak_bytes - peak) / GIB:.3f} GiB less at the peak")
        if knobs.offload_optimizer:
            state = sum(t.untyped_storage().nbytes() for t in _state_tensors(optimizers)) + sum(
                v.untyped_storage().nbytes() for st in copied_state for v in st.values() if isinstance(v, torch.Tensor))
            host["optimizer_state"] = -(-state // max(1, knobs.processes))
    elif knobs.processes > 1:
        notes.append(f"DDP over {knobs.processes} processes: each card holds all of the above (nothing is divided)")
    vram, context, margin, budget = card_budget(card, vram_gib)
    return MemoryProfile(
        workload=workload.id,
        knobs=asdict(knobs),
        peak_bytes=peak,
        by_category=by_category,
        peak_phase=result.peak_phase,
        context_bytes=context,
        margin_bytes=margin,
        vram_bytes=vram,
        budget_bytes=budget,
        seconds=time.perf_counter() - start,
        notes=list(dict.fromkeys(notes)),  # per-tensor optimizers (fused backward) repeat theirs
        host_bytes=host,
        bus_bytes=bus,
        resident_blocks=resident,
    )
