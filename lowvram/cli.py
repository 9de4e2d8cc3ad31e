"""The ``lowvram`` command line: its parser and flags, the table of subcommands and ``main``, which turns every
error into one line; the commands themselves live in ``cli_train.py`` and ``cli_commands.py``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .cli_commands import (
    cmd_cache,
    cmd_doctor,
    cmd_eval,
    cmd_export,
    cmd_presets,
    cmd_profile,
    cmd_sample,
    cmd_ui,
)

# re-exported: tests and tools resolve configs and read plans through ``lowvram.cli``
from .cli_config import add_config_flags, resolve_config, resolve_run, settings_of  # noqa: F401
from .cli_train import PLAN_FILE_MARK, cmd_plan, cmd_train, resume_command, split_plan_output  # noqa: F401
from .config import field_help
from .errors import ConfigError, LowvramError
from .runtime_env import offline_and_quiet


class UsageError(ConfigError):
    """A flag argparse refused (unknown, missing, wrong type): one line, like every other error."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one ``UsageError`` line instead of usage text and ``sys.exit``."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}", f"see `{self.prog} --help`")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "train": (cmd_train, "Train a model (plans against the card's memory first)."),
    "plan": (cmd_plan, "Dry run: print the resolved config and the memory plan, then exit."),
    "sample": (cmd_sample, "Sample images from a run with classifier-free guidance."),
    "eval": (cmd_eval, "Sample every evaluation prompt and report prompt adherence (builtin data)."),
    "doctor": (cmd_doctor, "Report the device, what really works on it, and run a GEMM/conv self-test."),
    "presets": (cmd_presets, "List the card presets and their memory tables."),
    "profile": (cmd_profile, "Profile the memory of the standard workloads (W1-W6) on a card, without a GPU."),
    "ui": (cmd_ui, "Open the training panel in a browser (this machine only unless --host and --auth are given)."),
    "cache": (cmd_cache, "Encode a dataset's latents and captions once through a checkpoint's VAE and text encoder."),
    "export": (cmd_export, "Write a LoRA run's files (kohya for A1111/ComfyUI, diffusers); --merge fuses it into the base model."),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``lowvram`` parser: one subparser per entry of ``COMMANDS``, each with its own flags."""
    parser = Parser(prog="lowvram", description="Train diffusion models on 4-8 GB GPUs.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lowvram {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in COMMANDS.items()}
    _add_train_flags(parsers["train"], parsers["plan"])
    _add_sample_flags(parsers["sample"], parsers["eval"])
    parsers["presets"].add_argument("--markdown", action="store_true", help="Print docs/presets.md (Markdown).")
    parsers["doctor"].add_argument("--json", action="store_true", help="Print the report as JSON.")
    parsers["doctor"].add_argument("--no-self-test", action="store_true", help="Skip the GEMM/conv self-test.")
    add_config_flags(parsers["cache"])
    _add_tool_flags(parsers["ui"], parsers["profile"], parsers["export"])
    return parser


def _add_train_flags(p: argparse.ArgumentParser, plan: argparse.ArgumentParser) -> None:
    """``lowvram train``'s and ``lowvram plan``'s flags: the config's, then resuming, progress and processes."""
    add_config_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="Continue the run in RUN_DIR from its latest checkpoint.")
    p.add_argument("--from-checkpoint", metavar="step-N",
                   help="With --resume: continue from this older checkpoint (e.g. when the newest is damaged); "
                        "the newer ones are set aside as step-N.abandoned.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar (metrics.jsonl is still written).")
    p.add_argument("--no-final-samples", action="store_true", help="Sets sample.final=false: " + field_help("sample.final"))
    p.add_argument("--processes", type=int, metavar="N",
                   help="Train on N processes of this machine (one per GPU; on the CPU, gloo): the effective batch "
                        "is batch_size x grad_accum x N. Several machines: see docs/multi-gpu.md.")

    add_config_flags(plan)
    plan.add_argument("--processes", type=int, metavar="N",
                      help="Plan for N data-parallel processes, one card each (what ZeRO divides by).")


