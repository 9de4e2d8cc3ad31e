"""Optimizer factory, the portable 8-bit AdamW (convergence, memory, quantizer) and bitwise state round trips."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowvram.errors import CheckpointError, ConfigError
from lowvram.optim import (
    OPTIMIZERS,
    AdamW8bitPortable,
    FusedBackward,
    QuantCode,
    build_optimizer,
    dequantize_blockwise,
    dynamic_code,
    optimizer_from_tensors,
    optimizer_state_bytes,
    optimizer_to_tensors,
    quantize_blockwise,
)

EIGHT_BIT = ("adamw8bit", "adamw8bit_portable")


def test_factory_builds_each_optimizer_with_its_settings():
    p = nn.Parameter(torch.zeros(10))
    adamw = build_optimizer([p], "adamw", lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.8, 0.9) and adamw.param_groups[0]["weight_decay"] == 0.1
    assert type(build_optimizer([p], "adamw8bit", lr=1e-3)).__name__ == "AdamW8bit"
    assert isinstance(build_optimizer([p], "adamw8bit_portable", lr=1e-3), AdamW8bitPortable)
    ada = build_optimizer([p], "adafactor", lr=5e-4)
    group = ada.param_groups[0]
    assert type(ada).__name__ == "Adafactor" and group["lr"] == 5e-4
    assert group["relative_step"] is False and group["scale_parameter"] is False
    with pytest.raises(ConfigError, match="unknown optimizer"):
        build_optimizer([p], "sgd", lr=1e-3)


def test_adamw8bit_without_bitsandbytes_points_to_the_portable_one(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ConfigError, match="adamw8bit_portable"):
        build_optimizer([nn.Parameter(torch.zeros(3))], "adamw8bit", lr=1e-3)


def test_dynamic_code_shape():
    for signed in (True, False):
        code = dynamic_code(signed)
        assert code.numel() == 256 and bool((code.diff() > 0).all())
        assert 0.0 in code.tolist() and code.max() == 1.0
        assert 0 < code[code > 0].min() < 1e-6  # small values keep a nonzero code
    assert dynamic_code(False).min() == 0.0 and dynamic_code(True).min() < -0.99


def test_fast_code_lookup_equals_bucketize():
    g = torch.Generator().manual_seed(0)
    for signed in (True, False):
        quant = QuantCode(dynamic_code(signed))
        x = torch.randn(200_000, generator=g)
        x = x * 10 ** (-8 * torch.rand(200_000, generator=g))  # every decade down to 1e-8
        x = x / x.abs().max()
        if not signed:
            x = x.abs()
        x = torch.cat([x, quant.code, (quant.code[1:] + quant.code[:-1]) / 2, torch.tensor([0.0, -0.0, 1.0])])
        midpoints = (quant.code[1:] + quant.code[:-1]) / 2
        assert torch.equal(quant.index(x).long(), torch.bucketize(x, midpoints))


def test_blockwise_quantization_round_trip_error():
    quant = QuantCode(dynamic_code(True))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=g)  # not a multiple of the block: a partial last block
    x[:256] = 0.0
    index, absmax = quantize_blockwise(x, quant, 256)
    assert index.dtype == torch.uint8 and index.shape == (5000,) and absmax.shape == (20,)
    back = dequantize_blockwise(index, absmax, quant, 256)
    assert torch.equal(back[:256], torch.zeros(256))  # zeros stay exact
    large = x.abs() > 0.1 * absmax.repeat_interleave(256)[:5000]
    rel = ((back - x).abs() / x.abs())[large]
    assert rel.max() < 0.08 and rel.mean() < 0.02


def _mlp_loss(name: str, steps: int = 150) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    y = torch.tanh(x @ (torch.randn(64, 64, generator=g) / 8))
    torch.manual_seed(1)
    # 8192-weight layers, so the 8-bit optimizers really quantize them.
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    opt = build_optimizer(model.parameters(), name, lr=3e-3, weight_decay=0.01)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_eight_bit_optimizers_train_like_fp32_adamw():
    reference = _mlp_loss("adamw")
    assert reference < 0.02  # the problem is learnable
    for name in EIGHT_BIT:
        assert _mlp_loss(name) < 1.2 * reference, name


def test_portable_handles_gradients_spanning_five_decades_in_a_block():
    # Adam equalises step sizes across curvatures; an 8-bit state that rounds small moments to 0 (or
    # divides a surviving first moment by a zeroed second moment) would leave small-curvature weights behind.
    g = torch.Generator().manual_seed(0)
    n = 8192
    curvature, goal = 10 ** (-5 * torch.rand(n, generator=g)), torch.randn(n, generator=g)

    def run(name):
        w = nn.Parameter(torch.zeros(n))
        opt = build_optimizer([w], name, lr=2e-2)
        for _ in range(300):
            loss = (curvature * (w - goal) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item(), (w - goal).abs()

    ref_loss, _ = run("adamw")
    loss, err = run("adamw8bit_portable")
    assert torch.isfinite(err).all() and loss < 1.5 * ref_loss
    assert err.median() < 1e-3 and err[curvature < 1e-4].median() < 1e-2


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_eight_bit_state_is_about_two_bytes_per_weight(name):
    w = nn.Parameter(torch.zeros(1024, 1024))
    opt = build_optimizer([w], name, lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    per_weight = optimizer_state_bytes(opt) / w.numel()
    assert 1.9 < per_weight < 2.3


def test_fp32_adamw_state_is_eight_bytes_and_small_tensors_stay_fp32():
    w = nn.Parameter(torch.zeros(256, 256))
    adamw = build_optimizer([w], "adamw", lr=1e-3)
    w.grad = torch.ones_like(w)
    adamw.step()
    assert optimizer_state_bytes(adamw) == pytest.approx(8 * w.numel(), abs=16)
    small = nn.Parameter(torch.zeros(100))
    opt = build_optimizer([small], "adamw8bit_portable", lr=1e-3)
    small.grad = torch.ones_like(small)
    opt.step()
    assert opt.state[small]["exp_avg"].dtype == torch.float32


def test_portable_updates_half_precision_parameters():
    w = nn.Parameter(torch.ones(8192, dtype=torch.float16))
    opt = build_optimizer([w], "adamw8bit_portable", lr=1e-2)
    w.grad = torch.ones_like(w)
    opt.step()
    assert w.dtype == torch.float16 and torch.allclose(w.float(), torch.full((8192,), 0.99), atol=1e-3)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 64, generator=g)
        loss = (model(x) - x[:, :32]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _pair(name: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 32))  # 8-bit and fp32-state tensors
    # as the trainer builds it (fused AdamW where torch has the kernel)
    return model, build_optimizer(model.parameters(), name, lr=1e-2, weight_decay=0.01, foreach=False, fused=True)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_round_trip_is_bitwise(name, tmp_path):
    model, opt = _pair(name)
    _train(model, opt, 5, seed=1)
    tensors, meta = optimizer_to_tensors(opt)
    save_file(tensors, str(tmp_path / "optimizer.safetensors"))
    (tmp_path / "optimizer.json").write_text(json.dumps(meta))
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    _train(model, opt, 4, seed=2)  # the run that never stopped

    resumed, fresh_opt = _pair(name)
    resumed.load_state_dict(weights)
    optimizer_from_tensors(
        fresh_opt,
        load_file(str(tmp_path / "optimizer.safetensors")),
        json.loads((tmp_path / "optimizer.json").read_text()),
    )
    reloaded, _ = optimizer_to_tensors(fresh_opt)  # same tensors, same dtypes (uint8 codes stay uint8)
    assert reloaded.keys() == tensors.keys()
    assert all(
        reloaded[k].dtype == tensors[k].dtype and torch.equal(reloaded[k], tensors[k]) for k in tensors
    )
    _train(resumed, fresh_opt, 4, seed=2)
    for (key, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    after, _ = optimizer_to_tensors(opt)
    after_resumed, _ = optimizer_to_tensors(fresh_opt)
    assert after.keys() == after_resumed.keys()
    assert all(torch.equal(after[k], after_resumed[k]) for k in after)


def test_loading_another_optimizers_state_is_refused():
    model, opt = _pair("adamw")
    _train(model, opt, 1, seed=0)
    tensors, meta = optimizer_to_tensors(opt)
    _, other = _pair("adamw8bit_portable")
    with pytest.raises(CheckpointError, match="train.optimizer"):
        optimizer_from_tensors(other, tensors, meta)


def _batches(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 64, generator=g) for _ in range(n)]


@pytest.mark.parametrize("name", ["adamw", "adamw8bit_portable"])
def test_fused_backward_matches_a_normal_optimizer_and_frees_gradients(name):
    normal, opt = _pair(name)
    fused_model, _ = _pair(name)
    fused = FusedBackward(fused_model.parameters(), name, lr=1e-2, weight_decay=0.01)
    for x in _batches(3, 4):
        loss = (normal(x) - x[:, :32]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        (fused_model(x) - x[:, :32]).pow(2).mean().backward()
        assert all(p.grad is None for p in fused_model.parameters())  # each gradient freed after its step
    for a, b in zip(normal.parameters(), fused_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert fused.state_bytes() == optimizer_state_bytes(opt)


def test_fused_backward_keeps_one_set_of_8bit_code_tables_for_all_its_tensors():
    """Each per-tensor AdamW8bitPortable used to build its own 0.5 MiB lookup tables (signed and unsigned) on
    the device: 1 MiB per trained tensor, 1.4 GiB for an SDXL LoRA."""
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])  # 6 weights of 4096: quantized moments
    fused = FusedBackward(model.parameters(), "adamw8bit_portable", lr=1e-2)
    model(torch.randn(4, 64)).pow(2).mean().backward()
    tables = {id(code.table.untyped_storage()) for o in fused.optimizers for code in o._codes.values()}
    assert len(tables) == 2  # signed and unsigned, for the one device
    fused.remove()


def test_fused_backward_accumulates_when_not_stepping_and_round_trips():
    model, _ = _pair("adamw")
    fused = FusedBackward(model.parameters(), "adamw", lr=1e-2)
    before = [p.clone() for p in model.parameters()]
    fused.stepping = False
    x1, x2 = _batches(4, 2)
    model(x1).sum().backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    fused.stepping = True
    model(x2).sum().backward()  # steps on the accumulated gradient of both micro-batches
    assert not torch.equal(next(model.parameters()), before[0])
    fused.set_lr(5e-3)
    assert all(o.param_groups[0]["lr"] == 5e-3 for o in fused.optimizers)

    tensors, meta = fused.to_tensors()
    json.dumps(meta)
    twin, _ = _pair("adamw")
    twin.load_state_dict(model.state_dict())
    twin_fused = FusedBackward(twin.parameters(), "adamw", lr=5e-3)
    twin_fused.from_tensors(tensors, meta)
    for m in (model, twin):
        m(x1).pow(2).mean().backward()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    fused.remove()
    model(x1).sum().backward()  # hooks gone: gradients stay
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(CheckpointError):
        optimizer_from_tensors(build_optimizer(twin.parameters(), "adamw", lr=1e-3), tensors, meta)


def test_fused_backward_in_fp16_skips_an_overflowing_tensor_and_backs_off_the_scale():
    """fp16 with fused backward keeps overflow protection: an injected inf in one gradient skips that tensor's
    step (no inf/NaN reaches its weight or its optimizer state), the finite ones step, the scale halves;
    the next clean step steps everything."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    fused = FusedBackward(model.parameters(), "adamw", lr=1e-2, clip_per_param=1.0, scaler=scaler)
    victim = model[0].weight
    inject = {"on": True}
    victim.register_hook(lambda g: g * float("inf") if inject["on"] else g)  # runs before it is accumulated
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 8)

    def step() -> None:
        fused.begin_step()
        scaler.scale(model(x).pow(2).mean()).backward()
        scaler.update()

    step()
    assert fused.skipped == 1
    assert torch.equal(victim, before["0.weight"])  # not stepped ...
    assert not fused.optimizers[0].state.get(victim)  # ... and its optimizer state untouched
    assert not torch.equal(model[2].weight, before["2.weight"])  # the finite gradients stepped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # every gradient freed, the skipped one too
    assert scaler.get_scale() == 2.0**9
    inject["on"] = False
    step()
    assert fused.skipped == 0 and not torch.equal(victim, before["0.weight"])
    assert scaler.get_scale() == 2.0**9  # no overflow: the scale grows only after growth_interval clean steps


