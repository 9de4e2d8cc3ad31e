"""The from-scratch family: a model lowvram trained from scratch (a ``final/`` folder, or its run folder), LoRA-trained.

Such a folder holds ``lowvram_model.json`` beside diffusers/transformers components (``pipeline.TextToImage``): a
pixel-space (or latent) UNet, the small CLIP text encoder and its word-level tokenizer. It is not trained by the
fine-tune job: ``train`` hands it to ``train/scratch_lora.py``, which reuses the from-scratch job with the base
frozen and an adapter on it. The planner's workload, the panel's line and the export come from here, like any
family's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ModelLoadError
from ..run_folder import FINAL_DIR, MODEL_JSON
from .base import ModelFamily, register

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from ..config import RunConfig
    from ..run_folder import RunResult
    from ..train.events import Event
    from ..train.phases import PhaseClock


def scratch_model_folder(path: str | Path | None) -> Path | None:
    """The from-scratch model folder ``path`` names (the folder itself, or a run folder's ``final/``), else None."""
    if not path:
        return None
    p = Path(path).expanduser()
    for folder in (p, p / FINAL_DIR):
        if (folder / MODEL_JSON).is_file():
            return folder
    return None


def model_descriptor(folder: Path) -> dict[str, Any]:
    """The model's ``lowvram_model.json``: sample shape, latent scale, whether it has a VAE, its size."""
    return json.loads((folder / MODEL_JSON).read_text())


def model_resolution(folder: Path) -> int:
    """The image side the model was trained at (its UNet's side, times the VAE's downsampling)."""
    desc = model_descriptor(folder)
    side = int(desc["sample_shape"][-1])
    if desc.get("has_vae"):
        vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
        side *= 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    return side


@register
class ScratchFamily(ModelFamily):
    """A model lowvram trained from scratch: LoRA only, trained by ``train/scratch_lora.py``'s own job."""

    name = "scratch"
    label = "lowvram from-scratch model"
    variants = ("scratch",)
    tasks = ("lora",)

    @classmethod
    def detect(cls, path: Path, allow_pickle: bool = False) -> bool:
        return scratch_model_folder(path) is not None

    @classmethod
    def describe(cls, path: Path) -> str:
        folder = scratch_model_folder(path)
        assert folder is not None  # the registry detected it
        desc = model_descriptor(folder)
        space = "latent" if desc.get("has_vae") else "pixel"
        return f"{cls.label} ({desc.get('size', '?')}, {space} space, {model_resolution(folder)}²)"

    @classmethod
    def check_config(cls, cfg: RunConfig, world: Any = None) -> None:
        if cfg.run.task != "lora":
            raise ConfigError(f"task '{cfg.run.task}' on a from-scratch model ('{cfg.model.pretrained}')",
                              "use --task lora, or continue the base model's own run with --resume")
        if cfg.data.class_data:
            raise ConfigError("prior preservation (data.class_data) is for SD fine-tunes, not for a from-scratch model",
                              "unset data.class_data, or add images of other concepts to the data folder")

    @classmethod
    def workload(cls, cfg: RunConfig, res: int, batch: int, extra: str, common: dict[str, Any]) -> Any:
        from ..memory.run_workload import scratch_lora_workload

        folder = scratch_model_folder(cfg.model.pretrained)
        assert folder is not None  # the registry detected it
        return scratch_lora_workload(cfg, folder, model_descriptor(folder), res, batch, common)

    @classmethod
    def export_run(cls, run_dir: Path, formats: tuple[str, ...], merge: bool, out_dir: Path,
                   name: str) -> list[Path] | None:
        """The diffusers (peft-keyed) file converts as any LoRA file's; kohya and ``--merge`` are refused here,
        before anything is written (kohya's names are SD's: no A1111/ComfyUI loads the model this LoRA adapts)."""
        if "kohya" in formats:
            raise ModelLoadError(f"'{run_dir}' is a LoRA of a model lowvram trained from scratch: it has no kohya "
                                 "form (A1111, ComfyUI and Forge load SD, SDXL and FLUX.1 LoRAs)",
                                 "use --format diffusers, or the merged model in the run's final/ folder")
        if merge:
            raise ModelLoadError(f"--merge: '{run_dir / FINAL_DIR}' already is the base model with this LoRA merged in",
                                 "use that folder (lowvram sample and eval read it), or leave out --merge")
        return None

    @classmethod
    def train(cls, cfg: RunConfig, run_dir: Path, device: torch.device, emit: Callable[[Event], None], *,
              stop: Callable[[], bool], resume: bool, world: Any, clock: PhaseClock) -> RunResult:
        from ..train.scratch_lora import train_scratch_lora

        return train_scratch_lora(cfg, run_dir, device, emit, stop=stop, resume=resume, world=world, clock=clock)

    def load(self) -> Any:
        """Not the fine-tune job's: ``train`` above takes another path, so only ``lowvram cache`` ends here."""
        raise ModelLoadError(f"'{self.cfg.model.pretrained}' is a model lowvram trained from scratch: its LoRA "
                             "encodes each batch as it trains, with no latent or text cache",
                             "train it with `lowvram train --task lora`; lowvram cache is for SD, SDXL and FLUX.1")