def _add_sample_flags(sample: argparse.ArgumentParser, eval_: argparse.ArgumentParser) -> None:
    """``lowvram sample``'s and ``lowvram eval``'s flags: the run, the sampler, prompts and guidance."""
    for p in (sample, eval_):
        p.add_argument("--run", required=True, help="Run folder (a train --out).")
        p.add_argument("--steps", type=int, default=25, help="Sampling steps.")
        p.add_argument("--sampler", choices=("ddpm", "ddim", "dpm++"), default="ddim", help="Sampler.")
        p.add_argument("--seed", type=int, default=0, help="Seed of the sample noise.")
        p.add_argument("--device", default="cpu", help="Device to sample on (cpu, cuda).")
    sample.add_argument("--prompt", action="append", help="Prompt (repeatable: one grid row each).")
    sample.add_argument("--negative", default="", help="Negative prompt.")
    sample.add_argument("--cfg", type=float, nargs="+", help="Guidance scale(s): one column each (default: the run's sample.guidance).")
    sample.add_argument("--out", help="Output PNG (default: RUN/samples/sample-seedN.png).")
    for p in (sample, eval_):
        p.add_argument("--which", choices=("auto", "final", "latest"), default="auto",
                       help="final model, or the latest checkpoint's EMA weights.")
    eval_.add_argument("--cfg", type=float, help="Guidance scale (default: the run's sample.guidance).")
    eval_.add_argument("--samples", type=int, default=8, help="Samples per prompt.")
    eval_.add_argument("--json", action="store_true", help="Print the report as JSON.")


def _add_tool_flags(ui: argparse.ArgumentParser, profile: argparse.ArgumentParser,
                    export: argparse.ArgumentParser) -> None:
    """The flags of ``lowvram ui``, ``lowvram profile`` and ``lowvram export``."""
    ui.add_argument("--host", default="127.0.0.1",
                    help="Address to listen on; anything but loopback needs --auth or LOWVRAM_UI_AUTH.")
    ui.add_argument("--port", type=int, default=7860, help="Port to listen on.")
    ui.add_argument("--auth", metavar="USER:PASS", help="Require this user and password (default: LOWVRAM_UI_AUTH).")
    ui.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                    help="Start each job as a new process instead of handing it to a spare one that has imported "
                         "the libraries already (saves that spare's host RAM; each Start then waits for the imports).")
    profile.add_argument("--preset", help="Card preset whose budget to plan against.")
    profile.add_argument("--workload", action="append", choices=("W1", "W2", "W3", "W4", "W5", "W6"),
                         help="Standard workload (repeatable; default: all six).")
    profile.add_argument("--vram", type=float, help="Card memory in GiB (instead of a preset's).")
    profile.add_argument("--ram", type=float, help="Host RAM in GiB to check plans against (default: this machine's).")
    profile.add_argument("--json", action="store_true", help="Print JSON: peak_bytes, budget_bytes, fits, lower_bound_bytes, ...")
    profile.add_argument("--update-presets", action="store_true",
                         help="Re-profile W1-W6 (only the --workload ones, if given: the other stored rows are kept) "
                              "with each preset's knobs (only --preset's, if given) and write its memory_profile table.")
    export.add_argument("--run", required=True, help="Run folder of a lora task (a train --out).")
    export.add_argument("--format", choices=("kohya", "diffusers", "both"), default="kohya", help="LoRA file format(s) to write.")
    export.add_argument("--merge", action="store_true",
                        help="Also fuse the LoRA into the base model: a diffusers folder and one .safetensors.")
    export.add_argument("--out", help="Output folder (default: RUN/export).")
    export.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="Weight dtype of the merged model.")


def _interrupted(args: argparse.Namespace | None, e: KeyboardInterrupt) -> int:
    """A stop that saved nothing (a second Ctrl-C, or one before the handlers were in place)."""
    from .train.signals import exit_code

    signum = getattr(e, "signum", 2)
    run_dir = getattr(args, "run_dir", None)
    if run_dir is None or getattr(args, "command", None) != "train":
        print("interrupted: nothing was saved", file=sys.stderr)
        return exit_code(signum)
    from .run_folder import CHECKPOINTS_DIR
    from .train.checkpoint import latest_checkpoint

    try:
        ckpt = latest_checkpoint(Path(run_dir) / CHECKPOINTS_DIR)
    except LowvramError:
        ckpt = None
    kept = f"the newest checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
    print(f"interrupted without saving: {kept}; run folder {run_dir}; resume with: {resume_command(run_dir)}",
          file=sys.stderr)
    return exit_code(signum)


def main(argv: Sequence[str] | None = None) -> int:
    offline_and_quiet()
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(argv) if argv is not None else sys.argv[1:]  # what --processes relaunches
        return COMMANDS[args.command][0](args)
    except LowvramError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        return _interrupted(args, e)
    except Exception as e:  # only storage failures (disk full, read-only) become one line; the rest is a bug
        from .fsutil import storage_error

        err = storage_error(e, getattr(args, "run_dir", None))
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
