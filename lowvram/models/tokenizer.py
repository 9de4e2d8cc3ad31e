"""A word-level tokenizer built from the training captions, for text encoders trained from scratch.

Attribute captions use a few dozen words, so a word vocabulary is exact and tiny (no BPE merges to
learn); it is a ``PreTrainedTokenizerFast`` so it saves and loads like any Hugging Face tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from ..errors import ConfigError

# Fixed ids: the text encoder's config uses them (pad 0, eos 3 — not 2, which CLIP reads as "legacy").
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)


def build_tokenizer(captions: Iterable[str], max_length: int) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer over the words of ``captions``; pads/truncates to ``max_length``.

    Every sequence is ``[BOS] words… [EOS] [PAD]…``; unknown words map to ``[UNK]``.
    """
    if max_length < 3:
        raise ConfigError(f"text max length {max_length} is too short", "use at least 3 tokens (bos, word, eos)")
    pre = pre_tokenizers.Whitespace()
    norm = normalizers.Lowercase()
    words: dict[str, None] = {}
    for caption in captions:
        for word, _ in pre.pre_tokenize_str(norm.normalize_str(caption)):
            words.setdefault(word, None)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words):  # sorted: the same captions give the same ids, whatever their order
        vocab[word] = len(vocab)

    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = norm
    core.pre_tokenizer = pre
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
    )


def encode(tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> torch.LongTensor:
    """Token ids ``[len(prompts), max_length]``, padded and truncated to the tokenizer's max length."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
