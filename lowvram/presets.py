"""Find, list, load and validate the card presets (one YAML per card in the repository's ``presets/``); match one to a card.

A preset names a card (backend, architecture, VRAM, what the card can do) and the RunConfig knobs that
suit it; ``lowvram profile --update-presets`` later writes its measured ``memory_profile`` into it.
``recommend_preset`` picks the one for a probed machine (``hardware.probe`` reads no preset file itself).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .card import CardSpec, budget_bytes  # noqa: F401 (budget_bytes: re-exported, the one budget rule)
from .config import ConfigBuilder, RunConfig, load_yaml
from .errors import ConfigError, PresetError

if TYPE_CHECKING:
    from .hardware import HardwareInfo

BACKENDS = ("cpu", "cuda", "rocm")
TOP_LEVEL_KEYS = ("name", "description", "card", "config", "memory_profile")
# Capabilities a card declares; a preset's knobs may only use what its card has (checked on load).
CAPABILITIES = ("bf16", "fp16", "flash_attention", "bitsandbytes", "xformers")
# Knob values that only run on a card with the capability: {capability: (section.key, value)}.
CARD_ONLY_KNOBS = {
    "bf16": ("train.precision", "bf16"),
    "fp16": ("train.precision", "fp16"),
    "bitsandbytes": ("train.optimizer", "adamw8bit"),
    "xformers": ("memory.attention", "xformers"),
}
# Presets describe a card, not a job: these belong in the config file or flags.
JOB_KEYS = ("run.steps", "run.task")


@dataclass(frozen=True)
class Preset:
    """A loaded, validated preset; ``config`` is a RunConfig override mapping (sections → keys)."""

    name: str
    description: str
    card: CardSpec
    config: dict[str, Any]
    memory_profile: dict[str, Any] | None
    path: Path

    @property
    def source(self) -> str:
        """The layer name ConfigBuilder reports for values this preset sets."""
        return f"preset {self.name} ({self.path})"

    def knob(self, dotted: str) -> Any:
        """The value the preset gives ``section.key``, or the RunConfig default."""
        section, key = dotted.split(".", 1)
        body = self.config.get(section) or {}
        if key in body:
            return body[key]
        return getattr(getattr(RunConfig(), section), key)

    def needs(self) -> tuple[str, ...]:
        """Card capabilities the preset's knobs rely on (a card without one of them cannot use it)."""
        used = {cap: self.knob(dotted) == value for cap, (dotted, value) in CARD_ONLY_KNOBS.items()}
        # On a GPU the preset's memory profile assumes SDPA without the N x N attention matrix.
        used["flash_attention"] = (
            self.card.backend != "cpu"
            and self.knob("memory.attention") in ("sdpa", "auto")
            and self.card.flash_attention
        )
        return tuple(cap for cap in CAPABILITIES if used[cap])


# The data package of the shipped YAMLs: the repository's presets/ folder, installed inside lowvram (pyproject's
# package-dir); not "lowvram.presets", which is this module.
PRESET_PACKAGE = "lowvram.preset_files"


def preset_dir() -> Path:
    """The folder of shipped presets: the repository's ``presets/`` in a checkout or an editable install,
    ``lowvram/preset_files/`` inside an installed wheel (so it works without the repo). ``lowvram profile
    --update-presets`` writes the memory tables there."""
    return Path(str(resources.files(PRESET_PACKAGE)))


