"""The panel's spare training process: hand-over, honest time account, fallbacks to a fresh process, no orphans."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowvram.webui import callbacks as cb
from lowvram.webui import child
from lowvram.webui.jobs import JobManager
from lowvram.webui.spare import Spare

sys.path.insert(0, str(Path(__file__).parent))
from test_webui import cuda_plan, tiny_form, wait_for  # noqa: E402

# A stand-in for ``python -m lowvram.webui.child``: writes the events a finished job writes, and who it was.
FAKE_CHILD = """
import json, sys
job = {"argv": sys.argv[sys.argv.index("--events"):]} if "--events" in sys.argv else json.loads(sys.stdin.readline())
args = job["argv"]
with open(args[args.index("--events") + 1], "a") as f:
    for kind, data in (("process", {"who": WHO, "env": job.get("env")}), ("exit", {"status": "done"})):
        f.write(json.dumps({"kind": kind, "step": 0, "data": data}) + "\\n")
"""
SPARE_CRASHES = "import sys; sys.stdin.readline(); sys.exit(3)"
SPARE_HANGS = "import pathlib, sys, time; pathlib.Path(sys.argv[1]).touch(); time.sleep(120)"


def fake_python(tmp_path: Path) -> str:
    """An executable that runs like ``python -m lowvram.webui.child ...`` started fresh, without torch."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    exe = tmp_path / "fake-python"
    exe.write_text(f"#!{sys.executable}\nWHO = 'fresh'\n{FAKE_CHILD}")
    exe.chmod(0o755)
    return str(exe)


def fake_manager(tmp_path: Path, spare_code: str) -> JobManager:
    """A manager whose fresh children and whose spare are stand-ins (no warm_start: tests place the spare)."""
    manager = JobManager(tmp_path / "state", python=fake_python(tmp_path))
    job_dir = manager._new_job_dir()
    argv = [sys.executable, "-c", spare_code, str(job_dir / "ready")]
    manager.spare = Spare(job_dir, manager.python, manager._child_env(), argv=argv)
    return manager


def events(job) -> list[dict]:
    return [json.loads(line) for line in job.events_path.read_text().splitlines()]


def finish(manager: JobManager) -> None:
    s = wait_for(manager, lambda s: not s.active, "the end of the job", limit=60)
    assert s.state == "done" and s.exit_code == 0, (s.state, s.error)


# ---- the hand-over, with stand-ins ------------------------------------------------------------------
def test_the_job_goes_to_the_spare_through_its_stdin(tmp_path):
    manager = fake_manager(tmp_path, f"WHO = 'spare'\n{FAKE_CHILD}")
    spare = manager.spare
    # torch writes its default inductor cache folder into the panel's environment while planning: no reason
    # to start afresh, and the child gets the job's value with the hand-over
    manager.env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    job = manager.resume(tmp_path / "run", steps=5)
    assert job.warm and job.proc is spare.proc and manager.spare is None and job.dir == spare.dir
    finish(manager)
    assert events(job)[0]["data"] == {"who": "spare", "env": {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}}
    assert job.argv[:3] == [manager.python, "-m", "lowvram.webui.child"]  # what a fresh start would have run
    assert job.argv[3:] == ["--events", str(job.events_path), "--stop-file", str(job.stop_file),
                            "--resume", str(tmp_path / "run"), "--steps", "5"]


def test_a_dead_spare_or_another_environment_means_a_fresh_process(tmp_path):
    manager = fake_manager(tmp_path, SPARE_HANGS)
    os.kill(manager.spare.proc.pid, signal.SIGKILL)  # the out-of-memory killer chose the idle spare
    manager.spare.proc.wait()
    job = manager.resume(tmp_path / "run")
    assert not job.warm and manager.spare is None
    finish(manager)
    assert events(job)[0]["data"]["who"] == "fresh"

    other = fake_manager(tmp_path / "b", SPARE_HANGS)
    spare = other.spare
    other.env = {**os.environ, "CUDA_VISIBLE_DEVICES": "1"}  # the job must see another card than the spare did
    job = other.resume(tmp_path / "run")
    assert not job.warm and spare.proc.poll() is not None  # the unfit spare is ended and reaped
    finish(other)
    assert events(job)[0]["data"]["who"] == "fresh"


