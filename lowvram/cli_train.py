"""The ``lowvram train`` and ``lowvram plan`` commands: resolve the run, plan it against the card, then train
it (or resume it) or print exactly the files training would write."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .cli_config import resolve_run, resume_overrides
from .errors import ConfigError
from .runtime_env import no_compile_while_importing

PLAN_FILE_MARK = "# ==> "  # lowvram plan: the line before each file it prints


def resume_command(run_dir: str | Path) -> str:
    """The command line that continues the run in ``run_dir``."""
    return f"lowvram train --resume {run_dir}"


def cmd_train(args: argparse.Namespace) -> int:
    """Plan the run against the card and train it (or resume one); the exit code says how it ended."""
    from .train.phases import PhaseClock, summary_lines
    from .train.signals import GracefulStop, exit_code

    clock = PhaseClock(since_process_start=True)  # the account starts when the process did
    _check_train_flags(args)
    if args.processes is not None and args.processes > 1:
        import torch

        from .distributed import relaunch
        from .validate import check_config_flags

        check_config_flags(args)
        # this process only launches the N training processes and passes on their exit code
        return relaunch(args.processes, args.argv, cpu=args.device == "cpu" or not torch.cuda.is_available())
    with clock.phase("imports"), no_compile_while_importing():  # torch, diffusers: seconds before anything else
        from .distributed import launched, launched_as_main
        from .train import run as _training  # noqa: F401

    main_process = launched_as_main()
    if not main_process:
        # one voice: the other processes' progress lines (data, caches) would repeat the main one's;
        # errors still reach stderr from every process
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — lives as long as the process
    # under a launcher each process gets the launcher's one forwarded signal; repeats are the launcher's job
    graceful = GracefulStop(ignore_repeats=launched(), announce=main_process)
    result = _train_or_resume(args, graceful, clock, main_process)
    code = exit_code(graceful.signum) if graceful.signum and result.status == "stopped" else 0
    if not main_process:
        return code
    if result.phases:
        print("\n".join(summary_lines(result.phases)))
    return _report_end(result, graceful, code)


def _check_train_flags(args: argparse.Namespace) -> None:
    """``--from-checkpoint`` only with ``--resume``; a resumed run's folder, flags and device must be usable."""
    from .validate import check_config_flags, check_device, check_run_dir

    if args.from_checkpoint is not None and args.resume is None:
        raise ConfigError("--from-checkpoint needs --resume RUN", "e.g. lowvram train --resume RUN --from-checkpoint step-00000400")
    if args.resume is not None:
        check_run_dir("--resume", args.resume)
        check_config_flags(args)
        check_device("--device", args.device)


def _train_or_resume(args: argparse.Namespace, graceful: Any, clock: Any, main_process: bool) -> Any:
    """Resume ``--resume``'s run, or resolve, plan and train a new one; the run's ``RunResult``."""
    from . import api

    if args.resume:
        overrides = resume_overrides(args)
        if args.no_final_samples:
            overrides["sample.final"] = False
        args.run_dir = args.resume
        with graceful.installed():
            return api.resume(args.resume, overrides, progress=not args.no_progress, stop=graceful,
                              from_checkpoint=args.from_checkpoint, clock=clock)
    with clock.phase("resolve"):
        run = resolve_run(args)
    if run.warning and main_process:
        print(f"warning: {run.warning}", file=sys.stderr)
    with clock.phase("plan"):
        planned = api.plan(run)  # every process plans alike (the plan is deterministic)
    if main_process:
        print("\n".join(planned.lines()))
    args.run_dir = planned.config.run.out
    with graceful.installed():
        return api.train(planned, progress=not args.no_progress, stop=graceful, clock=clock)


def _report_end(result: Any, graceful: Any, code: int) -> int:
    """How the run ended, in a line or two (where it stopped and how to resume it); the exit code."""
    if result.status == "stopped":
        from .run_folder import CHECKPOINTS_DIR
        from .train.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(result.run_dir / CHECKPOINTS_DIR)
        cause = f"stopped by {graceful.name}" if graceful.signum else "stopped"
        saved = f"checkpoint {ckpt}" if ckpt else "nothing trained yet, no checkpoint"
        print(f"{cause} at step {result.step}: {saved}; run folder {result.run_dir}")
        if graceful.repeated:
            print(f"a second {graceful.name} came while the checkpoint was written: it was finished, not cut")
        print(f"resume with: {resume_command(result.run_dir)}")
        return code
    print(f"{result.status}: {result.step} steps; run folder {result.run_dir}")
    if graceful.signum:
        print(f"({graceful.name} came after the last step: the run finished)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print exactly the files ``lowvram train`` with the same arguments writes before it trains (the config
    it trains, the plan, each value's source), then the plan in words; exit 2 if training would refuse."""
    from . import api

    run = resolve_run(args)
    if run.warning:
        print(f"warning: {run.warning}", file=sys.stderr)
    planned = api.plan(run, processes=args.processes)
    for name, text in planned.files().items():
        print(f"{PLAN_FILE_MARK}{name}")
        print(text, end="")
    card = run.preset.card
    print(f"\n# preset: {run.preset.name} — {run.preset.description}")
    print(f"# card: {card.name}, {card.vram_gib} GiB, backend {card.backend}")
    print("\n".join(f"# {line}" for line in planned.lines()))
    if planned.refusal is not None:
        print(f"error: lowvram train refuses this config: {planned.refusal[0]} — {planned.refusal[1]}",
              file=sys.stderr)
        return 2
    return 0


def split_plan_output(text: str) -> dict[str, str]:
    """The files in ``lowvram plan``'s output (name -> text), as ``lowvram train`` writes them."""
    files: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        if line.startswith(PLAN_FILE_MARK):
            name = line[len(PLAN_FILE_MARK):].strip()
            files[name] = ""
        elif line.startswith("\n") or line.startswith("# preset:"):
            name = None
        elif name is not None:
            files[name] += line
    return files
