"""Find, list, load and validate the card presets (one YAML per card in ``lowvram/presets/``); match one to a card.

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

from .config import ConfigBuilder, RunConfig, load_yaml
from .errors import ConfigError, PresetError

if TYPE_CHECKING:
    from .hardware import HardwareInfo

GIB = 2**30
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
class CardSpec:
    """The card a preset is for: what it is, its memory, and what it can run."""

    name: str
    backend: str
    arch: str
    vram_gib: float
    context_gib: float
    margin_gib: float
    bf16: bool
    fp16: bool
    flash_attention: bool
    bitsandbytes: bool
    xformers: bool

    def describe(self) -> str:
        """``AMD RX 570 (gfx803, 4 GB)``; ``the CPU`` for the CPU preset."""
        if self.backend == "cpu":
            return "the CPU"
        return f"{self.name} ({self.arch}, {self.vram_gib:g} GB)"


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


def budget_bytes(card: CardSpec) -> int:
    """Bytes a run may plan for: the card's VRAM minus the runtime context and a safety margin."""
    return int((card.vram_gib - card.context_gib - card.margin_gib) * GIB)


def preset_dir() -> Path:
    """The folder of shipped presets (inside the installed package, so it works without the repo)."""
    return Path(str(resources.files("lowvram").joinpath("presets")))


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


def _card_host(card_gib: Any, host_gib: Any) -> str:
    """``2.9G`` on the card, ``2.9G+17.6G host`` with host memory (tables written before host bytes: card only)."""
    card = f"{card_gib or 0:.1f}G"
    return f"{card}+{host_gib:.1f}G host" if isinstance(host_gib, int | float) and host_gib >= 0.05 else card


def profile_verdict(profile: dict[str, Any] | None) -> str:
    """One short cell for the presets table from a memory profile.

    Reads ``verdict`` (text) if the profile has one, else ``workloads: {W1: {fits: bool}, ...}``.
    """
    if not profile:
        return ""
    if isinstance(profile.get("verdict"), str):
        return profile["verdict"]
    workloads = profile.get("workloads")
    if isinstance(workloads, dict):
        marks = []
        for wid, row in workloads.items():
            row = row if isinstance(row, dict) else {}
            fits = row.get("fits")
            if fits is False and row.get("fits_with_planner"):  # fits once the planner turns knobs
                mark = f"planned {_card_host(row.get('planned_peak_gib'), row.get('planned_host_gib'))}"
            else:
                mark = _card_host(row.get("peak_gib"), row.get("host_gib")) if fits else \
                    "no" if fits is False else "?"
            marks.append(f"{wid} {mark}")
        return ", ".join(marks)
    return "profiled"


def presets_table(presets: list[Preset] | None = None) -> str:
    """The ``lowvram presets`` listing: one row per preset with its card and main knobs."""
    presets = presets if presets is not None else [load_preset(n) for n in list_presets()]
    header = ["name", "card", "VRAM", "backend", "precision", "optimizer", "attention"]
    with_profile = any(p.memory_profile for p in presets)
    if with_profile:
        header.append("memory profile (card GiB + host GiB)")
    rows = [header]
    for p in presets:
        row = [
            p.name,
            "CPU" if p.card.backend == "cpu" else f"{p.card.name} ({p.card.arch})",
            f"{p.card.vram_gib:g} GB",
            p.card.backend,
            str(p.knob("train.precision")),
            str(p.knob("train.optimizer")),
            str(p.knob("memory.attention")),
        ]
        if with_profile:
            row.append(profile_verdict(p.memory_profile))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def presets_markdown(presets: list[Preset] | None = None) -> str:
    """docs/presets.md: each card, its knobs and its generated memory table (``lowvram presets --markdown``)."""
    presets = presets if presets is not None else [load_preset(n) for n in list_presets()]
    names = {"W1": "SD 1.5 LoRA r16, 512²", "W2": "SDXL LoRA r16, 1024²", "W3": "SD 1.5 full fine-tune, 512²",
             "W4": "celeba64 from scratch, batch 16", "W5": "FLUX.1-dev LoRA r16, 512²",
             "W6": "FLUX.1-dev LoRA r16, 1024²"}
    out = ["# Presets and their memory tables", "",
           "Generated by `lowvram presets --markdown` from `lowvram/presets/*.yaml`; the tables inside them are",
           "written by `lowvram profile --update-presets`: the peak of tensor bytes of the whole run (caching,",
           "the training steps with EMA, validation, sample previews), profiled on the meta device, see",
           "[memory.md](memory.md). *peak* uses the preset's own knobs; when that does not fit, *planned* is the",
           "first plan the planner finds from there (what `lowvram train`, `lowvram plan`, `lowvram profile",
           "--preset` and the web panel run and show for that job), or the closest plan it profiled. The",
           "planner only switches on what the trainer runs. The budget is the card's memory minus the runtime",
           "context and a safety margin. *host* is what the same plan keeps in host RAM at the card's peak",
           "(streamed block weights and the pinned allocator's rounding, the VAE/text encoders parked after",
           "caching, the EMA on the CPU); *streamed* is the share of the frozen block weights streamed from there.",
           "Host bytes are shown, not judged: `lowvram train` checks them against the machine's RAM (`--ram`).", ""]
    for p in presets:
        c = p.card
        out += [f"## `{p.name}` — {c.name}", "", p.description, "",
                f"- card: {c.vram_gib:g} GiB, backend {c.backend}, arch {c.arch}; bf16 {'yes' if c.bf16 else 'no'}, "
                f"flash attention {'yes' if c.flash_attention else 'no'}, bitsandbytes {'yes' if c.bitsandbytes else 'no'}",
                "- knobs: " + ", ".join(f"`{sec}.{k}={v}`" for sec, body in (p.config or {}).items()
                                        for k, v in (body or {}).items()), ""]
        table = (p.memory_profile or {}).get("workloads") or {}
        if not table:
            out += ["(not profiled yet)", ""]
            continue
        out += [f"budget for tensors: {p.memory_profile.get('budget_gib')} GiB", "",
                "| workload | peak GiB | host GiB | verdict | planned GiB | planned host GiB | streamed |",
                "|---|---|---|---|---|---|---|"]
        for wid, row in table.items():
            verdict = "fits" if row.get("fits") else ("fits with the planner" if row.get("fits_with_planner")
                                                      else "does not fit (the planner's closest shown)")
            cells = [row.get(k, "") for k in ("peak_gib", "host_gib")] + [verdict] + \
                [row.get(k, "") for k in ("planned_peak_gib", "planned_host_gib")]
            streamed = f"{row['stream_blocks']:.0%}" if row.get("stream_blocks") else ""
            out.append(f"| {wid} {names.get(wid, '')} | " + " | ".join(map(str, cells)) + f" | {streamed} |")
        out.append("")
    return "\n".join(out)


# ---- which preset suits this machine -------------------------------------------------------------------
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
