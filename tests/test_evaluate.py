"""Prompt-adherence arithmetic on fake generators (no model involved)."""

import pytest
import torch

from lowvram.data import builtin as B
from lowvram.errors import ConfigError
from lowvram.evaluate import format_report, prompt_adherence


def own_images(prompts, n):
    """A perfect 'model': the dataset's own images of each prompt (different jitter per sample)."""
    return torch.stack([B.image_for_prompt(p, seed=k) for p in prompts for k in range(n)])


def noise_images(prompts, n):
    g = torch.Generator().manual_seed(0)
    return torch.rand((len(prompts) * n, 3, 32, 32), generator=g) * 2 - 1


def score(generate, prompts, n=3):
    return prompt_adherence(generate, prompts, n, B.matches, B.decode_attributes, B.attributes_of_caption)


def test_perfect_generator_scores_one():
    res = score(own_images, B.eval_prompts())
    assert res["overall"] == 1.0 and res["samples"] == 36 and res["correct"] == 36
    assert set(res["per_prompt"]) == set(B.eval_prompts()) and all(v == 1.0 for v in res["per_prompt"].values())
    assert res["per_attribute"] == {"shape": 1.0, "colour": 1.0, "background": 1.0}


def test_noise_generator_scores_about_zero():
    res = score(noise_images, B.eval_prompts())
    assert res["overall"] <= 0.05


def test_partial_generator_counts_per_prompt_and_attribute():
    prompts = ["a red circle on a white background", "a blue square on a black background"]

    def half_wrong(ps, n):
        # prompt 0 is right; prompt 1 gets a red square on black: colour wrong, shape and background right
        return torch.stack([B.image_for_prompt(ps[0], seed=k) for k in range(n)]
                           + [B.image_for_prompt("a red square on a black background", seed=k) for k in range(n)])

    res = score(half_wrong, prompts, n=2)
    assert res["overall"] == 0.5
    assert res["per_prompt"] == {prompts[0]: 1.0, prompts[1]: 0.0}
    assert res["per_attribute"] == {"colour": 0.5, "shape": 1.0, "background": 1.0}
    assert "50.0%" in format_report(res)


def test_repeated_prompts_are_pooled():
    prompt = "a red circle on a white background"

    def alternate(ps, n):  # first copy of the prompt right, second copy wrong
        right = [B.image_for_prompt(prompt, seed=k) for k in range(n)]
        wrong = [B.image_for_prompt("a red square on a white background", seed=k) for k in range(n)]
        return torch.stack(right + wrong + right)

    res = prompt_adherence(alternate, [prompt] * 3, 2, B.matches)
    assert res["per_prompt"] == {prompt: pytest.approx(2 / 3)} and "per_attribute" not in res


def test_bad_arguments():
    with pytest.raises(ConfigError):
        prompt_adherence(own_images, [], 2, B.matches)
    with pytest.raises(ConfigError):
        prompt_adherence(own_images, B.eval_prompts(), 0, B.matches)
    with pytest.raises(ValueError, match="shape"):
        prompt_adherence(lambda ps, n: torch.zeros(1, 3, 32, 32), B.eval_prompts(), 2, B.matches)
