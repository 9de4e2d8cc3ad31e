"""Prompt adherence: the share of generated samples whose decoded attributes all match their prompt.

Pure bookkeeping: the caller passes a ``generate`` function (the run's EMA model + sampler) and a
``matches``/decoder pair (the built-in dataset's), so this module loads no model and knows no dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .errors import ConfigError

Generate = Callable[[list[str], int], torch.Tensor]


def prompt_adherence(
    generate: Generate,
    prompts: list[str],
    samples_per_prompt: int,
    matches: Callable[[str, torch.Tensor], bool],
    decode: Callable[[torch.Tensor], dict[str, Any]] | None = None,
    attributes_of: Callable[[str], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Sample each prompt ``samples_per_prompt`` times and score the samples.

    ``generate(prompts, n)`` returns images ``[len(prompts) * n, 3, H, W]`` in [-1, 1], prompt-major
    (the n samples of prompt 0 first). Returns ``{"overall", "per_prompt", "samples", "correct"}`` and,
    when ``decode`` and ``attributes_of`` are given, ``"per_attribute"`` (accuracy of each attribute).
    """
    if not prompts:
        raise ConfigError("no prompts to evaluate", "pass at least one prompt")
    if samples_per_prompt < 1:
        raise ConfigError(f"samples per prompt must be 1 or more, got {samples_per_prompt}",
                          "use e.g. --samples 8")
    images = generate(list(prompts), samples_per_prompt)
    expected = len(prompts) * samples_per_prompt
    if images.ndim != 4 or images.shape[0] != expected:
        raise ValueError(f"generate returned shape {tuple(images.shape)}, expected [{expected}, C, H, W]")

    prompt_hits: dict[str, list[int]] = {}  # prompt -> [hits, samples]; repeated prompts are pooled
    attr_hits: dict[str, int] = {}
    correct = 0
    for p, prompt in enumerate(prompts):
        hits = 0
        for image in images[p * samples_per_prompt : (p + 1) * samples_per_prompt]:
            hits += bool(matches(prompt, image))
            if decode is not None and attributes_of is not None:
                got, want = decode(image), attributes_of(prompt)
                for key, value in want.items():
                    attr_hits[key] = attr_hits.get(key, 0) + (got.get(key) == value)
        counts = prompt_hits.setdefault(prompt, [0, 0])
        counts[0] += hits
        counts[1] += samples_per_prompt
        correct += hits
    result: dict[str, Any] = {
        "overall": correct / expected,
        "per_prompt": {prompt: h / n for prompt, (h, n) in prompt_hits.items()},
        "samples": expected,
        "correct": correct,
    }
    if attr_hits:
        result["per_attribute"] = {k: v / expected for k, v in attr_hits.items()}
    return result


def format_report(result: dict[str, Any]) -> str:
    """A short human-readable table of an adherence result (for ``lowvram eval``)."""
    lines = [f"prompt adherence: {result['overall']:.1%} ({result['correct']}/{result['samples']} samples)"]
    for key, acc in result.get("per_attribute", {}).items():
        lines.append(f"  {key:<12} {acc:.1%}")
    for prompt, share in result["per_prompt"].items():
        lines.append(f"  {share:6.1%}  {prompt}")
    return "\n".join(lines)
