"""The memory profiler: tracker accounting, meta autocast, fidelity against real CPU tensors, fp8 storage.

The fidelity test is the one that holds the profiler to reality: the same step runs on real CPU
tensors and its peak is read from the CPU allocator's own events (torch.profiler), not from our
tracker, and the meta-device prediction must agree within 5 %.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from sd_fixtures import tiny_workload
from torch import nn

from lowvram.memory.autocast import MetaAutocast
from lowvram.memory.fidelity import CPU_CARD, compare
from lowvram.memory.profiler import profile_step
from lowvram.memory.report import profile_workload
from lowvram.memory.tracker import StorageTracker
from lowvram.memory.workloads import Knobs, Workload
from lowvram.quant import StoredConv2d, StoredLinear, store_frozen_weights

# The "tiny" from-scratch size with cross-attention at 16x16 too, so the attention kernel matters.
_ATTN_16 = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
_TMP = Path(tempfile.mkdtemp())


def tiny(mode: str, batch: int = 4, ema: bool = False) -> Workload:
    """The tiny SD 1.x pipeline's LoRA / full fine-tune, or the tiny from-scratch size (text2img)."""
    if mode == "scratch":
        return Workload("tiny-scratch", "test", "tiny", "scratch", 32, batch, ema=ema, task="text2img",
                        unet_overrides=_ATTN_16)
    return tiny_workload(_TMP, mode, batch=batch, ema=ema)


# ---- tracker -------------------------------------------------------------------------------------

def test_tracker_counts_storages_once_and_frees_them():
    tr = StorageTracker()
    with tr:
        a = torch.empty(1000, device="meta")  # 4000 bytes
        view = a[:10]  # same storage: not counted again
        b = a * 2
        assert tr.live == 8000
        del a, b
        assert tr.live == 4000  # the view keeps a's storage alive
        del view
        assert tr.live == 0
    assert tr.peak == 8000


def test_tracker_attributes_the_peak_by_label():
    tr = StorageTracker()
    w = torch.empty(100, device="meta")
    with tr:
        tr.register(w, "frozen_weights")
        tr.phase = "forward"
        act = w * 2  # alive at the peak, born in forward → activation
        tr.phase = "backward"
        tmp = act * 3
        g = tmp + 1
        tr.mark(g, "gradients")
        del tmp
    res = tr.result()
    assert res.peak_bytes == 1600
    assert res.by_category["frozen_weights"] == 400
    assert res.by_category["activations"] == 400
    assert res.by_category["gradients"] == 400
    assert res.by_category["temporaries"] == 400


# ---- autocast emulation ----------------------------------------------------------------------------

@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_meta_autocast_casts_like_autocast(device_type):
    lin, norm = nn.Linear(8, 8).to("meta"), nn.GroupNorm(2, 8).to("meta")
    x = torch.empty(2, 8, device="meta")
    with MetaAutocast(torch.float16, device_type):
        y = lin(x)
        z = norm(y)
    assert y.dtype == torch.float16
    # CUDA autocast runs GroupNorm in fp32; CPU autocast leaves it in the input dtype
    assert z.dtype == (torch.float32 if device_type == "cuda" else torch.float16)


def test_meta_autocast_matches_real_cpu_autocast_dtypes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = [m(torch.randn(1, 3, 8, 8)) for m in [model[0]]][0]
        real_out = model(torch.randn(1, 3, 8, 8))
    meta_model = model.to("meta")
    with MetaAutocast(torch.bfloat16, "cpu"):
        fake = meta_model[0](torch.empty(1, 3, 8, 8, device="meta"))
        fake_out = meta_model(torch.empty(1, 3, 8, 8, device="meta"))
    assert (fake.dtype, fake_out.dtype) == (real.dtype, real_out.dtype)


# ---- fidelity: prediction on meta vs the allocator on real CPU tensors --------------------------------

