"""The planner: switch memory knobs on, cheapest in speed first, until a profiled step fits the budget.

Each candidate is the previous one plus one more knob, and each is profiled (not estimated), so the
first that fits is the fastest plan that fits. Resolution and LoRA rank are never changed: they are
the user's job, and the error says when only they (or a bigger card) would help.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

from ..card import CardSpec
from ..errors import MemoryPlanError
from .profiler import GIB, MemoryProfile, card_budget, profile_step
from .streaming import check_host, streamable_bytes
from .workloads import Knobs, Workload, fp16_compute_safe, text_placement_applies, vae_tiles

STREAM_STEPS = (0.25, 0.5, 0.75, 1.0)  # fractions of the frozen block bytes the planner tries


@dataclass
class Step:
    """One knob the planner switched on and what it saved (bytes of peak)."""

    knob: str
    peak_before: int
    peak_after: int
    knobs: Knobs | None = None  # the knobs after this step

    @property
    def saved(self) -> int:
        return self.peak_before - self.peak_after


@dataclass
class Plan:
    """The chosen knob settings with their profile, and the steps that led there."""

    knobs: Knobs
    profile: MemoryProfile
    steps: list[Step] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return self.profile.fits

    def format(self) -> str:
        lines = []
        for s in self.steps:
            lines.append(f"  + {s.knob:<44} {s.peak_after / GIB:6.2f} GiB  (saved {s.saved / GIB:+.2f})")
        head = f"plan for {self.profile.workload}: {len(self.steps)} knob(s) switched on"
        return "\n".join([head, *lines, self.profile.format()])


def fast_precision(card: CardSpec | None = None) -> str:
    """The compute precision a card trains fastest in: bf16 or fp16 on a GPU that has it, fp32 on the CPU
    (bf16 runs there, but slower than fp32 on most CPUs: no AMX / AVX512-BF16); fp16 without a card."""
    if card is None:
        return "fp16"
    if getattr(card, "backend", "cuda") == "cpu":
        return "fp32"
    return "bf16" if getattr(card, "bf16", False) else "fp16" if getattr(card, "fp16", False) else "fp32"


def baseline(workload: Workload, card: CardSpec | None = None) -> Knobs:
    """Every saving off: the card's fast precision, fp32 frozen weights, AdamW, SDPA, no caching."""
    precision = fast_precision(card)
    if precision == "fp16" and not fp16_compute_safe(workload):
        # FLUX.1's activations overflow fp16: bf16 where unknown, fp32 on a card without bf16 (gfx803, GTX 16xx)
        precision = "bf16" if card is None else "fp32"
    return Knobs(precision=precision, frozen_dtype="fp32", optimizer="adamw", gradient_checkpointing=False,
                 attention="sdpa", batch_size=workload.batch_size, grad_accum=1, cache_latents=False,
                 cache_text=False, offload_frozen=False, ema_on_cpu=False, fused_backward=False)


def candidates(workload: Workload, card: CardSpec | None = None, start: Knobs | None = None) -> Iterator[tuple[str, Knobs]]:
    """(what was switched on, knobs) in order of speed cost; each adds to the previous one."""
    k = yield from _storage_steps(workload, card, start or baseline(workload, card))
    yield from _compute_steps(workload, card, k)


