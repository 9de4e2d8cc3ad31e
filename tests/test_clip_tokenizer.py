"""The CLIP tokenizers lowvram builds for single-file checkpoints from its shipped vocabulary.

Reference ids come from open_clip's own CLIP tokenizer (tools/clip_reference_ids.py), an independent
implementation of CLIP's BPE over the same vocabulary file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowvram.models import clip_vocab as V
from lowvram.models.pretrained import CONFIGS_DIR, TOKENIZER_NAMES, load_tokenizers

REFERENCE = json.loads((Path(__file__).parent / "data" / "clip_reference_ids.json").read_text(encoding="utf-8"))
BOS, EOS = 49406, 49407
# what each family's tokenizer pads with (hub tokenizer_config.json): OpenAI CLIP "<|endoftext|>", OpenCLIP "!"
PAD_IDS = {("sd1", "tokenizer"): EOS, ("sd2", "tokenizer"): 0, ("sd2-v", "tokenizer"): 0,
           ("sdxl", "tokenizer"): EOS, ("sdxl", "tokenizer_2"): 0,
           ("flux-dev", "tokenizer"): EOS, ("flux-schnell", "tokenizer"): EOS}


@pytest.fixture(scope="module")
def tokenizers():
    out = {}
    for family, names in TOKENIZER_NAMES.items():
        toks = load_tokenizers(family, None, CONFIGS_DIR / family)
        out.update({(family, n): t for n, t in zip(names, toks, strict=False)})
    return out


def test_vocabulary_is_clips():
    vocab, merges = V.clip_vocab()
    assert len(vocab) == V.VOCAB_SIZE == 49408 and len(merges) == 48894
    assert (vocab["!"], vocab["!</w>"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (0, 256, BOS, EOS)
    assert sorted(vocab.values()) == list(range(V.VOCAB_SIZE))  # no token lost to a duplicate


def test_every_family_has_its_tokenizers_with_clips_length_and_pad(tokenizers):
    assert set(tokenizers) == set(PAD_IDS)
    for key, tok in tokenizers.items():
        assert tok.model_max_length == 77 and len(tok) == V.VOCAB_SIZE, key
        assert tok.pad_token_id == PAD_IDS[key], key
        assert type(tok).__name__ == "CLIPTokenizer"  # what diffusers' pipelines and model_index.json expect


@pytest.mark.parametrize("prompt", list(REFERENCE["ids"]))
def test_ids_equal_open_clip_padded_and_truncated_as_the_pipelines_do(tokenizers, prompt):
    ref = REFERENCE["ids"][prompt]
    for key, tok in tokenizers.items():
        ids = tok(prompt, padding="max_length", truncation=True, max_length=77).input_ids
        # the pipelines' call: 77 ids, BOS + at most 75 prompt tokens + EOS, then the family's pad token
        expected = [BOS, *ref[:75], EOS]
        expected += [PAD_IDS[key]] * (77 - len(expected))
        assert ids == expected, key
    if len(ref) > 75:
        assert len(tokenizers["sd1", "tokenizer"](prompt).input_ids) == len(ref) + 2  # untruncated: every token


def test_openclip_pad_token_is_special_as_in_the_hub_folders(tokenizers):
    """SD 2.x / SDXL tokenizer_2 folders mark "!" (their pad) special: a "!" in a prompt is id 0, not BPE's 256."""
    assert tokenizers["sd1", "tokenizer"]("wow!").input_ids == [BOS, 2781, 256, EOS]
    assert tokenizers["sdxl", "tokenizer_2"]("wow!").input_ids == [BOS, 2781, 0, EOS]


def test_tokenizer_folder_without_vocabulary_is_a_clear_error(tmp_path):
    from lowvram.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no vocab.json"):
        load_tokenizers("sd1", tmp_path, CONFIGS_DIR / "sd1")
