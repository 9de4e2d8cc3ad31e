"""A corpus of bad `lowvram` invocations: every subcommand, every flag, every config field, hostile files
and damaged run folders. Each case must be refused: exit 2, one line on stderr, no traceback, nothing written.

``corpus(ws)`` builds the whole corpus deterministically; ``Workspace`` makes the files the cases point at
(a trained tiny run, damaged copies of it, hostile YAML, pipes and devices). Cases are generated from the
config's own field table (types, choices, bounds), so a new field is fuzzed without touching this file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from lowvram.config import UPPER_BOUNDS, all_fields

CONFIG_COMMANDS = ("train", "plan", "cache")
SAMPLE_COMMANDS = ("sample", "eval")
LONG_NAME = "n" * 300


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]


class Workspace:
    """The files the cases name, all under ``root``; damaged runs are copies of the ``good`` run."""

    def __init__(self, root: Path, good_run: Path) -> None:
        self.root = root
        self.good = good_run
        self._made: dict[str, Path] = {}

    def path(self, name: str) -> str:
        return str(self.root / name)

    # -- hostile files --------------------------------------------------------------------------
    def file(self, name: str, make: Callable[[Path], None]) -> str:
        if name not in self._made:
            p = self.root / "files" / name
            p.parent.mkdir(parents=True, exist_ok=True)
            make(p)
            self._made[name] = p
        return str(self._made[name])

    def text(self, name: str, text: str) -> str:
        return self.file(name, lambda p: p.write_text(text))

    def fifo(self, name: str = "pipe.yaml") -> str:
        return self.file(name, lambda p: os.mkfifo(p))

    def device(self, name: str = "zero.yaml") -> str:
        return self.file(name, lambda p: p.symlink_to("/dev/zero"))

    def hostile_yaml(self) -> dict[str, str]:
        bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"]
        for i in range(1, 9):
            bomb.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]")
        deep = "run: " + "[" * 500 + "]" * 500
        return {
            "alias-bomb": self.text("bomb.yaml", "\n".join(bomb) + "\n"),
            "deep-nesting": self.text("deep.yaml", deep + "\n"),
            "not-a-mapping": self.text("list.yaml", "- 1\n- 2\n"),
            "bad-syntax": self.text("syntax.yaml", "run: {steps: [1, 2\n"),
            "python-tag": self.text("tag.yaml", "run: !!python/object/apply:os.system ['true']\n"),
            "unknown-section": self.text("section.yaml", "trian:\n  lr: 1e-4\n"),
            "wrong-type": self.text("type.yaml", "train:\n  lr: [1, 2]\n"),
            "binary": self.file("binary.yaml", lambda p: p.write_bytes(bytes(range(256)) * 4)),
            "huge": self.file("huge.yaml", lambda p: p.write_bytes(b"#" * (2 << 20))),
            "fifo": self.fifo(),
            "device": self.device(),
            "folder": str((self.root / "files").resolve()),
            "empty-name": "",
            "missing": self.path("missing.yaml"),
        }

    # -- damaged run folders --------------------------------------------------------------------
    def run(self, kind: str) -> str:
        """A copy of the good run with one kind of damage (see ``DAMAGE``)."""
        if kind not in self._made:
            dest = self.root / "runs" / kind
            shutil.copytree(self.good, dest, symlinks=True)
            DAMAGE[kind](dest)
            self._made[kind] = dest
        return str(self._made[kind])


def _newest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*"))[-1]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero(path: Path) -> None:
    path.write_bytes(b"\0" * path.stat().st_size)


def _rm(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _no_final(run: Path) -> None:
    _rm(run / "final")


def _both(*fs: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        for f in fs:
            f(run)
    return apply


# damage that makes both the final model and the resume point unusable (sample, eval, resume all refuse)
DAMAGE: dict[str, Callable[[Path], None]] = {
    "config-missing": lambda r: (r / "config.yaml").unlink(),
    "config-bad-yaml": lambda r: (r / "config.yaml").write_text("run: {steps: [\n"),
    "config-alias-bomb": lambda r: (r / "config.yaml").write_text(
        "a: &a [x, x, x, x, x, x, x, x]\n" + "".join(
            f"{c}: &{c} [{', '.join([f'*{p}'] * 8)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))),
    "config-fifo": lambda r: ((r / "config.yaml").unlink(), os.mkfifo(r / "config.yaml")),
    "config-bad-value": lambda r: (r / "config.yaml").write_text(
        (r / "config.yaml").read_text().replace("steps: ", "steps: -", 1)),
    "final-json-zeroed+ckpt-state-zeroed": _both(lambda r: _zero(r / "final" / "lowvram_model.json"),
                                                 lambda r: _zero(_newest(r) / "state.json")),
    "final-json-bad+ckpt-rng-missing": _both(lambda r: (r / "final" / "lowvram_model.json").write_text("{"),
                                             lambda r: (_newest(r) / "rng.safetensors").unlink()),
    "final-unet-truncated+ckpt-model-truncated": _both(
        lambda r: _truncate(r / "final" / "unet" / "diffusion_pytorch_model.safetensors"),
        lambda r: _truncate(_newest(r) / "model.safetensors")),
    "final-unet-zeroed+ckpt-model-zeroed": _both(
        lambda r: _zero(r / "final" / "unet" / "diffusion_pytorch_model.safetensors"),
        lambda r: _zero(_newest(r) / "model.safetensors")),
    "final-unet-missing+ckpt-state-incomplete": _both(
        lambda r: _rm(r / "final" / "unet"),
        lambda r: (_newest(r) / "state.json").write_text(json.dumps({"step": 4}))),
    "final-wrong-family+ckpt-state-bad-json": _both(
        lambda r: (r / "final" / "unet" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL",
                                                                                 "in_channels": 3})),
        lambda r: (_newest(r) / "state.json").write_text("{not json")),
    "final-shape-mismatch+ckpt-ema-missing": _both(
        lambda r: (r / "final" / "lowvram_model.json").write_text(json.dumps({"sample_shape": [7, 5, 5]})),
        lambda r: (_newest(r) / "ema.safetensors").unlink()),
    "no-final+tokenizer-missing": _both(_no_final, lambda r: _rm(r / "tokenizer")),
    "no-final+stray-checkpoints-only": _both(
        _no_final, lambda r: [_rm(p) for p in (r / "checkpoints").iterdir()],
        lambda r: (r / "checkpoints" / "step-abc").mkdir(),
        lambda r: shutil.copytree(r / "tokenizer", r / "checkpoints" / "step-00000400.bak")),
    "no-final+ckpt-optimizer-missing": _both(_no_final, lambda r: (_newest(r) / "optimizer.safetensors").unlink()),
    "scheduler-missing+ckpt-folder-is-file": _both(
        lambda r: _rm(r / "final" / "scheduler"),
        lambda r: [_rm(p) for p in (r / "checkpoints").iterdir()],
        lambda r: (r / "checkpoints" / "step-00000004").write_text("not a folder")),
}


# ---- bad values -------------------------------------------------------------------------------------
BAD_INT = ["abc", "1.5", "nan", "inf", "", "9" * 30, "0x10", "1e400"]
BAD_FLOAT = ["nan", "inf", "-inf", "abc", "1e400", ""]
BAD_BOOL = ["maybe", "2", "yes please", ""]
POSITIVE = {"run.steps", "train.batch_size", "train.grad_accum", "model.timesteps", "data.resolution", "sample.steps",
            "lora.rank", "memory.attention_chunk", "data.num_images", "train.autoencoder_steps", "data.bucket_step",
            "data.max_pixels", "run.log_every", "data.min_size", "lora.alpha", "run.max_nonfinite", "train.lr",
            "train.autoencoder_lr", "memory.vram_gib"}
NON_NEGATIVE = {"run.checkpoint_every", "run.sample_every", "run.val_every", "train.warmup_steps",
                "train.weight_decay", "train.grad_clip", "run.keep_checkpoints", "data.workers", "run.seed",
                "train.prior_loss_weight", "train.snr_gamma", "train.kl_weight", "sample.seed", "sample.guidance",
                "data.keep_tokens", "sample.guidance_rescale", "data.caption_dropout", "lora.dropout",
                "train.ema_decay", "memory.zero_stage", "data.num_class_images", "data.unmasked_weight"}
FRACTIONS = {"data.caption_dropout": "1.0", "lora.dropout": "1.5", "train.ema_decay": "1", "train.lr": "1",
             "train.autoencoder_lr": "2", "sample.guidance_rescale": "1.5"}
OTHER_BAD = {"data.builtin_exclude": ["purple", "red,green,blue,yellow"]}  # unknown value; no colour left


def bad_values(dotted: str, field: dataclasses.Field) -> list[str]:
    """Values of ``section.key`` that no one can mean: wrong type, out of range, non-finite, unknown choice."""
    typ = str(field.type)
    out: list[str] = []
    choices = field.metadata.get("choices")
    if choices:
        out += ["bogus", choices[0] + "x"]
    if typ in ("int", "int | None"):
        out += [v for v in BAD_INT if not (typ.endswith("None") and v == "")]
    elif typ in ("float", "float | None"):
        out += [v for v in BAD_FLOAT if not (typ.endswith("None") and v == "")]
    elif typ == "bool":
        out += BAD_BOOL
    elif typ == "list[float]":
        out += ["nan", "1,abc", "inf,1", "-1", "1000"]
    if dotted in POSITIVE:
        out += ["0", "-1"]
    if dotted in NON_NEGATIVE:
        out += ["-1"]
    if dotted in UPPER_BOUNDS:
        bound = UPPER_BOUNDS[dotted]
        out.append(str(int(bound * 10 + 1)) if "int" in typ else repr(bound * 10 + 1))
    if dotted in FRACTIONS:
        out.append(FRACTIONS[dotted])
    out += OTHER_BAD.get(dotted, [])
    if typ == "str" and not choices and dotted.startswith(("data.caption_", "sample.negative")):
        out.append("x" * 5000)
    return list(dict.fromkeys(out))


def set_cases(ws: Workspace) -> list[Case]:
    """``--set`` of every config field to each of its bad values, and unknown or malformed keys."""
    cases = []
    for dotted, field in all_fields():
        for value in bad_values(dotted, field):
            for cmd in ("plan", "train"):
                argv = [cmd, "--preset", "cpu", "--set", f"{dotted}={value}"]
                if cmd == "train":
                    argv += ["--out", ws.path("out-set"), "--no-progress"]
                cases.append(Case(f"{cmd} --set {dotted}={value[:20]}", tuple(argv)))
    for item in ("train.lrr=1e-4", "trian.lr=1", "lr=1", "train.lr", "=", "run.=3", "sample.cfg_scales="):
        cases.append(Case(f"plan --set {item}", ("plan", "--preset", "cpu", "--set", item)))
    cases.append(Case("plan sample.steps above timesteps",
                      ("plan", "--preset", "cpu", "--set", "model.timesteps=10", "--set", "sample.steps=20")))
    return cases


def flag_cases(ws: Workspace) -> list[Case]:
    """Every flag of every subcommand with values that cannot be meant."""
    out = ws.path("out-flags")
    cases: list[Case] = []

    def add(name: str, *argv: str) -> None:
        cases.append(Case(name, tuple(argv)))

    data_file = ws.text("data.txt", "not a folder")
    model_file = ws.file("model.safetensors", lambda p: p.write_bytes(b"\0" * 64))
    for cmd in CONFIG_COMMANDS:
        base = [cmd, "--preset", "cpu"] + (["--out", out] if cmd != "plan" else [])
        for v in ["0", "-1", "-5", str(10**9), str(2**64), "x", "1.5", ""]:
            add(f"{cmd} --steps {v}", *base, "--steps", v)
        for v in ["-1", str(2**32), str(2**64), "nan", "x"]:
            add(f"{cmd} --seed {v}", *base, "--seed", v)
        for v in ["nan", "inf", "-inf", "0", "-1", "1e9", "x", ""]:
            add(f"{cmd} --vram {v}", *base, "--vram", v)
        for v in ["cuda", "mps", "tpu", "", "cuda:7", "cpu0"]:
            add(f"{cmd} --device {v!r}", *base, "--device", v)
        for v in [ws.path("no-such-folder"), data_file, ws.fifo("data-pipe"), "", "/dev/null"]:
            add(f"{cmd} --data {v[-20:]!r}", *base, "--data", v)
        for v in [ws.path("nope.safetensors"), "", ws.path("nope/"), "tinyy", "../x.ckpt"]:
            add(f"{cmd} --model {v[-20:]!r}", *base, "--model", v)
        add(f"{cmd} --model FILE without --task lora", *base, "--model", model_file)
        add(f"{cmd} --model FILE --task text2img", *base, "--model", model_file, "--task", "text2img")
        add(f"{cmd} --task lora without --model", *base, "--task", "lora", "--data", str(ws.root / "files"))
        for v in ["paint", "LORA", ""]:
            add(f"{cmd} --task {v!r}", *base, "--task", v)
        for name, path in ws.hostile_yaml().items():
            add(f"{cmd} --config {name}", *base, "--config", path)
        for v in ["", "nope", ws.hostile_yaml()["alias-bomb"], ws.fifo(), "../../etc/passwd"]:
            add(f"{cmd} --preset {v[-20:]!r}", cmd, "--preset", v, *(["--out", out] if cmd != "plan" else []))
        if cmd != "plan":
            for v in ["", data_file, data_file + "/sub", ws.path(LONG_NAME), ws.path("a/" + LONG_NAME + "/b")]:
                add(f"{cmd} --out {v[-20:]!r}", cmd, "--preset", "cpu", "--out", v)
        add(f"{cmd} --tokenizer missing", *base, "--tokenizer", ws.path("no-tokenizer"))
        add(f"{cmd} --tokenizer empty", *base, "--tokenizer", "")
        add(f"{cmd} unknown flag", *base, "--bogus")
        add(f"{cmd} --set without =", *base, "--set", "train.lr")
    for v in ["0", "-1", str(10**6), "x"]:
        add(f"train --processes {v}", "train", "--preset", "cpu", "--out", out, "--processes", v)
        add(f"plan --processes {v}", "plan", "--preset", "cpu", "--processes", v)
    return cases


def resume_cases(ws: Workspace) -> list[Case]:
    """--resume with what it cannot honour: missing, damaged, and every override it would have to drop."""
    good = str(ws.good)
    cases = [Case("resume empty", ("train", "--resume", "")),
             Case("resume missing", ("train", "--resume", ws.path("no-run"))),
             Case("resume a file", ("train", "--resume", ws.text("run.txt", "x"))),
             Case("resume not a run", ("train", "--resume", str(ws.root / "files"))),
             Case("from-checkpoint without resume", ("train", "--preset", "cpu", "--from-checkpoint", "step-2")),
             Case("resume from unknown checkpoint", ("train", "--resume", good, "--from-checkpoint", "step-99")),
             Case("resume from a stray name", ("train", "--resume", good, "--from-checkpoint", "abc"))]
    overrides = {"--seed": "3", "--data": str(ws.root), "--out": ws.path("elsewhere"), "--preset": "cpu",
                 "--config": ws.text("ok.yaml", "run:\n  steps: 5\n"), "--vram": "4", "--model": "tiny",
                 "--task": "text2img", "--tokenizer": str(ws.root)}
    for flag, value in overrides.items():
        cases.append(Case(f"resume ignores {flag}", ("train", "--resume", good, flag, value)))
    cases.append(Case("resume --force", ("train", "--resume", good, "--force")))
    cases.append(Case("resume --allow-pickle", ("train", "--resume", good, "--allow-pickle")))
    for item in ("run.seed=3", "data.source=x", "model.size=celeba64", "run.out=x", "train.batch_size=2",
                 "lora.rank=4", "run.task=latent", "train.lr=nan", "run.steps=-1"):
        cases.append(Case(f"resume --set {item}", ("train", "--resume", good, "--set", item)))
    for v in ["0", "-3", "x", str(10**9)]:
        cases.append(Case(f"resume --steps {v}", ("train", "--resume", good, "--steps", v)))
    cases.append(Case("resume --device tpu", ("train", "--resume", good, "--device", "tpu")))
    cases.append(Case("resume --device cuda:9", ("train", "--resume", good, "--device", "cuda:9")))
    for kind in DAMAGE:
        # a run without any checkpoint resumes from the start (a kill before the first save): not a refusal
        if ("ckpt-" in kind and "folder-is-file" not in kind) or kind.startswith("config"):
            cases.append(Case(f"resume damaged {kind}", ("train", "--resume", ws.run(kind), "--no-progress")))
    return cases


def sample_cases(ws: Workspace) -> list[Case]:
    """sample / eval / export: bad flags on a good run, and every damaged run."""
    good = str(ws.good)
    cases: list[Case] = []

    def add(name: str, *argv: str) -> None:
        cases.append(Case(name, tuple(argv)))

    for cmd in SAMPLE_COMMANDS:
        for v in ["0", "-2", str(10**6), "x", "1.5"]:
            add(f"{cmd} --steps {v}", cmd, "--run", good, "--steps", v)
        for v in ["-1", str(2**32), str(2**64), "x"]:
            add(f"{cmd} --seed {v}", cmd, "--run", good, "--seed", v)
        for v in ["nan", "inf", "-1", "1e6", "x", ""]:
            add(f"{cmd} --cfg {v!r}", cmd, "--run", good, "--cfg", v)
        for v in ["cuda", "mps", "tpu", "", "cuda:7"]:
            add(f"{cmd} --device {v!r}", cmd, "--run", good, "--device", v)
        for v in ["", ws.path("no-run"), ws.text("notrun.txt", "x"), str(ws.root / "files")]:
            add(f"{cmd} --run {v[-20:]!r}", cmd, "--run", v)
        for v in ["sometimes", ""]:
            add(f"{cmd} --which {v!r}", cmd, "--run", good, "--which", v)
        add(f"{cmd} --sampler euler", cmd, "--run", good, "--sampler", "euler")
        add(f"{cmd} without --run", cmd)
        for kind in DAMAGE:
            add(f"{cmd} damaged {kind}", cmd, "--run", ws.run(kind), "--steps", "2", "--samples" if cmd == "eval"
                else "--cfg", "1")
        add(f"{cmd} --which final on a run without one", cmd, "--run", ws.run("no-final+tokenizer-missing"),
            "--which", "final")
    add("sample --cfg twice nan", "sample", "--run", good, "--cfg", "1", "nan")
    for v in ["x.txt", "noext", str(ws.root / "files"), ws.path(LONG_NAME + ".png"), ws.text("f.txt", "x") + "/o.png",
              "", ws.path("pipe-out.png")]:
        if v.endswith("pipe-out.png"):
            ws.fifo("../pipe-out.png")
        add(f"sample --out {v[-20:]!r}", "sample", "--run", good, "--out", v)
    add("sample 100 prompts", "sample", "--run", good, *sum([["--prompt", "p"] for _ in range(100)], []))
    add("sample NUL prompt", "sample", "--run", good, "--prompt", "a\x00b")
    for v in ["0", "-1", str(10**9), "x"]:
        add(f"eval --samples {v}", "eval", "--run", good, "--samples", v)
    for v in ["", ws.path("no-run"), good]:  # the good run is a text2img run: no LoRA to export
        add(f"export --run {v[-20:]!r}", "export", "--run", v)
    add("export --format zip", "export", "--run", good, "--format", "zip")
    add("export --dtype fp64", "export", "--run", good, "--dtype", "fp64")
    add("export --out a file", "export", "--run", good, "--out", ws.text("exp.txt", "x"))
    return cases


def other_cases(ws: Workspace) -> list[Case]:
    cases = [Case("no command", ()), Case("unknown command", ("frobnicate",)), Case("bad global flag", ("--bogus",))]
    for v in ["0", "-1", "70000", "65536", "x", ""]:
        cases.append(Case(f"ui --port {v!r}", ("ui", "--port", v)))
    for v in ["256.1.1.1", "203.0.113.7", "", "no such host.invalid"]:
        cases.append(Case(f"ui --host {v!r}", ("ui", "--host", v)))
    for v in ["nan", "inf", "0", "-1", "1e9", "x"]:
        cases.append(Case(f"profile --vram {v}", ("profile", "--vram", v)))
    cases += [Case("profile --workload W9", ("profile", "--preset", "cpu", "--workload", "W9")),
              Case("profile --preset nope", ("profile", "--preset", "nope")),
              Case("profile --preset ''", ("profile", "--preset", "")),
              Case("profile without a card", ("profile",)),
              Case("doctor --bogus", ("doctor", "--bogus")),
              Case("presets extra", ("presets", "extra")),
              Case("cache builtin data", ("cache", "--preset", "cpu", "--out", ws.path("out-cache"))),
              Case("cache without a model", ("cache", "--preset", "cpu", "--out", ws.path("out-cache"),
                                             "--data", str(ws.root / "files")))]
    return cases


def corpus(ws: Workspace) -> list[Case]:
    """The whole corpus, in a fixed order (the same cases, in the same order, every time)."""
    cases = set_cases(ws) + flag_cases(ws) + resume_cases(ws) + sample_cases(ws) + other_cases(ws)
    seen: set[tuple[str, ...]] = set()
    unique = [c for c in cases if not (c.argv in seen or seen.add(c.argv))]
    return unique


def sample_of(cases: list[Case], n: int, seed: int) -> list[Case]:
    """A seeded subset of ``n`` cases that still covers every subcommand."""
    rng = random.Random(seed)
    by_command: dict[str, list[Case]] = {}
    for c in cases:
        by_command.setdefault(c.argv[0] if c.argv else "", []).append(c)
    picked = [rng.choice(group) for group in by_command.values()]
    rest = [c for c in cases if c not in picked]
    return picked + rng.sample(rest, max(0, n - len(picked)))
