"""The checks at the edge: every flag and path a command gets, before any work starts.

Config values are checked by ``config.validate`` (types, ranges, finiteness, each with its source);
what needs the file system or the machine is checked here: path kinds and writability, output
extensions and name lengths, devices, ports. Each problem is one ``LowvramError`` line naming the flag
or field, the value, where it came from and the fix. Nothing here writes anything.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, LowvramError

NAME_MAX = 255  # bytes of one path component on Linux, macOS and Windows file systems
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
MAX_SAMPLE_STEPS = 1000
MAX_SAMPLES = 1024
MAX_PROMPTS = 64
SEED_MAX = 2**32 - 1


def read_regular_file(path: Path, what: str, max_bytes: int, error: type[LowvramError] = LowvramError) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes`` (never a FIFO or device)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist", "check the path") from None
    except OSError as e:
        raise error(f"{what} '{path}' cannot be read: {e.strerror}", "check the path and its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe or device)"
        raise error(f"{what} '{path}' is {kind}", "give the path of a file")
    if st.st_size > max_bytes:
        raise error(f"{what} '{path}' is {st.st_size} bytes, more than the {max_bytes} a {what} can be",
                    "check that this is the right file")
    try:
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)[:max_bytes]
    except OSError as e:
        raise error(f"{what} '{path}' cannot be read: {e.strerror}", "check the file's permissions") from None


def _bad(flag: str, value: Any, problem: str, fix: str, error: type[LowvramError] = ConfigError) -> LowvramError:
    return error(f"{flag} {value!r}: {problem}", fix)


# ---- single values ------------------------------------------------------------------------------------
def check_text(flag: str, value: str | None, *, limit: int = 4096) -> None:
    if value is not None and (not value.strip() or len(value) > limit or "\x00" in value):
        raise _bad(flag, value[:60], "is empty" if not value.strip() else "is not a usable value",
                   f"give {flag} a value (at most {limit} characters)")


def check_number(flag: str, value: float | None, low: float, high: float, *, low_open: bool = False) -> None:
    """``value`` finite and within [low, high] (``low_open``: above low)."""
    if value is None:
        return
    ok = math.isfinite(value) and value <= high and (value > low if low_open else value >= low)
    if not ok:
        above = f"above {low:g}" if low_open else f"from {low:g}"
        raise _bad(flag, value, f"expected a number {above} to {high:g}", f"pass {flag} within that range")


def check_name_lengths(flag: str, path: Path) -> None:
    for part in path.parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise _bad(flag, str(path)[:60] + "...", f"has a name longer than {NAME_MAX} bytes",
                       "choose a shorter name")


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(flag: str, value: str | None, source: str = "") -> None:
    """A folder we will create or write into: not empty, not a file, names not too long, writable."""
    if value is None:
        return
    where = f" (from {source})" if source else ""
    if not str(value).strip():
        raise ConfigError(f"{flag} is empty{where}", f"give {flag} a folder, e.g. runs/first")
    path = Path(value).expanduser()
    check_name_lengths(flag, path)
    if path.exists() and not path.is_dir():
        raise _bad(flag, value, f"exists and is not a folder{where}", "choose a folder path")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise _bad(flag, value, f"lies under '{base}', which is not a folder{where}", "choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise _bad(flag, value, f"cannot be written: '{base}' is read-only for this user{where}",
                   "choose a folder you can write to")


def check_output_file(flag: str, value: str | None, extensions: Sequence[str]) -> None:
    """A file we will write: a known extension, not a folder, names not too long, writable folder."""
    if value is None:
        return
    check_text(flag, value)
    path = Path(value).expanduser()
    check_name_lengths(flag, path)  # first: the file system refuses to even look at an overlong name
    if path.suffix.lower() not in extensions:
        raise _bad(flag, value, f"needs one of the extensions {', '.join(extensions)}", f"e.g. {flag} out{extensions[0]}")
    if path.is_dir():
        raise _bad(flag, value, "is a folder", f"give a file name ending in {extensions[0]}")
    if path.exists() and not path.is_file():
        raise _bad(flag, value, "exists and is not a regular file", "choose another name")
    check_output_dir(flag, str(path.parent) if str(path.parent) else ".")


def check_existing_path(flag: str, value: str | None, *, kind: str = "any", source: str = "") -> None:
    """A path we will read: exists; ``kind`` 'dir' or 'file' when it must be one (a file: regular)."""
    if value is None:
        return
    where = f" (from {source})" if source else ""
    if not str(value).strip():
        raise ConfigError(f"{flag} is empty{where}", f"give {flag} a path")
    path = Path(value).expanduser()
    if len(str(value)) > 4096:
        raise _bad(flag, str(value)[:60] + "...", f"is too long{where}", "check the path")
    check_name_lengths(flag, path)
    if not path.exists():
        raise _bad(flag, value, f"does not exist{where}", "check the path (models and data load from local paths only)")
    if kind == "dir" and not path.is_dir():
        raise _bad(flag, value, f"is not a folder{where}", "give a folder")
    if kind == "file" and not path.is_file():
        raise _bad(flag, value, f"is not a regular file{where}", "give a file")
    if path.is_file() is False and path.is_dir() is False:
        raise _bad(flag, value, f"is neither a file nor a folder (a pipe or device){where}", "give a file or folder")


def check_device(flag: str, value: str | None) -> None:
    """``cpu``, ``auto``, ``cuda``/``cuda:N`` or ``mps``, and only if this machine has it."""
    if value is None:
        return
    import torch

    text = str(value).strip().lower()
    if text in ("cpu", "auto"):
        return
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(text[5:]) if ":" in text else 0
        if index >= count:
            have = f"{count} GPU(s)" if count else "no GPU"
            raise _bad(flag, value, f"torch sees {have} here", "use --device cpu, or run `lowvram doctor`")
        return
    if text == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise _bad(flag, value, "Apple's MPS is not available on this machine", "use --device cpu")
        return
    raise _bad(flag, value, "is not a device", "use cpu, cuda, cuda:N or mps")


def check_run_dir(flag: str, value: str | None) -> Path:
    """An existing lowvram run folder (a train --out with its config.yaml)."""
    if value is None or not str(value).strip():
        raise CheckpointError(f"{flag} is empty", f"give {flag} a run folder (a train --out)")
    path = Path(value).expanduser()
    check_name_lengths(flag, path)
    if not path.is_dir():
        raise CheckpointError(f"{flag} '{value}' is not a folder", "give a run folder (a train --out)")
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"'{value}' is not a lowvram run folder (no config.yaml)",
                              "point --run/--resume at a run's --out folder")
    return path


# ---- whole commands -----------------------------------------------------------------------------------
def check_config_paths(cfg: Any, source_of: Any) -> None:
    """The paths of a resolved config: data and model inputs exist, the run folder can be written."""
    from .config import FINETUNE_TASKS  # here, not at the top: config calls into this module

    def src(key: str) -> str:
        return source_of(key)

    check_output_dir("run.out", cfg.run.out, src("run.out"))
    if cfg.data.source != "builtin":
        check_existing_path("data.source", cfg.data.source, kind="dir", source=src("data.source"))
    for key in ("model.pretrained", "model.tokenizer", "model.vae", "model.text_encoder", "model.config", "model.clip",
                "model.t5", "model.t5_tokenizer"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value:
            check_existing_path(key, value, source=src(key))
    if cfg.data.class_data and cfg.data.num_class_images:  # the run draws class images into it, creating it
        check_output_dir("data.class_data", cfg.data.class_data, src("data.class_data"))
    elif cfg.data.class_data:
        check_existing_path("data.class_data", cfg.data.class_data, kind="dir", source=src("data.class_data"))
    if cfg.run.task not in FINETUNE_TASKS and cfg.model.pretrained:
        raise ConfigError(
            f"model.pretrained = {cfg.model.pretrained!r} (from {src('model.pretrained')}) is a checkpoint, "
            f"but the task is '{cfg.run.task}' (from {src('run.task')}), which trains from scratch",
            "add --task lora (or --task full) to fine-tune it, or pass a model size (tiny, celeba64, ddpm64)")
    check_device("run.device", cfg.run.device if cfg.run.device != "auto" else None)


def check_config_flags(args: Any) -> None:
    """Flags of train/plan/cache that are not config fields, or need a check before layering."""
    for flag in ("preset", "config", "data", "model", "out", "tokenizer"):
        value = getattr(args, flag, None)
        if value is not None:
            check_text(f"--{flag}", value)
    if getattr(args, "config", None) is not None:
        check_existing_path("--config", args.config, kind="file")
    model = getattr(args, "model", None)
    if model is not None:
        from .config import MODEL_SIZES

        if model not in MODEL_SIZES:
            looks_like_path = os.sep in model or Path(model).suffix.lower() in CHECKPOINT_SUFFIXES
            if not looks_like_path and not Path(model).exists():
                raise _bad("--model", model, f"is neither a model size ({', '.join(MODEL_SIZES)}) nor an existing path",
                           "pass a size, or the path of a local checkpoint (file or diffusers folder)")
    check_number("--vram", getattr(args, "vram", None), 0, 4096, low_open=True)
    processes = getattr(args, "processes", None)
    if processes is not None and not 1 <= processes <= 1024:
        raise _bad("--processes", processes, "expected 1 to 1024 processes", "e.g. --processes 2")


def check_sample_args(args: Any) -> None:
    """sample / eval: the run folder, sampling settings, the device and the output file."""
    from .run_folder import load_run_config

    check_run_dir("--run", args.run)
    cfg = load_run_config(args.run)  # a damaged config.yaml is refused here, before any model loads
    most = min(MAX_SAMPLE_STEPS, cfg.model.timesteps)
    if not 1 <= args.steps <= most:
        raise _bad("--steps", args.steps, f"expected 1 to {most} sampling steps (the model has {cfg.model.timesteps} "
                   "timesteps)", "e.g. --steps 25")
    if not 0 <= args.seed <= SEED_MAX:
        raise _bad("--seed", args.seed, f"expected a seed from 0 to {SEED_MAX}", "e.g. --seed 0")
    scales = args.cfg if isinstance(args.cfg, list) else [args.cfg]
    for w in scales:
        check_number("--cfg", w, 0, 100)
    if isinstance(args.cfg, list) and len(args.cfg) > MAX_PROMPTS:
        raise _bad("--cfg", f"{len(args.cfg)} scales", f"at most {MAX_PROMPTS} guidance scales", "give fewer")
    check_device("--device", args.device)
    samples = getattr(args, "samples", None)
    if samples is not None and not 1 <= samples <= MAX_SAMPLES:
        raise _bad("--samples", samples, f"expected 1 to {MAX_SAMPLES} samples per prompt", "e.g. --samples 8")
    prompts = getattr(args, "prompt", None) or []
    if len(prompts) > MAX_PROMPTS:
        raise _bad("--prompt", f"{len(prompts)} prompts", f"at most {MAX_PROMPTS} prompts", "give fewer")
    for p in prompts:
        if len(p) > 4096 or "\x00" in p:
            raise _bad("--prompt", p[:60], "is not a usable prompt (too long or with a NUL)", "shorten it")
    negative = getattr(args, "negative", None)
    if negative is not None and (len(negative) > 4096 or "\x00" in negative):
        raise _bad("--negative", negative[:60], "is not a usable prompt", "shorten it")
    if getattr(args, "out", None) is not None:
        check_output_file("--out", args.out, IMAGE_EXTENSIONS)
    elif hasattr(args, "samples"):
        check_writable_run("--run", Path(args.run), "eval.json and metrics.jsonl")
    else:
        check_writable_run("--run", Path(args.run), "samples/")


def check_writable_run(flag: str, run: Path, what: str) -> None:
    if not os.access(run, os.W_OK | os.X_OK):
        raise _bad(flag, str(run), f"is read-only for this user (lowvram writes {what} into it)",
                   "copy the run folder somewhere writable")


def check_export_args(args: Any) -> None:
    check_run_dir("--run", args.run)
    if args.out is not None:
        check_output_dir("--out", args.out)
    else:
        check_writable_run("--run", Path(args.run), "export/")


def check_profile_args(args: Any) -> None:
    check_text("--preset", args.preset)
    check_number("--vram", args.vram, 0, 4096, low_open=True)


def check_ui_args(args: Any) -> None:
    """A port we can listen on and an address this machine has (checked by binding it for a moment)."""
    import errno
    import socket

    if not 1 <= args.port <= 65535:
        raise _bad("--port", args.port, "expected a port from 1 to 65535", "e.g. --port 7860")
    check_text("--host", args.host, limit=255)
    try:
        infos = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise _bad("--host", args.host, "is not an address or host name this machine can resolve",
                   "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface, with --auth)") from None
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        try:
            s.bind((address[0], 0))  # port 0: the address alone is checked, the port is tried by the panel
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise _bad("--host", args.host, "is not an address of this machine",
                           "use 127.0.0.1, 0.0.0.0, or one of this machine's addresses") from None
            raise _bad("--host", args.host, f"cannot be listened on: {e.strerror}", "choose another address") from None
