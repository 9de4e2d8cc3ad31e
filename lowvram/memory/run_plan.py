"""Plan a user's run (a RunConfig) against a card: profile its knobs, and if they don't fit, let the planner
switch more on. ``lowvram train``, ``lowvram plan`` and the web panel's Plan button all call this.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import MemoryPlanError
from .planner import Plan, plan
from .profiler import GIB, MemoryProfile, profile_step
from .report import knobs_from_config
from .streaming import check_host
from .workloads import FLUX_MODELS, Workload

# models/pretrained.py names families by checkpoint; the profiler by published architecture
SD_FAMILY_WORKLOAD = {"sd1": "sd15", "sd2": "sd2", "sd2-v": "sd2", "sdxl": "sdxl"}


def _checkpoint_unet_config(cfg: RunConfig) -> dict[str, Any]:
    """The checkpoint's own UNet config when a folder describes it (non-standard or tiny models)."""
    for folder in (cfg.model.config, cfg.model.pretrained):
        if folder and (Path(folder) / "unet" / "config.json").is_file():
            data = json.loads((Path(folder) / "unet" / "config.json").read_text())
            return {k: v for k, v in data.items() if not k.startswith("_")}
    return {}


def prior_factor(cfg: RunConfig) -> int:
    """2 with prior preservation (each micro-batch carries one class image per instance image), else 1."""
    return 2 if cfg.run.task in ("lora", "full") and getattr(cfg.data, "class_data", "") else 1


def _profiler(factor: int) -> Callable[..., MemoryProfile]:
    """``profile_step`` on a micro-batch ``factor`` times the knobs' one: the planner keeps reasoning in
    instance images (what train.batch_size means), the profile measures what the card really holds."""
    if factor == 1:
        return profile_step

    def profile(wl: Workload, knobs: Any, **kw: Any) -> MemoryProfile:
        return profile_step(wl, knobs.with_(batch_size=knobs.batch_size * factor), **kw)

    return profile


def workload_for(cfg: RunConfig) -> Workload:
    """The planner's Workload for this config (a from-scratch size, or the checkpoint's SD family)."""
    from ..train.setup import resolve_defaults

    resolve_defaults(cfg)
    res = int(cfg.data.resolution)
    batch = cfg.train.batch_size * cfg.train.grad_accum
    if cfg.run.task in ("lora", "full"):
        from ..models.flux import is_flux_model
        from ..models.pretrained import detect_family
        from ..train.scratch_lora import model_descriptor, scratch_model_folder

        if (folder := scratch_model_folder(cfg.model.pretrained)) is not None:  # a model trained from scratch
            size = model_descriptor(folder).get("size", cfg.model.size)
            return Workload("this job", f"LoRA on the from-scratch {size} model, {res}²", size, "lora", res, batch,
                            lora_rank=cfg.lora.rank)

        prior = " + class images (prior preservation)" if prior_factor(cfg) > 1 else ""
        if is_flux_model(cfg.model.pretrained):
            from .flux_workload import workload_of_run

            return workload_of_run(cfg, batch, prior)
        family = SD_FAMILY_WORKLOAD[cfg.model.family or detect_family(cfg.model.pretrained, None)]
        what = cfg.lora.type if cfg.run.task == "lora" else cfg.run.task
        return Workload("this job", f"{family} {what}, {res}²{prior}", family, cfg.run.task, res, batch,
                        lora_rank=cfg.lora.rank, adapter=cfg.lora.type, unet_overrides=_checkpoint_unet_config(cfg))
    return Workload("this job", f"{cfg.model.size} from scratch, {res}²", cfg.model.size, "scratch", res, batch,
                    ema=cfg.train.ema_decay > 0)


@dataclass
class RunPlan:
    """The profile of the run as configured, and the planner's plan when that did not fit."""

    profile: MemoryProfile | None
    plan: Plan | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if self.profile is None:
            return self.notes
        p = self.profile
        verdict = "fits" if p.fits else "does not fit" if p.fits is False else "no budget"
        out = [f"memory: one training step peaks at {p.peak_bytes / GIB:.2f} GiB of tensors ({verdict}"
               + (f"; budget {p.budget_bytes / GIB:.2f} GiB, headroom {p.headroom_bytes / GIB:+.2f} GiB)"
                  if p.budget_bytes is not None else ")")]
        out += [f"  {cat:<20} {b / GIB:8.3f} GiB" for cat, b in p.by_category.items() if b]
        out += [f"  {cat:<20} {b / GIB:8.3f} GiB in host memory (not on the card)" for cat, b in p.host_bytes.items()]
        if self.plan is not None:
            out.append(f"the planner switched on (fastest plan that fits: {self.plan.profile.peak_bytes / GIB:.2f} GiB):")
            out += [f"  + {s.knob}: {s.peak_after / GIB:.2f} GiB (saved {s.saved / GIB:+.2f})" for s in self.plan.steps]
        return out + [f"note: {n}" for n in self.notes + p.notes]


