"""Checks config values: each raw value against its field's type, each built config against its ranges, choices
and combinations; every problem names the field, what was expected and where the value came from."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, get_args, get_origin

from .config_choices import FINETUNE_TASKS

if TYPE_CHECKING:
    from .config import RunConfig

def closest(name: str, options: list[str]) -> str:
    """A "did you mean" hint for an unknown name, or the valid options."""
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid: {', '.join(options)}."


def coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a YAML/flag value to the field type; raise ValueError with what was expected."""
    origin = get_origin(typ)
    args = get_args(typ)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return coerce(value, inner, where)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if "," in value or value else []
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return [coerce(v, args[0], where) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ValueError(f"expected a whole number, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, dict | list):
            raise ValueError(f"expected text, got {value!r}")
        return str(value)
    return value


# Largest values that can be meant (beyond them a run exhausts memory or never ends): what `validate` allows.
UPPER_BOUNDS: dict[str, float] = {
    "run.steps": 10**8, "run.checkpoint_every": 10**8, "run.sample_every": 10**8, "run.val_every": 10**8,
    "run.log_every": 10**8, "run.keep_checkpoints": 10**4, "run.max_nonfinite": 10**6, "run.seed": 2**32 - 1,
    "model.timesteps": 10**5, "data.resolution": 16384, "data.num_images": 200_000, "data.workers": 256,
    "data.bucket_step": 1024, "data.bucket_max_ratio": 100.0, "data.keep_tokens": 10**4, "data.min_size": 16384,
    "data.max_pixels": 2**40, "train.batch_size": 65536, "train.grad_accum": 65536, "train.warmup_steps": 10**8,
    "train.weight_decay": 10.0, "train.grad_clip": 10**6, "train.snr_gamma": 10**4, "train.prior_loss_weight": 10**4,
    "train.autoencoder_steps": 10**8, "train.kl_weight": 10**3, "sample.steps": 10**4, "sample.seed": 2**32 - 1,
    "sample.guidance": 100.0, "sample.guidance_rescale": 1.0, "memory.attention_chunk": 2**24,
    "memory.vram_gib": 4096.0, "lora.rank": 4096, "lora.alpha": 10**5, "data.num_class_images": 200_000,
    "data.unmasked_weight": 1.0,
}


TEXT_LIMIT = 4096  # characters of one text value (captions prefixes, prompts, paths)


ITEMS_LIMIT = 256  # entries of one list value (prompts, guidance scales)


def fields_of(cfg: RunConfig) -> list[tuple[str, dataclasses.Field, Any]]:
    """Every ``section.key`` of ``cfg`` with its dataclass field and value, in declaration order."""
    return [(f"{s.name}.{f.name}", f, getattr(getattr(cfg, s.name), f.name))
            for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def _value(cfg: RunConfig, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _number_problems(cfg: RunConfig) -> list[tuple[str, Any, str]]:
    """Non-finite floats, values above ``UPPER_BOUNDS``, overlong texts and lists: (field, value, expected)."""
    out: list[tuple[str, Any, str]] = []
    for dotted, _f, value in fields_of(cfg):
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) > ITEMS_LIMIT:
            out.append((dotted, f"<{len(value)} items>", f"at most {ITEMS_LIMIT} items"))
            continue
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                out.append((dotted, v, "a finite number"))
            elif isinstance(v, int | float) and not isinstance(v, bool) and dotted in UPPER_BOUNDS \
                    and v > UPPER_BOUNDS[dotted]:
                out.append((dotted, v, f"at most {UPPER_BOUNDS[dotted]:g}"))
            elif isinstance(v, str) and len(v) > TEXT_LIMIT:
                out.append((dotted, v[:40] + "...", f"at most {TEXT_LIMIT} characters"))
    return out


Bad = Callable[[str, Any, str], None]  # bad(field, value, what was expected): reports one problem

POSITIVE = ("run.steps", "train.batch_size", "train.grad_accum", "model.timesteps", "data.resolution",
            "sample.steps", "lora.rank", "memory.attention_chunk", "data.num_images", "train.autoencoder_steps",
            "data.bucket_step", "data.max_pixels", "run.log_every", "data.min_size", "lora.alpha")
NON_NEGATIVE = ("run.checkpoint_every", "run.sample_every", "run.val_every", "run.log_every",
                "train.warmup_steps", "train.weight_decay", "train.grad_clip", "run.keep_checkpoints",
                "data.workers", "run.seed", "train.prior_loss_weight", "train.snr_gamma", "train.kl_weight",
                "sample.seed", "sample.guidance", "data.keep_tokens")


def _check_choices_and_signs(cfg: RunConfig, bad: Bad) -> None:
    """Values outside a field's choices, and numbers that must be above 0 or at least 0."""
    for dotted, f, value in fields_of(cfg):
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            match = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
            hint = f"; did you mean '{match[0]}'?" if match else ""
            bad(dotted, value, "one of " + ", ".join(choices) + hint)
    for dotted in POSITIVE:
        v = _value(cfg, dotted)
        if v is not None and v <= 0:
            bad(dotted, v, "a number above 0")
    for dotted in NON_NEGATIVE:
        v = _value(cfg, dotted)
        if v < 0:
            bad(dotted, v, "0 or more")


def _check_ranges(cfg: RunConfig, bad: Bad) -> None:
    """Rates, fractions, guidance scales and step counts that only make sense within a range."""
    if not 0 < cfg.train.lr < 1:
        bad("train.lr", cfg.train.lr, "a learning rate between 0 and 1 (e.g. 2e-4)")
    if not 0 < cfg.train.autoencoder_lr < 1:
        bad("train.autoencoder_lr", cfg.train.autoencoder_lr, "a learning rate between 0 and 1 (e.g. 1e-3)")
    if not 0 <= cfg.sample.guidance_rescale <= 1:
        bad("sample.guidance_rescale", cfg.sample.guidance_rescale, "a fraction from 0 to 1 (e.g. 0.7)")
    if not 1 <= cfg.data.bucket_max_ratio:
        bad("data.bucket_max_ratio", cfg.data.bucket_max_ratio, "1 or more (long side / short side)")
    if any(w < 0 for w in cfg.sample.cfg_scales) or any(w > 100 for w in cfg.sample.cfg_scales):
        bad("sample.cfg_scales", cfg.sample.cfg_scales, "guidance scales from 0 to 100")
    if cfg.run.task not in FINETUNE_TASKS and 0 < cfg.model.timesteps < cfg.sample.steps:
        bad("sample.steps", cfg.sample.steps, f"at most model.timesteps = {cfg.model.timesteps} sampling steps")
    if cfg.data.caption_ext not in (".txt", ".caption"):
        bad("data.caption_ext", cfg.data.caption_ext, "'.txt' or '.caption'")
    if not 0 <= cfg.data.unmasked_weight <= 1:
        bad("data.unmasked_weight", cfg.data.unmasked_weight, "a weight from 0 to 1")
    for dotted in ("data.caption_dropout", "lora.dropout"):
        v = _value(cfg, dotted)
        if not 0 <= v < 1:
            bad(dotted, v, "a fraction from 0 to below 1")
    if not 0 <= cfg.train.ema_decay < 1:
        bad("train.ema_decay", cfg.train.ema_decay, "0 (off) or a decay below 1, e.g. 0.999")
    if cfg.data.resolution is not None and cfg.data.resolution % 8:
        bad("data.resolution", cfg.data.resolution, "a multiple of 8")
    if cfg.run.max_nonfinite < 1:
        bad("run.max_nonfinite", cfg.run.max_nonfinite, "1 or more")


def _check_data(cfg: RunConfig, bad: Bad) -> None:
    """Data fields that need (or forbid) another: class images, generated-shape filters, guidance scales, model."""
    if cfg.data.class_data and cfg.run.task not in FINETUNE_TASKS:
        bad("data.class_data", cfg.data.class_data, f"no class images for task '{cfg.run.task}' "
            "(prior preservation is for lora / full fine-tunes; unset data.class_data)")
    if cfg.data.num_class_images < 0:
        bad("data.num_class_images", cfg.data.num_class_images, "0 or more")
    elif cfg.data.num_class_images and not (cfg.data.class_data and cfg.data.class_prompt.strip()):
        bad("data.num_class_images", cfg.data.num_class_images, "data.class_data (the folder to fill) and "
            "data.class_prompt (what to draw) as well")
    if cfg.data.builtin_exclude and cfg.data.source != "builtin":
        bad("data.builtin_exclude", cfg.data.builtin_exclude, "data.source=builtin (it filters the generated shapes)")
    elif cfg.data.builtin_exclude:
        from .data.builtin import exclude_problem  # only when the field is set (the module imports torch)

        problem = exclude_problem(cfg.data.builtin_exclude)
        if problem:
            bad("data.builtin_exclude", cfg.data.builtin_exclude, f"{problem[1]} ({problem[0]})")
    if not cfg.sample.cfg_scales:
        bad("sample.cfg_scales", cfg.sample.cfg_scales, "at least one guidance scale")
    if cfg.run.task in FINETUNE_TASKS and not cfg.model.pretrained:
        bad("model.pretrained", None, f"a local checkpoint path for task '{cfg.run.task}' (--model PATH)")


def _check_memory(cfg: RunConfig, bad: Bad) -> None:
    """Memory sizes, streaming share and the ZeRO-2 pair."""
    if cfg.memory.vram_gib is not None and cfg.memory.vram_gib <= 0:
        bad("memory.vram_gib", cfg.memory.vram_gib, "a positive number of GiB")
    if not 0.0 <= cfg.memory.stream_blocks <= 1.0:
        bad("memory.stream_blocks", cfg.memory.stream_blocks, "a fraction from 0 (off) to 1 (every block)")
    if cfg.memory.text_encoders != "card":
        from .train.text_cache import text_place_problem

        problem = text_place_problem(cfg.memory.text_encoders, cfg.memory.cache_text,
                                     cfg.run.task == "lora" and cfg.lora.text_encoder, cfg.data.shuffle_tags)
        if problem:
            bad("memory.text_encoders", cfg.memory.text_encoders, problem)
    if cfg.memory.ram_gib is not None and cfg.memory.ram_gib <= 0:
        bad("memory.ram_gib", cfg.memory.ram_gib, "a positive number of GiB")
    if cfg.memory.zero_stage not in (0, 2):
        bad("memory.zero_stage", cfg.memory.zero_stage, "0 (off) or 2 (ZeRO-2)")
    if cfg.memory.offload_optimizer and cfg.memory.zero_stage != 2:
        bad("memory.offload_optimizer", True, "memory.zero_stage=2 as well (the offload is part of ZeRO-2)")


def validate(cfg: RunConfig, source_of: Any = lambda k: "default") -> list[str]:
    """Range and choice checks; each message names the field, the expectation and the source."""
    problems: list[str] = []
    reported: set[str] = set()

    def bad(dotted: str, value: Any, expected: str) -> None:
        if dotted in reported:  # one problem per field: a NaN is not also "out of range"
            return
        reported.add(dotted)
        problems.append(f"{dotted} = {value!r} (from {source_of(dotted)}): expected {expected}")

    for dotted, value, expected in _number_problems(cfg):
        bad(dotted, value, expected)
    for check in (_check_choices_and_signs, _check_ranges, _check_data, _check_memory):
        check(cfg, bad)
    return problems
