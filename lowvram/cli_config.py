"""Turns a command's --preset, --config, flags and --set into the front door's resolved run, and says what
``--resume`` may change."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .config import MODEL_SIZES, TASKS, RunConfig, field_help
from .errors import ConfigError, LowvramError


def settings_of(args: argparse.Namespace) -> list[Any]:
    """The flags and ``--set`` items of a command, in order, each naming itself as the source."""
    from .api import Setting, parse_set

    flags = {
        "data.source": getattr(args, "data", None),
        "run.task": getattr(args, "task", None),
        "run.steps": getattr(args, "steps", None),
        "run.out": getattr(args, "out", None),
        "run.seed": getattr(args, "seed", None),
        "run.device": getattr(args, "device", None),
        "memory.vram_gib": getattr(args, "vram", None),
        "memory.ram_gib": getattr(args, "ram", None),
        "model.tokenizer": getattr(args, "tokenizer", None),
    }
    model = getattr(args, "model", None)
    if model is not None:
        flags["model.size" if model in MODEL_SIZES else "model.pretrained"] = model
    if getattr(args, "force", False):
        flags["memory.force"] = True
    if getattr(args, "allow_pickle", False):
        flags["model.allow_pickle"] = True
    names = {"model.size": "--model", "model.pretrained": "--model", "memory.vram_gib": "--vram",
             "data.source": "--data", "memory.force": "--force", "model.allow_pickle": "--allow-pickle"}
    out = [Setting(key, value, names.get(key, "--" + key.split(".")[1].replace("_", "-")))
           for key, value in flags.items() if value is not None]
    if getattr(args, "no_final_samples", False):
        out.append(Setting("sample.final", False, "--no-final-samples"))
    return out + [parse_set(item) for item in getattr(args, "set", None) or []]


def resolve_run(args: argparse.Namespace, check_paths: bool = True) -> Any:
    """The front door's ``resolve`` for a command's --preset, --config, flags and --set; with
    ``check_paths`` its inputs must exist and its run folder be writable (nothing is written here)."""
    from .api import resolve
    from .validate import check_config_flags, check_config_paths

    check_config_flags(args)
    run = resolve(getattr(args, "preset", None), config_file=getattr(args, "config", None), settings=settings_of(args))
    if check_paths:
        check_config_paths(run.config, lambda key: run.sources.get(key, "default"))
    return run


def resolve_run_with(args: argparse.Namespace, extra: list[Any]) -> RunConfig:
    """The command's config with ``extra`` settings after its own (what a command itself decides)."""
    from .api import resolve

    return resolve(getattr(args, "preset", None), config_file=getattr(args, "config", None),
                   settings=settings_of(args) + extra).config


def resolve_config(args: argparse.Namespace, check_paths: bool = True) -> tuple[RunConfig, Any, str | None]:
    """Build the RunConfig from the layers, each remembered as the source of its values."""
    run = resolve_run(args, check_paths)
    return run.config, run.preset, run.warning


# flags that name a new run's inputs: a resumed run keeps its own (config.yaml in the run folder)
FIXED_ON_RESUME = ("preset", "config", "data", "model", "task", "out", "seed", "vram", "tokenizer", "force",
                   "allow_pickle")


# config fields a resume cannot change without breaking the run (its data order, weights, optimizer state)
FIXED_FIELDS_ON_RESUME = ("run.out", "run.seed", "run.task", "data.", "model.", "lora.", "train.batch_size",
                          "train.grad_accum", "train.optimizer", "train.ema_decay", "memory.fused_backward")


CHANGEABLE_ON_RESUME = ("data.workers", "data.cache_dir")  # how data is read, not which data


def resume_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What ``--resume`` may change (``--steps``, ``--device``, ``--set`` of the other fields); refuse
    the rest by name rather than ignore it."""
    for name in FIXED_ON_RESUME:
        value = getattr(args, name, None)
        if value not in (None, False):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{flag} {value!r} cannot be used with --resume: the run continues with the settings in "
                f"{Path(args.resume) / 'config.yaml'}",
                f"drop {flag} (with --resume only --steps, --device and --set of training settings apply), "
                "or start a new run with another --out")
    overrides: dict[str, Any] = {}
    if args.steps is not None:
        overrides["run.steps"] = args.steps
    if args.device is not None:
        overrides["run.device"] = args.device
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise LowvramError(f"--set '{item}' must be written section.key=value", "e.g. --set train.lr=1e-4")
        key = key.strip()
        if key.startswith(FIXED_FIELDS_ON_RESUME) and key not in CHANGEABLE_ON_RESUME:
            raise ConfigError(f"--set {item}: {key} cannot change when a run is resumed (its checkpoints depend on it)",
                              "start a new run with another --out to change it")
        overrides[key] = value.strip()
    return overrides


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """The flags that set config fields (shared by train, plan and cache)."""
    p.add_argument("--preset", help="Card preset (see `lowvram presets`); default: picked from the detected hardware.")
    p.add_argument("--config", help="YAML config file (e.g. a run's config.yaml) applied over the preset.")
    p.add_argument("--data", help=field_help("data.source"))
    p.add_argument("--model", help=f"Model size ({', '.join(MODEL_SIZES)}) or a local pretrained checkpoint path.")
    p.add_argument("--task", choices=TASKS, help=field_help("run.task"))
    p.add_argument("--steps", type=int, help=field_help("run.steps"))
    p.add_argument("--out", help=field_help("run.out"))
    p.add_argument("--seed", type=int, help=field_help("run.seed"))
    p.add_argument("--device", help=field_help("run.device"))
    p.add_argument("--vram", type=float, help=field_help("memory.vram_gib"))
    p.add_argument("--ram", type=float, help=field_help("memory.ram_gib"))
    p.add_argument("--allow-pickle", action="store_true", help=field_help("model.allow_pickle"))
    p.add_argument("--tokenizer", help=field_help("model.tokenizer"))
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="Override any config field, e.g. --set train.lr=1e-4 (repeatable).")
