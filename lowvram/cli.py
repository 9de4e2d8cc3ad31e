"""``lowvram`` subcommands: each parses its flags and calls one API function; no training logic here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import FINETUNE_TASKS, MODEL_SIZES, TASKS, RunConfig, field_help
from .errors import ConfigError, LowvramError
from .runtime_env import no_compile_while_importing, offline_and_quiet

PLAN_FILE_MARK = "# ==> "  # lowvram plan: the line before each file it prints


class UsageError(ConfigError):
    """A flag argparse refused (unknown, missing, wrong type): one line, like every other error."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one ``UsageError`` line instead of usage text and ``sys.exit``."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}", f"see `{self.prog} --help`")


# ---- config resolution: preset → --config → flags → --set ---------------------------------------
def settings_of(args: argparse.Namespace) -> list[Any]:
    """The flags and ``--set`` items of a command, in order, each naming itself as the source."""
    from .api import Setting, parse_set

    flags = {
        "data.source": getattr(args, "data", None),
        "run.task": getattr(args, "task", None),
        "run.steps": getattr(args, "steps", None),
        "run.out": getattr(args, "out", None),
        "run.seed": getattr(args, "seed", None),
        "run.device": getattr(args, "device", None),
        "memory.vram_gib": getattr(args, "vram", None),
        "memory.ram_gib": getattr(args, "ram", None),
        "model.tokenizer": getattr(args, "tokenizer", None),
    }
    model = getattr(args, "model", None)
    if model is not None:
        flags["model.size" if model in MODEL_SIZES else "model.pretrained"] = model
    if getattr(args, "force", False):
        flags["memory.force"] = True
    if getattr(args, "allow_pickle", False):
        flags["model.allow_pickle"] = True
    names = {"model.size": "--model", "model.pretrained": "--model", "memory.vram_gib": "--vram",
             "data.source": "--data", "memory.force": "--force", "model.allow_pickle": "--allow-pickle"}
    out = [Setting(key, value, names.get(key, "--" + key.split(".")[1].replace("_", "-")))
           for key, value in flags.items() if value is not None]
    if getattr(args, "no_final_samples", False):
        out.append(Setting("sample.final", False, "--no-final-samples"))
    return out + [parse_set(item) for item in getattr(args, "set", None) or []]


def resolve_run(args: argparse.Namespace, check_paths: bool = True) -> Any:
    """The front door's ``resolve`` for a command's --preset, --config, flags and --set; with
    ``check_paths`` its inputs must exist and its run folder be writable (nothing is written here)."""
    from .api import resolve
    from .validate import check_config_flags, check_config_paths

    check_config_flags(args)
    run = resolve(getattr(args, "preset", None), config_file=getattr(args, "config", None), settings=settings_of(args))
    if check_paths:
        check_config_paths(run.config, lambda key: run.sources.get(key, "default"))
    return run


def resolve_run_with(args: argparse.Namespace, extra: list[Any]) -> RunConfig:
    """The command's config with ``extra`` settings after its own (what a command itself decides)."""
    from .api import resolve

    return resolve(getattr(args, "preset", None), config_file=getattr(args, "config", None),
                   settings=settings_of(args) + extra).config


def resolve_config(args: argparse.Namespace, check_paths: bool = True) -> tuple[RunConfig, Any, str | None]:
    """Build the RunConfig from the layers, each remembered as the source of its values."""
    run = resolve_run(args, check_paths)
    return run.config, run.preset, run.warning


# flags that name a new run's inputs: a resumed run keeps its own (config.yaml in the run folder)
FIXED_ON_RESUME = ("preset", "config", "data", "model", "task", "out", "seed", "vram", "tokenizer", "force",
                   "allow_pickle")
# config fields a resume cannot change without breaking the run (its data order, weights, optimizer state)
FIXED_FIELDS_ON_RESUME = ("run.out", "run.seed", "run.task", "data.", "model.", "lora.", "train.batch_size",
                          "train.grad_accum", "train.optimizer", "train.ema_decay", "memory.fused_backward")
CHANGEABLE_ON_RESUME = ("data.workers", "data.cache_dir")  # how data is read, not which data


