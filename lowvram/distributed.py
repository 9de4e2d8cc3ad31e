"""Process topology of a run: how many processes train it, which one this is, and what they agree on.

``accelerate launch`` / ``torchrun`` set the environment a multi-process run reads; without it a run is
one process with no process group, and every helper here is a no-op. Gradients are all-reduced by
DDP; the small collectives here only keep the ranks agreeing on stop flags and logged numbers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import ConfigError

T = TypeVar("T")
# what accelerate launch / torchrun set in every process they start
LAUNCH_ENV = ("LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class World:
    """The processes of one run: ``num_processes`` of them, this one is ``index``; ``is_main`` writes files."""

    num_processes: int = 1
    index: int = 0
    local_index: int = 0
    is_main: bool = True
    device: torch.device | None = None  # the device accelerate assigned this process (cuda:LOCAL_RANK on GPUs)

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1


SINGLE = World()


def launched() -> bool:
    """True inside a process started by ``accelerate launch`` / ``torchrun`` with more than one process."""
    return all(k in os.environ for k in LAUNCH_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def process_count() -> int:
    """How many processes the launcher started (1 without one), read without starting the process group."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def launched_as_main() -> bool:
    """Whether this process will be the main one, read from the launcher's env without starting the
    process group (that waits for ``world`` and the run's device)."""
    return not launched() or int(os.environ.get("RANK", "0")) == 0


def world(cpu: bool | None = None) -> World:
    """This process's place in the run; a plain single process (no launcher env) is ``SINGLE``.

    ``cpu``: train on the CPU (gloo); default: the CPU when torch sees no GPU. Under a launcher this
    initialises the process group once per process (accelerate's ``PartialState`` owns it).
    """
    if not launched():
        return SINGLE
    from accelerate import PartialState

    if cpu is None:
        cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    device = torch.device(state.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return World(state.num_processes, state.process_index, state.local_process_index, state.is_main_process, device)


def training_device(w: World, requested: torch.device) -> torch.device:
    """The device this process trains on: with several GPU processes, each its own card (LOCAL_RANK)."""
    if w.distributed and requested.type == "cuda":
        return torch.device("cuda", w.local_index)
    return requested


def wait(w: World) -> None:
    """Barrier: every process waits here until all have arrived (no-op for one process)."""
    if w.distributed:
        torch.distributed.barrier()


@contextmanager
def main_first(w: World) -> Iterator[None]:
    """The main process runs the block first (e.g. builds a cache), the others after it (and read it)."""
    if not w.is_main:
        wait(w)
    yield
    if w.is_main:
        wait(w)


def _reduce(w: World, values: Sequence[float], op: Any) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=w.device or "cpu")
    torch.distributed.all_reduce(t, op=op)
    return t.tolist()


def any_process(w: World, flag: bool) -> bool:
    """True if ``flag`` is true on any process: a stop asked on one rank stops all, none hangs in a collective."""
    if not w.distributed:
        return flag
    return _reduce(w, [1.0 if flag else 0.0], torch.distributed.ReduceOp.MAX)[0] > 0


def mean_over_processes(w: World, value: float) -> float:
    """The mean of ``value`` over the processes; non-finite anywhere gives non-finite everywhere."""
    if not w.distributed:
        return value
    return _reduce(w, [value], torch.distributed.ReduceOp.SUM)[0] / w.num_processes