def plan_run(cfg: RunConfig, card: Any, processes: int | None = None) -> RunPlan:
    """Profile ``cfg`` on ``card``; when it does not fit, plan (raises MemoryPlanError if nothing fits).

    ``processes``: data-parallel processes, one card each (default: what the launcher started)."""
    if cfg.run.task == "autoencoder":
        return RunPlan(None, notes=["the autoencoder stage is small and is not planned"])
    from ..distributed import process_count

    wl = workload_for(cfg)
    family_notes: list[str] = []
    if wl.model in FLUX_MODELS:
        from .flux_workload import safe_precision

        family_notes = safe_precision(cfg, card)
    knobs = knobs_from_config(cfg, wl, card).with_(processes=processes or process_count())
    profile = _profiler(prior_factor(cfg))
    try:
        prof = profile(wl, knobs, card=card, vram_gib=cfg.memory.vram_gib)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        # a checkpoint whose layout the profiler's family configs do not describe (e.g. a custom SDXL)
        return RunPlan(None, notes=[f"warning: memory not profiled for this model ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0]}); training without a plan"])
    notes = family_notes + (["pixel-space jobs are profiled with the latent UNet of the same size (an estimate)"]
                            if cfg.run.task == "text2img" else [])
    if prior_factor(cfg) > 1:
        notes.append(f"prior preservation: each micro-batch of {knobs.batch_size} instance image(s) also carries "
                     f"as many class images (profiled at micro-batch {prof.knobs.get('batch_size')})")
    if prof.fits is not False:
        check_host(prof, cfg.memory.ram_gib, card)
        return RunPlan(prof, notes=notes + sampling_notes(cfg, wl, knobs, card))
    chosen = plan(wl, card, vram_gib=cfg.memory.vram_gib, ram_gib=cfg.memory.ram_gib, start=knobs, profile=profile)
    # knobs the profiler models but the trainer refuses: a plan that needs one cannot train
    untrained = [name for name, needed in (
        ("DeepSpeed ZeRO-2", chosen.knobs.zero_stage and not cfg.memory.zero_stage),
        (f"{chosen.knobs.trainable_dtype} trainable weights", chosen.knobs.trainable_dtype != "fp32"),
    ) if needed]
    if untrained:
        raise MemoryPlanError(
            f"this job fits only with {untrained[0]} ({chosen.profile.peak_bytes / GIB:.2f} GiB a card), which "
            "lowvram profiles but does not train yet",
            "use a card with more memory, a LoRA instead of a full fine-tune, or a smaller batch/resolution",
        )
    notes += sampling_notes(cfg, wl, chosen.knobs, card)
    before = knobs.as_config()
    overrides = {sec: {k: v for k, v in body.items() if before.get(sec, {}).get(k) != v}
                 for sec, body in chosen.knobs.as_config().items()}
    return RunPlan(prof, chosen, {s: b for s, b in overrides.items() if b}, notes)


def sampling_notes(cfg: RunConfig, wl: Workload, knobs: Any, card: Any) -> list[str]:
    """When the run first draws class images with the base model (data.num_class_images), profile that
    sampling step under the same knobs; raises MemoryPlanError when it does not fit (memory.force aside)."""
    if not (cfg.run.task in ("lora", "full") and cfg.data.class_data and cfg.data.num_class_images):
        return []
    from ..data.class_images import missing_numbers
    from .sampling import profile_sampling

    draw = len(missing_numbers(cfg.data.class_data, cfg.data.num_class_images))
    if not draw or wl.model not in SD_FAMILY_WORKLOAD.values():
        return []
    sp = profile_sampling(wl, knobs, card=card, vram_gib=cfg.memory.vram_gib)
    verdict = {True: "fits", False: "does NOT fit", None: "no budget"}[sp.fits]
    if sp.fits is False and not cfg.memory.force:
        raise MemoryPlanError(
            f"drawing the {draw} missing class images needs {sp.peak_bytes / GIB:.2f} GiB (the VAE and text encoders "
            f"stay on the card while sampling), over the budget of {sp.budget_bytes / GIB:.2f} GiB",
            "set memory.attention=chunked, or fill data.class_data with images drawn elsewhere "
            "(data.num_class_images=0 then uses the folder as it is)",
        )
    return [f"class images: {draw} to draw with the base model first (same frozen dtype and attention); "
            f"a sampling step with guidance + the VAE decode peaks at {sp.peak_bytes / GIB:.2f} GiB ({verdict})"]


def apply_plan(cfg: RunConfig, rp: RunPlan) -> RunConfig:
    """Write the planner's knob settings into ``cfg`` (in place)."""
    for section, body in rp.overrides.items():
        for key, value in body.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def plan_or_refuse(cfg: RunConfig, card: Any, processes: int | None = None) -> RunPlan:
    """What ``lowvram train`` does first: fit the run to the card or refuse it (unless memory.force)."""
    from .plan_cache import cached_plan

    try:
        rp = cached_plan(cfg, card, processes, lambda: plan_run(cfg, card, processes))
    except MemoryPlanError:
        if cfg.memory.force:
            return RunPlan(None, notes=["no plan fits the card; training anyway because memory.force is set"])
        raise
    apply_plan(cfg, rp)
    return rp
