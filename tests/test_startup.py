"""What ``lowvram train`` loads before its first step: nothing the run does not use (the panel, TorchInductor's
compiler, TensorBoard's writer), and the account's startup phase holds no library import."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from test_cli import tiny_flags

from lowvram.runtime_env import no_compile_while_importing

# Runs `lowvram train ARGS` in a fresh interpreter; at the first step it writes down what is loaded.
PROBE = """
import json, os, sys
from lowvram.train import phases

seen = {}
first_step, clock_init = phases.PhaseClock.mark_first_step, phases.PhaseClock.__init__

def init(self, *args, **kwargs):
    seen.setdefault("torch_at_clock_start", "torch" in sys.modules)
    clock_init(self, *args, **kwargs)

def mark(self):
    if "modules" not in seen:
        seen.update(modules=sorted(sys.modules), dynamo_off="TORCHDYNAMO_DISABLE" in os.environ)
    first_step(self)

phases.PhaseClock.mark_first_step, phases.PhaseClock.__init__ = mark, init
from lowvram.cli import main

code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(seen, f)
sys.exit(code)
"""


def test_dynamo_is_off_only_while_importing(monkeypatch):
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    with no_compile_while_importing():
        assert os.environ["TORCHDYNAMO_DISABLE"] == "1"
    assert "TORCHDYNAMO_DISABLE" not in os.environ  # torch.compile works again afterwards
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # the user's choice is theirs
    with no_compile_while_importing():
        assert os.environ["TORCHDYNAMO_DISABLE"] == "0"
    assert os.environ["TORCHDYNAMO_DISABLE"] == "0"


def test_a_second_run_loads_only_what_its_first_step_needs(tmp_path):
    from lowvram import api
    from lowvram.cli import build_parser, resolve_run

    flags = ["train", *tiny_flags(tmp_path / "run"), "--set", "run.steps=1", "--set", "run.val_every=0",
             "--no-final-samples"]
    api.plan(resolve_run(build_parser().parse_args(flags)))  # the first run's plan: the one below reuses it
    seen_file = tmp_path / "seen.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("TORCHDYNAMO_DISABLE", None)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(seen_file), *flags], env=env, capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "plan reused from" in proc.stdout
    seen = json.loads(seen_file.read_text())
    loaded = set(seen["modules"])
    assert "torch" in loaded and "diffusers" in loaded  # the probe saw a real first step
    if importlib.util.find_spec("bitsandbytes"):
        assert "bitsandbytes" in loaded  # imported by diffusers: the case that used to load TorchInductor
    # bitsandbytes compiles nothing at import, so TorchInductor's compiler stays unloaded (torch._dynamo
    # itself imports a few of its modules)
    assert "torch._inductor.compile_fx" not in loaded
    assert not seen["dynamo_off"]  # the switch was only on while importing
    assert not {"gradio", "lowvram.webui", "torch.utils.tensorboard"} & loaded  # panel; TB writer opens after step 1
    run = tmp_path / "run"
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    account = next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["kind"] == "phases")
    # startup is the interpreter and the command line only: torch is imported inside "imports"
    assert seen["torch_at_clock_start"] is False
    assert {"startup", "imports", "plan", "load", "steps"} <= account["seconds"].keys()
    assert 0 < account["first_step_s"] <= account["wall_s"]