_SLOW = pytest.mark.slow
FIDELITY = [  # two in the default suite (tests/test_plan_fidelity.py measures whole runs), the rest with -m slow
    pytest.param("lora", dict(attention="math"), id="lora-math", marks=_SLOW),
    pytest.param("lora", dict(attention="math", gradient_checkpointing=True), id="lora-ckpt", marks=_SLOW),
    pytest.param("lora", dict(attention="chunked", attention_chunk=32), id="lora-chunked", marks=_SLOW),
    pytest.param("lora", dict(attention="math", frozen_dtype="fp16", precision="bf16"), id="lora-fp16frozen-bf16",
                 marks=_SLOW),
    pytest.param("lora", dict(attention="chunked", attention_chunk=32, frozen_dtype="fp8", gradient_checkpointing=True),
                 id="lora-fp8-chunked-ckpt"),
    pytest.param("full", dict(attention="math"), id="full-math", marks=_SLOW),
    pytest.param("full", dict(attention="chunked", attention_chunk=64, gradient_checkpointing=True,
                              optimizer="adamw8bit_portable"), id="full-chunked-ckpt-8bit"),
    pytest.param("full", dict(attention="math", fused_backward=True, optimizer="adafactor"), id="full-fused-adafactor",
                 marks=_SLOW),
    pytest.param("scratch", dict(attention="math", precision="bf16", batch_size=2, grad_accum=2),
                 id="scratch-bf16-accum", marks=_SLOW),
]


@pytest.mark.parametrize("mode,knobs", FIDELITY)
def test_profiler_predicts_the_real_cpu_peak_within_5_percent(mode, knobs):
    knobs = {"batch_size": 4, "cache_latents": True, "cache_text": True, "offload_frozen": True, **knobs}
    predicted, measured, on_cpu = compare(tiny(mode, ema=True).with_(preview=None), Knobs(**knobs))
    assert measured > 0
    step = predicted.stages["train"]  # the step the allocator measured (the run's other stages aside)
    assert abs(step - measured) <= 0.05 * measured, (step, measured)
    # the same tracker on real tensors agrees with the allocator too (the meta shapes are the real ones)
    assert abs(on_cpu.stages["train"] - measured) <= 0.05 * measured


@pytest.mark.parametrize("adapter", ["loha", "lokr", "dora"])
def test_adapter_types_are_profiled_as_they_run(adapter):
    """Each adapter type's weights and forward temporaries (LoHa/LoKr build the full weight delta, DoRA the
    weight norm): the meta profile matches the real CPU peak, and the bytes differ from LoRA's as they should."""
    knobs = Knobs(attention="math", batch_size=2)
    step = tiny("lora").with_(preview=None)  # the training step: its forward temporaries are the adapter's
    lora = profile_step(step, knobs, card=CPU_CARD)  # the same card's rules as the prediction below
    predicted, measured, _ = compare(step.with_(adapter=adapter), knobs)
    assert abs(predicted.peak_bytes - measured) <= 0.05 * measured, (predicted.peak_bytes, measured)
    ratio = predicted.by_category["trainable_weights"] / lora.by_category["trainable_weights"]
    # LoHa: two pairs of LoRA-shaped factors; LoKr: Kronecker factors, far smaller; DoRA: LoRA + one magnitude per row
    assert {"loha": ratio == 2, "lokr": ratio < 0.5, "dora": 1 < ratio < 1.5}[adapter], ratio
    # what backward keeps is the adapter's own: LoHa/LoKr the built weight delta instead of LoRA's rank-r
    # intermediates (fewer bytes than LoRA's at these tiny widths), DoRA the weight norm too
    if adapter == "dora":
        assert predicted.by_category["activations"] > lora.by_category["activations"]
    else:
        assert predicted.by_category["activations"] != lora.by_category["activations"]


# ---- what the categories say ------------------------------------------------------------------------

def test_categories_follow_the_knobs():
    wl = tiny("lora")
    base = profile_step(wl, Knobs(attention="math", batch_size=4))
    frozen_params = base.by_category["frozen_weights"]
    assert base.by_category["trainable_weights"] > 0
    # AdamW keeps two fp32 moments per trainable weight (+ a step counter per tensor)
    assert 2 * base.by_category["trainable_weights"] <= base.by_category["optimizer_state"] < \
        2 * base.by_category["trainable_weights"] + 4096
    half = profile_step(wl, Knobs(attention="math", batch_size=4, frozen_dtype="fp16", precision="fp16"))
    fp8 = profile_step(wl, Knobs(attention="math", batch_size=4, frozen_dtype="fp8"))
    assert half.by_category["frozen_weights"] < 0.6 * frozen_params
    assert fp8.by_category["frozen_weights"] < 0.35 * frozen_params
    ckpt = profile_step(wl, Knobs(attention="math", batch_size=4, gradient_checkpointing=True))
    assert ckpt.peak_bytes < base.peak_bytes


