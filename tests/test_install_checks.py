"""The doctor's install checks on injected facts: known-broken pairs, bounds, declared conflicts, torch builds
for the wrong GPU, gfx803 without its override; and the real install of this machine is consistent."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lowvram.hardware import DeviceFacts, doctor_dict, doctor_report, probe, read_facts
from lowvram.hardware import report as doctor_module
from lowvram.hardware.facts import pci_display_devices
from lowvram.hardware.install import Finding, install_findings, package_lines

TESTED = (("torch", "2.13.0+cpu"), ("diffusers", "0.42.1"), ("transformers", "5.23.0"), ("peft", "0.21.2"),
          ("accelerate", "1.15.0"), ("bitsandbytes", "0.50.2"), ("gradio", "6.31.0"), ("xformers", None))
REQS = ["torch>=2.1", "transformers>=4.40,<5.24", "peft>=0.12"]
RX570_PCI = (("0x1002", "0x67df"),)
RX6600_PCI = (("0x1002", "0x73ff"),)
RTX2060_PCI = (("0x10de", "0x1f08"),)
CPU_TORCH = dict(torch_version="2.13.0+cpu")
CUDA_TORCH = dict(torch_version="2.13.0+cu128", cuda_version="12.8")
ROCM_TORCH = dict(torch_version="2.5.1+rocm6.1", hip_version="6.1.40091")


def facts(packages=TESTED, **kw) -> DeviceFacts:
    """Injected facts; the torch in ``packages`` is the build ``kw`` describes, as on a real machine."""
    packages = tuple((n, kw.get("torch_version", v) if n == "torch" else v) for n, v in packages)
    return DeviceFacts(packages=packages, platform="linux", **kw)


def with_version(name: str, version: str | None, packages=TESTED) -> tuple:
    return tuple((n, version if n == name else v) for n, v in packages)


def no_declared(_name: str) -> list[str]:
    return []


def findings(f: DeviceFacts, requirements=REQS, requires_of=no_declared) -> list[Finding]:
    return install_findings(f, requirements, requires_of)


def test_the_tested_set_on_a_cpu_machine_has_no_findings():
    assert findings(facts(**CPU_TORCH)) == []


def test_transformers_524_with_peft_021_is_flagged_with_the_pip_fix():
    broken = facts(with_version("transformers", "5.24.0"), **CPU_TORCH)
    # bounds off: the pair rule alone must catch what a user's `pip install -U transformers` did
    found = findings(broken, requirements=[])
    assert len(found) == 1 and found[0].severity == "error"
    assert "transformers 5.24.0 with peft 0.21.2" in found[0].problem and "text encoder" in found[0].problem
    assert found[0].fix == "pip install 'transformers<5.24'"
    # once peft 0.22 is out the pair works
    fixed = facts(with_version("peft", "0.22.0", with_version("transformers", "5.24.0")), **CPU_TORCH)
    assert findings(fixed, requirements=[]) == []


def test_a_version_outside_lowvrams_bounds_names_the_bound():
    found = findings(facts(with_version("transformers", "5.30.1"), **CPU_TORCH), requires_of=no_declared)
    bound = [f for f in found if "outside the versions lowvram works with" in f.problem]
    assert len(bound) == 1 and "transformers 5.30.1" in bound[0].problem
    assert bound[0].fix in ("pip install 'transformers<5.24,>=4.40'", "pip install 'transformers>=4.40,<5.24'")
    too_old = findings(facts(with_version("peft", "0.10.0"), **CPU_TORCH))
    assert [f.fix for f in too_old] == ["pip install 'peft>=0.12'"]


def test_a_declared_requirement_between_the_packages_is_checked():
    """An xformers wheel is built for one torch: installed beside another torch, it breaks at import."""
    pkgs = with_version("xformers", "0.0.28.post3")

    def requires_of(name: str) -> list[str]:
        return {"xformers": ["torch==2.5.1", "numpy"], "peft": ["torch>=1.13", 'pytest; extra == "test"']}.get(name, [])

    found = findings(facts(pkgs, **CUDA_TORCH), requires_of=requires_of)
    assert len(found) == 1
    assert found[0].problem == "xformers 0.0.28.post3 requires torch==2.5.1, but torch 2.13.0+cu128 is installed"
    assert found[0].fix == "pip install 'torch==2.5.1'"


def test_cuda_torch_on_an_amd_machine_is_an_error():
    polaris = findings(facts(pci_gpus=RX570_PCI, **CUDA_TORCH))
    assert len(polaris) == 1 and polaris[0].severity == "error"
    assert "CUDA 12.8 build" in polaris[0].problem and "AMD" in polaris[0].problem
    assert "gfx803" in polaris[0].fix and "community" in polaris[0].fix  # PyPI's ROCm wheels dropped Polaris
    rdna2 = findings(facts(pci_gpus=RX6600_PCI, **CUDA_TORCH))
    assert len(rdna2) == 1 and "download.pytorch.org/whl/rocm" in rdna2[0].fix and "torch==2.13.0" in rdna2[0].fix
    # a CUDA build beside an NVIDIA card (plus an AMD iGPU) is what it should be
    assert findings(facts(pci_gpus=RX6600_PCI + RTX2060_PCI, **CUDA_TORCH)) == []


def test_cpu_torch_with_an_nvidia_card_is_a_warning_with_the_cuda_wheel():
    found = findings(facts(pci_gpus=RTX2060_PCI, **CPU_TORCH))
    assert len(found) == 1 and found[0].severity == "warning"
    assert "CPU-only build" in found[0].problem and "NVIDIA" in found[0].problem
    assert "torch==2.13.0" in found[0].fix and "download.pytorch.org/whl/cu" in found[0].fix


def test_rocm_build_on_gfx803_needs_the_override():
    unset = findings(facts(pci_gpus=RX570_PCI, **ROCM_TORCH))
    assert len(unset) == 1 and "HSA_OVERRIDE_GFX_VERSION is unset" in unset[0].problem
    assert unset[0].fix.startswith("export HSA_OVERRIDE_GFX_VERSION=8.0.3 ROC_ENABLE_PRE_VEGA=1")
    wrong = findings(facts(pci_gpus=RX570_PCI, hsa_override_gfx_version="10.3.0", **ROCM_TORCH))
    assert len(wrong) == 1 and "is 10.3.0" in wrong[0].problem
    assert findings(facts(pci_gpus=RX570_PCI, hsa_override_gfx_version="8.0.3", **ROCM_TORCH)) == []
    assert findings(facts(pci_gpus=RX6600_PCI, **ROCM_TORCH)) == []  # not Polaris: no override needed


def test_report_and_json_carry_packages_and_problems():
    info = probe(facts(with_version("transformers", "5.24.0"), pci_gpus=RTX2060_PCI, **CPU_TORCH))
    found = findings(info.facts)
    text = doctor_report(info, None, found)
    assert "torch 2.13.0+cpu (CPU build)" in text and "peft 0.21.2" in text
    assert "xformers not installed (optional)" in text
    assert "install problems:" in text and "ERROR: transformers 5.24.0 with peft 0.21.2" in text
    assert text.index("ERROR") < text.index("WARNING")  # errors first
    data = doctor_dict(info, None, found)
    assert data["torch_build"] == "CPU" and data["packages"]["peft"] == "0.21.2"
    assert {p["severity"] for p in data["install_problems"]} == {"error", "warning"}


def test_doctor_exits_non_zero_on_a_broken_install(monkeypatch):
    monkeypatch.setattr(doctor_module, "install_findings", lambda facts: [Finding("error", "broken", "fix it")])
    text, code = doctor_module.doctor(with_self_test=False)
    assert code == 2 and "ERROR: broken" in text
    monkeypatch.setattr(doctor_module, "install_findings", lambda facts: [Finding("warning", "odd", "maybe")])
    assert doctor_module.doctor(with_self_test=False)[1] == 0


def test_pci_display_devices_reads_sysfs(tmp_path):
    def device(slot: str, cls: str, vendor: str, dev: str) -> None:
        d = tmp_path / slot
        d.mkdir()
        (d / "class").write_text(cls + "\n")
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(dev + "\n")

    device("0000:00:02.0", "0x030000", "0x8086", "0x3E92")  # VGA controller
    device("0000:01:00.0", "0x030200", "0x10DE", "0x1F08")  # 3D controller
    device("0000:00:1f.3", "0x040300", "0x8086", "0xa348")  # audio: not a GPU
    (tmp_path / "0000:02:00.0").mkdir()  # unreadable entry
    assert pci_display_devices(str(tmp_path)) == (("0x8086", "0x3e92"), ("0x10de", "0x1f08"))
    assert pci_display_devices(str(tmp_path / "missing")) == ()


def test_this_machines_install_is_consistent():
    """The set CI installed (constraints.txt) must pass the doctor's own checks."""
    real = read_facts(import_optional=False)
    assert dict(real.packages)["torch"] is not None
    assert [f for f in install_findings(real) if f.severity == "error"] == []
    lines = package_lines(real)
    assert lines[0].startswith(f"torch {real.torch_version} (") and lines[0].endswith(" build)")
    assert len(lines) == len(real.packages)  # torch once, from the imported module


@pytest.mark.parametrize("command", [["doctor", "--no-self-test"], ["presets"]])
def test_commands_print_no_dependency_noise(command):
    out = subprocess.run([sys.executable, "-m", "lowvram", *command], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gemm_4bit" not in out.stderr and "kernels-community" not in out.stderr
    assert out.stderr.strip() == ""


def test_flux_pipeline_import_is_quiet_under_the_command_environment():
    """Importing diffusers' FLUX.1 pipeline (lowvram's FLUX loading and profiling do) prints nothing on stderr."""
    code = ("from lowvram.runtime_env import offline_and_quiet\noffline_and_quiet()\n"
            "import diffusers.pipelines.flux.pipeline_flux\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == ""