def list_presets() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def _resolve(name_or_path: str | Path) -> Path:
    """A shipped preset name or a path to a YAML file → the file; unknown names list the choices."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    looks_like_path = text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text
    if looks_like_path or candidate.is_file():
        if not candidate.is_file():
            raise PresetError(f"preset file '{candidate}' does not exist", "check the path")
        return candidate
    path = preset_dir() / f"{text}.yaml"
    if path.is_file():
        return path
    names = list_presets()
    close = difflib.get_close_matches(text, names, n=1, cutoff=0.4)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise PresetError(
        f"unknown preset '{text}'", f"{hint}available: {', '.join(names)} (or give a path to a preset YAML)"
    )


def _unknown(key: str, valid: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(valid)}"


def _check_type(value: Any, typ: type, where: str, problems: list[str]) -> None:
    if typ is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        expected = "a number"
    elif typ is bool:
        ok = isinstance(value, bool)
        expected = "true or false"
    else:
        ok = isinstance(value, str) and bool(value.strip())
        expected = "non-empty text"
    if not ok:
        problems.append(f"{where} = {value!r}: expected {expected}")


def _card(data: Any, found: list[str]) -> CardSpec | None:
    """Validate the ``card`` mapping, adding to ``found`` a problem naming each bad ``card.<field>``."""
    problems: list[str] = []
    card = _card_or_none(data, problems)
    found.extend(problems)
    return card


def _card_or_none(data: Any, problems: list[str]) -> CardSpec | None:
    if not isinstance(data, dict):
        problems.append(f"card: expected a mapping of card fields, got {data!r}")
        return None
    spec = {f.name: f.type for f in fields(CardSpec)}
    types = {"str": str, "float": float, "bool": bool}
    for key in data:
        if key not in spec:
            problems.append(f"unknown key 'card.{key}': {_unknown(str(key), list(spec))}")
    for key, typ in spec.items():
        if key not in data:
            problems.append(f"missing field 'card.{key}'")
        else:
            _check_type(data[key], types[typ], f"card.{key}", problems)
    if problems:
        return None
    if data["backend"] not in BACKENDS:
        problems.append(f"card.backend = {data['backend']!r}: expected one of {', '.join(BACKENDS)}")
    sizes = {k: float(data[k]) for k in ("vram_gib", "context_gib", "margin_gib")}
    if sizes["vram_gib"] <= 0 or sizes["context_gib"] < 0 or sizes["margin_gib"] < 0:
        problems.append("card.vram_gib must be above 0 and card.context_gib / card.margin_gib 0 or more")
    elif sizes["context_gib"] + sizes["margin_gib"] >= sizes["vram_gib"]:
        problems.append("card.context_gib + card.margin_gib leave no memory to train in (card.vram_gib)")
    return None if problems else CardSpec(**{**data, **sizes})


def _check_knobs(preset: Preset, problems: list[str]) -> None:
    """Knobs must respect the card: no bf16 on a card without bf16, no bitsandbytes where it is missing."""
    for cap, (dotted, value) in CARD_ONLY_KNOBS.items():
        if preset.knob(dotted) == value and not getattr(preset.card, cap):
            problems.append(f"config {dotted} = {value} but card.{cap} is false: the card cannot run it")
    for dotted in JOB_KEYS:
        section, key = dotted.split(".")
        if key in (preset.config.get(section) or {}):
            problems.append(
                f"config {dotted}: presets describe a card, not a job; set it in --config or a flag"
            )


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a shipped preset by name, or any preset YAML by path, and validate all of it at once.

    Raises PresetError naming the file and every bad field (with the closest valid key).
    """
    path = _resolve(name_or_path)
    try:
        data = load_yaml(path, what="preset")
    except ConfigError as e:
        raise PresetError(e.problem, e.fix) from None
    problems: list[str] = []
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            problems.append(f"unknown key '{key}': {_unknown(str(key), TOP_LEVEL_KEYS)}")
    for key in ("name", "description"):
        if key not in data:
            problems.append(f"missing field '{key}'")
        else:
            _check_type(data[key], str, key, problems)
    if "card" not in data:
        problems.append("missing field 'card'")
        card = None
    else:
        card = _card(data["card"], problems)
    config = data.get("config") or {}
    if not isinstance(config, dict):
        problems.append(f"config: expected a mapping of RunConfig sections, got {config!r}")
        config = {}
    profile = data.get("memory_profile")
    if profile is not None and not isinstance(profile, dict):
        problems.append(f"memory_profile: expected a mapping or null, got {profile!r}")
    if problems or card is None:
        raise _preset_error(path, problems)
    preset = Preset(str(data["name"]), str(data["description"]), card, config, profile, path)
    try:
        ConfigBuilder().apply(config, preset.source).build()
    except ConfigError as e:
        # One line per problem, each already naming the field and this preset as its source.
        problems.extend(getattr(e, "problems", [e.problem]))
    _check_knobs(preset, problems)
    if problems:
        raise _preset_error(path, problems)
    return preset


