"""The portable 8-bit AdamW: both moments quantized blockwise with the dynamic 8-bit code, in plain PyTorch,
for cards where bitsandbytes has no build (gfx803)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError


def dynamic_code(signed: bool) -> torch.Tensor:
    """The 256 sorted values of the dynamic-exponent 8-bit code (Dettmers 2016, as bitsandbytes uses).

    Decade 10^(i-6) (i = 0..6) gets 2^i values per sign (2^(i+1) unsigned) at the centres of a linear
    split of [0.1, 1]: fine steps near the block maximum, coarse but nonzero down to ~1e-7 of it.
    """
    values = [0.0, 1.0]
    for i in range(7):
        items = 2**i if signed else 2 ** (i + 1)
        bounds = torch.linspace(0.1, 1.0, items + 1, dtype=torch.float64)
        centres = ((bounds[:-1] + bounds[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += centres
        if signed:
            values += [-c for c in centres]
    code = torch.tensor(sorted(values), dtype=torch.float32)
    if code.numel() != 256 or not bool((code[1:] > code[:-1]).all()):
        # An internal invariant (a bug here, not user input).
        raise AssertionError("dynamic code must have 256 distinct sorted values")
    return code


def _blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def _bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """float32 values whose IEEE bit patterns are the (unsigned 32-bit) integers ``bits``."""
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


class QuantCode:
    """A 256-value code with a fast nearest-value lookup (identical to ``bucketize`` on the midpoints).

    ``torch.bucketize`` costs ~120 ms per million values on one CPU core; instead the top 17 bits of the
    float (sign, exponent, 8 mantissa bits) index a table of bucket starts, and one comparison with the
    next midpoint finishes the job: no code midpoint is closer than 2^-8 relative, so each 17-bit range
    holds at most one midpoint (checked in the constructor). ~6x faster, bit-identical.
    """

    def __init__(self, code: torch.Tensor) -> None:
        self.code = code.float()
        midpoints = (self.code[1:] + self.code[:-1]) / 2
        keys = torch.arange(1 << 17, dtype=torch.int64)
        low = keys << 15
        high = low | 0x7FFF
        negative = keys >= (1 << 16)
        smallest = torch.where(negative, _bits_to_float(high), _bits_to_float(low))
        largest = torch.where(negative, _bits_to_float(low), _bits_to_float(high))
        finite = torch.isfinite(smallest) & torch.isfinite(largest)
        start = torch.bucketize(smallest, midpoints)
        if int((torch.bucketize(largest, midpoints) - start)[finite].max()) > 1:
            # An internal invariant (a bug in the code table, not user input).
            raise AssertionError("code too dense for the 17-bit lookup")
        self.table = torch.where(finite, start, 0).to(torch.int32)
        self.midpoints = torch.cat([midpoints, torch.tensor([float("inf")])])

    def to(self, device: torch.device | str) -> QuantCode:
        copy = object.__new__(QuantCode)
        copy.code, copy.table, copy.midpoints = (
            t.to(device) for t in (self.code, self.table, self.midpoints)
        )
        return copy

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 index of the code value nearest to each element of fp32 ``x`` (ties go down)."""
        key = (x.contiguous().view(torch.int32) >> 15) & 0x1FFFF
        start = self.table.index_select(0, key.view(-1)).view(key.shape)
        return (start + (x > self.midpoints.index_select(0, start.view(-1)).view(key.shape))).to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, code: QuantCode, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 ``x`` → (uint8 indices into the code, fp32 absmax per block of ``block`` elements)."""
    n = x.numel()
    pad = _blocks(n, block) * block - n
    xb = F.pad(x.reshape(-1), (0, pad)).view(-1, block)
    absmax = xb.abs().amax(dim=1)
    normalised = xb / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    # Nearest-value rounding: deterministic, so a resumed run is bitwise identical.
    index = code.index(normalised)
    return index.view(-1)[:n].clone() if pad else index.view(-1), absmax


def dequantize_blockwise(
    index: torch.Tensor, absmax: torch.Tensor, code: QuantCode, block: int
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: a flat fp32 tensor of ``index.numel()`` values."""
    n = index.numel()
    pad = absmax.numel() * block - n
    values = code.code.index_select(0, index.to(torch.int32))
    return (F.pad(values, (0, pad)).view(-1, block) * absmax[:, None]).view(-1)[:n]


