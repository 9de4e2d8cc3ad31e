"""The model-family plug-in interface and its registry: which family a checkpoint is, asked of each family.

A family (SD 1.x/2.x, SDXL, FLUX.1, ...) is one class: class-level methods answer questions about a
checkpoint without loading it (``detect``, the planner's ``workload``, the panel's ``describe``), and one
instance per fine-tune holds what that run needs (its pipeline, its sampler) and answers the job's calls
(load, text, conditioning, loss, previews, LoRA files). The job, the planner and the shells only ever ask
the registry, so a new family is its own file, one ``@register`` line and its tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ModelLoadError

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from torch import nn

    from ..config import ModelSection, RunConfig
    from ..run_folder import RunResult
    from ..train.events import Event
    from ..train.phases import PhaseClock

_FAMILIES: dict[str, type[ModelFamily]] = {}


class ModelFamily:
    """One model family. Subclasses set ``name``, ``label`` and ``variants`` and implement the methods the
    fine-tune job calls; ``job`` arguments are the :class:`~lowvram.train.finetune.FinetuneJob` of the run."""

    name: ClassVar[str] = ""  # the registry key
    label: ClassVar[str] = ""  # what messages call it: "Stable Diffusion 1.x/2.x"
    variants: ClassVar[tuple[str, ...]] = ()  # what ``model.family`` / the loaded components call it: sd1, sdxl, ...
    denoiser_key: ClassVar[str] = "unet"  # the trained model's name in checkpoints (resume reads it back)
    tasks: ClassVar[tuple[str, ...]] = ("lora", "full")  # the fine-tune tasks (run.task) it trains

    # -- about a checkpoint, nothing loaded ------------------------------------------------------------
    @classmethod
    def detect(cls, path: Path, allow_pickle: bool = False) -> bool:
        """Whether ``path`` (an existing folder or file) holds this family's model. A file that is clearly this
        family's but unusable (an SDXL refiner, a FLUX.1 Fill model) raises the reason instead."""
        raise NotImplementedError

    @classmethod
    def describe(cls, path: Path) -> str:
        """The panel's one line about a checkpoint of this family; raises a LowvramError to refuse it."""
        return f"{cls.label} checkpoint"

    @classmethod
    def check_config(cls, cfg: RunConfig, world: Any = None) -> None:
        """Refuse what this family cannot train (before any model loads); the default refuses nothing."""

    @classmethod
    def workload(cls, cfg: RunConfig, res: int, batch: int, extra: str, common: dict[str, Any]) -> Any:
        """The planner's ``Workload`` of a fine-tune of this family (``run_workload.workload_for`` asks)."""
        raise NotImplementedError

    @classmethod
    def plan_precision(cls, planned: RunConfig, card: Any) -> list[str]:
        """Change the plan's copy of the config where this family cannot compute as asked; returns notes."""
        return []

    @classmethod
    def train(cls, cfg: RunConfig, run_dir: Path, device: torch.device, emit: Callable[[Event], None], *,
              stop: Callable[[], bool], resume: bool, world: Any, clock: PhaseClock) -> RunResult:
        """Train a fine-tune of this family (``train/run.py`` asks the registry, then calls this): the fine-tune
        job written against this interface (``train/finetune.py``), unless a family trains with its own job."""
        from ..train.finetune import train_finetune

        return train_finetune(cfg, run_dir, device, emit, stop=stop, resume=resume, world=world, clock=clock)

    @classmethod
    def export_run(cls, run_dir: Path, formats: tuple[str, ...], merge: bool, out_dir: Path,
                   name: str) -> list[Path] | None:
        """``lowvram export`` of a LoRA run of this family, or None: the SD exporter's conversion applies."""
        return None

    # -- one run ----------------------------------------------------------------------------------------
    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device

    def load(self) -> Any:
        """The pretrained components the run starts from (the denoiser may come later: ``denoiser_to_card``)."""
        raise NotImplementedError

    def prepare(self, comps: Any) -> list[str]:
        """Dtypes, adapters and attention of the loaded components; returns notes for the log."""
        return []

    def bind(self, job: Any) -> list[nn.Module]:
        """Set up this run's state for ``job``; returns the frozen helpers (VAE, text encoders), on the device."""
        raise NotImplementedError

    def denoiser(self, comps: Any) -> nn.Module | None:
        return getattr(comps, self.denoiser_key, None)

    def text_encoders(self, comps: Any) -> dict[str, nn.Module]:
        return {}

    def trainable_modules(self, job: Any) -> dict[str, nn.Module]:
        return {self.denoiser_key: job.unet}

    def encode_text(self, job: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def text_identity(self, job: Any) -> str:
        """What the text cache is keyed on besides the captions (encoders, settings)."""
        raise NotImplementedError

    def conditioning(self, job: Any, captions: list[str], gen: torch.Generator) -> Any:
        """The text conditioning of a batch, caption dropout applied."""
        raise NotImplementedError

    def batch_extras(self, job: Any, ds: Any, plans: list[Any], x0: torch.Tensor) -> dict[str, Any]:
        """What else a batch carries besides latents and captions (SDXL: its size conditioning)."""
        return {}

    def loss(self, job: Any, batch: dict[str, Any], gen: torch.Generator, reduce: bool) -> torch.Tensor:
        """The training loss of a batch: a scalar, or one value per sample when ``reduce`` is off."""
        raise NotImplementedError

    def preview_captions(self, job: Any) -> set[str]:
        """Strings the previews encode, cached with the captions (none: the family encodes its own)."""
        return set()

    def cache_preview_text(self, job: Any) -> None:
        """Keep the preview prompts' text from the caption cache (the default keeps nothing)."""

    def after_caching(self, job: Any) -> None:
        """What the family does once latents and text are cached (FLUX.1 drops its text encoders)."""

    def denoiser_to_card(self, job: Any) -> list[str]:
        """Bring the trained model to the device (or stream it); returns notes."""
        raise NotImplementedError

    def summary(self, job: Any, notes: list[str]) -> str:
        """The line printed before training starts."""
        return f"{self.cfg.run.task} fine-tune of {self.label} from {self.cfg.model.pretrained}; " + "; ".join(notes)

    def preview(self, job: Any) -> Any:
        raise NotImplementedError

    def draw_base(self, job: Any, prompt: str, seed: int) -> torch.Tensor:
        raise ModelLoadError(f"{self.label}: lowvram does not draw class images with this family",
                             "draw them elsewhere into data.class_data, or set data.num_class_images=0")

    def metadata(self, job: Any, meta: dict[str, Any]) -> dict[str, Any]:
        """The family's keys added to the LoRA files' metadata."""
        return meta

    def save_lora(self, job: Any, step: int, kohya_path: Path | None = None) -> dict[str, Path]:
        """Write the LoRA files; returns {"diffusers": path, "kohya": path}."""
        raise NotImplementedError

    def save_model(self, job: Any, step: int) -> Path:
        raise ModelLoadError(f"{self.label} trains as a LoRA only", "use --task lora")


# ---- the registry ---------------------------------------------------------------------------------------
def register(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: add a family to the registry (a later family of the same name replaces it)."""
    if not cls.name or not cls.variants:
        raise TypeError(f"{cls.__name__} needs a name and its variants to be registered")
    _FAMILIES[cls.name] = cls
    return cls


@contextmanager
def registered(cls: type[ModelFamily]) -> Iterator[type[ModelFamily]]:
    """The family registered for a block only (tests), the registry as it was afterwards."""
    before = _FAMILIES.get(cls.name)
    register(cls)
    try:
        yield cls
    finally:
        if before is None:
            _FAMILIES.pop(cls.name, None)
        else:
            _FAMILIES[cls.name] = before


def families() -> tuple[type[ModelFamily], ...]:
    return tuple(_FAMILIES.values())


def family_named(variant: str) -> type[ModelFamily]:
    """The family whose variants include ``variant`` (``model.family``: sd1, sd2, sd2-v, sdxl, ...)."""
    for cls in _FAMILIES.values():
        if variant in cls.variants:
            return cls
    known = ", ".join(v for cls in _FAMILIES.values() for v in cls.variants)
    raise ModelLoadError(f"unknown model family '{variant}'", f"use one of {known}")


def detect(path: str | Path, allow_pickle: bool = False) -> type[ModelFamily]:
    """The family of the checkpoint at ``path``: the one registered family that recognises it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path '{p}' does not exist", "pass a local diffusers folder or .safetensors file")
    found = [cls for cls in _FAMILIES.values() if cls.detect(p, allow_pickle)]
    if len(found) > 1:  # two plug-ins claim one file: a bug in one of them, said plainly
        raise ModelLoadError(f"'{p}' is claimed by several model families ({', '.join(c.name for c in found)})",
                             "set model.family to say which, and report the overlap")
    if not found:
        what = ("a folder holding " + ", ".join(sorted(x.name for x in p.iterdir())[:12])) if p.is_dir() \
            else f"a '{p.suffix}' file"
        labels = "; ".join(f"{c.label} ({', '.join(c.variants)})" for c in _FAMILIES.values())
        raise ModelLoadError(f"'{p}' ({what}) is not a checkpoint of a model family lowvram trains: {labels}",
                             "pass a diffusers folder or an A1111/ComfyUI .safetensors file of one of them")
    return found[0]


def family_of(model: ModelSection) -> type[ModelFamily]:
    """The family of a config's ``model`` section: ``model.family`` when given (it skips detection, as the
    loaders do), else the detected family of ``model.pretrained``."""
    if model.family:
        return family_named(model.family)
    if not model.pretrained:
        raise ModelLoadError("model.pretrained is not set", "pass a local checkpoint (--model PATH)")
    return detect(model.pretrained, model.allow_pickle)
