"""A step's randomness, learning rate and an epoch's data order as pure functions of (seed, step, epoch): why a
resumed run needs no saved RNG or scheduler state for them."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """A CPU generator per (seed, step, micro-batch): noise and dropout need no saved RNG to resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (2**63))


def lr_at(peak: float, step: int, warmup: int, total: int, schedule: str = "constant") -> float:
    """Linear warm-up over ``warmup`` steps to ``peak``, then constant or a cosine/linear decay that
    reaches 0 at step ``total`` (diffusers' ``get_scheduler`` shapes). Extending ``run.steps`` on resume
    stretches the decay from that step on."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / (total - warmup))
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (1.0 - progress)


def shuffled_batches(n: int, batch_size: int, seed: int) -> Callable[[int], list[list[int]]]:
    """Batches of one epoch as a pure function of (seed, epoch): what makes the data position resumable."""

    def epoch_batches(epoch: int) -> list[list[int]]:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch)).tolist()
        if n < batch_size:  # fewer items than a batch: repeat them
            order = (order * (batch_size // n + 1))[:batch_size]
        return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]

    return epoch_batches