class AdamW8bitPortable(torch.optim.Optimizer):
    """AdamW with 8-bit block-wise quantized moments, in plain PyTorch (any device torch runs on).

    Per parameter of at least ``min_8bit_size`` elements the state is ~2 bytes/weight: exp_avg as a signed
    dynamic code and sqrt(exp_avg_sq) as an unsigned one (the square root halves the dynamic range, so a
    small second moment never rounds to 0 while its first moment does not — that would explode the
    step), each with an fp32 absmax per block of ``block_size``. Smaller tensors keep fp32 moments (as
    bitsandbytes does). The update itself is computed in fp32 from the dequantized moments.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        block_size: int = 256,
        min_8bit_size: int = 4096,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(
                f"invalid AdamW hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}"
            )
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "block_size": block_size, "min_8bit_size": min_8bit_size}  # fmt: skip
        super().__init__(params, defaults)
        self._codes: dict[tuple[torch.device, bool], QuantCode] = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, except that state tensors keep their saved dtype and only follow the device.

        torch casts every state tensor to a float parameter's dtype: the uint8 codes would come back as
        fp32 (4x the memory) and fp32 moments of fp16 parameters would lose precision.
        """
        tensors: dict[Any, dict[str, torch.Tensor]] = {}
        stripped: dict[Any, dict[str, Any]] = {}
        for key, param_state in state_dict["state"].items():
            tensors[key] = {k: v for k, v in param_state.items() if isinstance(v, torch.Tensor)}
            stripped[key] = {k: v for k, v in param_state.items() if not isinstance(v, torch.Tensor)}
        super().load_state_dict({**state_dict, "state": stripped})  # checks groups, restores hyper-parameters
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            if saved_id in tensors:
                self.state[p].update({k: v.to(device=p.device) for k, v in tensors[saved_id].items()})

    def _code(self, device: torch.device, signed: bool) -> QuantCode:
        key = (device, signed)
        if key not in self._codes:
            cpu = self._codes.get((torch.device("cpu"), signed)) or QuantCode(dynamic_code(signed))
            self._codes[key] = cpu.to(device)
        return self._codes[key]

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32)
        if p.numel() >= group["min_8bit_size"]:
            blocks = _blocks(p.numel(), group["block_size"])
            for name in ("exp_avg", "exp_avg_sq"):
                state[f"{name}_code"] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
                state[f"{name}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            # index of 0.0 in each code, so a fresh state dequantizes to exact zeros
            state["exp_avg_code"].fill_(int((self._code(p.device, True).code == 0).nonzero()))
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(
                p, dtype=torch.float32, memory_format=torch.preserve_format
            )
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step (decoupled weight decay, bias correction) for every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bitPortable does not support sparse gradients")
                state = self.state[p] or self._init_state(p, group)
                self._update(p, state, group)
        return loss

    def _update(self, p: torch.Tensor, state: dict[str, torch.Tensor], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, block = group["lr"], group["eps"], group["block_size"]
        state["step"] += 1
        step = float(state["step"])
        quantized = "exp_avg_code" in state
        grad = p.grad.detach().float().reshape(-1) if quantized else p.grad.detach().float()
        if quantized:
            signed, unsigned = self._code(p.device, True), self._code(p.device, False)
            exp_avg = dequantize_blockwise(state["exp_avg_code"], state["exp_avg_absmax"], signed, block)
            exp_avg_sq = dequantize_blockwise(
                state["exp_avg_sq_code"], state["exp_avg_sq_absmax"], unsigned, block
            )
            exp_avg_sq.square_()  # stored as its square root
        else:
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        root = exp_avg_sq.sqrt()
        if quantized:
            state["exp_avg_code"], state["exp_avg_absmax"] = quantize_blockwise(exp_avg, signed, block)
            state["exp_avg_sq_code"], state["exp_avg_sq_absmax"] = quantize_blockwise(root, unsigned, block)
        denom = root.div_(math.sqrt(1 - beta2**step)).add_(eps)
        update = exp_avg.div(denom).mul_(lr / (1 - beta1**step))
        # fp32 master math even for half-precision params; in place for fp32 ones.
        target = p if p.dtype == torch.float32 else p.detach().float()
        if group["weight_decay"] != 0:
            target.mul_(1 - lr * group["weight_decay"])
        target.sub_(update.view_as(target))
        if target is not p:
            p.copy_(target)
