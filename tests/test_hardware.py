"""The probe's decisions on faked cards, the doctor report, the self-test and the preset-mismatch warning."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lowvram.errors import HardwareError
from lowvram.hardware import (
    DeviceFacts,
    default_self_test_dtypes,
    doctor_dict,
    doctor_report,
    probe,
    read_facts,
    recommend_preset,
    run_self_test_or_raise,
    self_test,
    warn_if_preset_mismatch,
)
from lowvram.presets import load_preset

GIB = 2**30


def rocm(name: str, arch: str, gib: float, **kw) -> DeviceFacts:
    base = dict(
        backend="rocm",
        device_name=name,
        gcn_arch=f"{arch}:sramecc-:xnack-",
        vram_total=int(gib * GIB),
        vram_free=int((gib - 0.2) * GIB),
        torch_version="2.3.0+rocm6.0",
        hip_version="6.0.32830",
    )
    return DeviceFacts(**{**base, **kw})


def cuda(name: str, cc: tuple[int, int], gib: float, **kw) -> DeviceFacts:
    base = dict(
        backend="cuda",
        device_name=name,
        compute_capability=cc,
        vram_total=int(gib * GIB),
        vram_free=int((gib - 0.2) * GIB),
        torch_version="2.5.1+cu121",
        cuda_version="12.1",
        bitsandbytes_importable=True,
        bitsandbytes_version="0.45.0",
        sdpa_efficient_ok=True,
    )
    return DeviceFacts(**{**base, **kw})


GFX803_ENV = dict(hsa_override_gfx_version="8.0.3", roc_enable_pre_vega="1")
RX570 = rocm("AMD Radeon RX 570 Series", "gfx803", 4.0, **GFX803_ENV)
RX570_8 = rocm("AMD Radeon RX 580 Series", "gfx803", 8.0, **GFX803_ENV)
RX6600 = rocm(
    "AMD Radeon RX 6600",
    "gfx1032",
    8.0,
    bitsandbytes_importable=True,
    bitsandbytes_version="0.50.0",
    hsa_override_gfx_version="10.3.0",
    sdpa_efficient_ok=False,
)
GTX1650 = cuda("NVIDIA GeForce GTX 1650", (7, 5), 3.8)  # cards report a little under their size
RTX2060 = cuda("NVIDIA GeForce RTX 2060", (7, 5), 6.0)
RTX3070 = cuda("NVIDIA GeForce RTX 3070", (8, 6), 8.0)
CPU = DeviceFacts(
    backend="cpu",
    device_name="Some CPU",
    vram_total=16 * GIB,
    vram_free=12 * GIB,
    torch_version="2.13.0+cpu",
    bitsandbytes_importable=True,
    bitsandbytes_version="0.50.2",
    sdpa_efficient_ok=True,
)

# (facts, fp16, bf16, flash, bitsandbytes, precision, attention, preset)
CARDS = {
    "rx570": (RX570, True, False, False, False, "fp16", "chunked", "rx570"),
    "rx570-8gb": (RX570_8, True, False, False, False, "fp16", "chunked", "rx570-8gb"),
    "gtx1650": (GTX1650, False, False, True, True, "fp32", "sdpa", "gtx1650-4gb"),
    "rtx2060": (RTX2060, True, False, True, True, "fp16", "sdpa", "rtx2060-6gb"),
    "rtx3070": (RTX3070, True, True, True, True, "bf16", "sdpa", "rtx3070-8gb"),
    "rx6600": (RX6600, True, False, False, True, "fp16", "chunked", "rx6600-8gb"),
    "cpu": (CPU, False, True, True, True, "fp32", "sdpa", "cpu"),
}


@pytest.mark.parametrize("card", list(CARDS))
def test_probe_decides_from_the_architecture(card):
    facts, fp16, bf16, flash, bnb, precision, attention, preset = CARDS[card]
    info = probe(facts)
    assert (info.fp16_ok, info.bf16_ok, info.flash_attention_ok, info.bitsandbytes_ok) == (
        fp16,
        bf16,
        flash,
        bnb,
    )
    assert (info.precision, info.attention) == (precision, attention)
    assert info.recommended_preset == preset
    # The recommended preset only uses what the card really has.
    p = load_preset(info.recommended_preset)
    assert warn_if_preset_mismatch(p, info) is None


def test_gfx803_has_none_of_the_fast_paths():
    info = probe(RX570)
    assert info.arch == "gfx803"  # gcnArchName split on ':'
    assert not (info.xformers_ok or info.compile_ok or info.bf16_ok)
    # Even an importable bitsandbytes has no gfx803 kernels.
    info = probe(dataclasses.replace(RX570, bitsandbytes_importable=True, bitsandbytes_version="0.50.0"))
    assert not info.bitsandbytes_ok


def test_rocm_bf16_and_flash_follow_the_table():
    assert probe(rocm("AMD Radeon RX 7900 XTX", "gfx1100", 24.0, sdpa_efficient_ok=True)).bf16_ok
    assert probe(rocm("AMD Radeon RX 7900 XTX", "gfx1100", 24.0, sdpa_efficient_ok=True)).flash_attention_ok
    assert not probe(rocm("AMD Radeon RX 6800", "gfx1030", 16.0)).bf16_ok
    # The table allows flash on RDNA 3 but it did not run: the measurement wins, with a note.
    info = probe(rocm("AMD Radeon RX 7600", "gfx1102", 8.0, sdpa_efficient_ok=False))
    assert not info.flash_attention_ok and info.attention == "chunked"
    assert any("SDPA did not run" in n for n in info.notes)


def test_bitsandbytes_needs_050_on_rocm_and_cpu_only():
    old = dict(bitsandbytes_importable=True, bitsandbytes_version="0.49.1")
    assert not probe(dataclasses.replace(RX6600, **old)).bitsandbytes_ok
    assert not probe(dataclasses.replace(CPU, **old)).bitsandbytes_ok
    assert probe(dataclasses.replace(RTX2060, **old)).bitsandbytes_ok
    missing = probe(
        dataclasses.replace(RTX2060, bitsandbytes_importable=False, bitsandbytes_error="not installed")
    )
    assert not missing.bitsandbytes_ok
    assert any("adamw8bit_portable" in n for n in missing.notes)


def test_gtx16_names_train_in_fp32():
    for name in (
        "NVIDIA GeForce GTX 1660 Ti",
        "GeForce GTX 1650 SUPER",
        "NVIDIA GeForce GTX 1650 with Max-Q Design",
    ):
        info = probe(cuda(name, (7, 5), 6.0))
        assert not info.fp16_ok and info.precision == "fp32", name
        assert any("NaN" in n for n in info.notes)
    assert probe(cuda("NVIDIA GeForce RTX 2070", (7, 5), 8.0)).fp16_ok


def test_recommendation_never_picks_knobs_the_card_lacks():
    # An 8 GB Turing card has no bf16: not the (bf16) rtx3070-8gb preset.
    assert probe(cuda("NVIDIA GeForce RTX 2070", (7, 5), 8.0)).recommended_preset == "rtx2060-6gb"
    # Unknown bigger card: the largest preset not above its VRAM.
    assert probe(cuda("NVIDIA GeForce RTX 3090", (8, 6), 24.0)).recommended_preset == "rtx3070-8gb"
    # An RX 6600 without bitsandbytes gets a ROCm preset that does not need it.
    info = probe(dataclasses.replace(RX6600, bitsandbytes_importable=False))
    preset = load_preset(info.recommended_preset)
    assert preset.card.backend == "rocm" and "bitsandbytes" not in preset.needs()
    assert probe(dataclasses.replace(CPU, backend="mps", device_name="Apple GPU")).recommended_preset == "cpu"


def test_recommend_preset_from_a_given_pool():
    info = probe(RTX3070)
    assert recommend_preset(info, [load_preset("gtx1650-4gb"), load_preset("rtx2060-6gb")]) == "rtx2060-6gb"
    assert recommend_preset(info, [load_preset("rx570")]) == "cpu"  # no preset for this backend


def test_gfx803_advice_and_missing_env_warnings():
    info = probe(dataclasses.replace(RX570, hsa_override_gfx_version=None, roc_enable_pre_vega=None))
    text = doctor_report(info)
    for needle in (
        "HSA_OVERRIDE_GFX_VERSION=8.0.3",
        "ROC_ENABLE_PRE_VEGA=1",
        "PCIe atomics",
        "community",
        "rocBLAS",
        "recommended preset: rx570",
    ):
        assert needle in text, needle
    warnings = [n for n in info.notes if n.startswith("WARNING")]
    assert len(warnings) == 2 and "HSA_OVERRIDE_GFX_VERSION is not set" in warnings[0] + warnings[1]
    # With the variables set there is nothing to warn about.
    assert not [n for n in probe(RX570).notes if n.startswith("WARNING")]


def test_gfx1032_needs_the_gfx1030_override():
    info = probe(dataclasses.replace(RX6600, hsa_override_gfx_version=None))
    assert any("HSA_OVERRIDE_GFX_VERSION=10.3.0" in n for n in info.notes)


def test_rocm_build_without_gpu_says_why():
    info = probe(dataclasses.replace(CPU, hip_version="6.0.32830"))
    assert info.backend == "cpu" and any("render" in n for n in info.notes)


def test_doctor_report_and_json():
    info = probe(GTX1650)
    results = self_test("cpu", ("fp32",))
    text = doctor_report(info, results)
    for needle in (
        "NVIDIA GeForce GTX 1650",
        "sm_75",
        "fp16 no",
        "trains in fp32",
        "self-test",
        "passed",
        "gtx1650-4gb",
        "torch 2.5.1+cu121",
    ):
        assert needle in text, needle
    data = doctor_dict(info, results)
    assert json.loads(json.dumps(data)) == data
    assert data["recommended_preset"] == "gtx1650-4gb" and data["self_test_passed"] is True
    assert data["facts"]["compute_capability"] == [7, 5]


def test_read_facts_on_this_machine():
    facts = read_facts(import_optional=False)
    expected = "rocm" if torch.version.hip else "cuda"
    assert facts.backend == (expected if torch.cuda.is_available() else "cpu")
    assert facts.torch_version == torch.__version__
    info = probe(facts)
    assert info.recommended_preset and load_preset(info.recommended_preset)


def test_self_test_passes_on_cpu():
    results = self_test("cpu", ("fp32", "fp16", "bf16"))
    assert {(r.op, r.dtype) for r in results} == {
        (op, d) for op in ("gemm", "conv2d") for d in ("fp32", "fp16", "bf16")
    }
    assert all(r.ok for r in results), results
    assert all(r.rel_error is None or r.rel_error < r.tolerance for r in results)


def test_self_test_detects_a_wrong_and_a_nan_kernel():
    wrong_gemm = lambda a, b: torch.matmul(a, b) * 1.01  # noqa: E731 - 1 % off: a broken kernel
    nan_conv = lambda x, w: torch.nn.functional.conv2d(x, w, padding=1) * float("nan")  # noqa: E731
    results = {r.op: r for r in self_test("cpu", ("fp32",), ops={"gemm": wrong_gemm, "conv2d": nan_conv})}
    assert results["gemm"].status == "mismatch" and results["gemm"].rel_error == pytest.approx(0.01, rel=1e-3)
    assert results["conv2d"].status == "nan"


def test_self_test_reports_a_crashing_kernel():
    def crash(a, b):
        raise RuntimeError("HIP error: invalid device function")

    (r,) = [r for r in self_test("cpu", ("fp32",), ops={"gemm": crash}) if r.op == "gemm"]
    assert r.status == "error" and "invalid device function" in r.message


def test_run_self_test_or_raise_names_the_fix():
    nan_gemm = lambda a, b: torch.matmul(a, b) * float("nan")  # noqa: E731
    with pytest.raises(HardwareError) as e:
        run_self_test_or_raise("cpu", ("fp32",), info=probe(RX570), ops={"gemm": nan_gemm})
    assert "gemm fp32" in e.value.problem and "rocBLAS" in e.value.fix and "8.0.3" in e.value.fix

    def nan_in_fp16(a, b):
        out = torch.matmul(a, b)
        return out * float("nan") if a.dtype == torch.float16 else out

    with pytest.raises(HardwareError) as e:
        run_self_test_or_raise("cpu", ("fp32", "fp16"), info=probe(GTX1650), ops={"gemm": nan_in_fp16})
    assert "train.precision=fp32" in e.value.fix
    assert run_self_test_or_raise("cpu", ("fp32",))  # passing returns the results


def test_default_self_test_dtypes():
    assert default_self_test_dtypes(probe(RTX3070)) == ("fp32", "fp16", "bf16")
    assert default_self_test_dtypes(probe(GTX1650)) == ("fp32",)
    assert default_self_test_dtypes(probe(CPU)) == ("fp32",)


def test_preset_mismatch_warnings():
    msg = warn_if_preset_mismatch(load_preset("rx570"), probe(CPU))
    assert msg == (
        "preset rx570 is for an AMD RX 570 (gfx803, 4 GB) but this machine has: CPU; "
        "training on the CPU with the preset's memory knobs (--preset cpu suits this machine)"
    )
    msg = warn_if_preset_mismatch(load_preset("rtx3070-8gb"), probe(GTX1650))
    assert "bf16" in msg and "recommended preset: gtx1650-4gb" in msg
    msg = warn_if_preset_mismatch(load_preset("rx570"), probe(RTX2060))
    assert "NVIDIA GeForce RTX 2060" in msg and "rtx2060-6gb" in msg
    assert "recommended preset: rtx2060-6gb" in warn_if_preset_mismatch(load_preset("cpu"), probe(RTX2060))
    assert "plans for 8 GB" in warn_if_preset_mismatch(load_preset("rx570-8gb"), probe(RX570))
    assert warn_if_preset_mismatch(load_preset("cpu"), probe(CPU)) is None
    # A smaller preset on a bigger card of the same kind is fine.
    assert warn_if_preset_mismatch(load_preset("rx570"), probe(RX570_8)) is None


def test_probing_reads_no_preset_file_until_the_recommendation_is_asked_for(monkeypatch):
    import lowvram.presets as presets

    real, loaded = presets.load_preset, []
    monkeypatch.setattr(presets, "load_preset", lambda name: loaded.append(name) or real(name))
    info = probe(RTX3070)
    assert loaded == []  # a run that names its preset never reads the others
    assert info.recommended_preset == "rtx3070-8gb" and sorted(loaded) == presets.list_presets()
    assert info.recommended_preset == "rtx3070-8gb" and len(loaded) == len(presets.list_presets())  # read once
    assert doctor_dict(info, findings=[])["recommended_preset"] == "rtx3070-8gb"