def resume_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What ``--resume`` may change (``--steps``, ``--device``, ``--set`` of the other fields); refuse
    the rest by name rather than ignore it."""
    for name in FIXED_ON_RESUME:
        value = getattr(args, name, None)
        if value not in (None, False):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{flag} {value!r} cannot be used with --resume: the run continues with the settings in "
                f"{Path(args.resume) / 'config.yaml'}",
                f"drop {flag} (with --resume only --steps, --device and --set of training settings apply), "
                "or start a new run with another --out")
    overrides: dict[str, Any] = {}
    if args.steps is not None:
        overrides["run.steps"] = args.steps
    if args.device is not None:
        overrides["run.device"] = args.device
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise LowvramError(f"--set '{item}' must be written section.key=value", "e.g. --set train.lr=1e-4")
        key = key.strip()
        if key.startswith(FIXED_FIELDS_ON_RESUME) and key not in CHANGEABLE_ON_RESUME:
            raise ConfigError(f"--set {item}: {key} cannot change when a run is resumed (its checkpoints depend on it)",
                              "start a new run with another --out to change it")
        overrides[key] = value.strip()
    return overrides


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="Card preset (see `lowvram presets`); default: picked from the detected hardware.")
    p.add_argument("--config", help="YAML config file (e.g. a run's config.yaml) applied over the preset.")
    p.add_argument("--data", help=field_help("data.source"))
    p.add_argument("--model", help=f"Model size ({', '.join(MODEL_SIZES)}) or a local pretrained checkpoint path.")
    p.add_argument("--task", choices=TASKS, help=field_help("run.task"))
    p.add_argument("--steps", type=int, help=field_help("run.steps"))
    p.add_argument("--out", help=field_help("run.out"))
    p.add_argument("--seed", type=int, help=field_help("run.seed"))
    p.add_argument("--device", help=field_help("run.device"))
    p.add_argument("--vram", type=float, help=field_help("memory.vram_gib"))
    p.add_argument("--ram", type=float, help=field_help("memory.ram_gib"))
    p.add_argument("--allow-pickle", action="store_true", help=field_help("model.allow_pickle"))
    p.add_argument("--tokenizer", help=field_help("model.tokenizer"))
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="Override any config field, e.g. --set train.lr=1e-4 (repeatable).")


# ---- subcommands ---------------------------------------------------------------------------------
def resume_command(run_dir: str | Path) -> str:
    return f"lowvram train --resume {run_dir}"


def cmd_train(args: argparse.Namespace) -> int:
    from .train.phases import PhaseClock, summary_lines
    from .train.signals import GracefulStop, exit_code
    from .validate import check_config_flags, check_device, check_run_dir

    clock = PhaseClock(since_process_start=True)  # the account starts when the process did
    if args.from_checkpoint is not None and args.resume is None:
        raise ConfigError("--from-checkpoint needs --resume RUN", "e.g. lowvram train --resume RUN --from-checkpoint step-00000400")
    if args.resume is not None:
        check_run_dir("--resume", args.resume)
        check_config_flags(args)
        check_device("--device", args.device)
    if args.processes is not None and args.processes > 1:
        import torch

        from .distributed import relaunch

        check_config_flags(args)
        # this process only launches the N training processes and passes on their exit code
        return relaunch(args.processes, args.argv, cpu=args.device == "cpu" or not torch.cuda.is_available())
    with clock.phase("imports"), no_compile_while_importing():  # torch, diffusers: seconds before anything else
        from .distributed import launched, launched_as_main
        from .train import run as _training  # noqa: F401
    from . import api

    main_process = launched_as_main()
    if not main_process:
        # one voice: the other processes' progress lines (data, caches) would repeat the main one's;
        # errors still reach stderr from every process
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — lives as long as the process
    # under a launcher each process gets the launcher's one forwarded signal; repeats are the launcher's job
    graceful = GracefulStop(ignore_repeats=launched(), announce=main_process)
    if args.resume:
        overrides = resume_overrides(args)
        if args.no_final_samples:
            overrides["sample.final"] = False
        args.run_dir = args.resume
        with graceful.installed():
            result = api.resume(args.resume, overrides, progress=not args.no_progress, stop=graceful,
                                from_checkpoint=args.from_checkpoint, clock=clock)
    else:
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
            result = api.train(planned, progress=not args.no_progress, stop=graceful, clock=clock)
    code = exit_code(graceful.signum) if graceful.signum and result.status == "stopped" else 0
    if not main_process:
        return code
    if result.phases:
        print("\n".join(summary_lines(result.phases)))
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


def cmd_sample(args: argparse.Namespace) -> int:
    from .run_folder import load_run_config
    from .runs import load_run_model
    from .sample import make_grid
    from .validate import check_sample_args

    check_sample_args(args)

    saved = load_run_config(args.run).sample
    rescale = saved.guidance_rescale
    args.cfg = args.cfg or [saved.guidance]
    model = load_run_model(args.run, device=args.device, which=args.which)
    prompts = args.prompt or ["a red circle on a white background"]
    columns = [model.generate(prompts, cfg_scale=w, steps=args.steps, sampler=args.sampler, seed=args.seed,
                              negative_prompt=args.negative, guidance_rescale=rescale) for w in args.cfg]
    import torch

    grid = make_grid(torch.stack(columns, 1).flatten(0, 1), nrow=len(args.cfg))
    out = Path(args.out or Path(args.run) / "samples" / f"sample-seed{args.seed}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    from .fsutil import atomic_write

    image_format = "JPEG" if out.suffix.lower() in (".jpg", ".jpeg") else out.suffix[1:].upper()
    atomic_write(out, lambda tmp: grid.save(tmp, format=image_format))
    print(f"wrote {out} ({len(prompts)} prompts x guidance {', '.join(map(str, args.cfg))})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate_run import evaluate_run
    from .validate import check_sample_args

    check_sample_args(args)

    report = evaluate_run(args.run, samples_per_prompt=args.samples, cfg_scale=args.cfg, steps=args.steps,
                          sampler=args.sampler, seed=args.seed, device=args.device, which=args.which)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"prompt adherence: {report['overall']:.1%} over {report['samples']} samples "
              f"(guidance {report['cfg_scale']}, {args.sampler} {args.steps} steps, seed {args.seed})")
        for name, acc in report.get("per_attribute", {}).items():
            print(f"  {name:<12} {acc:.1%}")
        print(f"written to {Path(args.run) / 'eval.json'}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .hardware import doctor

    text, code = doctor(as_json=args.json, with_self_test=not args.no_self_test)
    print(text)
    return code


def cmd_cache(args: argparse.Namespace) -> int:
    from .api import Setting
    from .train.finetune import train_finetune
    from .train.setup import resolve_device

    run = resolve_run(args, check_paths=False)  # the config as asked, then what caching itself decides
    if not run.config.model.pretrained or run.config.data.source == "builtin":
        raise ConfigError("lowvram cache needs a checkpoint (--model PATH) and a folder of images (--data DIR)",
                          "e.g. lowvram cache --model sd15.safetensors --data my_images")
    task = [] if run.config.run.task in FINETUNE_TASKS else \
        [Setting("run.task", "lora", "lowvram cache (the pretrained VAE and text encoder of a fine-tune)")]
    # no training batches are drawn, so any dataset size can be cached
    one = [Setting("train.batch_size", 1, "lowvram cache (encodes one image at a time)")]
    cfg = resolve_run_with(args, task + one)
    from .validate import check_config_paths

    check_config_paths(cfg, lambda key: "flags")
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    train_finetune(cfg, out, resolve_device(cfg.run.device), lambda event: None, cache_only=True)
    print(f"cache ready; data report in {out / 'data_report.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_cli
    from .validate import check_export_args

    check_export_args(args)

    for path in export_cli(args.run, args.format, args.merge, args.out, args.dtype):
        print(f"wrote {path}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .memory.report import profile_command
    from .validate import check_profile_args

    check_profile_args(args)

    print(profile_command(args.preset, args.workload, args.vram, args.json, args.update_presets, ram_gib=args.ram))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from .validate import check_ui_args
    from .webui.auth import resolve_auth

    check_ui_args(args)
    resolve_auth(args.host, args.auth)  # refuse a reachable panel without a password before loading Gradio
    from .webui.app import serve

    serve(host=args.host, port=args.port, auth=args.auth)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import presets_markdown, presets_table

    print(presets_markdown() if args.markdown else presets_table())
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "train": (cmd_train, "Train a model (plans against the card's memory first)."),
    "plan": (cmd_plan, "Dry run: print the resolved config and the memory plan, then exit."),
    "sample": (cmd_sample, "Sample images from a run with classifier-free guidance."),
    "eval": (cmd_eval, "Sample every evaluation prompt and report prompt adherence (builtin data)."),
    "doctor": (cmd_doctor, "Report the device, what really works on it, and run a GEMM/conv self-test."),
    "presets": (cmd_presets, "List the card presets and their memory tables."),
    "profile": (cmd_profile, "Profile the memory of the standard workloads (W1-W4) on a card, without a GPU."),
    "ui": (cmd_ui, "Open the training panel in a browser (this machine only unless --host and --auth are given)."),
    "cache": (cmd_cache, "Encode a dataset's latents and captions once through a checkpoint's VAE and text encoder."),
    "export": (cmd_export, "Write a LoRA run's files (kohya for A1111/ComfyUI, diffusers); --merge fuses it into the base model."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lowvram", description="Train diffusion models on 4-8 GB GPUs.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lowvram {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in COMMANDS.items()}

    p = parsers["train"]
    _add_config_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="Continue the run in RUN_DIR from its latest checkpoint.")
    p.add_argument("--from-checkpoint", metavar="step-N",
                   help="With --resume: continue from this older checkpoint (e.g. when the newest is damaged); "
                        "the newer ones are set aside as step-N.abandoned.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar (metrics.jsonl is still written).")
    p.add_argument("--no-final-samples", action="store_true", help="Sets sample.final=false: " + field_help("sample.final"))
    p.add_argument("--processes", type=int, metavar="N",
                   help="Train on N processes of this machine (one per GPU; on the CPU, gloo): the effective batch "
                        "is batch_size x grad_accum x N. Several machines: see docs/multi-gpu.md.")

    _add_config_flags(parsers["plan"])
    parsers["plan"].add_argument("--processes", type=int, metavar="N",
                                 help="Plan for N data-parallel processes, one card each (what ZeRO divides by).")

    for name in ("sample", "eval"):
        p = parsers[name]
        p.add_argument("--run", required=True, help="Run folder (a train --out).")
        p.add_argument("--steps", type=int, default=25, help="Sampling steps.")
        p.add_argument("--sampler", choices=("ddpm", "ddim", "dpm++"), default="ddim", help="Sampler.")
        p.add_argument("--seed", type=int, default=0, help="Seed of the sample noise.")
        p.add_argument("--device", default="cpu", help="Device to sample on (cpu, cuda).")
    parsers["sample"].add_argument("--prompt", action="append", help="Prompt (repeatable: one grid row each).")
    parsers["sample"].add_argument("--negative", default="", help="Negative prompt.")
    parsers["sample"].add_argument("--cfg", type=float, nargs="+", help="Guidance scale(s): one column each (default: the run's sample.guidance).")
    parsers["sample"].add_argument("--out", help="Output PNG (default: RUN/samples/sample-seedN.png).")
    for name in ("sample", "eval"):
        parsers[name].add_argument("--which", choices=("auto", "final", "latest"), default="auto",
                                   help="final model, or the latest checkpoint's EMA weights.")
    parsers["eval"].add_argument("--cfg", type=float, help="Guidance scale (default: the run's sample.guidance).")
    parsers["eval"].add_argument("--samples", type=int, default=8, help="Samples per prompt.")
    parsers["eval"].add_argument("--json", action="store_true", help="Print the report as JSON.")
    parsers["presets"].add_argument("--markdown", action="store_true", help="Print docs/presets.md (Markdown).")
    parsers["doctor"].add_argument("--json", action="store_true", help="Print the report as JSON.")
    parsers["doctor"].add_argument("--no-self-test", action="store_true", help="Skip the GEMM/conv self-test.")
    _add_config_flags(parsers["cache"])
    p = parsers["ui"]
    p.add_argument("--host", default="127.0.0.1",
                   help="Address to listen on; anything but loopback needs --auth or LOWVRAM_UI_AUTH.")
    p.add_argument("--port", type=int, default=7860, help="Port to listen on.")
    p.add_argument("--auth", metavar="USER:PASS", help="Require this user and password (default: LOWVRAM_UI_AUTH).")
    p = parsers["profile"]
    p.add_argument("--preset", help="Card preset whose budget to plan against.")
    p.add_argument("--workload", action="append", choices=("W1", "W2", "W3", "W4", "W5", "W6"),
                   help="Standard workload (repeatable; default: all six).")
    p.add_argument("--vram", type=float, help="Card memory in GiB (instead of a preset's).")
    p.add_argument("--ram", type=float, help="Host RAM in GiB to check plans against (default: this machine's).")
    p.add_argument("--json", action="store_true", help="Print JSON: peak_bytes, budget_bytes, fits, lower_bound_bytes, ...")
    p.add_argument("--update-presets", action="store_true",
                   help="Re-profile W1-W6 (only the --workload ones, if given: the other stored rows are kept) "
                        "with each preset's knobs (only --preset's, if given) and write its memory_profile table.")
    p = parsers["export"]
    p.add_argument("--run", required=True, help="Run folder of a lora task (a train --out).")
    p.add_argument("--format", choices=("kohya", "diffusers", "both"), default="kohya", help="LoRA file format(s) to write.")
    p.add_argument("--merge", action="store_true",
                   help="Also fuse the LoRA into the base model: a diffusers folder and one .safetensors.")
    p.add_argument("--out", help="Output folder (default: RUN/export).")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="Weight dtype of the merged model.")
    return parser


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