def _storage_steps(workload: Workload, card: CardSpec | None, k: Knobs) -> Generator[tuple[str, Knobs], None, Knobs]:
    """The cheap steps first: caching, frozen weights in half and 8-bit precision, 8-bit optimizer state,
    checkpointing, then smaller micro-batches; returns the knobs they end with."""
    half = "bf16" if getattr(card, "bf16", False) else "fp16"
    bnb = getattr(card, "bitsandbytes", True)
    # a from-scratch job always caches its latents and encodes captions with the text encoder it trains:
    # only the autoencoder's offload is a knob there
    cache = ("offload the autoencoder", lambda k: k.with_(offload_frozen=True)
             if workload.task == "latent" and not k.offload_frozen else None) if workload.from_scratch else \
        ("cache latents + text, offload VAE/text encoder",
         lambda k: k.with_(cache_latents=True, cache_text=True, offload_frozen=True)
         if not (k.cache_latents and k.cache_text and k.offload_frozen) else None)
    steps: list[tuple[str, Callable[[Knobs], Knobs | None]]] = [
        cache,
        (f"frozen weights in {half}",
         lambda k: k.with_(frozen_dtype=half) if workload.mode == "lora" and k.frozen_dtype == "fp32" else None),
        ("frozen weights in fp8 (upcast per layer)",
         lambda k: k.with_(frozen_dtype="fp8") if workload.mode == "lora" and k.frozen_dtype != "fp8" else None),
        ("8-bit optimizer state" + ("" if bnb else " (portable)"),
         lambda k: k.with_(optimizer="adamw8bit" if bnb else "adamw8bit_portable") if k.optimizer == "adamw" else None),
        ("gradient checkpointing",
         lambda k: k.with_(gradient_checkpointing=True) if not k.gradient_checkpointing else None),
    ]
    for name, f in steps:
        nxt = f(k)
        if nxt is not None:
            k = nxt
            yield name, k
    while k.batch_size > 1:  # micro-batch down, accumulation up: same images per optimizer step
        b = max(1, k.batch_size // 2)
        k = k.with_(batch_size=b, grad_accum=k.grad_accum * k.batch_size // b)
        yield f"micro-batch {b} x accumulation {k.grad_accum}", k
    return k


def _compute_steps(workload: Workload, card: CardSpec | None, k: Knobs) -> Iterator[tuple[str, Knobs]]:
    """The steps that cost time on every step: chunked attention, the EMA on the CPU, fused backward,
    Adafactor, VAE tiles, then streaming the frozen blocks from host RAM."""
    # A fused SDPA kernel (flash / memory-efficient) is already O(N): chunking would only slow it down.
    fused = k.attention in ("sdpa", "xformers") and getattr(card, "flash_attention", False)
    for chunk in () if fused else (1024, 256):
        if k.attention != "chunked" or k.attention_chunk > chunk:
            k = k.with_(attention="chunked", attention_chunk=chunk)
            yield f"chunked attention ({chunk} query rows)", k
    if workload.ema and not k.ema_on_cpu:
        k = k.with_(ema_on_cpu=True)
        yield "EMA on CPU", k
    # fused backward steps before DDP / ZeRO average the gradients: one process only
    if not k.fused_backward and k.grad_accum == 1 and k.processes == 1 and not k.zero_stage:
        k = k.with_(fused_backward=True)
        yield "fused backward (optimizer steps inside backward)", k
    if workload.mode != "lora" and k.optimizer != "adafactor":
        k = k.with_(optimizer="adafactor")
        yield "factored optimizer state (Adafactor)", k
    # The frozen text encoders off the card while the captions (and preview prompts) are cached: a one-time
    # cost at caching (sequential moves each encoder once; the CPU encodes slower), none per step or preview
    if text_placement_applies(workload, k):
        for place, name in (("sequential", "text encoders one at a time on the card (caching)"),
                            ("cpu", "text encoders on the CPU (caching)")):
            if k.text_encoders == "card" or (place == "cpu" and k.text_encoders == "sequential"):
                k = k.with_(text_encoders=place)
                yield name, k
    # VAE tiling costs time only while caching and drawing previews (the overlaps: about twice the pixels)
    # and changes latents and images a little: late, but before streaming, which costs bus time every step
    if not k.vae_tiling and vae_tiles(workload):
        k = k.with_(vae_tiling=True)
        yield "VAE in tiles (caching, previews)", k
    # bf16 trainable weights and DeepSpeed ZeRO-2 are profiled when a config asks for them, but the trainer
    # does not run them yet (run_plan.untrained_knobs): the planner never picks what cannot train.
    # Streaming the frozen blocks from host RAM costs bus time on every step (twice the streamed bytes
    # with checkpointing): last, a quarter of the block bytes at a time. LoRA only: the rest trains.
    # Not on the CPU, where the "card" is host RAM already.
    if workload.mode == "lora" and getattr(card, "backend", "cuda") != "cpu":
        for fraction in STREAM_STEPS:
            if k.stream_blocks < fraction:
                k = k.with_(stream_blocks=fraction)
                yield f"stream {fraction:.0%} of the frozen block weights from host RAM", k


def plan(
    workload: Workload,
    card: CardSpec | None = None,
    *,
    vram_gib: float | None = None,
    ram_gib: float | None = None,
    start: Knobs | None = None,
    profile: Callable[..., MemoryProfile] = profile_step,
    log: Callable[[str], None] | None = None,
    first: MemoryProfile | None = None,
) -> Plan:
    """The fastest plan for ``workload`` that fits the card's budget (or ``vram_gib``) and the host's RAM
    (``ram_gib``, default: this machine's).

    ``first``: the profile of ``start`` when the caller has it already. Raises MemoryPlanError saying how
    close the leanest plan came and what would make it fit (``leanest_bytes`` on the error), or that the
    plan that fits the card would exhaust host memory (no later knob gives RAM back).
    """
    _, _, _, budget = card_budget(card, vram_gib)
    knobs = start or baseline(workload, card)
    current = first or profile(workload, knobs, card=card, vram_gib=vram_gib)
    steps: list[Step] = []
    if log:
        log(f"  start: {current.peak_bytes / GIB:.2f} GiB (budget {budget / GIB:.2f} GiB)" if budget else "")
    if budget is None or current.peak_bytes <= budget:
        check_host(current, ram_gib, card)
        return Plan(knobs, current, steps)
    unstreamed: MemoryProfile | None = None  # the last profile before streaming, and what each fraction moves
    streamable: dict[float, int] = {}
    for name, cand in candidates(workload, card, knobs):
        if cand.stream_blocks > knobs.stream_blocks:
            if unstreamed is None:
                unstreamed, streamable = current, streamable_bytes(workload, cand, STREAM_STEPS)
            # streaming removes at most its host bytes from any instant of the step: skip what cannot fit
            if unstreamed.peak_bytes - streamable.get(cand.stream_blocks, 0) > budget:
                knobs = cand
                continue
        knobs = cand
        nxt = profile(workload, knobs, card=card, vram_gib=vram_gib)
        steps.append(Step(name, current.peak_bytes, nxt.peak_bytes, knobs))
        if log:
            log(f"  + {name}: {nxt.peak_bytes / GIB:.2f} GiB (saved {(current.peak_bytes - nxt.peak_bytes) / GIB:+.2f})")
        current = nxt
        if current.peak_bytes <= budget:
            check_host(current, ram_gib, card)
            return Plan(knobs, current, steps)
    raise _does_not_fit(workload, current, budget, steps, streamable)


def _does_not_fit(workload: Workload, current: MemoryProfile, budget: int, steps: list[Step],
                  streamable: dict[float, int]) -> MemoryPlanError:
    """The error when even the leanest plan is over budget: how close it came and what would make it fit."""
    short = current.peak_bytes - budget
    unhelpful = (f"; streaming every frozen block would remove at most {max(streamable.values()) / GIB:.2f} GiB"
                 if streamable and not current.knobs.get("stream_blocks") else "")
    err = MemoryPlanError(
        f"{workload.id} does not fit: the leanest plan needs {current.peak_bytes / GIB:.2f} GiB of tensors "
        f"(during {current.peak_phase}), "
        f"the budget is {budget / GIB:.2f} GiB (short by {short / GIB:.2f} GiB) after switching on: "
        + ", ".join(s.knob for s in steps) + unhelpful,
        f"use a card with at least {(current.peak_bytes + current.context_bytes + current.margin_bytes) / GIB:.1f} GiB, "
        "or lower the resolution / LoRA rank / batch yourself (the planner never changes them); "
        "--set memory.force=true trains anyway at your own risk",
    )
    err.leanest_bytes = current.peak_bytes
    err.leanest = current  # its profile: host bytes and knobs of the closest plan
    return err
