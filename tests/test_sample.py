"""Samplers with CFG on toy denoisers whose right answer is known, and the CFG preview grid."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from lowvram.diffusion import alphas_cumprod, betas_for, make_scheduler_config
from lowvram.errors import ConfigError
from lowvram.sample import make_grid, make_sampler, sample, sample_grid, save_grid

SAMPLERS = ("ddpm", "ddim", "dpm++")


def _ab(schedule: str) -> torch.Tensor:
    return alphas_cumprod(betas_for(schedule, 1000))


def _oracle(ab: torch.Tensor, prediction: str):
    """Exact model for a point-mass data set at the value given by ``cond`` ([B, 1])."""

    def denoise(x, t, cond):
        a = ab[t].view(-1, 1, 1, 1)
        c = cond.view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * c) / (1 - a).sqrt()
        return eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * c

    return denoise


def _gaussian_oracle(ab: torch.Tensor, mu: float, s: float):
    """Exact ε-model for data x0 ~ N(mu, s²): E[ε | x_t] = b (x_t − a·mu) / (a²s² + b²)."""

    def denoise(x, t, cond):
        a2 = ab[t].view(-1, 1, 1, 1)
        return (1 - a2).sqrt() * (x - a2.sqrt() * mu) / (a2 * s * s + (1 - a2))

    return denoise


def test_make_sampler_classes_and_cosine_dpm_clipping():
    cfg = make_scheduler_config("cosine", 1000, "v_prediction", clip_sample=True)
    assert isinstance(make_sampler("ddpm", cfg), DDPMScheduler)
    ddim = make_sampler("ddim", cfg)
    assert (
        isinstance(ddim, DDIMScheduler)
        and ddim.config.prediction_type == "v_prediction"
        and ddim.config.clip_sample
    )
    dpm = make_sampler("dpm++", cfg)
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.lambda_min_clipped == pytest.approx(-5.1)
    linear_dpm = make_sampler("dpm++", make_scheduler_config("linear", 1000, "epsilon"))
    assert linear_dpm.config.lambda_min_clipped == -float("inf")  # only cosine needs it
    with pytest.raises(ConfigError, match="sampler"):
        make_sampler("euler", cfg)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_samplers_land_on_the_point_mass_with_guidance(name, schedule, prediction):
    # With the oracle, CFG at scale s samples the point mass at u + s·(c − u): the ε oracle is linear in c.
    ab = _ab(schedule)
    sched = make_sampler(name, make_scheduler_config(schedule, 1000, prediction))
    cond, uncond = torch.tensor([[0.5], [-0.3]]), torch.tensor([[0.1]])
    for scale in (0.0, 1.0, 2.5):
        x = sample(_oracle(ab, prediction), (2, 3, 4, 4), scheduler=sched, cond=cond, uncond=uncond,
                   guidance_scale=scale, steps=20, seed=0)  # fmt: skip
        expected = (0.1 + scale * (cond - 0.1)).view(-1, 1, 1, 1).expand_as(x)
        torch.testing.assert_close(x, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", SAMPLERS)
def test_samplers_reproduce_a_gaussian_data_distribution(name):
    mu, s = 0.3, 0.5
    ab = _ab("linear")
    sched = make_sampler(name, make_scheduler_config("linear", 1000, "epsilon"))
    # DDPM's fixed_small variance under-disperses when steps are skipped (std ~0.45 at 50 steps): full chain.
    steps = 1000 if name == "ddpm" else 50
    x = sample(_gaussian_oracle(ab, mu, s), (64, 1, 8, 8), scheduler=sched, steps=steps, seed=1)
    assert torch.isfinite(x).all() and x.abs().max() < 5
    assert x.mean().item() == pytest.approx(mu, abs=0.03)
    assert x.std().item() == pytest.approx(s, rel=0.06)


def test_dpm_on_cosine_stays_in_a_sane_range_with_an_imperfect_model():
    # A slightly wrong ε-model: at cosine's last step (ᾱ ≈ 2e-9) DPM-Solver multiplies its error by ~1e4
    # unless λ is clipped; make_sampler must clip it (see REFERENCE.md "Samplers").
    def imperfect(x, t, cond):
        return 0.98 * x

    cfg = make_scheduler_config("cosine", 1000, "epsilon")
    x = sample(imperfect, (4, 3, 8, 8), scheduler=make_sampler("dpm++", cfg), steps=25, seed=0)
    assert torch.isfinite(x).all() and x.abs().max() < 10
    unclipped = make_sampler("dpm++", cfg, lambda_min_clipped=-float("inf"))
    wild = sample(imperfect, (4, 3, 8, 8), scheduler=unclipped, steps=25, seed=0)
    assert wild.abs().max() > 10  # the failure the clipping prevents is real for this model


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampling_is_deterministic_given_the_seed(name):
    def model(x, t, cond):
        return 0.9 * x + 0.01 * torch.sin(t.float()).view(-1, 1, 1, 1)

    sched = make_sampler(name, make_scheduler_config("linear", 1000, "epsilon"))
    a = sample(model, (2, 3, 8, 8), scheduler=sched, steps=10, seed=5)
    b = sample(model, (2, 3, 8, 8), scheduler=sched, steps=10, seed=5)
    c = sample(model, (2, 3, 8, 8), scheduler=sched, steps=10, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_batches_uncond_first_and_skips_it_at_scale_one():
    calls = []

    def model(x, t, cond):
        calls.append((x.shape[0], cond.clone()))
        return torch.zeros_like(x)

    sched = make_sampler("ddim", make_scheduler_config("linear", 1000, "epsilon"))
    cond, uncond = torch.ones(3, 5, 2), torch.zeros(1, 5, 2)
    sample(model, (3, 1, 4, 4), scheduler=sched, cond=cond, uncond=uncond, guidance_scale=4.0, steps=3)
    assert [n for n, _ in calls] == [6, 6, 6]
    assert torch.equal(calls[0][1][:3], torch.zeros(3, 5, 2)) and torch.equal(calls[0][1][3:], cond)
    calls.clear()
    sample(model, (3, 1, 4, 4), scheduler=sched, cond=cond, uncond=uncond, guidance_scale=1.0, steps=3)
    assert [n for n, _ in calls] == [3, 3, 3] and torch.equal(calls[0][1], cond)


def test_half_precision_model_input():
    seen = []

    def model(x, t, cond):
        seen.append(x.dtype)
        return torch.zeros_like(x)

    sched = make_sampler("ddim", make_scheduler_config("linear", 1000, "epsilon"))
    out = sample(model, (1, 1, 4, 4), scheduler=sched, steps=2, dtype=torch.float16)
    assert set(seen) == {torch.float16} and out.dtype == torch.float32


def test_make_grid_layout_and_values(tmp_path):
    images = torch.stack([torch.full((3, 8, 8), v) for v in (-1.0, 1.0, 0.0, -1.0, 1.0)])
    grid = make_grid(images, nrow=3)
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)
    assert grid.getpixel((2, 2)) == (0, 0, 0)  # first image, value -1
    assert grid.getpixel((12, 2)) == (255, 255, 255)  # second image, value 1
    assert grid.getpixel((22, 2)) == (128, 128, 128)  # third image, value 0
    labelled = make_grid(images, nrow=3, labels=["cfg 1", "cfg 3", "cfg 5"])
    assert labelled.size[1] > grid.size[1]
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=3)
    assert path.exists()
    with pytest.raises(ValueError):
        make_grid(torch.zeros(2, 8, 8), nrow=2)


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_sample_grid_rows_are_prompts_columns_are_scales(name):
    ab = _ab("linear")
    values = {"": 0.0, "red": 0.5, "blue": -0.4, "green": 0.2}

    def encode(prompts):
        return torch.tensor([[values[p]] for p in prompts])

    sched = make_sampler(name, make_scheduler_config("linear", 1000, "epsilon"))
    scales = [1.0, 2.0]
    prompts = ["red", "blue", "green"]
    kwargs = dict(shape=(3, 4, 4), scheduler=sched, steps=10, seed=0)
    image, imgs = sample_grid(_oracle(ab, "epsilon"), encode, prompts, scales, **kwargs)
    assert imgs.shape == (6, 3, 4, 4) and image.size[0] == 2 * 6 + 2
    for r, p in enumerate(prompts):
        for c, s in enumerate(scales):
            torch.testing.assert_close(
                imgs[r * 2 + c], torch.full((3, 4, 4), s * values[p]), atol=1e-4, rtol=0
            )
    # A deterministic sampler gives the same grid whatever the batch size.
    _, chunked = sample_grid(_oracle(ab, "epsilon"), encode, prompts, scales, batch_size=1, **kwargs)
    torch.testing.assert_close(chunked, imgs)


def test_sample_grid_shares_noise_along_a_row_and_decodes():
    def model(x, t, cond):  # ignores the condition, so every column of a row must be identical
        return 0.9 * x

    def decode(latents):
        return torch.nn.functional.interpolate(latents[:, :3], scale_factor=2).clamp(-1, 1)

    sched = make_sampler("ddpm", make_scheduler_config("linear", 1000, "epsilon"))
    _, imgs = sample_grid(model, lambda ps: torch.zeros(len(ps), 1), ["a", "b"], [1.0, 3.0, 5.0],
                          shape=(4, 4, 4), scheduler=sched, steps=5, seed=2, decode=decode)  # fmt: skip
    assert imgs.shape == (6, 3, 8, 8)
    assert torch.equal(imgs[0], imgs[1]) and torch.equal(imgs[0], imgs[2])
    assert not torch.equal(imgs[0], imgs[3])  # rows get different noise