def _step_bytes(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> int:
    """Bytes an optimizer step allocates beyond what is live before it (state already created)."""
    from lowvram.memory.tracker import StorageTracker

    optimizer.step()  # creates the state
    with StorageTracker() as tracker:
        for p in params:
            tracker.register(p, "trainable_weights")
            tracker.register(p.grad, "gradients")
        tracker.reset_peak()
        optimizer.step()
    return tracker.peak - tracker.live


def test_fused_adamw_steps_like_the_profiled_loop_without_more_memory():
    """The trainer's fused AdamW: the update of the per-tensor loop the profiler measures (to float
    rounding), and no storage beyond the loop's temporaries (its kernel updates in place)."""
    def params() -> list[nn.Parameter]:
        g = torch.Generator().manual_seed(0)
        ps = [nn.Parameter(torch.randn(shape, generator=g)) for shape in ((64, 32), (32,), (4, 4, 3, 3))]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        return ps

    loop_params, fused_params = params(), params()
    loop = build_optimizer(loop_params, "adamw", lr=1e-2, weight_decay=0.01, foreach=False)
    fused = build_optimizer(fused_params, "adamw", lr=1e-2, weight_decay=0.01, foreach=False, fused=True)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    assert _step_bytes(fused, fused_params) <= _step_bytes(loop, loop_params)
    for a, b in zip(loop_params, fused_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # no fused kernel for the device (the profiler's meta tensors): the per-tensor loop instead
    meta = build_optimizer([nn.Parameter(torch.zeros(3, device="meta"))], "adamw", lr=1e-3, foreach=False, fused=True)
    assert not meta.defaults["fused"] and meta.defaults["foreach"] is False