def test_profile_json_has_the_promised_fields():
    out = profile_workload(tiny("lora"), card=None, vram_gib=1.0, knobs=Knobs(attention="chunked", batch_size=2))
    data = json.loads(json.dumps(out))
    for key in ("peak_bytes", "budget_bytes", "fits", "lower_bound_bytes", "by_category"):
        assert key in data
    assert data["fits"] is True and data["lower_bound_bytes"] <= data["peak_bytes"]


# ---- fp8 weight storage -------------------------------------------------------------------------------

def _small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 16, 3, padding=1), nn.SiLU(),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.SiLU(), nn.Linear(32, 1))


def test_fp8_storage_outputs_close_to_fp32_and_saves_bytes():
    torch.manual_seed(0)
    net = _small_net().requires_grad_(False)
    x = torch.randn(4, 3, 8, 8)
    ref = net(x)
    before = sum(p.numel() * p.element_size() for p in net.parameters())
    assert store_frozen_weights(net, "fp8") == 4
    assert isinstance(net[0], StoredConv2d) and isinstance(net[5], StoredLinear)
    assert net[0].weight.dtype == torch.float8_e4m3fn
    after = sum(p.numel() * p.element_size() for p in net.parameters())
    assert after < 0.3 * before
    out = net(x)
    assert (out - ref).abs().max() < 0.08 * ref.abs().max() + 1e-3  # e4m3: ~3 mantissa bits per weight


def _fit_student(body: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> list[float]:
    """Train a 1x1-conv adapter before and a head after a frozen ``body``; returns the losses."""
    torch.manual_seed(1)
    pre, head = nn.Conv2d(3, 3, 1), nn.Linear(32, 1)
    opt = torch.optim.Adam([*pre.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = (head(body(pre(x))) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_through_fp8_frozen_layers_converges_like_fp32():
    """LoRA's situation in small: trainable layers around a frozen body, gradients flow through it.

    Tolerance: the fp8 run must cut its loss 50x and end within 1.5x of the fp32 run's final loss.
    """
    torch.manual_seed(0)
    body = _small_net()[:-1].requires_grad_(False)
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():  # a teacher with the same frozen body: the task is learnable exactly in fp32
        y = nn.Linear(32, 1)(body(nn.Conv2d(3, 3, 1)(x)))
    ref = _fit_student(body, x, y)
    body8 = _small_net()[:-1]
    body8.load_state_dict(body.state_dict())
    body8.requires_grad_(False)
    store_frozen_weights(body8, "fp8")
    fp8 = _fit_student(body8, x, y)
    assert fp8[-1] < fp8[0] / 50
    assert fp8[-1] <= 1.5 * ref[-1] + 1e-6


# ---- presets' stored tables (SD-size profiles: minutes) -------------------------------------------------

def _preset_names() -> list[str]:
    from lowvram.presets import list_presets

    return list_presets()


@pytest.mark.slow
@pytest.mark.parametrize("name", _preset_names())
def test_stored_preset_memory_table_matches_a_fresh_profile(name):
    from lowvram.memory.report import check_preset_profile

    assert check_preset_profile(name) == []


def test_profile_command_accepts_every_standard_workload():
    from lowvram.cli import build_parser
    from lowvram.memory.workloads import WORKLOADS

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["profile"]._actions
                  if "--workload" in a.option_strings)
    assert set(action.choices) == set(WORKLOADS)  # W5/W6 (FLUX.1) were refused by `lowvram profile --workload`


def test_updating_some_rows_of_a_preset_table_keeps_the_others(tmp_path):
    import yaml

    from lowvram.memory.report import preset_table, update_preset_profile
    from lowvram.presets import load_preset, preset_dir

    path = tmp_path / "mine.yaml"
    data = yaml.safe_load((preset_dir() / "rx570.yaml").read_text())
    data["name"] = "mine"
    stale = {"peak_gib": 99.0, "host_gib": 9.0, "fits": False}
    data["memory_profile"]["workloads"] = {w: dict(stale) for w in ("W1", "W2", "W3", "W4", "W5", "W6")}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    update_preset_profile(str(path), ["W4"])
    rows = load_preset(str(path)).memory_profile["workloads"]
    assert list(rows) == ["W1", "W2", "W3", "W4", "W5", "W6"]
    assert all(rows[w] == stale for w in ("W1", "W2", "W3", "W5", "W6"))
    assert rows["W4"] == preset_table(load_preset(str(path)), ["W4"])["workloads"]["W4"] != stale
