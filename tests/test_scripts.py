"""Every script in bench/ and tools/ still imports: a rename inside lowvram breaks them at once, not when a
maintainer next runs a benchmark (bench/step_flops.py imported two profiler functions that had moved)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for folder in ("bench", "tools") for p in (ROOT / folder).glob("*.py"))


def test_the_scripts_are_found():
    assert {"bench", "tools"} <= {p.parent.name for p in SCRIPTS}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str(path.parent))  # scripts import their neighbours (bench/gpu_check, ...)
    name = f"_script_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{path.name}: no main() to run"