@pytest.mark.parametrize("code, why", [(SPARE_CRASHES, "ended with exit code 3"),
                                       (SPARE_HANGS, "did not answer within 0 s")], ids=["crashes", "hangs"])
def test_a_spare_that_never_takes_the_job_hands_it_to_a_fresh_process(tmp_path, code, why):
    manager = fake_manager(tmp_path, code)
    manager.spare.answer_timeout = 0.3
    spare_proc = manager.spare.proc
    if code == SPARE_HANGS:
        wait_until(lambda: (manager.spare.ready_file).exists(), "the stand-in spare's ready file")
    job = manager.resume(tmp_path / "run")
    assert job.warm
    finish(manager)
    assert not job.warm and job.proc is not spare_proc and spare_proc.poll() is not None
    assert events(job)[0]["data"]["who"] == "fresh"
    assert why in job.stderr_path.read_text()


def wait_until(done, what: str, limit: float = 300.0) -> None:
    end = time.monotonic() + limit
    while not done():
        if time.monotonic() > end:
            pytest.fail(f"no {what} within {limit:.0f} s")
        time.sleep(0.1)


# ---- the warm child itself ------------------------------------------------------------------------------
def test_the_clock_of_a_handed_job_starts_at_the_hand_over():
    now = time.time()
    clock = child.handover_clock(handed_at=now - 3.0, imported_at=now - 1.0)  # handed while still importing
    assert clock.totals["imports"] == pytest.approx(2.0, abs=0.1)
    assert clock.totals["startup"] == pytest.approx(1.0, abs=0.1)
    assert clock.wall_s() == pytest.approx(3.0, abs=0.1)
    clock = child.handover_clock(handed_at=now - 0.5, imported_at=now - 60.0)  # an idle spare, imported long ago
    assert "imports" not in clock.totals and clock.wall_s() == pytest.approx(0.5, abs=0.1)


def pipe_stdin(monkeypatch, text: str) -> None:
    r, w = os.pipe()
    os.write(w, text.encode())
    os.close(w)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.FileIO(r, "r")))


def test_a_spare_exits_quietly_when_its_stdin_closes_or_the_panel_is_gone(tmp_path, monkeypatch):
    pipe_stdin(monkeypatch, "")  # the panel shut down (or died): the pipe closed without a job
    assert child.main(["--warm", "--ready-file", str(tmp_path / "ready")]) == 0
    assert (tmp_path / "ready").exists()
    parents = iter([os.getppid(), 1])  # re-parented during the imports: the panel died
    monkeypatch.setattr(child.os, "getppid", lambda: next(parents))
    pipe_stdin(monkeypatch, '{"argv": ["--events", "never-written"], "handed_at": 0}\n')
    assert child.main(["--warm"]) == 0
    assert not (tmp_path / "never-written").exists()


def test_a_warm_child_reports_a_config_error_like_a_fresh_one(tmp_path, monkeypatch):
    plan = cuda_plan(tmp_path)
    ev = tmp_path / "events.jsonl"
    job = {"argv": ["--plan", str(plan), "--events", str(ev), "--stop-file", str(tmp_path / "stop")],
           "env": {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "CUDA_VISIBLE_DEVICES": "7"},
           "handed_at": time.time()}
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pipe_stdin(monkeypatch, json.dumps(job) + "\n")
    assert child.main(["--warm"]) == 2
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # read at import: never taken from the line
    rows = [json.loads(line) for line in ev.read_text().splitlines()]
    assert rows[0]["kind"] == "process" and rows[-1]["kind"] == "error" and "run.device" in rows[-1]["data"]["message"]


