"""Schedules, noising, targets, CFG helpers and the fixed validation loss of lowvram.diffusion."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lowvram import diffusion as D
from lowvram.errors import ConfigError

SCHEDULES = ("linear", "cosine", "scaled_linear")


def test_linear_schedule_keeps_ddpm_endpoints_at_t1000():
    betas = D.betas_for("linear", 1000)
    assert betas.dtype == torch.float32 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-6)


def test_linear_schedule_scales_with_t():
    betas = D.betas_for("linear", 250)
    assert betas[0].item() == pytest.approx(4e-4, rel=1e-6)
    assert betas[-1].item() == pytest.approx(0.08, rel=1e-6)
    # A very short chain still has valid betas (< 1) and ends near pure noise.
    short = D.betas_for("linear", 20)
    assert short.max() < 1 and D.alphas_cumprod(short)[-1] < 1e-3


def test_scaled_linear_is_sqrt_linear_between_sd_endpoints():
    betas = D.betas_for("scaled_linear", 1000)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-5)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-5)
    second_difference = betas.double().sqrt().diff().diff()
    assert second_difference.abs().max() < 1e-6


def test_cosine_schedule_runs_from_clean_to_pure_noise():
    betas = D.betas_for("cosine", 1000)
    ab = D.alphas_cumprod(betas)
    assert ab[0] > 0.999 and ab[-1] < 1e-3
    assert betas.max() <= 0.999 + 1e-6


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alphas_cumprod_decreases_and_matches_diffusers_bitwise(schedule):
    cfg = D.make_scheduler_config(schedule, 1000, "epsilon")
    ab = D.alphas_cumprod(D.betas_for(schedule, 1000))
    assert bool((ab.diff() < 0).all()) and 0 < ab[-1] < ab[0] < 1
    assert torch.equal(ab, DDPMScheduler(**cfg).alphas_cumprod)


def test_add_noise_matches_diffusers():
    cfg = D.make_scheduler_config("cosine", 1000, "epsilon")
    sched = DDPMScheduler(**cfg)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = D.add_noise(x0, noise, t, D.alphas_cumprod(D.betas_for("cosine", 1000)))
    assert torch.equal(ours, sched.add_noise(x0, noise, t))


def test_add_noise_upcasts_half_inputs():
    ab = D.alphas_cumprod(D.betas_for("linear", 1000))
    x0 = torch.randn(2, 4, 4, 4).half()
    out = D.add_noise(x0, torch.randn_like(x0), torch.tensor([10, 900]), ab)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_predicted_x0_inverts_the_true_target(schedule, prediction):
    ab = D.alphas_cumprod(D.betas_for(schedule, 1000))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 2, 4, 4, generator=g)
    t = torch.tensor([0, 100, 500, 900, 980])  # not the very last cosine step, where sqrt(ᾱ) ≈ 5e-5
    x_t = D.add_noise(x0, noise, t, ab)
    out = D.target(x0, noise, t, ab, prediction)
    torch.testing.assert_close(D.predicted_x0(x_t, out, t, ab, prediction), x0, atol=2e-3, rtol=1e-3)


def test_v_target_matches_diffusers_velocity():
    cfg = D.make_scheduler_config("linear", 1000, "v_prediction")
    sched = DDPMScheduler(**cfg)
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([3, 400, 999])
    ab = D.alphas_cumprod(D.betas_for("linear", 1000))
    torch.testing.assert_close(D.target(x0, noise, t, ab, "v_prediction"), sched.get_velocity(x0, noise, t))
    assert torch.equal(D.target(x0, noise, t, ab, "epsilon"), noise)


def test_unknown_names_raise_config_errors():
    with pytest.raises(ConfigError, match="schedule"):
        D.make_scheduler_config("quadratic", 1000, "epsilon")
    with pytest.raises(ConfigError, match="prediction"):
        D.make_scheduler_config("linear", 1000, "x0")


def test_cfg_combine_is_linear_in_the_scale():
    u, c = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(D.cfg_combine(u, c, 1.0), u + (c - u))
    torch.testing.assert_close(D.cfg_combine(u, c, 1.0), c)
    torch.testing.assert_close(D.cfg_combine(u, c, 0.0), u)
    torch.testing.assert_close(D.cfg_combine(u, c, 7.5), u + 7.5 * (c - u))
    # Linear: halfway between two scales is the scale halfway between.
    mid = (D.cfg_combine(u, c, 3.0) + D.cfg_combine(u, c, 5.0)) / 2
    torch.testing.assert_close(mid, D.cfg_combine(u, c, 4.0))


def test_drop_conditions_rate_and_replacement():
    cond = torch.randn(20000, 3, 4) + 5.0
    empty = torch.zeros(3, 4)
    out, mask = D.drop_conditions(cond, empty, 0.1, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (20000,)
    assert 0.09 < mask.float().mean().item() < 0.11
    assert torch.equal(out[mask], torch.zeros_like(out[mask]))
    assert torch.equal(out[~mask], cond[~mask])
    # Same seed, same mask; the input is not modified.
    _, again = D.drop_conditions(cond, empty, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again) and cond.min() > 0


def test_drop_conditions_on_token_ids_with_batched_empty():
    ids = torch.arange(1, 9).repeat(1000, 1)
    empty = torch.tensor([[49406, 49407, 0, 0, 0, 0, 0, 0]])
    out, mask = D.drop_conditions(ids, empty, 0.5, torch.Generator().manual_seed(3))
    assert out.dtype == ids.dtype and 0.45 < mask.float().mean() < 0.55
    assert torch.equal(out[mask][0], empty[0]) and torch.equal(out[~mask][0], ids[0])
    none_dropped, mask0 = D.drop_conditions(ids, empty, 0.0, torch.Generator().manual_seed(3))
    assert not mask0.any() and torch.equal(none_dropped, ids)


def test_sample_timesteps_uniform_range_and_seeded():
    t = D.sample_timesteps(50000, 1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() == 0 and t.max() == 999
    assert 450 < t.float().mean() < 550
    assert torch.equal(t[:10], D.sample_timesteps(10, 1000, torch.Generator().manual_seed(0)))


def test_diffusion_loss_is_fp32_mse():
    a, b = torch.randn(4, 3, 8, 8).half(), torch.randn(4, 3, 8, 8).half()
    loss = D.diffusion_loss(a, b)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ((a.float() - b.float()) ** 2).mean())


def test_validation_timesteps_are_evenly_spaced():
    t = D.validation_timesteps(1000, 8)
    assert t.tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    assert D.validation_timesteps(4, 10).tolist() == [0, 1, 2, 3]


def _point_mass_oracle(ab: torch.Tensor, prediction: str, c: float):
    """The exact model for a data set whose every sample equals c."""

    def predict(x, t, cond):
        a = ab[t].view(-1, *([1] * (x.dim() - 1)))
        eps = (x - a.sqrt() * c) / (1 - a).sqrt()
        return eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * c

    return predict


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_validation_loss_is_deterministic_and_zero_for_the_oracle(prediction):
    ab = D.alphas_cumprod(D.betas_for("linear", 1000))
    x0 = torch.full((4, 3, 8, 8), 0.25)
    assert D.validation_loss(_point_mass_oracle(ab, prediction, 0.25), x0, None, ab, prediction) < 1e-8

    def wrong(x, t, cond):  # a model that is off: its loss must be positive, reproducible and seed-dependent
        return 0.5 * x

    first = D.validation_loss(wrong, x0, None, ab, prediction, seed=3)
    assert first > 1e-3
    assert D.validation_loss(wrong, x0, None, ab, prediction, seed=3) == first
    assert D.validation_loss(wrong, x0, None, ab, prediction, seed=4) != first


def test_fixed_noise_depends_only_on_seed_and_shape():
    torch.manual_seed(123)
    a = D.fixed_noise((2, 3), seed=7)
    torch.manual_seed(456)
    assert torch.equal(a, D.fixed_noise((2, 3), seed=7))
    assert not torch.equal(a, D.fixed_noise((2, 3), seed=8))
