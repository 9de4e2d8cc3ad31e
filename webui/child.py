"""The training process the web panel starts: ``python -m lowvram.webui.child --plan DIR ...``.

It runs the same ``train`` / ``resume`` API as ``lowvram train``, writes every event as a JSON line
for the panel to follow, and turns a stop file (or the panel going away) into a graceful stop. With
``--warm`` it is the panel's spare: it imports the libraries first, then reads its job's arguments as
one JSON line from stdin (the panel's pipe, nothing else) and runs exactly like a freshly started one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .spare import SET_BY_LIBRARIES


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


class EventWriter:
    """A listener that appends each event as one flushed JSON line (the panel reads them live)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, kind: str, step: int, data: dict[str, Any]) -> None:
        line = json.dumps({"kind": kind, "step": step, "data": _clean(data)})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    def __call__(self, event: Any) -> None:
        self.write(event.kind, event.step, event.data)


def stop_requested(stop_file: Path, parent_pid: int) -> Callable[[], bool]:
    """True once the stop file exists, or once the panel that started us is gone (no orphan runs)."""

    def stop() -> bool:
        return stop_file.exists() or os.getppid() != parent_pid

    return stop


def import_libraries() -> None:
    """What every job needs before its first step: the trainer and its libraries (torch, diffusers, peft)."""
    from .. import api  # noqa: F401 — api imports torch
    from ..train import run as _training  # noqa: F401


def handover_clock(handed_at: float, imported_at: float) -> Any:
    """The phase clock of a job handed to a spare: the run counts from the hand-over (what the user waits),
    and the imports the spare was still doing then are counted as ``imports``, the rest of the wait as startup."""
    from ..train.phases import PhaseClock

    waited = max(0.0, time.time() - handed_at)
    importing = min(waited, max(0.0, imported_at - handed_at))
    clock = PhaseClock()
    clock.count_before({"startup": waited - importing, **({"imports": importing} if importing else {})})
    return clock


def wait_for_job(parser: argparse.ArgumentParser, ready_file: str | None) -> tuple[argparse.Namespace, Any] | None:
    """The spare's life before its job: import, say so, then block on stdin for the job's arguments.

    ``None`` when there is no job to run: stdin closed (the panel shut down or died) or the panel is gone.
    """
    from ..runtime_env import no_compile_while_importing

    panel = os.getppid()
    with no_compile_while_importing():
        import_libraries()
    imported_at = time.time()
    if ready_file:
        Path(ready_file).touch()
    if os.getppid() != panel:
        return None
    line = sys.stdin.readline()
    if not line.strip():
        return None
    job = json.loads(line)
    args = parser.parse_args([str(a) for a in job["argv"]])
    for key, value in (job.get("env") or {}).items():  # the rest of the environment matched already
        if key not in SET_BY_LIBRARIES:
            continue
        if value is None:
            os.environ.pop(str(key), None)
        else:
            os.environ[str(key)] = str(value)
    with open(os.devnull, "rb") as null:  # from here on, stdin as a freshly started child has it
        os.dup2(null.fileno(), sys.stdin.fileno())
    return args, handover_clock(float(job["handed_at"]), imported_at)


def run(args: argparse.Namespace, clock: Any = None) -> int:
    from ..errors import LowvramError
    from ..runtime_env import no_compile_while_importing
    from ..train.phases import PhaseClock

    if clock is None:  # started for this job: the panel waits from the moment the process starts
        clock = PhaseClock(since_process_start=True)
    with clock.phase("imports"), no_compile_while_importing():  # a spare has imported them already: ~0 s
        import_libraries()
    from .. import api

    events = EventWriter(args.events)
    stop = stop_requested(Path(args.stop_file), os.getppid())
    events.write("process", 0, {"pid": os.getpid()})
    try:
        if args.resume:
            overrides = {"run.steps": args.steps} if args.steps else {}
            result = api.resume(args.resume, overrides, listeners=[events], stop=stop, progress=False, clock=clock)
        else:  # the plan the panel made: its config, its sources and its record go into the run folder
            result = api.train(api.read_plan(args.plan), listeners=[events], stop=stop, progress=False, clock=clock)
    except LowvramError as e:
        events.write("error", 0, {"message": str(e), "type": type(e).__name__})
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 — anything else is reported to the panel, then re-raised as exit 1
        message = f"{type(e).__name__}: {e}"
        if "out of memory" in str(e).lower():
            message += " — the job does not fit the card: press Plan, lower batch/resolution, or pick a leaner preset"
        events.write("error", 0, {"message": message, "type": type(e).__name__})
        traceback.print_exc()
        return 1
    events.write("exit", result.step, {"status": result.status, "run_dir": str(result.run_dir)})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowvram.webui.child", description=__doc__)
    p.add_argument("--plan", help="Folder with the plan of a new run (lowvram.api.save_plan): config.yaml, plan.yaml, "
                                  "config_sources.yaml.")
    p.add_argument("--resume", metavar="RUN_DIR", help="Continue this run folder instead.")
    p.add_argument("--steps", type=int, help="With --resume: the new total of steps.")
    p.add_argument("--events", help="JSON-lines file the events are appended to (required).")
    p.add_argument("--stop-file", help="Stop gracefully (checkpoint) once this file exists (required).")
    p.add_argument("--warm", action="store_true",
                   help="Import the libraries, then read the job's other arguments from stdin: one JSON line "
                        '{"argv": [...], "handed_at": UNIX_TIME}; exit quietly if stdin closes first.')
    p.add_argument("--ready-file", help="With --warm: touched once the libraries are imported.")
    args = p.parse_args(argv)
    clock = None
    if args.warm:
        job = wait_for_job(p, args.ready_file)
        if job is None:
            return 0
        args, clock = job
        if args.warm:
            p.error("a job handed to a spare cannot be --warm itself")
    if not args.events or not args.stop_file:
        p.error("give --events and --stop-file")
    if not args.plan and not args.resume:
        p.error("give --plan or --resume")
    return run(args, clock)


if __name__ == "__main__":
    sys.exit(main())
