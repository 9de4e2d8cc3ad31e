"""The front door: resolve a run's configuration, plan it against the card, train exactly that plan.

    run = resolve("rx570", settings=[Setting("run.task", "lora", "--task"), ...])
    p = plan(run)    # the config it will train, each value's source, the memory plan
    train(p)         # trains p.config; the run folder keeps config.yaml, plan.yaml, config_sources.yaml

``lowvram train`` / ``lowvram plan``, the web panel's Plan and Start buttons and the panel's training
process call these functions and nothing else, so a verdict shown anywhere is the verdict of the run
that starts. A resolved config is final: defaults are filled when it is built, and planning returns a
new config (with the planner's settings and their sources) instead of changing the one it was given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .card import CardSpec
from .config import ConfigBuilder, RunConfig, load_yaml
from .errors import ConfigError
from .fsutil import write_text_atomic
from .memory.run_plan import PLAN_NAME, SOURCES_NAME, RunPlan, plan_run, read_plan

__all__ = ["ResolvedRun", "RunPlan", "Setting", "plan", "read_plan", "resolve", "resume", "save_plan", "train"]


@dataclass(frozen=True)
class Setting:
    """One value set by one layer: ``key`` (section.key), the value, and where it came from (a flag, a
    panel field, a line of the panel's extra settings...), shown in errors and kept in the run folder."""

    key: str
    value: Any
    source: str


@dataclass(frozen=True)
class ResolvedRun:
    """A validated, final config with the source of every value, and the preset whose card it runs on."""

    config: RunConfig
    sources: Mapping[str, str]
    preset: Any  # presets.Preset
    warning: str | None = None  # the preset does not match the machine's card


def _preset(name: str | None, probe_hardware: bool) -> tuple[Any, str | None]:
    """The named preset (or the one recommended for this machine) and a mismatch warning."""
    from .presets import load_preset

    if name is not None and not probe_hardware:
        return load_preset(name), None
    from .hardware import probe, recommend_preset, warn_if_preset_mismatch

    info = probe()
    preset = load_preset(name or recommend_preset(info))
    return preset, warn_if_preset_mismatch(preset, info)


def resolve(preset: str | None = None, *, config_file: str | Path | None = None, settings: Iterable[Setting] = (),
            problems: Iterable[str] = (), probe_hardware: bool = True) -> ResolvedRun:
    """preset → ``config_file`` → ``settings`` (flags, panel fields, then ``--set``, in order): one validated
    config, every value's source kept. ``problems`` (e.g. unparsable lines) are reported with the config's
    own, all at once. ``preset=None`` picks the one recommended for this machine."""
    b = ConfigBuilder()
    chosen, warning = _preset(preset, probe_hardware)
    b.apply(chosen.config, chosen.source)
    if config_file:
        b.apply(load_yaml(config_file), f"config file {config_file}")
    for s in settings:
        b.set(s.key, s.value, s.source)
    b.problems.extend(problems)
    cfg = b.build()
    return ResolvedRun(cfg, b.all_sources(), chosen, warning)


def parse_set(item: str, source: str | None = None) -> Setting:
    """``section.key=value`` (a ``--set`` flag) as a Setting."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}' must be written section.key=value", "e.g. --set train.lr=1e-4")
    key, value = item.split("=", 1)
    return Setting(key.strip(), value.strip(), source or f"--set {item}")


def plan(run: ResolvedRun, *, processes: int | None = None, card: CardSpec | None = None) -> RunPlan:
    """Plan ``run`` against its preset's card (or ``card``): the run's config if it fits, else the planner's
    knobs on top (MemoryPlanError when nothing fits, unless memory.force). ``processes``: data-parallel
    processes, one card each (default: what the launcher started)."""
    from .distributed import process_count

    card = card if card is not None else run.preset.card
    return plan_run(run.config, card, processes or process_count(), dict(run.sources), run.preset.name)


def save_plan(p: RunPlan, folder: str | Path) -> Path:
    """Write the plan's files (config.yaml, plan.yaml, config_sources.yaml) into ``folder``, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in p.files().items():
        write_text_atomic(folder / name, text)
    return folder


def train(p: RunPlan, *, listeners: Iterable[Any] = (), stop: Callable[[], bool] | None = None,
          progress: bool = True, clock: Any = None) -> Any:
    """Train the planned config; the run folder gets the plan's files beside the checkpoints.

    Refuses (ConfigError) a config the trainer cannot run, as ``plan`` reported it. ``clock`` (a
    ``train.phases.PhaseClock``) carries the phases timed before training (imports, resolve, plan)."""
    from .memory.run_plan import refuse_untrained
    from .train.run import train as run_training

    if p.refusal is not None:
        raise ConfigError(*p.refusal)
    refuse_untrained(p.config)
    return run_training(p.config, listeners=listeners, stop=stop, progress=progress, record=p.files(), clock=clock)


def resume(run_dir: str | Path, overrides: Mapping[str, Any] | None = None, **kw: Any) -> Any:
    """Continue a run folder from its latest checkpoint (``overrides`` may extend ``run.steps``); the saved
    sources say which values the resume changed."""
    from .train.run import resume as resume_run

    folder = Path(run_dir)
    result = resume_run(run_dir, dict(overrides or {}), **kw)
    if overrides and (folder / SOURCES_NAME).is_file():
        sources = load_yaml(folder / SOURCES_NAME, "config sources")
        sources.update({k: "resume override" for k in overrides})
        write_text_atomic(folder / SOURCES_NAME, yaml.safe_dump(sources, sort_keys=False, allow_unicode=True))
    return result


def plan_files_of(folder: str | Path) -> dict[str, str]:
    """The plan files a run folder holds (what ``lowvram plan`` printed for it)."""
    folder = Path(folder)
    return {name: (folder / name).read_text(encoding="utf-8")
            for name in ("config.yaml", PLAN_NAME, SOURCES_NAME) if (folder / name).is_file()}