def computed_once(w: World, path: Path, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()`` on the main process, shared through ``path`` (safetensors) with the others.

    One process encodes a cache; the others read it instead of encoding it again each.
    """
    if not w.distributed:
        return make()
    from safetensors.torch import load_file

    from .fsutil import save_safetensors_atomic

    with main_first(w):
        if w.is_main:
            value = make()
            save_safetensors_atomic({"value": value}, path, {})
        else:
            value = load_file(str(path))["value"]
    wait(w)  # everyone has read it: the file is only a hand-over, it need not stay in the run folder
    if w.is_main:
        path.unlink(missing_ok=True)
    return value


def wrap_ddp(module: torch.nn.Module, w: World) -> torch.nn.Module:
    """``module`` in DistributedDataParallel over the trainable parameters only (frozen ones are not
    broadcast or reduced: every process loads the same frozen weights itself)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in module.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
    device_ids = [w.device.index] if w.device is not None and w.device.type == "cuda" else None
    # bucket views: the gradients live in DDP's buckets, not in a second copy of them
    return DDP(module, device_ids=device_ids, gradient_as_bucket_view=True)


# ---- the launcher behind `lowvram train --processes N` ---------------------------------------------------
def strip_processes_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--processes N`` / ``--processes=N`` (the launched processes must not relaunch)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--processes":
            skip = True
            continue
        if a.startswith("--processes="):
            continue
        out.append(a)
    return out


def launch_command(processes: int, args: Sequence[str], *, module: str | None = "lowvram.cli",
                   cpu: bool = False) -> tuple[list[str], dict[str, str]]:
    """The command and environment that start ``processes`` copies of ``python -m module args`` on this
    machine through torch's launcher (what ``accelerate launch --multi_gpu`` runs); ``cpu``: gloo."""
    if processes < 1:
        raise ConfigError(f"--processes {processes}", "give 1 or more processes")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd += ["-m", module] if module else []
    cmd += list(args)
    env = dict(os.environ)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"  # accelerate's PartialState then sets up gloo, not NCCL
    # torch's launcher would set 1 thread per process with a warning; keep the user's choice if any
    env.setdefault("OMP_NUM_THREADS", "1")
    return cmd, env


def relaunch(processes: int, argv: Sequence[str], *, cpu: bool = False) -> int:
    """Run ``lowvram <argv>`` (minus ``--processes``) as ``processes`` processes; returns the exit code."""
    if launched():
        raise ConfigError("--processes given inside a process that accelerate launch / torchrun started",
                          "drop --processes: the launcher already decides the number of processes")
    from .train.signals import exit_code, forwarded_to

    cmd, env = launch_command(processes, strip_processes_flag(argv), cpu=cpu)
    # its own session: a terminal's Ctrl-C reaches only this process, which forwards exactly one signal
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    with forwarded_to(proc) as stop:
        code = proc.wait()
    return exit_code(stop.signum) if stop.signum else code


# ---- DeepSpeed ZeRO ------------------------------------------------------------------------------------
def deepspeed_available() -> bool:
    """True when ``import deepspeed`` works (the ``lowvram[deepspeed]`` extra)."""
    try:
        import deepspeed  # noqa: F401
    except Exception:  # ImportError, or deepspeed's own errors when no CUDA toolkit is found
        return False
    return True


def rocm_arch(device: torch.device) -> str | None:
    """The ROCm GPU architecture (``gfx803``...) of ``device``, None on CUDA or the CPU."""
    if device.type != "cuda" or not getattr(torch.version, "hip", None):
        return None
    return torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]


def check_zero(zero_stage: int, offload_optimizer: bool, device: torch.device, arch: str | None = None) -> None:
    """Refuse ZeRO settings, naming what to do instead: lowvram profiles ZeRO-2 (``lowvram plan``) but its
    trainer does not run DeepSpeed yet, and where DeepSpeed cannot run the message says why."""
    if zero_stage == 0 and not offload_optimizer:
        return
    off = "set memory.zero_stage=0 and memory.offload_optimizer=false"
    if zero_stage != 2:
        raise ConfigError(f"memory.zero_stage = {zero_stage}: only ZeRO-2 is modelled", f"use 2, or {off}")
    if device.type != "cuda":
        raise ConfigError(f"DeepSpeed ZeRO needs a CUDA GPU; this run trains on {device.type}", off)
    arch = arch or rocm_arch(device)
    if arch is not None:
        raise ConfigError(f"DeepSpeed ZeRO is not available for lowvram on ROCm ({arch}; no DeepSpeed build for "
                          "consumer Radeon cards such as gfx803)",
                          f"{off}; the portable 8-bit optimizer (train.optimizer=adamw8bit_portable) saves optimizer memory")
    if not deepspeed_available():
        raise ConfigError("memory.zero_stage = 2 needs DeepSpeed, which is not installed",
                          f"pip install 'lowvram[deepspeed]' (then `lowvram plan` shows the saving), or {off}")
    raise ConfigError("DeepSpeed ZeRO-2 is profiled (`lowvram plan` shows its saving) but lowvram's trainer "
                      "does not run it yet", f"{off}; see docs/multi-gpu.md for what ZeRO would save")
