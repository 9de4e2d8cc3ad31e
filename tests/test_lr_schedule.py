"""The learning-rate schedule: warm-up then constant or a decay to 0 at the last step."""

import math

import pytest

from lowvram.config import ConfigBuilder
from lowvram.errors import ConfigError
from lowvram.train.loop import lr_at


def test_warmup_rises_linearly_to_the_peak() -> None:
    assert [lr_at(1.0, s, 4, 100) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decays_reach_zero_at_the_last_step_and_never_rise(schedule: str) -> None:
    lrs = [lr_at(2e-3, s, 10, 110, schedule) for s in range(10, 111)]
    assert lrs[0] == pytest.approx(2e-3)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))
    # half-way through the decay: cosine and linear both sit at half the peak
    assert lr_at(2e-3, 60, 10, 110, schedule) == pytest.approx(1e-3)


def test_cosine_is_flatter_than_linear_early_and_lower_late() -> None:
    assert lr_at(1.0, 20, 0, 100, "cosine") > lr_at(1.0, 20, 0, 100, "linear")
    assert lr_at(1.0, 80, 0, 100, "cosine") < lr_at(1.0, 80, 0, 100, "linear")
    assert lr_at(1.0, 25, 0, 100, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_constant_ignores_the_total_and_unknown_names_are_refused() -> None:
    assert lr_at(1e-4, 10_000, 50, 100) == 1e-4
    with pytest.raises(ConfigError, match="lr_schedule"):
        ConfigBuilder().set("train.lr_schedule", "step", "--set").build()