def _preset_error(path: Path, problems: list[str]) -> PresetError:
    return PresetError(
        f"preset file '{path}' is invalid: " + "; ".join(problems),
        "fix these fields (the schema is documented at the top of every shipped preset)",
    )


# A card reports a little less than its nominal size (e.g. 3.8 of 4 GB); within this it still "is" 4 GB.
VRAM_TOLERANCE_GIB = 0.5
PRECISION_RANK = {"fp32": 0, "fp16": 1, "bf16": 2}


def _capability(info: HardwareInfo, cap: str) -> bool:
    return {
        "bf16": info.bf16_ok,
        "fp16": info.fp16_ok,
        "flash_attention": info.flash_attention_ok,
        "bitsandbytes": info.bitsandbytes_ok,
        "xformers": info.xformers_ok,
    }[cap]


def _preset_backend(info: HardwareInfo) -> str:
    return "cpu" if info.backend in ("cpu", "mps") else info.backend


def _missing(preset: Preset, info: HardwareInfo) -> list[str]:
    """Capabilities the preset's knobs use that this machine lacks."""
    return [cap for cap in preset.needs() if not _capability(info, cap)]


def _fits_vram(preset: Preset, info: HardwareInfo) -> bool:
    gib = info.vram_total_gib
    return gib is None or preset.card.vram_gib <= gib + VRAM_TOLERANCE_GIB


def recommend_preset(info: HardwareInfo, presets: Iterable[Preset] | None = None) -> str:
    """The preset for this card: same backend, knobs the card can run, the largest VRAM not above its own.

    Ties go to the preset for the same architecture, then to the better precision. CPU and MPS get ``cpu``.
    """
    backend = _preset_backend(info)
    if backend == "cpu":
        return "cpu"
    pool = list(presets) if presets is not None else [load_preset(n) for n in list_presets()]
    usable = [p for p in pool if p.card.backend == backend and not _missing(p, info)]
    fitting = [p for p in usable if _fits_vram(p, info)]

    def rank(p: Preset) -> tuple[float, bool, int]:
        return (p.card.vram_gib, p.card.arch == info.arch, PRECISION_RANK[p.knob("train.precision")])

    if fitting:
        return max(fitting, key=rank).name
    if usable:  # a card smaller than every preset: the smallest one, the planner will say what fits
        return min(usable, key=lambda p: p.card.vram_gib).name
    return "cpu"


def warn_if_preset_mismatch(preset: Preset, info: HardwareInfo) -> str | None:
    """One clear warning when ``preset`` is for another kind of machine than this one; else None."""
    card = preset.card
    here = _preset_backend(info)
    head = f"preset {preset.name} is for {_article(card.describe())} but this machine has: {info.describe()}"
    if card.backend == "cpu":
        if here == "cpu":
            return None
        return f"{head}; the GPU will train with the CPU preset's knobs (recommended preset: {info.recommended_preset})"
    if here == "cpu":
        return f"{head}; training on the CPU with the preset's memory knobs (--preset cpu suits this machine)"
    if card.backend != here:
        return f"{head}; recommended preset: {info.recommended_preset}"
    missing = _missing(preset, info)
    if missing:
        return f"{head}; this card lacks {', '.join(missing)}, which the preset's knobs use; recommended preset: {info.recommended_preset}"
    if not _fits_vram(preset, info):
        return (
            f"{head}; the preset plans for {card.vram_gib:g} GB, more than this card has; "
            f"recommended preset: {info.recommended_preset}"
        )
    return None


def _article(text: str) -> str:
    """'an AMD RX 570 ...', 'a GeForce ...'; 'the CPU' stays as it is."""
    if text.startswith("the "):
        return text
    # Vowel sounds, including initialisms read letter by letter (AMD, NVIDIA, RX).
    vowel = text[:1].upper() in "AEIOU" or re.match(r"(NVIDIA|RX|RTX|MX|FX|HD)\b", text)
    return f"{'an' if vowel else 'a'} {text}"
