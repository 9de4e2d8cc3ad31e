"""The commands that work on a finished run, a dataset or the machine: sample, eval, doctor, cache, export,
profile, ui and presets; each checks its flags and calls one function."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_config import resolve_run, resolve_run_with
from .config import FINETUNE_TASKS
from .errors import ConfigError


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
    from .train.events import print_notes
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
    train_finetune(cfg, out, resolve_device(cfg.run.device), print_notes, cache_only=True)  # the caches' counts
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

    serve(host=args.host, port=args.port, auth=args.auth, warm_start=args.warm_start)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .preset_tables import presets_markdown, presets_table

    print(presets_markdown() if args.markdown else presets_table())
    return 0
