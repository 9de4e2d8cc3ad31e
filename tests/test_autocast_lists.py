"""The profiler's autocast emulation (memory/autocast.py) against torch's documented autocast op reference.

A card's plan is made with the CUDA/ROCm autocast rules (ROCm builds use the same CUDA autocast kernels),
which no CPU run can check; these lists are what the emulation must agree with. They are copied from
PyTorch's "Autocast Op Reference" (docs/source/amp.md, pytorch/pytorch at commit 4e0ff98, sections
"CUDA Ops that can autocast to float16 / float32 / promote to the widest input type" and "CPU Ops that
can autocast to bfloat16 / float32 / promote"), stored here so the test never downloads anything.
"""

from __future__ import annotations

import torch

from lowvram.memory import autocast as ac

DOC_CUDA_LOWER = {
    "__matmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "multi_dot", "conv1d", "conv2d", "conv3d",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "GRUCell", "linear", "LSTMCell", "matmul", "mm",
    "mv", "prelu", "RNNCell",
}
DOC_CUDA_FP32 = {
    "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits", "cosh",
    "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum", "dist", "erfinv",
    "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss", "layer_norm", "log", "log_softmax",
    "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss", "multilabel_margin_loss", "multi_margin_loss",
    "nll_loss", "norm", "normalize", "pdist", "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh",
    "smooth_l1_loss", "soft_margin_loss", "softmax", "softmin", "softplus", "sum", "renorm", "tan",
    "triplet_margin_loss",
}
DOC_CUDA_PROMOTE = {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sample", "index_put",
                    "scatter_add", "tensordot"}
DOC_CPU_LOWER = {
    "conv1d", "conv2d", "conv3d", "bmm", "mm", "linalg_vecdot", "baddbmm", "addmm", "addbmm", "linear", "matmul",
    "_convolution", "conv_tbc", "mkldnn_rnn_layer", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "prelu", "scaled_dot_product_attention", "_native_multi_head_attention",
}
DOC_CPU_FP32 = {  # the documented list, less the linear-algebra / FFT / pooling ops no diffusion model calls
    "avg_pool3d", "binary_cross_entropy", "grid_sampler", "polar", "prod", "quantile", "nanquantile", "stft",
    "cdist", "trace", "view_as_complex", "max_pool3d", "max_unpool2d", "max_unpool3d", "adaptive_avg_pool3d",
    "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d", "replication_pad3d",
    "mse_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "poisson_nll_loss",
    "cross_entropy_loss", "l1_loss", "huber_loss", "margin_ranking_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "ctc_loss", "kl_div", "multilabel_margin_loss", "binary_cross_entropy_with_logits",
    "fractional_max_pool2d", "fractional_max_pool3d", "adaptive_max_pool3d",
}
DOC_CPU_PROMOTE = {"cat", "stack", "index_copy"}

# Names the emulation matches that the page does not list, each with where torch itself says so: the
# installed torch's dispatcher has an AutocastCUDA kernel for the op (checked below), and
# aten/src/ATen/autocast_mode.h puts it in the named list.
SOURCE_ONLY_CUDA_LOWER = {
    "__rmatmul__": "matmul (the reflected operator of the documented __matmul__)",
    "einsum": "AT_FORALL_LOWER_PRECISION_FP",
    "chain_matmul": "AT_FORALL_LOWER_PRECISION_FP",
    "convolution": "AT_FORALL_LOWER_PRECISION_FP",
    "scaled_dot_product_attention": "AT_FORALL_LOWER_PRECISION_FP",
}
SOURCE_ONLY_CUDA_FP32 = {
    "logsumexp": "AT_FORALL_FP32",
    "huber_loss": "AT_FORALL_FP32",
    "interpolate": "upsample_* in AT_FORALL_FP32 (F.interpolate dispatches to them)",
    "upsample": "upsample_* in AT_FORALL_FP32",
    "upsample_nearest": "upsample_nearest* in AT_FORALL_FP32",
    "upsample_bilinear": "upsample_bilinear2d in AT_FORALL_FP32",
}
SOURCE_ONLY_CPU_LOWER = {"__matmul__": "matmul", "__rmatmul__": "matmul"}
SOURCE_ONLY_CPU_FP32 = {"smooth_l1_loss": "registered for AutocastCPU in this torch (the page lists huber_loss)"}
# Python-level names of the documented aten ops (what the emulation sees in __torch_function__)
ATEN_OF = {"__matmul__": "matmul", "__rmatmul__": "matmul", "interpolate": "upsample_nearest2d",
           "upsample": "upsample_nearest2d", "upsample_nearest": "upsample_nearest2d",
           "upsample_bilinear": "upsample_bilinear2d", "smooth_l1_loss": "smooth_l1_loss",
           "norm": "norm.Scalar"}
