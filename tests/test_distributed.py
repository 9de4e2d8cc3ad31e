"""Several processes on one run (DDP through accelerate / torch's launcher, gloo on the CPU).

The end-to-end test launches real processes the way users do (``lowvram train --processes 2``) and
checks the one promise that matters: 2 processes x micro-batch 1 equal 1 process x accumulation 2,
through a SIGKILL and a resume, with one set of outputs. The rest are fast unit checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_checkpoints_equal
from torch import nn

from lowvram.config import ConfigBuilder
from lowvram.distributed import World, check_zero, launch_command, strip_processes_flag
from lowvram.errors import ConfigError
from lowvram.memory.planner import candidates
from lowvram.memory.profiler import profile_step
from lowvram.memory.workloads import Knobs, Workload
from lowvram.train.checkpoint import list_checkpoints
from lowvram.train.loop import Trainer, step_generator
from lowvram.train.run import load_run_config, train

REPO = Path(__file__).resolve().parents[1]

# Rank 0 SIGKILLs itself right after the first checkpoint (a crash, no cleanup); the launcher then
# ends rank 1, which is waiting for it in a collective.
KILLED_RUN = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from conftest import tiny_config
    from lowvram.train.run import train

    def kill_after_first_checkpoint(event):
        if event.kind == "checkpoint":
            os.kill(os.getpid(), signal.SIGKILL)

    train(tiny_config(Path({out!r}), **json.loads({overrides!r})), listeners=[kill_after_first_checkpoint],
          progress=False)
    """
)

