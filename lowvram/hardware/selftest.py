"""The GEMM/conv self-test: the device's arithmetic against a float64 CPU reference (what no flag reveals)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import HardwareError
from .caps import HardwareInfo

# Relative (Frobenius) error allowed against a float64 CPU reference computed from the same rounded
# inputs. fp32 allows TF32 convolutions (cuDNN's default on Ampere); a NaN or a broken kernel is ~1.
SELF_TEST_TOLERANCE = {"fp32": 2e-3, "fp16": 1e-2, "bf16": 5e-2}


@dataclass(frozen=True)
class SelfTestResult:
    """One op at one dtype on one device, compared with the CPU."""

    op: str
    dtype: str
    device: str
    status: str  # ok | nan | mismatch | error | skipped
    rel_error: float | None
    tolerance: float
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")


def _default_ops() -> dict[str, tuple[Callable[..., Any], Callable[[Any], tuple[Any, Any]]]]:
    """Each op with the inputs it is tested on: a GEMM of SD's attention sizes and a 3x3 convolution."""
    import torch

    def gemm_inputs(g: Any) -> tuple[Any, Any]:
        return torch.randn(256, 320, generator=g), torch.randn(320, 384, generator=g)

    def conv_inputs(g: Any) -> tuple[Any, Any]:
        return torch.randn(2, 32, 24, 24, generator=g), torch.randn(64, 32, 3, 3, generator=g)

    conv = lambda x, w: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
    return {"gemm": (torch.matmul, gemm_inputs), "conv2d": (conv, conv_inputs)}


def self_test(
    device: str,
    dtypes: Iterable[str] = ("fp32", "fp16"),
    ops: Mapping[str, Callable[..., Any]] | None = None,
) -> list[SelfTestResult]:
    """Run a GEMM and a conv2d on ``device`` and compare with a float64 CPU reference.

    Catches what no flag reveals: the unpatched rocBLAS on gfx803 returns NaN. ``ops`` replaces the
    functions under test by name (``gemm``, ``conv2d``), so tests can inject a broken kernel.
    """
    import torch

    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    results: list[SelfTestResult] = []
    for name, (default_fn, make_inputs) in _default_ops().items():
        fn = (ops or {}).get(name, default_fn)
        for dtype in dtypes:
            tol = SELF_TEST_TOLERANCE[dtype]
            a, b = make_inputs(torch.Generator().manual_seed(0))
            a, b = a.to(dt[dtype]), b.to(dt[dtype])
            # The reference sees the same rounded inputs: only the device's arithmetic is judged.
            ref = default_fn(a.double(), b.double())
            try:
                out = fn(a.to(device), b.to(device)).to("cpu", torch.float64)
            except (RuntimeError, NotImplementedError) as e:
                text = str(e).splitlines()[0] if str(e) else type(e).__name__
                status = "skipped" if "not implemented" in text.lower() else "error"
                results.append(SelfTestResult(name, dtype, device, status, None, tol, text))
                continue
            if out.shape != ref.shape:
                results.append(
                    SelfTestResult(name, dtype, device, "mismatch", None, tol, f"shape {tuple(out.shape)}")
                )
            elif not torch.isfinite(out).all():
                bad = int((~torch.isfinite(out)).sum())
                results.append(
                    SelfTestResult(name, dtype, device, "nan", None, tol, f"{bad} non-finite values")
                )
            else:
                err = float((out - ref).norm() / ref.norm())
                status = "ok" if err <= tol else "mismatch"
                results.append(SelfTestResult(name, dtype, device, status, err, tol))
    return results


def default_self_test_dtypes(info: HardwareInfo) -> tuple[str, ...]:
    """fp32 always, plus each reduced precision the device claims to run."""
    if info.backend in ("cpu", "mps"):
        return ("fp32",)
    return ("fp32",) + (("fp16",) if info.fp16_ok else ()) + (("bf16",) if info.bf16_ok else ())


def self_test_fix(failed: list[SelfTestResult], info: HardwareInfo | None) -> str:
    """What to do about failed self-test results, in the user's terms."""
    if failed and all(r.dtype != "fp32" for r in failed):
        bad = sorted({r.dtype for r in failed})
        return f"do not train in {'/'.join(bad)} on this device: --set train.precision=fp32 (and memory.frozen_dtype=fp32)"
    if info is not None and info.backend == "rocm" and re.fullmatch(r"gfx8\d\d", info.arch):
        return (
            "install a community PyTorch/ROCm build for gfx803 with a patched rocBLAS and set "
            "HSA_OVERRIDE_GFX_VERSION=8.0.3 ROC_ENABLE_PRE_VEGA=1 (docs/hardware.md); meanwhile train with "
            "--device cpu --preset cpu"
        )
    return "update the GPU driver and the PyTorch build for this card (docs/hardware.md); meanwhile train with --device cpu --preset cpu"


def run_self_test_or_raise(
    device: str,
    dtypes: Iterable[str] = ("fp32", "fp16"),
    info: HardwareInfo | None = None,
    ops: Mapping[str, Callable[..., Any]] | None = None,
) -> list[SelfTestResult]:
    """``self_test`` that raises HardwareError naming the failures and the fix."""
    results = self_test(device, dtypes, ops)
    failed = [r for r in results if not r.ok]
    if failed:
        what = "; ".join(f"{r.op} {r.dtype}: {_result_text(r)}" for r in failed)
        raise HardwareError(
            f"the {device} device failed its self-test against the CPU ({what})", self_test_fix(failed, info)
        )
    return results


def _result_text(r: SelfTestResult) -> str:
    if r.status == "ok":
        return f"ok (rel. error {r.rel_error:.1e})"
    if r.status == "mismatch" and r.rel_error is not None:
        return f"WRONG (rel. error {r.rel_error:.1e} > {r.tolerance:.0e})"
    return f"{r.status.upper() if r.status != 'skipped' else 'skipped'}: {r.message}"
