"""``torch.autocast`` for the ``meta`` device, which real autocast ignores: same casts, same weight cache.

Training runs fp16/bf16 under ``torch.autocast`` (fp32 trainable weights, low-precision matmuls, fp32
norms/softmax on CUDA). On ``meta`` nothing is cast, so activations would come out fp32 and the
profile twice too big. This ``TorchFunctionMode`` applies the target device's autocast op lists at
the Python API level (above autograd, where real autocast sits), so saved tensors have the real dtypes.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

# Op lists of PyTorch's autocast by Python-level function name: the documented "Autocast Op Reference"
# (docs/source/amp.md) plus what aten/src/ATen/autocast_mode.h registers beyond it (upsampling, logsumexp,
# SDPA, einsum); tests/test_autocast_lists.py holds them to the documented lists and this torch's kernels.
_CUDA_LOWER = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution",
    "prelu", "addmm", "addmv", "addr", "matmul", "__matmul__", "__rmatmul__", "einsum", "mm", "mv", "linear",
    "addbmm", "baddbmm", "bmm", "chain_matmul", "scaled_dot_product_attention",
}
_CUDA_FP32 = {
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "__rtruediv__", "norm", "softplus", "layer_norm", "group_norm",
    "cosine_similarity", "mse_loss",
    "l1_loss", "smooth_l1_loss", "huber_loss", "nll_loss", "kl_div", "binary_cross_entropy_with_logits",
    "softmax", "log_softmax", "cumsum", "cumprod", "prod", "sum", "logsumexp", "cdist", "dist",
    "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
}
_CPU_LOWER = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "bmm", "mm",
    "baddbmm", "addmm", "addbmm", "linear", "matmul", "__matmul__", "__rmatmul__", "prelu",
    "scaled_dot_product_attention",
}
_CPU_FP32 = {"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "nll_loss", "kl_div", "prod", "cdist",
             "binary_cross_entropy_with_logits"}

POLICIES = {"cuda": (_CUDA_LOWER, _CUDA_FP32), "cpu": (_CPU_LOWER, _CPU_FP32)}
# ops whose floating inputs are all cast to the widest of them
PROMOTE = {"cuda": {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sample", "index_put",
                    "scatter_add", "tensordot"},
           "cpu": {"cat", "stack", "index_copy"}}
_WIDTH = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_LOW = (torch.float16, torch.bfloat16)


class MetaAutocast(TorchFunctionMode):
    """Emulates ``torch.autocast(device_type, dtype)`` for tensors on any device (meant for ``meta``).

    ``device_type`` picks the op lists: "cuda" (CUDA and ROCm targets) or "cpu" (used by the fidelity
    test against real CPU autocast). Like autocast, casts of leaf tensors that require grad (trainable
    weights) are cached until the mode exits (``cache=False`` for checkpoint recomputation).
    """

    def __init__(self, dtype: torch.dtype, device_type: str = "cuda", cache: bool = True) -> None:
        super().__init__()
        self.dtype = dtype
        kind = "cpu" if device_type == "cpu" else "cuda"
        self.lower, self.fp32 = POLICIES[kind]
        self.promote = PROMOTE[kind]
        self.enabled = True
        self.caching = cache
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def matmul_dtype(self) -> torch.dtype | None:
        """What ``lowvram.quant`` upcasts stored weights to while this emulation is on."""
        return self.dtype if self.enabled else None

    def _cast(self, t: object, dtype: torch.dtype) -> object:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
            return t
        if dtype == torch.float32 and t.dtype not in _LOW:
            return t
        if self.caching and t.is_leaf and t.requires_grad and dtype != torch.float32:
            hit = self._cache.get(id(t))
            if hit is not None and hit[0] is t:
                return hit[1]
            cast = t.to(dtype)
            self._cache[id(t)] = (t, cast)  # keeps t alive too, so id() cannot be reused meanwhile
            return cast
        return t.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.enabled:
            name = getattr(func, "__name__", "")
            if name in self.lower:
                args, kwargs = tree_map(lambda t: self._cast(t, self.dtype), (args, kwargs))
            elif name in self.fp32:
                args, kwargs = tree_map(lambda t: self._cast(t, torch.float32), (args, kwargs))
            elif name in self.promote:
                floats = [t.dtype for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor) and t.is_floating_point()]
                if len(set(floats)) > 1:
                    widest = max(floats, key=lambda d: _WIDTH.get(d, 2))
                    args, kwargs = tree_map(lambda t: t.to(widest) if isinstance(t, torch.Tensor) and
                                            t.is_floating_point() and t.dtype != widest else t, (args, kwargs))
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        self._cache.clear()
        return super().__exit__(*exc)