OVERRIDES = {
    "run__steps": 6, "run__checkpoint_every": 2, "run__sample_every": 3, "run__val_every": 3,
    "run__device": "cpu", "train__batch_size": 1, "train__grad_accum": 1, "sample__cfg_scales": [1.0],
}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_two_processes_killed_and_resumed_equal_one_process_accumulating_two(tmp_path):
    run = tmp_path / "two"
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN.format(tests=str(REPO / "tests"), out=str(run), overrides=json.dumps(OVERRIDES)))
    cmd, env = launch_command(2, [str(script)], module=None, cpu=True)
    proc = subprocess.run(cmd, env={**env, **_env()}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, "the killed run should have failed"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000002"], proc.stderr[-3000:]
    assert not (run / "final").exists()

    # resumed the way users do: the CLI relaunches itself as 2 processes
    resumed = subprocess.run([sys.executable, "-m", "lowvram.cli", "train", "--resume", str(run), "--processes", "2",
                              "--no-progress"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("done: 6 steps") == 1  # printed by the main process only

    # the reference: the same config in one process, micro-batch 1 x accumulation 2, not interrupted
    cfg = load_run_config(run, {"train.grad_accum": 2})
    cfg.run.out = str(tmp_path / "one")
    one = train(cfg, progress=False).run_dir

    # Exactly equal, not just close: DDP averages two gradients as g0/2 + g1/2 and accumulation adds
    # g0/2 then g1/2; halving is exact in binary floating point and a sum of two is order-free. (With
    # more than 2 processes the summation order differs and results agree to float rounding only.)
    assert_checkpoints_equal(run, one, 6, "between 2x1 and 1x2")

    # one set of outputs: every step logged once, one checkpoint folder, one sample set, no per-rank copies
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert {r["effective_batch"] for r in steps} == {2}  # micro-batch 1 x accumulation 1 x 2 processes
    ref = [r for r in (json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert [r["loss"] for r in steps] == [r["loss"] for r in ref]  # the mean over processes = over micro-batches
    assert [r["step"] for r in rows if r["kind"] == "val"] == [3, 6]
    assert [r["kind"] for r in rows].count("end") == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["final.png", "step-00000003.png"]
    assert len(list((run / "tensorboard").iterdir())) == 2  # one writer per launch, not per process
    assert not (run / "cache").exists()


def test_two_process_lora_fine_tune_equals_one_process_accumulating_two(tmp_path):
    """The fine-tune path under DDP: a LoRA on a tiny SD 1.x folder, caches built once by the main process."""
    import numpy as np
    from PIL import Image
    from sd_fixtures import finetune_argv, save_tiny

    model = save_tiny(tmp_path, "sd1")["folder"]
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a photo of sks dog, photo {i}")
    sets = {"data.resolution": 32, "train.batch_size": 1, "data.cache_dir": tmp_path / "cache", "lora.rank": 4,
            "train.lr": 1e-2, "train.warmup_steps": 0, "run.checkpoint_every": 2, "run.sample_every": 0,
            "run.tensorboard": "false", "sample.steps": 2, "sample.cfg_scales": 1, "sample.prompts": "a dog"}
    cli = [sys.executable, "-m", "lowvram.cli"]
    two = subprocess.run([*cli, *finetune_argv(model, data, tmp_path / "two", sets, steps=4), "--processes", "2"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    # the latent cache is encoded once (main process), then read; only the main process prints
    assert two.stdout.count("4 latents, 0 reused, 4 encoded") == 1 and two.stdout.count("done: 4 steps") == 1
    one = subprocess.run([*cli, *finetune_argv(model, data, tmp_path / "one", sets, "train.grad_accum=2", steps=4)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "4 latents, 4 reused, 0 encoded" in one.stdout
    assert_checkpoints_equal(tmp_path / "two", tmp_path / "one", 4, "between LoRA 2x1 and 1x2")
    # one set of LoRA files (kohya file named after the run folder, diffusers file, per-step copies)
    names = {run: sorted(p.name.replace(run, "RUN") for p in (tmp_path / run / "lora").iterdir()) for run in ("one", "two")}
    assert names["two"] == names["one"] and "RUN.safetensors" in names["two"]


def test_ranks_share_a_step_like_accumulated_micro_batches():
    """Rank r's micro-batch m is global micro-batch m*N + r: its batch and its noise."""
    order = [[i] for i in range(8)]
    got = {}
    for rank in (0, 1):
        fake = SimpleNamespace(world=World(2, rank, rank, rank == 0))
        positions = iter(order)
        got[rank] = [Trainer.take(fake, positions) for _ in range(3)]
    assert got == {0: [[0], [2], [4]], 1: [[1], [3], [5]]}
    single = SimpleNamespace(world=World())
    positions = iter(order)
    assert [Trainer.take(single, positions) for _ in range(2)] == [[0], [1]]
    # 2 processes x accumulation 1 draw the noise of micro-batches 0 and 1 of 1 process x accumulation 2
    for rank in (0, 1):
        micro, n = 0, 2
        a = torch.randn(3, generator=step_generator(7, 5, micro * n + rank))
        b = torch.randn(3, generator=step_generator(7, 5, rank))
        assert torch.equal(a, b)


def _cfg(**values):
    b = ConfigBuilder()
    for k, v in values.items():
        b.set(k, v, "test")
    return b.build()


def test_fused_backward_is_refused_with_several_processes(tmp_path):
    job = SimpleNamespace(trainable_modules=lambda: {"unet": nn.Linear(2, 2)}, unet=None)
    cfg = _cfg(**{"memory.fused_backward": True, "train.grad_accum": 1})
    two = World(2, 0, 0, True, torch.device("cpu"))
    with pytest.raises(ConfigError, match="fused_backward") as err:
        Trainer(cfg, tmp_path, job, lambda idx: {}, lambda e: [], torch.device("cpu"), lambda e: None, world=two)
    assert "fused_backward=false" in err.value.fix
    # the planner never offers it to a multi-process run
    wl = Workload("t", "test", "tiny", "scratch", 32, 4)
    assert any("fused" in name for name, _ in candidates(wl, None, Knobs(batch_size=1)))
    assert not any("fused" in name for name, _ in candidates(wl, None, Knobs(batch_size=1, processes=2)))


def test_launcher_command_drops_processes_and_uses_gloo_on_cpu():
    argv = ["train", "--processes", "2", "--out", "x", "--processes=3", "--steps", "4"]
    assert strip_processes_flag(argv) == ["train", "--out", "x", "--steps", "4"]
    cmd, env = launch_command(2, ["train", "--out", "x"], cpu=True)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in cmd
    assert cmd[-5:] == ["-m", "lowvram.cli", "train", "--out", "x"]
    assert env["ACCELERATE_USE_CPU"] == "true"
    with pytest.raises(ConfigError):
        launch_command(0, [])


def test_zero_is_refused_with_the_reason(monkeypatch):
    check_zero(0, False, torch.device("cpu"))  # off: nothing to check
    with pytest.raises(ConfigError, match="CUDA GPU"):
        check_zero(2, True, torch.device("cpu"))
    with pytest.raises(ConfigError, match="gfx803"):
        check_zero(2, True, torch.device("cuda"), arch="gfx803")
    monkeypatch.setattr("lowvram.distributed.deepspeed_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        check_zero(2, False, torch.device("cuda"))
    assert "lowvram[deepspeed]" in err.value.fix
    monkeypatch.setattr("lowvram.distributed.deepspeed_available", lambda: True)
    with pytest.raises(ConfigError, match="does not run it yet"):
        check_zero(2, True, torch.device("cuda"))
    with pytest.raises(ConfigError, match="zero_stage"):
        _cfg(**{"memory.offload_optimizer": True})


def test_profiler_shows_what_zero2_takes_off_each_card():
    wl = Workload("t", "test", "tiny", "scratch", 32, 2)
    base = Knobs(attention="math", batch_size=1, grad_accum=2, processes=2)  # gradients alive all step
    ddp = profile_step(wl, base)
    grads, state = ddp.by_category["gradients"], ddp.by_category["optimizer_state"]
    assert grads > 0 and state > 0 and any("nothing is divided" in n for n in ddp.notes)
    zero = profile_step(wl, base.with_(zero_stage=2))
    # gradients and optimizer state: half on each of 2 cards; the rest of the step is unchanged
    assert zero.by_category["optimizer_state"] == pytest.approx(state / 2, rel=0.01)
    assert zero.by_category["gradients"] <= grads / 2 + 4096
    assert zero.peak_bytes < ddp.peak_bytes - state / 2
    offload = profile_step(wl, base.with_(zero_stage=2, offload_optimizer=True))
    assert offload.by_category["optimizer_state"] == 0
    assert offload.host_bytes["optimizer_state"] == pytest.approx(state / 2, rel=0.01)
    assert offload.peak_bytes < zero.peak_bytes
    assert "host memory" in offload.format()
    with pytest.raises(ConfigError, match="averaged over processes"):
        profile_step(wl, base.with_(fused_backward=True, grad_accum=1))


@pytest.mark.slow
def test_ctrl_c_stops_every_process_at_one_step_and_resumes_bitwise(tmp_path):
    """SIGINT to `lowvram train --processes 2`: it forwards one signal to the launcher, both processes stop at
    the same step boundary, the main one saves, all exit (130, no hang); the resumed run equals 1 x accum 2."""
    import signal
    import time

    from conftest import TINY_RUN

    run = tmp_path / "two"
    values = {**TINY_RUN, **{k.replace("__", "."): v for k, v in OVERRIDES.items()}, "run.steps": 40}
    flags = [a for k, v in values.items()
             for a in ("--set", f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}")]
    argv = [sys.executable, "-m", "lowvram.cli", "train", "--preset", "cpu", "--out", str(run), "--no-progress",
            "--processes", "2", *flags]
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not list_checkpoints(run / "checkpoints") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert out.count("resume with: lowvram train --resume") == 1 and str(run) in out, out
    stopped = list_checkpoints(run / "checkpoints")[-1]
    assert 2 <= int(stopped.name.split("-")[1]) < 40 and not (run / "final").exists()

    resumed = subprocess.run([sys.executable, "-m", "lowvram.cli", "train", "--resume", str(run), "--processes", "2",
                              "--no-progress"], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    cfg = load_run_config(run, {"train.grad_accum": 2})
    cfg.run.out = str(tmp_path / "one")
    one = train(cfg, progress=False).run_dir
    assert_checkpoints_equal(run, one, 40, "between 2x1 stopped by Ctrl-C and resumed, and 1x2")
