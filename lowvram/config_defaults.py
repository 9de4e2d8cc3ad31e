"""The values a config takes where no layer set them: a from-scratch size's recipe and the training resolution."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config_choices import FINETUNE_TASKS

if TYPE_CHECKING:
    from .config import ConfigBuilder

FINETUNE_RESOLUTION = 512  # what lora/full fine-tunes train at unless data.resolution says otherwise


def default_resolution(task: str, size: str, pretrained: str | None = None) -> int | None:
    """The resolution a run trains at when ``data.resolution`` is not set (None: unknown size): a fine-tune
    of SD 512, of a model lowvram trained from scratch (``pretrained`` names its folder) that model's side."""
    if task in FINETUNE_TASKS:
        if pretrained:
            from .families.scratch import model_resolution, scratch_model_folder

            folder = scratch_model_folder(pretrained)
            if folder is not None:
                return model_resolution(folder)
        return FINETUNE_RESOLUTION
    from .models.scratch import MODEL_SIZES as SPECS

    spec = SPECS.get(size)
    return spec.resolution if spec is not None else None


def fill_defaults(b: ConfigBuilder, size: Any, task: Any) -> None:
    """Fill in ``b`` what no layer set: the model size's recipe (``lowvram/models/recipes.py``; from-scratch
    tasks only) and the resolution, which depends on the task, the size and the checkpoint."""
    from .models.recipes import recipe_for

    # a fine-tune follows its checkpoint (prediction type, schedule), not a from-scratch recipe
    from_scratch = task not in FINETUNE_TASKS
    for key, value in (recipe_for(size) if from_scratch else {}).items():
        if key not in b.values:
            b.set(key, value, f"recipe of model size {size}")
    if b.values.get("data.resolution") is None and isinstance(size, str) and isinstance(task, str):
        pretrained = b.values.get("model.pretrained")
        resolution = default_resolution(task, size, pretrained if isinstance(pretrained, str) else None)
        if resolution is not None:
            b.values["data.resolution"] = resolution
            b.sources["data.resolution"] = ("default for fine-tunes" if not from_scratch
                                            else f"default of model size {size}")
