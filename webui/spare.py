"""The panel's spare training process: a child that has imported the libraries and waits on its stdin for a job.

Starting a job then costs the hand-over of one JSON line instead of the libraries' import (5-10 s on a
small CPU). The channel is the spare's stdin pipe and nothing else: no socket, no pickle. A spare started
with another environment, interpreter or working folder than the job needs is not used (the device
variables CUDA_VISIBLE_DEVICES, PYTORCH_*_ALLOC_CONF, HSA_* are read from the process's environment).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

# Set in the panel's own process by the libraries as it plans, to the value a child derives by itself
# (torch writes its default inductor cache folder into os.environ when asked for it): not a reason to start
# the job afresh; the job's value travels with the hand-over and the child takes it.
SET_BY_LIBRARIES = ("TORCHINDUCTOR_CACHE_DIR",)
ANSWER_TIMEOUT_S = 10.0  # a spare that has imported reads its job within milliseconds; 10 s is a hung one


class Spare:
    """One idle ``python -m lowvram.webui.child --warm``, its job folder reserved (its output goes there)."""

    def __init__(self, job_dir: Path, python: str, env: dict[str, str], argv: list[str] | None = None) -> None:
        self.dir = job_dir
        self.python = python
        self.env = env
        self.cwd = os.getcwd()
        self.ready_file = job_dir / "ready"
        self.argv = argv or [python, "-m", "lowvram.webui.child", "--warm", "--ready-file", str(self.ready_file)]
        self.handed_at: float | None = None
        self.answer_timeout = ANSWER_TIMEOUT_S
        with (job_dir / "stderr.log").open("ab") as err:
            # its own session, like a job: Ctrl-C in the panel's terminal is the panel's
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=err, stderr=subprocess.STDOUT,
                                         env=env, cwd=self.cwd, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fits(self, python: str, env: dict[str, str]) -> bool:
        """Alive, and started exactly as a fresh child of this job would be (interpreter, environment, folder)."""
        return self.alive() and python == self.python and _core(env) == _core(self.env) and os.getcwd() == self.cwd

    def hand_over(self, args: list[str], env: dict[str, str]) -> bool:
        """Send the job's arguments and close the pipe; False if the spare is gone (the job is then started fresh)."""
        changed = {k: env.get(k) for k in SET_BY_LIBRARIES if env.get(k) != self.env.get(k)}  # None: unset it
        line = json.dumps({"argv": [str(a) for a in args], "env": changed, "handed_at": time.time()}) + "\n"
        if self.proc.stdin is None:  # never: started with stdin=PIPE
            return False
        try:
            self.proc.stdin.write(line.encode("utf-8"))
            self.proc.stdin.close()  # one job per spare: it reads one line, then EOF
        except (OSError, ValueError):  # BrokenPipeError: it died; ValueError: the pipe was closed already
            return False
        self.handed_at = time.time()
        return True

    def silent(self) -> bool:
        """Handed a job, ready (imported) and still no answer ``answer_timeout`` seconds after both: hung."""
        if self.handed_at is None:
            return False
        try:
            ready_at = self.ready_file.stat().st_mtime
        except FileNotFoundError:
            return False  # still importing: a fresh process would be importing too, and be further behind
        return time.time() > max(self.handed_at, ready_at) + self.answer_timeout

    def close(self, timeout: float = 1.0) -> None:
        """End the spare and reap it: it exits by itself once its stdin closes, but only after its imports, and
        an idle spare (or one that never took its job) holds nothing worth waiting for, so it is killed."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _core(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in SET_BY_LIBRARIES}
