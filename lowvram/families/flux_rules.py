"""What a FLUX.1 run may be: the settings it refuses before any model loads, with the reason and the fix."""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from ..errors import ConfigError


def check_flux_config(cfg: RunConfig, world: Any = None) -> None:
    """What a FLUX.1 run cannot do (yet), refused before any model loads."""
    refuse = [
        (cfg.run.task != "lora", f"task '{cfg.run.task}': FLUX.1 trains as a LoRA only (the 12 B transformer "
         "does not fit a small card as trainable weights)", "use --task lora"),
        (cfg.lora.type != "lora", f"lora.type '{cfg.lora.type}': FLUX.1 files are written as plain LoRA "
         "(the formats ComfyUI and diffusers load for FLUX.1)", "use --set lora.type=lora"),
        (cfg.lora.text_encoder, "lora.text_encoder: FLUX.1's text encoders stay frozen (T5-XXL is cached, then "
         "dropped)", "use --set lora.text_encoder=false"),
        (cfg.lora.conv, "lora.conv adapts 3x3 convolutions and FLUX.1's transformer has none",
         "use --set lora.conv=false"),
        (not cfg.memory.cache_text, "memory.cache_text=false: FLUX.1 captions are always encoded once and cached "
         "(T5-XXL would otherwise stay in memory beside the transformer)", "use --set memory.cache_text=true"),
        (cfg.data.shuffle_tags, "data.shuffle_tags makes new captions every draw, and FLUX.1's T5-XXL is dropped "
         "after caching", "use --set data.shuffle_tags=false"),
        (world is not None and world.distributed, "FLUX.1 LoRA trains in one process (several were not tried)",
         "train without --processes"),
    ]
    if cfg.data.num_class_images and cfg.data.class_data:
        from ..data.class_images import missing_numbers

        missing = len(missing_numbers(cfg.data.class_data, cfg.data.num_class_images))
        refuse.append((missing > 0, f"data.num_class_images: {missing} class images are still to be drawn, and lowvram "
                       "draws them with SD checkpoints only", "draw them with FLUX.1 in ComfyUI or diffusers into "
                       "data.class_data, or set data.num_class_images=0"))
    for bad, problem, fix in refuse:
        if bad:
            raise ConfigError(problem, fix)
