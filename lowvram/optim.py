"""Builds the optimizer a config names (AdamW, bitsandbytes 8-bit AdamW, the portable 8-bit AdamW, Adafactor),
and the fused backward that steps each parameter as soon as its gradient is complete.

The portable 8-bit AdamW lives in ``optim_8bit.py``, the state's safetensors round trip in ``optim_state.py``;
both are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .errors import CheckpointError, ConfigError
from .optim_8bit import AdamW8bitPortable, QuantCode, dequantize_blockwise, dynamic_code, quantize_blockwise  # noqa: F401
from .optim_state import (  # noqa: F401
    STATE_FORMAT,
    optimizer_from_tensors,
    optimizer_state_bytes,
    optimizer_to_tensors,
)

OPTIMIZERS = ("adamw", "adamw8bit", "adamw8bit_portable", "adafactor")


def _fused_kernels_for(params: list[Any]) -> bool:
    """Whether torch has fused optimizer kernels for every parameter's device and dtype (torch checks
    only at the first step; the profiler's meta tensors have none)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # an old torch
        return False
    devices = set(_get_fused_kernels_supported_devices())
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return all(t.device.type in devices and t.is_floating_point() for t in tensors)


def build_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    *,
    foreach: bool | None = None,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of ``OPTIMIZERS``) over ``params`` (tensors or param groups).

    ``foreach`` applies to plain AdamW only: None lets torch choose (multi-tensor on GPUs, faster but a
    few temporaries more); False is the leanest in memory. ``fused`` (plain AdamW): torch's fused kernel,
    one in-place pass per tensor — no temporaries beyond the per-tensor loop's, 3-8x faster steps
    (bench/optimizer_step.py); where torch has none for the device (or an old torch), ``foreach`` applies.
    Adafactor ignores betas/eps (it has its own).
    """
    params = list(params)
    if name == "adamw":
        if fused and _fused_kernels_for(params):
            return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        return torch.optim.AdamW(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach
        )
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as exc:  # ImportError, or a broken native library (OSError/RuntimeError)
            raise ConfigError(
                f"optimizer adamw8bit needs bitsandbytes, which cannot be imported here ({exc})",
                "use train.optimizer=adamw8bit_portable (plain PyTorch 8-bit AdamW, same memory) or install bitsandbytes",
            ) from exc
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw8bit_portable":
        return AdamW8bitPortable(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate like the other optimizers; beta1=None keeps Adafactor's factored,
        # momentum-free state (its whole point: a few bytes per row/column instead of 8 per weight).
        return Adafactor(
            params,
            lr=lr,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
            weight_decay=weight_decay,
        )
    raise ConfigError(f"unknown optimizer {name!r}", f"use one of {', '.join(OPTIMIZERS)} (train.optimizer)")


# --------------------------------------------------------------------------------------------------
# Fused backward


class FusedBackward:
    """Steps one optimizer per parameter inside backward, as soon as its gradient is complete, then frees it.

    Peak memory then holds a single gradient instead of all of them (kohya's/OneTrainer's "fused back
    pass"). Limits: no global gradient-norm clipping (``clip_per_param`` clips each tensor's norm), and a
    step the loop cannot take back — check the loss is finite *before* ``backward()``. With gradient
    accumulation, set ``stepping = False`` for every micro-batch but the last.

    fp16 overflow protection (``scaler``, an enabled ``GradScaler``): the loss is scaled as usual; each
    gradient is unscaled when it arrives and checked before its tensor steps. A tensor whose gradient
    overflowed does not step (its gradient is dropped; no inf/NaN ever reaches a weight or the optimizer
    state); the tensors whose gradients were finite step as usual, because their steps cannot wait for the
    rest of backward without keeping every gradient. After backward call ``scaler.update()``: one
    overflow anywhere halves the scale for the next step, exactly as GradScaler does for a whole step.
    ``skipped`` counts the tensors skipped since the last ``begin_step()``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        name: str,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        clip_per_param: float = 0.0,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        # one fused in-place AdamW kernel per tensor where torch has one (else foreach=False): as the non-fused trainer
        self.optimizers = [build_optimizer([p], name, lr, weight_decay, betas, eps, foreach=False, fused=True)
                           for p in self.params]
        # one set of the portable 8-bit optimizer's code tables (0.5 MiB each, per device and sign) for every
        # per-tensor optimizer, not a set each: an SDXL LoRA's 1,435 tensors held 1.4 GiB of copies
        codes: dict[tuple[torch.device, bool], QuantCode] = {}
        for opt in self.optimizers:
            if isinstance(opt, AdamW8bitPortable):
                opt._codes = codes
        self.clip_per_param = clip_per_param
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.stepping = True
        self.skipped = 0
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook(opt))
            for p, opt in zip(self.params, self.optimizers, strict=True)
        ]

    def begin_step(self) -> None:
        """Reset the count of tensors skipped for an fp16 overflow (call before each optimizer step)."""
        self.skipped = 0

    def _hook(self, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def step(param: torch.Tensor) -> None:
            if not self.stepping:
                return
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)  # in place; records the overflow for scaler.update()
                if not bool(torch.isfinite(param.grad).all()):
                    self.skipped += 1
                    param.grad = None
                    return
            if self.clip_per_param > 0:
                torch.nn.utils.clip_grad_norm_([param], self.clip_per_param)
            optimizer.step()
            param.grad = None

        return step

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every per-parameter optimizer (warm-up, schedules)."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def remove(self) -> None:
        """Detach the hooks (after training, or before switching to a normal optimizer)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_bytes(self) -> int:
        """Bytes of optimizer state over all parameters."""
        return sum(optimizer_state_bytes(o) for o in self.optimizers)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Like ``optimizer_to_tensors``, for all per-parameter optimizers (prefixed ``<i>.``)."""
        tensors: dict[str, torch.Tensor] = {}
        metas = []
        for i, optimizer in enumerate(self.optimizers):
            part, meta = optimizer_to_tensors(optimizer)
            tensors.update({f"{i}.{k}": v for k, v in part.items()})
            metas.append(meta)
        return tensors, {"format": STATE_FORMAT, "optimizer": "FusedBackward", "parts": metas}

    def from_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Load what ``to_tensors`` produced (same parameters, same optimizer name)."""
        parts = meta.get("parts")
        if meta.get("optimizer") != "FusedBackward" or not isinstance(parts, list):
            raise CheckpointError(
                "the checkpoint's optimizer state was not saved with a fused backward pass",
                "resume with the same memory.fused_backward setting as the checkpoint",
            )
        if len(parts) != len(self.optimizers):
            raise CheckpointError(
                f"the checkpoint has optimizer state for {len(parts)} tensors, this model trains {len(self.optimizers)}",
                "resume with the same model and LoRA settings as the checkpoint",
            )
        for i, (optimizer, part) in enumerate(zip(self.optimizers, parts, strict=True)):
            prefix = f"{i}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            optimizer_from_tensors(optimizer, own, part)
