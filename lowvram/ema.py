"""Exponential moving average of a model's weights, the copy that samples are drawn from.

Written here rather than using diffusers' ``EMAModel`` because that keeps its shadow as an unnamed list
on the model's device and its ``state_dict`` mixes floats into the tensors; we want fp32 shadows keyed by
parameter name, on a chosen device (``"cpu"`` frees the card), saved as plain safetensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import CheckpointError

STEP_KEY = "__ema_step__"


class EMA:
    """fp32 shadow copies of a module's (trainable) parameters, updated with warm-up decay.

    The effective decay at update n (0-based) is min(decay, (1+n)/(10+n)), so early shadows follow the
    fast-moving weights instead of staying near the random initialisation.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        *,
        device: torch.device | str | None = None,
        trainable_only: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.step = 0
        self.shadow: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            target = p.device if device is None else torch.device(device)
            self.shadow[name] = p.detach().to(device=target, dtype=torch.float32, copy=True)

    def _params(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(shadow, parameter) pairs; every shadowed name must exist in ``model``."""
        params = dict(model.named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise KeyError(f"model has no parameters {missing[:3]} that the EMA tracks")
        return [(s, params[n]) for n, s in self.shadow.items()]

    def current_decay(self) -> float:
        """The decay the next ``update`` will use (warm-up included)."""
        return min(self.decay, (1 + self.step) / (10 + self.step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow ← d·shadow + (1−d)·param, in fp32 on the shadow's device."""
        d = self.current_decay()
        pairs = self._params(model)
        shadows = [s for s, _ in pairs]
        values = [p.detach().to(device=s.device, dtype=torch.float32) for s, p in pairs]
        if shadows:
            # lerp_(v, 1-d) = s + (1-d)(v - s): one fused op per tensor list.
            torch._foreach_lerp_(shadows, values, 1.0 - d)
        self.step += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the EMA weights (cast to each parameter's dtype)."""
        for s, p in self._params(model):
            p.copy_(s)

    @contextmanager
    def swapped(self, model: nn.Module, backup_device: torch.device | str = "cpu") -> Iterator[nn.Module]:
        """Temporarily load the EMA weights (e.g. to sample), restoring the trained weights afterwards.

        The trained weights wait on ``backup_device`` (CPU by default, so the swap costs no card memory).
        """
        pairs = self._params(model)
        with torch.no_grad():
            backup = [p.detach().to(backup_device, copy=True) for _, p in pairs]
            for s, p in pairs:
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (_, p), b in zip(pairs, backup, strict=True):
                    p.copy_(b)

    def weights(self) -> dict[str, torch.Tensor]:
        """The shadow weights by parameter name (what an exported EMA model contains)."""
        return dict(self.shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-ready): the shadows plus the update count under ``STEP_KEY``."""
        return {**self.shadow, STEP_KEY: torch.tensor(self.step, dtype=torch.int64)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore shadows and step from ``state_dict()`` output; names must match exactly."""
        names = set(state) - {STEP_KEY}
        if names != set(self.shadow):
            extra, missing = sorted(names - set(self.shadow)), sorted(set(self.shadow) - names)
            raise CheckpointError(
                f"EMA state does not match the model (missing {missing[:3]}, unexpected {extra[:3]})",
                "resume with the same model size and LoRA settings as the checkpoint",
            )
        for name, s in self.shadow.items():
            s.copy_(state[name])
        if STEP_KEY in state:
            self.step = int(state[STEP_KEY].item())

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadows (e.g. to the CPU when memory gets tight)."""
        self.shadow = {n: s.to(device) for n, s in self.shadow.items()}
        return self

    def num_bytes(self) -> int:
        """Bytes the shadows occupy (for the memory report)."""
        return sum(s.numel() * s.element_size() for s in self.shadow.values())
