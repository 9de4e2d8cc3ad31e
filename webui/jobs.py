"""The panel's one training job: a child process, its event stream, its stop file, its fate.

Training runs in its own process so that a crash, an out-of-memory kill or a hung GPU driver never
takes the panel down. The manager lives in the server process (not in a page), so a reloaded page
re-attaches to the job that is running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LowvramError
from .spare import Spare
from .tail import JsonlTail

STDERR_TAIL_LINES = 25
ACTIVE = ("starting", "running", "stopping")


def _package_root() -> str:
    """The folder that holds the ``lowvram`` package: a checkout's root, or site-packages."""
    import lowvram

    return str(Path(lowvram.__file__).resolve().parents[1])


def describe_exit(code: int) -> str:
    """What an exit code means to a person (a negative code is the signal that ended the process)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " — often the system's out-of-memory killer: the job needed more RAM than there was" if -code == signal.SIGKILL else ""
    return f"killed by {name}{hint}"


@dataclass
class JobStatus:
    """What the panel shows about the job; ``state`` is idle, starting, running, stopping, stopped, done or failed."""

    state: str = "idle"
    run_dir: str | None = None
    task: str | None = None
    stage: str = "training"  # or "autoencoder" during a latent run's first stage
    phase: str | None = None  # what the run is doing now: load, caching, steps, previews, ... (train/phases.py)
    step: int = 0
    total: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    it_s: float | None = None
    eta_s: float | None = None
    peak_mem_mib: float | None = None
    mem_kind: str | None = None
    last_sample: str | None = None
    last_checkpoint: str | None = None
    grid_prompts: list[str] = field(default_factory=list)  # rows of the preview grids
    grid_scales: list[float] = field(default_factory=list)  # their columns (guidance scales)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    exit_code: int | None = None
    pid: int | None = None
    started_at: float | None = None
    version: int = 0  # bumps whenever an event arrives: the page redraws only on change

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


class Job:
    """One child process: how it was started, where its files are, and what it has reported.

    Given a ``spare`` that has taken the job's arguments, the job is that process; if the spare ends or
    hangs before it answers (its first event), the job is started afresh with ``argv``: never lost.
    """

    def __init__(self, job_dir: Path, argv: list[str], run_dir: str, task: str, env: dict[str, str],
                 spare: Spare | None = None) -> None:
        self.dir = job_dir
        self.events_path = job_dir / "events.jsonl"
        self.stop_file = job_dir / "stop"
        self.stderr_path = job_dir / "stderr.log"
        self.argv = argv
        self.env = env
        self.status = JobStatus(state="starting", run_dir=run_dir, task=task, started_at=time.time())
        self._events = JsonlTail(self.events_path)
        self._stop_requested_at: float | None = None
        self.forced = False  # the second Stop: ended at once
        self._outcome: str | None = None  # done | stopped, from the child's last event
        self.spare = spare  # the warm process that took the job, until it has answered
        self.warm = spare is not None
        self.stepped = False  # a training step was reported (the panel then prepares the next spare)
        self.proc = spare.proc if spare is not None else self._spawn()
        self.status.pid = self.proc.pid

    def _spawn(self) -> subprocess.Popen:
        with self.stderr_path.open("ab") as err, open(os.devnull, "rb") as null:
            # A new session: Ctrl-C in the panel's terminal is the panel's, the job stops through the stop file.
            return subprocess.Popen(self.argv, stdin=null, stdout=err, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)

    def _restart_fresh(self, code: int | None) -> None:
        """The spare never answered (it died, or hangs): end it and start the job as a fresh process."""
        spare, self.spare = self.spare, None
        if code is not None:
            why = "ended with " + describe_exit(code)
        else:
            why = f"did not answer within {spare.answer_timeout if spare else 0:.0f} s"
        if spare is not None:
            spare.close()
        with self.stderr_path.open("a", encoding="utf-8") as err:
            err.write(f"lowvram panel: the spare training process (pid {self.proc.pid}) {why} before taking the job; "
                      "starting the job in a new process\n")
        self.proc = self._spawn()
        self.status.pid = self.proc.pid
        self.warm = False

    # ---- reading what the child reported ---------------------------------------------------
    def poll(self) -> JobStatus:
        """Fold new events into the status, then notice if the process has ended."""
        s = self.status
        for row in self._events.read():
            self._apply(row)
            s.version += 1
        if s.exit_code is None:
            code = self.proc.poll()
            if code is not None:
                for row in self._events.read():  # the last lines written before exiting
                    self._apply(row)
            if self.spare is not None and self._stop_requested_at is None and (code is not None or self.spare.silent()):
                self._restart_fresh(code)
                s.version += 1
            elif code is not None:
                self._finish(code)
                s.version += 1
        return s

    def _apply(self, row: dict[str, Any]) -> None:
        s, kind, step, d = self.status, row.get("kind"), int(row.get("step") or 0), row.get("data") or {}
        self.spare = None  # any event: the process has taken the job
        if kind == "start":
            s.stage = d.get("stage", "training")
            s.total = d.get("total", s.total)
            s.step = step
            if s.state == "starting":
                s.state = "running"
        elif kind == "step":
            self.stepped = True
            s.stage = d.get("stage", "training")
            s.step = step
            s.loss = _num(d.get("loss"))
            s.it_s = _num(d.get("it_s")) or s.it_s
            if d.get("peak_mem_mib") is not None:
                s.peak_mem_mib = _num(d.get("peak_mem_mib"))
                s.mem_kind = d.get("mem_kind")
            if s.it_s and s.total:
                s.eta_s = max(s.total - step, 0) / s.it_s
            if s.state == "starting":
                s.state = "running"
        elif kind == "phase" and d.get("state") == "start":
            s.phase = str(d.get("phase"))
        elif kind == "val":
            s.val_loss = _num(d.get("val_loss"))
        elif kind == "sample":
            s.last_sample = d.get("path")
            s.grid_prompts = [str(p) for p in d.get("prompts") or []]
            s.grid_scales = [float(x) for x in d.get("cfg_scales") or [] if _num(x) is not None]
        elif kind == "checkpoint":
            s.last_checkpoint = d.get("path")
        elif kind in ("nonfinite", "warning"):
            s.warnings = (s.warnings + [str(d.get("message", d))])[-5:]
        elif kind == "resume":
            s.step = step
        elif kind == "error":
            s.error = str(d.get("message"))
        elif kind == "exit":  # the outcome; the job stays active until the process has really ended
            s.step = step
            self._outcome = "done" if d.get("status") == "done" else "stopped"

    def _finish(self, code: int) -> None:
        s = self.status
        s.exit_code = code
        if code == 0:  # the child says how it ended; without that, trust the stop request
            s.state = self._outcome or ("stopped" if self._stop_requested_at else "done")
            s.eta_s = 0.0 if s.state == "done" else None
            return
        if self.forced:
            s.state = "stopped"
            s.error = f"ended at once on request ({describe_exit(code)}); the last checkpoint is kept"
            return
        s.state = "failed"
        tail = self.stderr_tail()
        head = s.error or "the training process ended unexpectedly"
        s.error = f"{head}\n({describe_exit(code)})" + (f"\n\nlast lines of its output:\n{tail}" if tail else "")

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> str:
        try:
            text = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    # ---- control -------------------------------------------------------------------------------
    def request_stop(self) -> str:
        """First call: graceful (checkpoint, then exit). A second call ends the process at once."""
        if not self.status.active:
            return "the job is not running"
        if self._stop_requested_at is None:
            self.stop_file.touch()
            self._stop_requested_at = time.time()
            self.status.state = "stopping"
            self.status.version += 1
            return ("stopping: the job saves a checkpoint after the current step "
                    "(press Stop again to end it at once)")
        self.forced = True
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return "ended the training process; the last checkpoint written is kept"

    def wait(self, timeout: float | None = None) -> JobStatus:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.poll()


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class JobManager:
    """Starts at most one training job at a time and reports its status; shared by every page.

    With ``warm_start`` it keeps one spare training process that has imported the libraries already
    (:class:`Spare`) and hands it the next job. The spare of the next job is started once the current
    one has made its first training step (or ended), not at once: on a CPU its imports would take a
    core from the job during exactly the seconds the user is waiting for that first step.
    """

    SPARE_FAILURES_MAX = 3  # spares that died on their own before a job: something is broken, stop making them

    def __init__(self, state_dir: str | Path | None = None, python: str = sys.executable,
                 env: dict[str, str] | None = None, *, warm_start: bool = False) -> None:
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="lowvram-ui-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.env = env
        self.job: Job | None = None
        self.warm_start = warm_start
        self.spare: Spare | None = None
        self._spare_failures = 0
        self._closed = False
        self._count = 0
        self._lock = threading.Lock()
        self._top_up()

    def _child_env(self) -> dict[str, str]:
        env = dict(self.env if self.env is not None else os.environ)
        root = _package_root()
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in parts:  # run from a checkout (not pip-installed): the child must import it too
            env["PYTHONPATH"] = os.pathsep.join([root, *parts])
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _new_job_dir(self) -> Path:
        self._count += 1
        job_dir = self.state_dir / f"job-{self._count:03d}"
        job_dir.mkdir(parents=True, exist_ok=True)
        return job_dir

    # ---- the spare ---------------------------------------------------------------------------------
    def _top_up(self) -> None:
        """Start a spare if there is none, none is starting and the job (if any) is past its first step."""
        if not self.warm_start or self._closed or self._spare_failures >= self.SPARE_FAILURES_MAX:
            return
        if self.spare is not None:
            if self.spare.alive():
                return
            self.spare.close()  # reap it: it died before any job was handed to it
            self._spare_failures += 1
            self.spare = None
        job = self.job
        if job is not None and job.status.active and not job.stepped:
            return
        self.spare = Spare(self._new_job_dir(), self.python, self._child_env())

    def _take_spare(self, env: dict[str, str]) -> Spare | None:
        """The spare, if it is alive and was started exactly as this job's process would be; else ``None``."""
        spare, self.spare = self.spare, None
        if spare is not None and not spare.fits(self.python, env):
            spare.close()  # started for another environment (or dead): the next one is made for this one
            return None
        return spare

    # ---- jobs --------------------------------------------------------------------------------------
    def _launch(self, extra: Sequence[str], run_dir: str, task: str, planned: Any = None) -> Job:
        with self._lock:
            if self.job is not None and self.job.poll().active:
                raise LowvramError(
                    f"a training job is already running (run folder {self.job.status.run_dir})",
                    "stop it first: the panel runs one job at a time",
                )
            env = self._child_env()
            spare = self._take_spare(env)
            job_dir = spare.dir if spare is not None else self._new_job_dir()
            args = ["--events", str(job_dir / "events.jsonl"), "--stop-file", str(job_dir / "stop")]
            if planned is not None:  # the front door's plan: the child trains exactly it
                from ..api import save_plan

                save_plan(planned, job_dir / "plan")
                args += ["--plan", str(job_dir / "plan")]
            args += list(extra)
            argv = [self.python, "-m", "lowvram.webui.child", *args]  # a fresh child's (and the fallback's)
            if spare is not None and not spare.hand_over(args, env):
                spare.close()
                spare = None
            self.job = Job(job_dir, argv, run_dir, task, env, spare=spare)
            return self.job

    def start(self, planned: Any) -> Job:
        """Train a plan of ``lowvram.api.plan`` (config, sources, plan record) in a new process."""
        return self._launch([], planned.config.run.out, planned.config.run.task, planned)

    def resume(self, run_dir: str | Path, steps: int | None = None) -> Job:
        """Continue ``run_dir`` from its latest checkpoint, to ``steps`` in total if given."""
        extra = ["--resume", str(run_dir)] + (["--steps", str(int(steps))] if steps else [])
        task = "?"
        try:
            from ..run_folder import load_run_config

            task = load_run_config(run_dir).run.task
        except LowvramError:
            pass  # the child reports the problem with the folder in its own words
        return self._launch(extra, str(run_dir), task, None)

    def stop(self) -> str:
        if self.job is None:
            return "no job has been started"
        with self._lock:
            return self.job.request_stop()

    def status(self) -> JobStatus:
        """The job's status (read by every page about once a second), and the spare topped up."""
        with self._lock:
            status = self.job.poll() if self.job is not None else JobStatus()
            self._top_up()
            return status

    def shutdown(self, timeout: float = 30.0) -> None:
        """On panel exit: end the spare, stop the job gracefully, then at once if it does not end within ``timeout``."""
        with self._lock:
            self._closed = True
            spare, self.spare = self.spare, None
        if spare is not None:
            spare.close()
        job = self.job
        if job is None or not job.poll().active:
            return
        job.request_stop()
        job.wait(timeout)
        if job.proc.poll() is None:
            job.request_stop()
