"""Model families as plug-ins: the registry of families a fine-tune can train, and the question "which one is this?".

A new family is one module here with a ``@register``-ed :class:`ModelFamily` subclass, its import below,
and its tests; the fine-tune job (``train/finetune.py``), the planner and the shells ask the registry.
"""

from __future__ import annotations

from . import flux, scratch, sd, sdxl  # noqa: F401  (each registers its family on import)
from .base import ModelFamily, detect, families, family_named, family_of, register, registered

__all__ = ["ModelFamily", "detect", "families", "family_named", "family_of", "register", "registered"]
