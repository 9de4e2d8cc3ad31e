"""Ctrl-C and SIGTERM on the real `lowvram` executable: the run stops at a step boundary, saves a consistent
checkpoint, names its folder and the resume command, exits 130/143; the resumed run ends bitwise equal to
one that was never interrupted.

The signal is sent by the process to itself at a named point (tests/signal_points.py, loaded through
tests/signal_hook/sitecustomize.py), so each point is hit exactly, every time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN, assert_checkpoints_equal
from safetensors.torch import load_file

from lowvram.cli import main
from lowvram.train.checkpoint import latest_checkpoint

TESTS = Path(__file__).resolve().parent
LOWVRAM = Path(sys.executable).with_name("lowvram")  # the console script of this environment
STEPS, ACCUM = 6, 2
RUN = {**TINY_RUN, "run.steps": STEPS, "train.grad_accum": ACCUM, "run.checkpoint_every": 2, "run.val_every": 2}


def flags(out: Path) -> list[str]:
    args = ["--preset", "cpu", "--out", str(out), "--no-progress"]
    for key, value in RUN.items():
        args += ["--set", f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}"]
    return args


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *flags(out)]) == 0
    return out


# (id, point, signals sent, the newest checkpoint after the stop, saved at the stop)
POINTS = [
    ("startup", "startup:0", 1, 0),  # models built, no step taken: step 0 is saved
    ("inside-step", "loss:3", 1, 3),  # in the forward of step 3's last micro-batch
    ("first-micro-batch", "first-micro:3", 1, 3),  # one micro-batch of step 3 accumulated, one to come
    ("after-optimizer-step", "after-optimizer:3", 1, 3),  # weights moved, step counter not yet
    ("after-next-batch-taken", "after-take:5", 1, 5),  # data position moved, nothing computed yet
    ("during-validation", "validate:4", 1, 4),
    ("during-periodic-save", "save:2", 1, 2),  # the save finishes; step 2 is not written twice
    ("during-last-save", "save:6", 1, 6),  # the last step is saved, the final model is left to the resume
    ("during-last-write", "write:6", 1, 6),  # between the last checkpoint's files (written in the pause)
    ("twice-during-save", "save:4", 2, 4),  # the second signal lets the save finish, and says so
    ("twice-inside-step", "loss:5", 2, 4),  # the second signal quits without saving: step 4 stays newest
]
SIGNALS = {"SIGINT": 130, "SIGTERM": 143}


def interrupt(out: Path, point: str, sig: str, count: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWVRAM_SIGNAL_POINT": point, "LOWVRAM_SIGNAL": sig,
           "LOWVRAM_SIGNAL_COUNT": str(count), "LOWVRAM_SIGNAL_ACCUM": str(ACCUM),
           "PYTHONPATH": os.pathsep.join([str(TESTS / "signal_hook"), str(TESTS)])}
    return subprocess.run([str(LOWVRAM), "train", *flags(out)], env=env, capture_output=True, text=True,
                          timeout=900)


def final_weights(run: Path) -> dict:
    return load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def check_point(straight: Path, tmp_path: Path, point: str, count: int, saved: int, sig: str) -> None:
    out = tmp_path / "run"
    proc = interrupt(out, point, sig, count)
    assert proc.returncode == SIGNALS[sig], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"resume with: lowvram train --resume {out}" in proc.stdout + proc.stderr
    assert str(out) in proc.stdout + proc.stderr
    newest = latest_checkpoint(out / "checkpoints")
    assert newest is not None and newest.name == f"step-{saved:08d}", (newest, proc.stdout, proc.stderr)
    assert not (out / "final").exists()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written leftovers
    if count == 2 and point.startswith(("save", "write")):
        assert "it was finished, not cut" in proc.stdout
    if count == 2 and point.startswith("loss"):
        assert "interrupted without saving" in proc.stderr
    # resume through the CLI's own entry point; it must end where the uninterrupted run ended
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert_checkpoints_equal(straight, out, STEPS, f"after {sig} at {point} x{count} and a resume")
    a, b = final_weights(straight), final_weights(out)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


CASES = [(*p, sig) for p in POINTS for sig in SIGNALS]
FAST = [c for c in CASES if (c[0], c[4]) in {("inside-step", "SIGINT"), ("twice-during-save", "SIGTERM")}]


@pytest.mark.parametrize("name, point, count, saved, sig", FAST, ids=[f"{c[0]}-{c[4]}" for c in FAST])
def test_signal_stops_at_a_step_boundary_and_resumes_bitwise(straight, tmp_path, name, point, count, saved, sig):
    check_point(straight, tmp_path, point, count, saved, sig)


@pytest.mark.slow
@pytest.mark.parametrize("name, point, count, saved, sig", CASES, ids=[f"{c[0]}-{c[4]}" for c in CASES])
def test_every_signal_point_resumes_bitwise(straight, tmp_path, name, point, count, saved, sig):
    check_point(straight, tmp_path, point, count, saved, sig)


def test_handlers_are_restored_after_the_command(tmp_path):
    """Library state is not process-global: the CLI puts back whatever handlers were there."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert main(["train", *flags(tmp_path / "r"), "--set", "run.steps=1"]) == 0
    assert {s: signal.getsignal(s) for s in before} == before
