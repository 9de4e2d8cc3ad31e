"""Shared test helpers: a tiny, fast run configuration and single-threaded torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lowvram.config import ConfigBuilder, RunConfig

torch.set_num_threads(1)

# Small enough that a training step takes tens of milliseconds on one core.
TINY_RUN: dict[str, Any] = {
    "run.steps": 4,
    "run.checkpoint_every": 2,
    "run.sample_every": 0,
    "run.val_every": 2,
    "run.log_every": 1,
    "run.tensorboard": True,
    "data.resolution": 16,
    "data.num_images": 24,
    "train.batch_size": 4,
    "train.warmup_steps": 1,
    "train.autoencoder_steps": 2,
    "sample.steps": 2,
    "sample.cfg_scales": [1.0, 3.0],
    "sample.prompts": ["a red circle on a blue background", "a green square on a white background"],
}


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Plans and data caches the tests make go to a temporary folder, not the user's ~/.cache/lowvram."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LOWVRAM_CACHE", str(tmp_path_factory.mktemp("lowvram-cache")))
    yield
    patch.undo()


def tiny_config(out: Path, **overrides: Any) -> RunConfig:
    """A RunConfig for a few-step tiny run in ``out``; ``overrides`` use section__key names."""
    b = ConfigBuilder()
    values = {**TINY_RUN, "run.out": str(out)}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    for key, value in values.items():
        b.set(key, value, "test")
    return b.build()


@pytest.fixture
def tiny_cfg(tmp_path: Path):
    return lambda **kw: tiny_config(tmp_path / "run", **kw)


def assert_checkpoints_equal(run_a: Path, run_b: Path, step: int, why: str) -> None:
    """Model, EMA and optimizer tensors of two runs' checkpoints at ``step`` are bitwise equal."""
    from safetensors.torch import load_file

    for name in ("model", "ema", "optimizer"):
        a = load_file(str(run_a / "checkpoints" / f"step-{step:08d}" / f"{name}.safetensors"))
        b = load_file(str(run_b / "checkpoints" / f"step-{step:08d}" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs {why}"


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory) -> Path:
    """One finished 4-step tiny run for the whole session; tests copy it before changing anything."""
    from lowvram.train.run import train

    out = tmp_path_factory.mktemp("finished") / "run"
    return train(tiny_config(out, run__keep_checkpoints=3), progress=False).run_dir
