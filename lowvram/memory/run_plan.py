"""Plan a user's run (a resolved RunConfig) against a card: the job is derived from the config itself,
profiled with the config's knobs, and when that does not fit the planner switches more on.

``plan_run`` is what ``lowvram.api.plan`` calls for ``lowvram train``, ``lowvram plan`` and the web panel
alike. Every config field either reaches the profile (through ``run_workload.workload_for`` / ``knobs_from_config``)
or is listed in ``MEMORY_NEUTRAL`` with the reason it allocates nothing on the card; a test walks every
field of ``RunConfig`` to keep that true.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ..card import CardSpec
from ..config import RunConfig, all_fields
from ..errors import ConfigError, LowvramError, MemoryPlanError
from ..run_folder import CONFIG_NAME, PLAN_NAME, SOURCES_NAME
from .knobs import knobs_from_config  # noqa: F401 (re-exported: report, tests and benches import it here)
from .planner import Plan, plan
from .profiler import GIB, MemoryProfile, profile_step
from .run_workload import family_of_run, workload_for
from .streaming import check_host
from .workloads import Knobs, Workload

# Config fields that allocate nothing on the card, each with the reason. Every other field must change
# the job (Workload) or the knobs the profile runs with (tests/test_plan_fields.py walks them all).
MEMORY_NEUTRAL: dict[str, str] = {
    "run.out": "where files go",
    "run.seed": "values, not shapes",
    "run.steps": "how long, not how big: every step is the same step",
    "run.device": "the plan is for the preset's card; lowvram warns when the machine differs",
    "run.checkpoint_every": "nothing on the card; a checkpoint's host copy is written beside the next steps only "
                            "when the RAM is free for it (train/checkpoint_writer.py), else in the pause",
    "run.keep_checkpoints": "files on disk",
    "run.log_every": "a line of metrics",
    "run.max_nonfinite": "a counter",
    "run.tensorboard": "event files on disk",
    "model.tokenizer": "the tokenizer pads to the text encoder's length, which the profile reads",
    "model.allow_pickle": "how a file is read, not what is loaded",
    "model.schedule": "a 1-D table of T numbers",
    "model.prediction": "epsilon and v have the same shape",
    "model.timesteps": "a 1-D table of T numbers",
    "model.zero_terminal_snr": "rescales the same table",
    "data.format": "how the folder is read",
    "data.caption_dropout": "which captions are blanked, not how many",
    "data.flip": "flipped copies are cached on disk, the batch is the same size",
    "data.workers": "decoding threads hold one batch of images ahead in host memory, not on the card",
    "data.caption_ext": "file names",
    "data.crop": "the cache keeps centre crops either way (a random crop is not cached)",
    "data.buckets": "bucket areas never exceed resolution², which the profile uses",
    "data.bucket_step": "bucket areas never exceed resolution²",
    "data.bucket_max_ratio": "bucket areas never exceed resolution²",
    "data.keep_tokens": "caption text; the token count is fixed",
    "data.caption_prefix": "caption text; the token count is fixed",
    "data.caption_suffix": "caption text; the token count is fixed",
    "data.max_pixels": "images are resized to the resolution before training",
    "data.min_size": "which images are skipped",
    "data.background": "a colour",
    "data.celeba_split": "which images",
    "data.missing_caption": "caption text",
    "data.cache_dir": "where the cache files go",
    "data.class_prompt": "caption text of class images",
    "data.builtin_exclude": "which generated shapes are drawn, not their size",
    "data.masked_loss": "a loss mask is one [B, 1, h, w] weight map at latent size and the loss kept per "
                        "element (a latent-sized fp32 tensor): under 0.1 % of any step",
    "data.mask_dir": "where the loss masks are read from (data.masked_loss)",
    "data.unmasked_weight": "a scalar weight",
    "model.clip": "where FLUX.1's CLIP-L loads from: run once to cache, dropped before training",
    "model.t5": "where FLUX.1's T5-XXL loads from: run once to cache, dropped before training",
    "model.t5_tokenizer": "a tokenizer",
    "train.lr": "a number",
    "train.warmup_steps": "a number",
    "train.lr_schedule": "a number per step",
    "train.weight_decay": "applied in place by the optimizer",
    "train.prior_loss_weight": "a scalar weight",
    "train.autoencoder_steps": "how long the autoencoder stage runs, not how big",
    "train.autoencoder_lr": "a number",
    "train.kl_weight": "a number",
    "sample.negative_prompt": "the unconditional prompt is encoded anyway (guidance)",
    "sample.guidance": "used by lowvram sample / eval, not in training",
    "sample.sampler": "latent-sized scheduler buffers (DPM-Solver++ keeps 2); profiled with DDIM",
    "sample.steps": "every sampling step is the same step",
    "sample.seed": "values, not shapes",
    "sample.guidance_rescale": "latent-sized temporaries",
    "lora.alpha": "a scale factor, no tensor",
}
# Config fields that decide the plan's verdict rather than what is allocated.
PLAN_SETTINGS: dict[str, str] = {
    "memory.vram_gib": "the budget the profile is judged against",
    "memory.force": "train although nothing fits",
    "memory.ram_gib": "the host RAM the plan's host share (streamed weights, parked models) is judged against",
}


def untrained_knobs(cfg: RunConfig, processes: int = 1) -> list[tuple[str, str]]:
    """(problem, fix) for each setting the profiler models but the trainer refuses: the one list that both
    the planner (never picks them) and the front door (refuses a config that sets them) use."""
    out = []
    m = cfg.memory
    if m.trainable_dtype != "fp32":
        out.append((f"memory.trainable_dtype = {m.trainable_dtype!r} is profiled but not trained yet (bf16 weights "
                    "need stochastic rounding, which is not implemented)", "use --set memory.trainable_dtype=fp32"))
    if m.zero_stage or m.offload_optimizer:
        out.append(("DeepSpeed ZeRO-2 is profiled (`lowvram plan` shows its saving) but lowvram's trainer does not "
                    "run it yet", "set memory.zero_stage=0 and memory.offload_optimizer=false; see docs/multi-gpu.md"))
    if m.fused_backward and processes > 1:
        out.append((f"memory.fused_backward cannot train with {processes} processes: it steps the optimizer inside "
                    "backward, before the gradients are averaged over the processes",
                    "use --set memory.fused_backward=false with several processes (or train in one process)"))
    return out


def refuse_untrained(cfg: RunConfig, processes: int = 1) -> None:
    """Raise the first of ``untrained_knobs`` as a ConfigError (what the trainer says, before it loads)."""
    refused = untrained_knobs(cfg, processes)
    if refused:
        raise ConfigError(*refused[0])


def plan_job(wl: Workload, knobs: Knobs, card: CardSpec | None, vram_gib: float | None = None,
             ram_gib: float | None = None, profile: Any = profile_step) -> tuple[MemoryProfile, Plan | None]:
    """The one way a job is planned (runs, presets' tables, ``lowvram profile``): profile it with its knobs;
    over budget, the planner's first plan that fits from there (raises MemoryPlanError when none does, or
    when the plan would exhaust host RAM). ``profile``: ``profile_step`` or a memo of it."""
    prof = profile(wl, knobs, card=card, vram_gib=vram_gib)
    if prof.fits is not False:
        check_host(prof, ram_gib, card)
        return prof, None
    return prof, plan(wl, card, vram_gib=vram_gib, ram_gib=ram_gib, start=knobs, first=prof, profile=profile)


def plan_inputs(cfg: RunConfig, card: CardSpec | None = None, processes: int = 1) -> tuple[Workload, Knobs]:
    """(job, knobs) the profile runs for ``cfg`` on ``card``: all a plan depends on besides the card."""
    return workload_for(cfg), knobs_from_config(cfg, None, card).with_(processes=processes)


# ---- the plan of a run ------------------------------------------------------------------------------------
@dataclass
class RunPlan:
    """What a run was decided to be: the config it trains (the resolved one plus the planner's knobs),
    where each value came from, and the plan record (profile, budget, verdict, the planner's steps)."""

    config: RunConfig
    sources: dict[str, str]
    record: dict[str, Any]
    profile: MemoryProfile | None = None  # absent when read back from a run folder
    refusal: tuple[str, str] | None = None  # (problem, fix) when the trainer would refuse this config
    reused: str | None = None  # the stored plan this one was read from (nothing was profiled), for the log

    @property
    def verdict(self) -> str:
        return str(self.record.get("verdict", ""))

    @property
    def fits(self) -> bool | None:
        return self.record.get("fits")

    @property
    def peak_bytes(self) -> int | None:
        return self.record.get("peak_bytes")

    def files(self) -> dict[str, str]:
        """What ``lowvram train`` writes into the run folder (and ``lowvram plan`` prints): name -> text."""
        return {
            CONFIG_NAME: yaml.safe_dump(self.config.to_dict(), sort_keys=False),
            PLAN_NAME: yaml.safe_dump(self.record, sort_keys=False, allow_unicode=True),
            SOURCES_NAME: yaml.safe_dump(self.sources, sort_keys=False, allow_unicode=True),
        }

    def lines(self) -> list[str]:
        """The plan for people, a few lines (``lowvram train`` prints them before it starts)."""
        r = self.record
        if r.get("peak_bytes") is None:
            return [f"note: {n}" for n in r.get("notes", [])]
        budget = r.get("budget_bytes")
        verdict = {"fits": "fits", "planned": "fits with the planner's knobs", "forced": "does NOT fit (forced)",
                   "refused": "refused"}.get(r["verdict"], r["verdict"])
        out = [f"memory: the run peaks at {r['peak_bytes'] / GIB:.2f} GiB of tensors during {r['peak_stage']} "
               f"({verdict}" + (f"; budget {budget / GIB:.2f} GiB, headroom {(budget - r['peak_bytes']) / GIB:+.2f} GiB)"
                                if budget is not None else ")")]
        out += [f"  {cat:<20} {b / GIB:8.3f} GiB" for cat, b in r["by_category"].items() if b]
        out += [f"  {cat:<20} {b / GIB:8.3f} GiB in host memory (not on the card)" for cat, b in r["host_bytes"].items()]
        if len(r.get("stages", {})) > 1:
            out.append("  stages: " + ", ".join(f"{s} {b / GIB:.2f}" for s, b in r["stages"].items()) + " GiB")
        if r.get("planner_steps"):
            out.append("the planner switched on (fastest plan that fits):")
            out += [f"  + {s['knob']}: {s['peak_bytes'] / GIB:.2f} GiB (saved {s['saved_bytes'] / GIB:+.2f})"
                    for s in r["planner_steps"]]
            out.append("  settings changed: " + ", ".join(f"{k}={v}" for k, v in r.get("changed", {}).items()))
        if self.refusal is not None or r.get("refused"):
            out.append(f"refused: {r.get('refused')}")
        out += [f"note: {n}" for n in r.get("notes", [])]
        return out + ([f"note: {self.reused}"] if self.reused else [])


def _card_record(card: CardSpec | None, preset: str | None) -> dict[str, Any]:
    if card is None:
        return {"preset": preset}
    keys = ("name", "backend", "arch", "vram_gib", "context_gib", "margin_gib")
    return {"preset": preset, **{k: getattr(card, k) for k in keys if hasattr(card, k)}}


def _changed(before: Knobs, after: Knobs) -> dict[str, Any]:
    old = before.as_config()
    return {f"{sec}.{k}": v for sec, body in after.as_config().items() for k, v in body.items()
            if old.get(sec, {}).get(k) != v}


def _profile_record(p: MemoryProfile) -> dict[str, Any]:
    return {"peak_bytes": p.peak_bytes, "peak_gib": round(p.peak_bytes / GIB, 3), "peak_stage": p.peak_phase,
            "budget_bytes": p.budget_bytes, "fits": p.fits, "by_category": dict(p.by_category),
            "host_bytes": dict(p.host_bytes), "stages": dict(p.stages), "knobs": dict(p.knobs)}


class NotProfiled(Exception):
    """A checkpoint whose own configs the profiler cannot build: the run trains without a plan."""


def _decide(cfg: RunConfig, card: CardSpec | None, wl: Workload, knobs: Knobs,
            refusal: tuple[str, str] | None) -> tuple[dict[str, Any], MemoryProfile]:
    """The expensive part of a plan (profiling, the planner's search): the verdict and its figures, the
    settings the planner changed with the step that changed each (``changed_by``), the profile."""
    try:
        prof = profile_step(wl, knobs, card=card, vram_gib=cfg.memory.vram_gib)
    except LowvramError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        if not (wl.unet_overrides or wl.vae_overrides or wl.text_encoder_overrides):
            raise  # the published layouts always profile: anything else is a bug to see, not to hide
        raise NotProfiled(f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    notes = list(prof.notes)
    if wl.prior:
        notes.append(f"prior preservation: each micro-batch of {knobs.batch_size} instance image(s) also carries "
                     f"as many class images (profiled at {2 * knobs.batch_size} images)")
    if wl.from_scratch and cfg.data.source != "builtin" and not wl.frozen_text_encoder:
        notes.append("the text encoder's vocabulary is built from the captions: profiled at 256 words")
    if prof.fits is not False and refusal is None and not cfg.memory.force:
        check_host(prof, cfg.memory.ram_gib, card)
    core: dict[str, Any] = {"verdict": "fits" if prof.fits is not False else "does not fit", **_profile_record(prof),
                            "planner_steps": [], "changed": {}, "changed_by": {}, "notes": notes}
    if prof.fits is False and refusal is None:
        try:
            chosen: Plan = plan(wl, card, vram_gib=cfg.memory.vram_gib, ram_gib=cfg.memory.ram_gib, start=knobs,
                                first=prof)
        except MemoryPlanError as e:
            if not cfg.memory.force:
                if wl.class_images and prof.peak_phase == "class images":
                    raise MemoryPlanError(
                        f"drawing the {wl.class_images} missing class images: {e.problem}",
                        "fill data.class_data with images drawn elsewhere (data.num_class_images=0 then uses "
                        f"the folder as it is), or {e.fix or 'lower the resolution'}") from e
                raise
            core.update(verdict="forced")
            notes.append("no plan fits the card; training anyway because memory.force is set")
        else:
            changed = _changed(knobs, chosen.knobs)
            changed_by = {}
            for dotted in changed:  # each changed value's source: the planner step that first set it
                sec, k = dotted.split(".")
                changed_by[dotted] = next(
                    (s.knob for s in chosen.steps if s.knobs.as_config()[sec].get(k) == changed[dotted]), "plan")
            core.update(_profile_record(chosen.profile), verdict="planned", changed=changed, changed_by=changed_by,
                        planner_steps=[{"knob": s.knob, "peak_bytes": s.peak_after, "saved_bytes": s.saved}
                                       for s in chosen.steps])
            core["notes"] = notes + [n for n in chosen.profile.notes if n not in notes]
            prof = chosen.profile
    if wl.class_images:
        drawing = prof.stages.get("class images", 0)
        core["notes"].append(f"class images: {wl.class_images} to draw with the base model first (same frozen dtype "
                             f"and attention; the VAE and text encoders on the card): {drawing / GIB:.2f} GiB")
    return core, prof


def plan_run(cfg: RunConfig, card: CardSpec | None, processes: int = 1, sources: dict[str, str] | None = None,
             preset: str | None = None) -> RunPlan:
    """Profile ``cfg`` on ``card``; when it does not fit, let the planner switch knobs on (raises
    MemoryPlanError when nothing fits, unless ``memory.force``). ``cfg`` is never changed: the plan
    carries its own copy with the planner's settings, their sources saying so. An unchanged config on an
    unchanged card reuses the stored plan (``plan_cache``: keyed by content) instead of profiling again."""
    from .plan_cache import cached_decision

    sources = dict(sources or {name: "default" for name, _ in all_fields()})
    planned = copy.deepcopy(cfg)
    family_notes: list[str] = []
    wl = workload_for(planned)  # the job does not depend on the compute precision; the knobs do
    if (family := family_of_run(planned)) is not None:  # the family's precision rule (FLUX.1: never fp16)
        before = planned.train.precision
        family_notes = family.plan_precision(planned, card)  # FLUX.1: the plan's copy computes in bf16/fp32
        if planned.train.precision != before:
            sources["train.precision"] = f"planner: {family.label} precision"
    card_rec = _card_record(card, preset)
    refusal = (untrained_knobs(planned, processes) or [None])[0]
    knobs = knobs_from_config(planned, None, card).with_(processes=processes)
    job = {k: v for k, v in asdict(wl).items() if k not in ("id", "unet_overrides", "vae_overrides",
                                                          "text_encoder_overrides", "lora_targets")}
    base = {"card": card_rec, "job": job}
    try:
        core, prof, reused = cached_decision(planned, card, processes, wl,
                                             lambda: _decide(planned, card, wl, knobs, refusal))
    except NotProfiled as e:  # a checkpoint whose own configs the profiler cannot build (e.g. a custom SDXL)
        note = f"warning: memory not profiled for this model ({e}); training without a plan"
        return RunPlan(planned, sources, {**base, "verdict": "not profiled", "peak_bytes": None,
                                          "notes": family_notes + [note]}, refusal=refusal)
    changed_by = core.pop("changed_by", {})
    for dotted, value in core.get("changed", {}).items():
        section, key = dotted.split(".")
        setattr(getattr(planned, section), key, value)
        sources[dotted] = f"planner: {changed_by.get(dotted, 'plan')}"
    record = {**base, **core, "notes": family_notes + core["notes"]}
    if refusal is not None:
        record.update(verdict="refused", refused=f"{refusal[0]} — {refusal[1]}")
    return RunPlan(planned, sources, record, prof, refusal, reused)


def read_plan(folder: str | Path) -> RunPlan:
    """The plan a run folder (or the panel's job folder) holds: config, sources and plan record."""
    from ..config import ConfigBuilder, load_yaml

    folder = Path(folder)
    b = ConfigBuilder().apply(load_yaml(folder / CONFIG_NAME, "run config"), f"run config {folder / CONFIG_NAME}")
    cfg = b.build()
    sources = load_yaml(folder / SOURCES_NAME, "config sources") if (folder / SOURCES_NAME).is_file() else \
        b.all_sources()
    record = load_yaml(folder / PLAN_NAME, "plan") if (folder / PLAN_NAME).is_file() else {}
    return RunPlan(cfg, {str(k): str(v) for k, v in sources.items()}, record)
