"""The training process the web panel starts: ``python -m lowvram.webui.child --config FILE ...``.

It runs the same ``train`` / ``resume`` API as ``lowvram train``, writes every event as a JSON line
for the panel to follow, and turns a stop file (or the panel going away) into a graceful stop.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


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


def run(args: argparse.Namespace) -> int:
    from ..errors import LowvramError
    from ..runtime_env import no_compile_while_importing
    from ..train.phases import PhaseClock

    clock = PhaseClock(since_process_start=True)  # the panel waits from the moment the process starts
    with clock.phase("imports"), no_compile_while_importing():  # the trainer's libraries (api imports torch)
        from .. import api
        from ..train import run as _training  # noqa: F401
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
    p.add_argument("--events", required=True, help="JSON-lines file the events are appended to.")
    p.add_argument("--stop-file", required=True, help="Stop gracefully (checkpoint) once this file exists.")
    args = p.parse_args(argv)
    if not args.plan and not args.resume:
        p.error("give --plan or --resume")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