# Documented ops the emulation leaves out: no diffusion model or training step here calls them.
UNUSED = {"GRUCell", "LSTMCell", "RNNCell", "multi_dot", "__rdiv__", "cross_entropy", "multilabel_margin_loss",
          "multi_margin_loss", "margin_ranking_loss", "triplet_margin_loss", "soft_margin_loss",
          "hinge_embedding_loss", "cosine_embedding_loss", "poisson_nll_loss", "pdist", "renorm", "softmin",
          "normalize", "dist", "linalg_vecdot", "_convolution", "conv_tbc", "mkldnn_rnn_layer",
          "_native_multi_head_attention"}


def test_cuda_lists_agree_with_the_documented_reference():
    low, fp32 = ac.POLICIES["cuda"]
    assert low <= DOC_CUDA_LOWER | set(SOURCE_ONLY_CUDA_LOWER), low - DOC_CUDA_LOWER - set(SOURCE_ONLY_CUDA_LOWER)
    assert fp32 <= DOC_CUDA_FP32 | set(SOURCE_ONLY_CUDA_FP32), fp32 - DOC_CUDA_FP32 - set(SOURCE_ONLY_CUDA_FP32)
    assert not low & fp32
    # every documented op is emulated, unless no model here can call it
    assert DOC_CUDA_LOWER - low <= UNUSED, DOC_CUDA_LOWER - low - UNUSED
    assert DOC_CUDA_FP32 - fp32 <= UNUSED, DOC_CUDA_FP32 - fp32 - UNUSED
    assert ac.PROMOTE["cuda"] == DOC_CUDA_PROMOTE


def test_cpu_lists_agree_with_the_documented_reference():
    low, fp32 = ac.POLICIES["cpu"]
    assert low <= DOC_CPU_LOWER | set(SOURCE_ONLY_CPU_LOWER), low - DOC_CPU_LOWER
    assert fp32 <= DOC_CPU_FP32 | set(SOURCE_ONLY_CPU_FP32), fp32 - DOC_CPU_FP32
    assert DOC_CPU_LOWER - low <= UNUSED
    assert ac.PROMOTE["cpu"] == DOC_CPU_PROMOTE


def test_source_only_names_have_an_autocast_kernel_in_this_torch():
    """What the page omits but the emulation casts must really be registered for CUDA autocast."""
    ops = {name for name in torch._C._dispatch_get_all_op_names()
           if torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCUDA")}
    bare = {op.split("::")[1].split(".")[0] for op in ops}
    for name in set(SOURCE_ONLY_CUDA_LOWER) | set(SOURCE_ONLY_CUDA_FP32):
        assert ATEN_OF.get(name, name).split(".")[0] in bare, name
    # and the documented CUDA lists are registered too (the page matches this torch)
    for name in (DOC_CUDA_LOWER | DOC_CUDA_FP32) - UNUSED - {"__pow__", "__rpow__", "__rtruediv__"}:
        assert ATEN_OF.get(name, name).split(".")[0] in bare, name
    cpu = {op.split("::")[1].split(".")[0] for op in torch._C._dispatch_get_all_op_names()
           if torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutocastCPU")}
    assert set(SOURCE_ONLY_CPU_FP32) <= cpu


def test_promote_ops_cast_to_the_widest_input():
    a = torch.empty(2, 3, device="meta", dtype=torch.float16)
    b = torch.empty(2, 3, device="meta", dtype=torch.float32)
    with ac.MetaAutocast(torch.float16, "cpu"):
        assert torch.cat([a, b]).dtype == torch.float32
        assert torch.cat([a, a]).dtype == torch.float16
    with ac.MetaAutocast(torch.float16, "cuda"):
        assert torch.addcmul(b, a, a).dtype == torch.float32
