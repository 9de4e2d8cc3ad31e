"""Where a fine-tune's frozen text encoders run (``memory.text_encoders``), and the preview prompts' text cached
with the captions so that previews never bring the text encoders back to the card.

``card``: both encoders on the training device while the caches are built (the old behaviour); ``sequential``:
each encoder visits the card only for its own forward (the other waits in host RAM); ``cpu``: they encode on
the CPU and never touch the card. The last two exist for one reason: SDXL's encoders in fp32 (3.1 GiB) set the
peak of the whole run on a 4 GB card, and the captions are encoded once. The memory profile replays the same
placement (``memory/encoding.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def previews_from_cache(cache_text: bool, train_text: bool, shuffle_tags: bool) -> bool:
    """Whether the run's text is encoded once for good: cached captions of frozen encoders with static captions.
    Then the preview prompts are cached with them and the encoders never encode again."""
    return cache_text and not train_text and not shuffle_tags


def text_place_problem(place: str, cache_text: bool, train_text: bool, shuffle_tags: bool) -> str:
    """What a placement off the card needs and this run lacks ("" when it is fine): the encoders must
    encode once, for the cache, and never during training (config validation reports it)."""
    if place == "card":
        return ""
    why = ("lora.text_encoder trains them" if train_text else
           "memory.cache_text=false encodes the captions every step" if not cache_text else
           "data.shuffle_tags makes new captions every draw" if shuffle_tags else "")
    return f"card: {place} encodes the captions once, for the cache, but {why}" if why else ""


def encode_device(place: str, device: torch.device) -> torch.device:
    """Where the encoders' inputs go: the CPU for ``cpu``, else the training device (``sequential``'s
    encoders are brought there by ``visit_device`` for their forward)."""
    return torch.device("cpu") if place == "cpu" else device


def visit_device(modules: Iterable[nn.Module], device: torch.device) -> list[Any]:
    """``sequential``: each module moves to ``device`` just before its forward and back to the CPU after it,
    so at most one encoder is on the card at a time. Returns the hook handles."""
    def arrive(mod: nn.Module, _args: Any) -> None:
        mod.to(device)

    def leave(mod: nn.Module, _args: Any, _out: Any) -> None:
        mod.to("cpu")

    handles = []
    for m in modules:
        handles += [m.register_forward_pre_hook(arrive), m.register_forward_hook(leave)]
    return handles


def preview_strings(prompts: list[str], negatives: list[str]) -> set[str]:
    """The texts a preview encodes: its prompts, their negative prompts and the empty prompt (the
    unconditional half of guidance without a negative prompt)."""
    return {*prompts, *negatives, ""}


class PreviewText:
    """The preview prompts' encodings (host memory), handed to the diffusers pipeline as ``prompt_embeds``."""

    def __init__(self, rows: dict[str, dict[str, torch.Tensor]], sdxl: bool, zero_negative: bool) -> None:
        self.rows, self.sdxl, self.zero_negative = rows, sdxl, zero_negative

    @classmethod
    def from_cache(cls, get: Callable[[list[str]], Any], strings: Iterable[str], sdxl: bool,
                   zero_negative: bool) -> PreviewText:
        """``strings`` read through ``get`` (the text cache's, where they were encoded with the captions; or
        the job's encoder when nothing was cached yet: class images drawn before caching)."""
        strings = sorted(set(strings))
        got = get(strings)
        if isinstance(got, torch.Tensor):  # a cache read back from disk has no structure names
            got = {"embeds": got}
        rows = {s: {k: v[i : i + 1].cpu() for k, v in got.items()} for i, s in enumerate(strings)}
        return cls(rows, sdxl, zero_negative)

    def pipe_kwargs(self, prompts: list[str], negatives: list[str]) -> dict[str, Any]:
        """The pipeline's text arguments for ``prompts`` as ``pipe(prompt=..., negative_prompt=...)`` would
        encode them: SDXL zeros the unconditional half when no prompt has a negative (and the checkpoint says
        ``force_zeros_for_empty_prompt``), which the pipeline then does itself; otherwise the negative (or the
        empty prompt) is encoded as it would be."""
        def stack(texts: list[str], name: str) -> torch.Tensor:
            return torch.cat([self.rows[t][name] for t in texts])

        kw: dict[str, Any] = {"prompt_embeds": stack(prompts, "embeds")}
        if self.sdxl:
            kw["pooled_prompt_embeds"] = stack(prompts, "pooled")
        if self.sdxl and self.zero_negative and not any(negatives):
            return kw
        kw["negative_prompt_embeds"] = stack(negatives, "embeds")
        if self.sdxl:
            kw["negative_pooled_prompt_embeds"] = stack(negatives, "pooled")
        return kw
