"""Frozen weights stored in fewer bits (fp16, bf16, fp8) and upcast one layer at a time in forward.

A frozen Linear/Conv2d keeps its weight in the storage dtype (fp8 with a per-tensor scale) and builds
the compute-dtype copy only inside its own forward and backward: the copy is never saved for backward,
so the model costs its storage bytes plus one layer's copy. Used by training and by the profiler alike.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

STORAGE_DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
}
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's (real, or the profiler's emulation on meta) or x's."""
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    from torch.overrides import _get_current_function_mode_stack

    for mode in reversed(_get_current_function_mode_stack()):
        dtype = getattr(mode, "matmul_dtype", None)
        if dtype is not None:
            return dtype
    return x.dtype


def _upcast(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    w = w.to(dtype)
    return w * scale.to(dtype) if scale is not None else w


class _StoredLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W stored low-precision; only the stored W is saved (no grad to W or b)."""

    @staticmethod
    def forward(ctx, x, w, scale, bias):  # noqa: D102
        ctx.save_for_backward(w, scale)
        weight = _upcast(w, scale, x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        w, scale = ctx.saved_tensors
        grad_x = grad_out @ _upcast(w, scale, grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class _StoredConv2d(torch.autograd.Function):
    """conv2d with W stored low-precision; backward computes only the input gradient."""

    @staticmethod
    def forward(ctx, x, w, scale, bias, stride, padding, dilation, groups):  # noqa: D102
        ctx.save_for_backward(w, scale)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        weight = _upcast(w, scale, x.dtype)
        return F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        w, scale = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = _upcast(w, scale, grad_out.dtype)
            grad_x = torch.nn.grad.conv2d_input(shape, weight, grad_out, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None, None


class StoredLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is kept in a storage dtype (see ``store_frozen_weights``)."""

    weight_scale: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        dtype = compute_dtype(x)
        return _StoredLinear.apply(x.to(dtype), self.weight, self.weight_scale, self.bias)


class StoredConv2d(nn.Conv2d):
    """A frozen ``nn.Conv2d`` whose weight is kept in a storage dtype (see ``store_frozen_weights``)."""

    weight_scale: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.padding_mode != "zeros":
            raise ConfigError("fp8/half weight storage supports zero-padded convolutions only",
                              "use memory.frozen_dtype=fp32 for this model")
        dtype = compute_dtype(x)
        return _StoredConv2d.apply(x.to(dtype), self.weight, self.weight_scale, self.bias,
                                   self.stride, self.padding, self.dilation, self.groups)


def _store(module: nn.Module, dtype: torch.dtype) -> None:
    w = module.weight.detach()
    scale = None
    if dtype == torch.float8_e4m3fn:
        # Per-tensor absmax scale, kept in fp32: e4m3 has 3 mantissa bits but only a ±448 range.
        amax = w.abs().amax().float() if w.device.type != "meta" else torch.ones((), device=w.device)
        scale = (amax.clamp(min=1e-12) / _FP8_MAX).reshape(())
        w = (w.float() / scale)
    module.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    if module.bias is not None:
        module.bias.requires_grad_(False)
    module.register_buffer("weight_scale", scale, persistent=False)
    module.__class__ = StoredLinear if isinstance(module, nn.Linear) else StoredConv2d


def cast_frozen_layers(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast frozen Linear/Conv2d weights and biases to ``dtype`` (for autocast runs); returns how many.

    Norms and embeddings stay fp32: they are ~0.1 % of the bytes, and CPU autocast (unlike CUDA's)
    does not cast a LayerNorm's weight to its input's dtype.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(dtype)
            count += 1
    return count


def store_frozen_weights(model: nn.Module, storage: str, other_dtype: torch.dtype | None = None,
                         unscaled: Collection[nn.Module] = ()) -> int:
    """Keep every frozen Linear/Conv2d weight of ``model`` in ``storage`` (fp16/bf16/fp8); returns how many.

    Layers with a trainable weight are left alone; ``other_dtype`` (e.g. the autocast dtype) is applied
    to the remaining frozen parameters (norms, embeddings), which are small. Call after attaching LoRA,
    so the adapters are created next to a normal layer. ``unscaled``: layers whose weight something else
    reads directly (DoRA's norm): fp8's per-tensor scale is applied only by the stored layer's own forward,
    so these keep fp16 instead of fp8.
    """
    if storage not in STORAGE_DTYPES:
        raise ConfigError(f"memory.frozen_dtype = {storage!r} is unknown", f"use one of {', '.join(STORAGE_DTYPES)}")
    dtype = STORAGE_DTYPES[storage]
    keep = {id(m) for m in unscaled}
    count = 0
    if dtype != torch.float32:
        for module in list(model.modules()):
            if type(module) in (nn.Linear, nn.Conv2d) and not module.weight.requires_grad:
                unscaled_dtype = torch.float16 if dtype == torch.float8_e4m3fn else dtype
                _store(module, unscaled_dtype if id(module) in keep else dtype)
                count += 1
    if other_dtype is not None:
        for module in model.modules():
            if isinstance(module, StoredLinear | StoredConv2d):
                continue
            for name, p in list(module.named_parameters(recurse=False)):
                if not p.requires_grad and p.is_floating_point() and p.dtype != other_dtype:
                    setattr(module, name, nn.Parameter(p.detach().to(other_dtype), requires_grad=False))
    return count


def small_params_to_fp32(model: nn.Module) -> None:
    """Norms, embeddings and biases outside Linear/Conv layers back to fp32 (tiny, and CPU autocast
    does not cast a norm's weight to its input's dtype)."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                setattr(module, name, nn.Parameter(p.detach().float(), requires_grad=False))


def store_frozen_unet(unet: nn.Module, storage: str, compute: torch.dtype) -> str:
    """Keep a LoRA run's frozen UNet weights in ``storage`` the one way training and the profiler share:
    a plain cast under fp16/bf16 autocast, else per-layer upcast (fp8, or half without autocast).
    Returns how, for the run's notes. Call after attaching the adapters."""
    if storage == "fp32":
        return "fp32"
    if compute != torch.float32 and storage in ("fp16", "bf16"):
        cast_frozen_layers(unet, STORAGE_DTYPES[storage])
        small_params_to_fp32(unet)
        return f"{storage} (cast, autocast {str(compute).removeprefix('torch.')})"
    from .adapters import weight_readers

    store_frozen_weights(unet, storage, other_dtype=torch.float32, unscaled=weight_readers(unet))
    return f"{storage} (stored, upcast per layer)"