def test_importing_the_libraries_leaves_the_gpu_uninitialised():
    """bitsandbytes asks torch.cuda.is_available()/device_count() at import (the driver's view, fixed by the
    environment, which the spare shares with its job); nothing may initialise torch's CUDA state itself."""
    probe = """
import json, torch, torch.cuda as c
calls = []
for name in ("_lazy_init", "init", "current_device", "set_device", "mem_get_info", "get_device_properties"):
    setattr(c, name, (lambda n, f: lambda *a, **k: (calls.append(n), f(*a, **k))[1])(name, getattr(c, name)))
from lowvram.runtime_env import no_compile_while_importing
from lowvram.webui.child import import_libraries
with no_compile_while_importing():
    import_libraries()
print(json.dumps({"calls": calls, "initialized": torch.cuda.is_initialized()}))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert json.loads(out.stdout.splitlines()[-1]) == {"calls": [], "initialized": False}


# ---- a real tiny job through the spare ------------------------------------------------------------------
def phases_row(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["kind"] == "phases")  # the event's data, flat


def ready_spare(manager: JobManager) -> Spare:
    wait_until(lambda: manager.status() is not None and manager.spare is not None and manager.spare.ready_file.exists(),
               "spare that has imported the libraries")
    return manager.spare


def test_a_tiny_job_through_the_spare_counts_from_the_hand_over_and_stops_resumes_dies_like_a_fresh_one(tmp_path):
    spawned = time.time()
    state = cb.PanelState(JobManager(tmp_path / "state", warm_start=True))
    procs: list[subprocess.Popen] = []
    try:
        spare = ready_spare(state.manager)
        procs.append(spare.proc)
        handed = time.time()
        run = tmp_path / "run"
        assert cb.start_job(state, tiny_form(run)).startswith("Started")
        job = state.manager.job
        assert job.warm and job.proc is spare.proc and state.manager.spare is None  # no spare during the wait
        wait_for(state.manager, lambda s: s.step >= 1, "a training step")
        stepped = time.time()
        assert handed - spawned > 2.0  # the spare's imports: a clock from its start would be that much later
        wait_until(lambda: state.manager.status() and state.manager.spare is not None, "the next spare")
        procs.append(state.manager.spare.proc)
        assert "stopping" in cb.stop_job(state)
        s = wait_for(state.manager, lambda s: not s.active, "the end of the job")
        assert s.state == "stopped" and s.exit_code == 0, s.error
        account = phases_row(run)
        assert account["seconds"]["imports"] < 0.5  # imported before the job came
        assert account["first_step_s"] <= stepped - handed + 0.5

        assert cb.resume_job(state, str(run), 300).startswith("Resuming")  # through the next spare
        job = state.manager.job
        assert job.warm and job.proc is procs[-1]
        wait_for(state.manager, lambda s: job.stepped, "a step of the resumed run")
        os.kill(job.proc.pid, signal.SIGKILL)  # what the out-of-memory killer does
        s = job.wait(60)
        assert s.state == "failed" and "SIGKILL" in s.error and "failed" in cb.error_markdown(s)
    finally:
        state.manager.status()  # may start one more spare: shutdown must end it too
        procs += [state.manager.spare.proc] if state.manager.spare else []
        state.manager.shutdown()
        left = [proc.pid for proc in procs if proc.poll() is None]
        for proc in procs:  # reap whatever shutdown missed, so a failure leaves no process behind
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    assert not left, f"processes outliving the panel's shutdown: {left}"


def test_lowvram_ui_starts_warm_unless_told_not_to(monkeypatch):
    from lowvram.cli import build_parser
    from lowvram.cli_commands import cmd_ui
    from lowvram.webui import app

    got = []
    monkeypatch.setattr(app, "serve", lambda **kw: got.append(kw))
    for argv, warm in ((["ui"], True), (["ui", "--no-warm-start"], False)):
        assert cmd_ui(build_parser().parse_args(argv)) == 0
        assert got.pop()["warm_start"] is warm
