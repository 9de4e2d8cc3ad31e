"""``lowvram doctor``: the report of what the machine is, what it can run, what is installed, and what to do."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..errors import HardwareError
from .caps import GIB, HardwareInfo
from .install import Finding, install_findings, package_lines, torch_build
from .probe import probe
from .selftest import SelfTestResult, _result_text, default_self_test_dtypes, self_test, self_test_fix


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GIB:.2f} GB"


def doctor_report(info: HardwareInfo, self_test_results: list[SelfTestResult] | None = None,
                  findings: list[Finding] | None = None) -> str:
    """The human ``lowvram doctor`` text: what the machine is, what it can run, what to do.

    ``findings``: the install problems (default: ``install_findings`` of the probed facts)."""
    f = info.facts
    findings = install_findings(f) if findings is None else findings
    rows = _machine_rows(info)
    width = max(len(k) for k, _ in rows)
    lines = ["lowvram doctor", ""] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
    lines += ["", "packages:"] + [f"  {line}" for line in package_lines(f)]
    if findings:
        lines += ["", "install problems:"]
        lines += [f"  - {x.severity.upper()}: {x.problem}\n    fix: {x.fix}" for x in findings]
    if self_test_results is not None:
        verdict = "passed" if all(r.ok for r in self_test_results) else "FAILED"
        where = self_test_results[0].device if self_test_results else info.device
        lines += ["", f"self-test on {where} against the CPU: {verdict}"]
        lines += [f"  {r.op:<7} {r.dtype:<5} {_result_text(r)}" for r in self_test_results]
        failed = [r for r in self_test_results if not r.ok]
        if failed:
            lines.append(f"  fix: {self_test_fix(failed, info)}")
    if info.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in info.notes]
    lines += [
        "",
        f"recommended preset: {info.recommended_preset}   (lowvram train --preset {info.recommended_preset})",
    ]
    return "\n".join(lines)


def _machine_rows(info: HardwareInfo) -> list[tuple[str, str]]:
    """The report's table: backend and runtime, device, architecture, memory, what it can run."""
    f = info.facts
    runtime = (
        f"HIP {f.hip_version}"
        if info.backend == "rocm"
        else f"CUDA {f.cuda_version}"
        if info.backend == "cuda"
        else ""
    )
    mem_label = "RAM" if info.backend == "cpu" else "VRAM"
    bnb = f"{_yes(info.bitsandbytes_ok)}" + (f" ({f.bitsandbytes_version})" if f.bitsandbytes_version else "")
    if not info.bitsandbytes_ok and f.bitsandbytes_error:
        bnb += f" - {f.bitsandbytes_error}"
    rows = [
        ("backend", f"{info.backend}" + (f" ({runtime})" if runtime else "")),
        ("device", info.device_name),
        ("arch", info.family if info.arch in ("cpu", "mps") else f"{info.arch} - {info.family}"),
        (mem_label, f"{_gib(info.vram_total)} total, {_gib(info.vram_free)} free"),
        (
            "precision",
            f"fp32 yes, fp16 {_yes(info.fp16_ok)}, bf16 {_yes(info.bf16_ok)} -> trains in {info.precision}",
        ),
        (
            "attention",
            f"flash/mem-efficient SDPA {_yes(info.flash_attention_ok)}, xformers {_yes(info.xformers_ok)}"
            f" -> memory.attention=auto uses {info.attention}",
        ),
        ("bitsandbytes", bnb),
        ("torch.compile", _yes(info.compile_ok)),
    ]
    if info.backend == "rocm" or f.hip_version:
        rows.append(
            (
                "environment",
                f"HSA_OVERRIDE_GFX_VERSION={f.hsa_override_gfx_version or '(unset)'}, "
                f"ROC_ENABLE_PRE_VEGA={f.roc_enable_pre_vega or '(unset)'}",
            )
        )
    return rows


def doctor_dict(info: HardwareInfo, self_test_results: list[SelfTestResult] | None = None,
                findings: list[Finding] | None = None) -> dict[str, Any]:
    """The same as ``doctor_report`` as plain JSON-ready data (``lowvram doctor --json``)."""
    findings = install_findings(info.facts) if findings is None else findings
    data = {f.name: getattr(info, f.name) for f in dataclasses.fields(info) if f.name != "facts"}
    data["recommended_preset"] = info.recommended_preset
    data["torch_build"] = torch_build(info.facts)
    data["packages"] = {name: version for name, version in info.facts.packages}
    data["install_problems"] = [dataclasses.asdict(x) for x in findings]
    data["notes"] = list(info.notes)
    data["device"] = info.device
    data["facts"] = dataclasses.asdict(info.facts)
    if self_test_results is not None:
        data["self_test"] = [dataclasses.asdict(r) | {"ok": r.ok} for r in self_test_results]
        data["self_test_passed"] = all(r.ok for r in self_test_results)
    return json.loads(json.dumps(data))  # tuples -> lists: what a reader of the JSON gets


def doctor(as_json: bool = False, with_self_test: bool = True) -> tuple[str, int]:
    """Probe, self-test and report: the whole ``lowvram doctor`` command; returns (text, exit code)."""
    info = probe()
    results = self_test(info.device, default_self_test_dtypes(info)) if with_self_test else None
    findings = install_findings(info.facts)
    broken = any(x.severity == "error" for x in findings)
    code = 0 if (results is None or all(r.ok for r in results)) and not broken else HardwareError.exit_code
    text = (json.dumps(doctor_dict(info, results, findings), indent=2) if as_json
            else doctor_report(info, results, findings))
    return text, code
