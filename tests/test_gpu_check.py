"""bench/gpu_check.py, the one command that checks the plan on a real card: its CPU path and its dry run.

There is no GPU here; on the CPU the same script plans each standard job through the front door, trains it
(tiny layouts) and compares with the CPU allocator, so everything but the CUDA allocator's counters runs.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_plans_every_standard_job_without_building_a_model(gpu_check, capsys):
    assert gpu_check.main(["--dry-run", "--tiny", "--preset", "rx570", "--device", "cpu", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["workload"] for r in rows] == ["W1", "W2", "W3", "W4"]
    for r in rows:
        assert r["preset"] == "rx570" and r["predicted"] > 0 and "allocated" not in r
        assert r["verdict"] in ("fits", "planned")


def test_cpu_path_trains_the_plan_and_reports_the_allocator(gpu_check, capsys):
    assert gpu_check.main(["--tiny", "--device", "cpu", "--preset", "cpu", "--workloads", "W1", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("W1"))
    predicted, allocated = (float(x) for x in row.split()[3:5])
    assert allocated > 0 and abs(predicted - allocated) <= 0.1 * allocated + 0.001, row
    assert "error = predicted vs allocated" in out
