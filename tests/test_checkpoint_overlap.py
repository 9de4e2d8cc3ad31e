"""Periodic checkpoints are written in the background while the steps go on: the folder appears whole only once
written, the steps do not wait for the disk, a failed write is raised in the run, a stop waits for the write."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_checkpoints_equal, tiny_config

from lowvram.fsutil import storage_error
from lowvram.train import checkpoint as ckpt
from lowvram.train import checkpoint_writer, trainer_state
from lowvram.train.checkpoint import list_checkpoints, load_checkpoint
from lowvram.train.events import Event
from lowvram.train.run import resume, train
from lowvram.train.signals import GracefulStop

REPO = Path(__file__).resolve().parents[1]
RUN = {"run__steps": 6, "run__checkpoint_every": 2, "run__val_every": 0}
WAIT_S = 60.0  # far above a tiny step; only reached when the steps did not go on


def names(run: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run / "checkpoints")]


@pytest.fixture(autouse=True)
def _room(monkeypatch):
    """The host has room for a snapshot (whatever this machine's free RAM is): the writes overlap."""
    monkeypatch.setattr(trainer_state, "room_for_snapshot", lambda nbytes: True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run the others must equal."""
    return train(tiny_config(tmp_path_factory.mktemp("straight") / "run", **RUN), progress=False).run_dir


def held_writes(monkeypatch, release: threading.Event, on_hold=lambda path: None) -> list[str]:
    """Files written outside the training thread call ``on_hold(path)``, then wait for ``release``."""
    real, held = ckpt.save_file, []

    def save_file(tensors, path, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            held.append(Path(path).name)
            on_hold(str(path))
            release.wait(WAIT_S)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    return held


def test_steps_go_on_while_a_checkpoint_is_written(tmp_path, straight, monkeypatch):
    release, seen = threading.Event(), []
    held = held_writes(monkeypatch, release)
    run = tmp_path / "run"

    def listen(event: Event) -> None:
        seen.append((event.kind, event.step))
        if event.kind == "step" and event.step == 4:  # two steps after checkpoint 2 was taken
            assert held and names(run) == [], "the write of step 2 is held: no step-2 folder yet"
            assert not [p for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")]
            release.set()

    result = train(tiny_config(run, **RUN), listeners=[listen], progress=False)
    assert result.status == "done" and release.is_set()
    order = [s for s in seen if s[0] in ("step", "checkpoint")]
    assert order.index(("checkpoint", 2)) > order.index(("step", 4))  # announced once on disk, not at the snapshot
    assert [s for s in order if s[0] == "checkpoint"] == [("checkpoint", 2), ("checkpoint", 4), ("checkpoint", 6)]
    assert names(run) == ["step-00000004", "step-00000006"]  # keep_checkpoints=2 pruned step 2 after its write
    # the weights written are those of the checkpoint's step, not of the steps taken during the write
    assert_checkpoints_equal(straight, run, 4, "written in the background")
    assert_checkpoints_equal(straight, run, 6, "written at the end")


def test_the_background_seconds_are_reported_and_not_counted_as_checkpoint_time(tmp_path, monkeypatch):
    real = ckpt.save_file

    def slow(tensors, path, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.1)  # a slow disk, per file
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", slow)
    events: list[Event] = []

    def listen(event: Event) -> None:
        events.append(event)
        if event.kind == "step":
            time.sleep(0.6)  # steps longer than a write: the write ends while the next step runs

    train(tiny_config(tmp_path / "run", **RUN), listeners=[listen], progress=False)
    written = {e.step: e.data["write_s"] for e in events if e.kind == "checkpoint"}
    assert written[2] >= 0.4 and written[4] >= 0.4  # the writer's own time: 4 files of 0.1 s at least
    paused = {e.step: e.data["seconds"] for e in events if e.kind == "phase" and e.data.get("state") == "end"
              and e.data.get("phase") == "checkpoints"}
    # what the steps waited for is the snapshot only: the writer's seconds are not in the account
    assert paused[2] < written[2] and paused[4] < written[4]


def test_a_failed_background_write_is_raised_in_the_run(tmp_path, monkeypatch):
    def full(tensors, path, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            Path(path).write_bytes(b"half")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *args, **kwargs)

    real = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", full)
    steps: list[int] = []
    run = tmp_path / "run"
    with pytest.raises(OSError) as info:
        train(tiny_config(run, **RUN), listeners=[lambda e: e.kind == "step" and steps.append(e.step)], progress=False)
    assert max(steps) <= 4  # raised at the next join point at the latest: the save of step 4
    assert not (run / "final").exists()
    assert list((run / "checkpoints").iterdir()) == []  # the half-written temporary folder was removed
    err = storage_error(info.value, run)  # the one line the CLI prints for it, as for a write in the pause
    assert err is not None and "the disk is full" in str(err) and f"--resume {run}" in str(err)


def test_a_stop_waits_for_the_write_in_flight_and_a_second_signal_does_not_cut_it(tmp_path, straight, monkeypatch):
    stop, release = GracefulStop(announce=False), threading.Event()
    release.set()  # step 2's write goes through

    def wait_for(condition) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)

    def signals_during_the_join(path: str) -> None:
        if "step-00000004" not in path or stop():
            return
        release.clear()  # step 4's write is held: the steps go on
        wait_for(lambda: stop() and stop._saving)  # stopped at the next boundary, where it waits for this write
        stop.handle(signal.SIGINT)  # a second Ctrl-C there is deferred (StopNow would raise here)
        release.set()

    def listen(event: Event) -> None:
        if event.kind == "step" and event.step == 5:
            stop.handle(signal.SIGINT)  # Ctrl-C during step 5, step 4's write still in flight

    held_writes(monkeypatch, release, on_hold=signals_during_the_join)
    run = tmp_path / "run"
    result = train(tiny_config(run, **RUN), listeners=[listen], stop=stop, progress=False)
    assert result.status == "stopped" and result.step == 5 and stop.repeated == signal.SIGINT
    assert names(run) == ["step-00000004", "step-00000005"]  # the write in flight completed, then step 5
    for folder in list_checkpoints(run / "checkpoints"):
        load_checkpoint(folder)  # every folder under a real name is complete
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert resume(run, progress=False).step == 6
    assert_checkpoints_equal(straight, run, 6, "after a stop during a background write and a resume")


KILLER = textwrap.dedent(
    """
    import os, signal, sys, threading
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config
    from lowvram.train import checkpoint, trainer_state
    from lowvram.train.run import train
    from pathlib import Path

    trainer_state.room_for_snapshot = lambda nbytes: True
    real = checkpoint.save_file

    def save_file(tensors, path, *args, **kwargs):
        if "step-00000004" in str(path) and threading.current_thread() is not threading.main_thread():
            real(tensors, path, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill mid-write, the steps going on meanwhile
        return real(tensors, path, *args, **kwargs)

    checkpoint.save_file = save_file
    train(tiny_config(Path({out!r}), **{overrides!r}), progress=False)
    """
)


def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint(tmp_path, straight):
    killed = tmp_path / "killed"
    script = KILLER.format(tests=str(REPO / "tests"), out=str(killed), overrides=RUN)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert names(killed) == ["step-00000002"]  # the half-written step 4 is not a checkpoint
    assert [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".tmp-step-00000004")]
    assert resume(killed, progress=False).step == 6
    assert_checkpoints_equal(straight, killed, 6, "after a kill mid-write and a resume")


def test_a_snapshot_is_a_copy_and_the_writer_joins_once():
    live = {"model": {"w": torch.ones(3, 4).t()}}  # strided: written as a contiguous copy
    snap = ckpt.snapshot(live)
    live["model"]["w"].add_(1)  # the next step changes the live tensor in place
    assert snap["model"]["w"].is_contiguous() and torch.equal(snap["model"]["w"], torch.ones(4, 3))
    assert ckpt.snapshot_bytes(live) == 12 * 4
    writer = checkpoint_writer.CheckpointWriter()
    assert writer.join() is None
    writer.submit(7, lambda: Path("step-7"))
    with pytest.raises(RuntimeError, match="join"):
        writer.submit(8, lambda: Path("step-8"))
    done = writer.join()
    assert done is not None and (done.step, done.path) == (7, Path("step-7")) and not writer.in_flight


def test_room_for_a_snapshot_follows_the_free_ram(monkeypatch):
    monkeypatch.setattr(checkpoint_writer, "available_ram_bytes", lambda: 4 * 2**30)
    monkeypatch.setattr(checkpoint_writer, "step_transient_bytes", lambda: 2**30)
    assert checkpoint_writer.room_for_snapshot(2 * 2**30)
    assert not checkpoint_writer.room_for_snapshot(3 * 2**30)  # the steps' own peak must stay free beside it
    monkeypatch.setattr(checkpoint_writer, "available_ram_bytes", lambda: None)
    assert not checkpoint_writer.room_for_snapshot(1)  # unknown: written in the pause, as before
