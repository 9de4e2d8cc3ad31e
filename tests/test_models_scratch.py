"""Named from-scratch sizes build on meta (for the profiler) and on CPU; the caption tokenizer round-trips."""

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lowvram.data.builtin import all_captions
from lowvram.errors import ConfigError
from lowvram.models import scratch as S
from lowvram.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, build_tokenizer, encode

# Ballparks (millions): a changed config that moves these a lot should be a deliberate change.
EXPECTED_UNET_M = {"tiny": (1.0, 2.5), "celeba64": (15, 25), "ddpm64": (60, 130)}


@pytest.mark.parametrize("name", list(S.MODEL_SIZES))
def test_every_size_builds_on_meta_with_its_parameter_ballpark(name):
    spec = S.get_spec(name)
    unet = S.build_unet(spec, device="meta")
    text = S.build_text_encoder(spec, vocab_size=40, device="meta")
    assert all(p.is_meta for p in unet.parameters()) and all(p.is_meta for p in text.parameters())
    lo, hi = EXPECTED_UNET_M[name]
    assert lo * 1e6 < S.param_count(unet) < hi * 1e6
    assert text.config.max_position_embeddings == spec.text_max_length
    assert unet.config.cross_attention_dim == text.config.hidden_size
    if spec.vae is not None:
        vae = S.build_vae(spec, device="meta")
        assert all(p.is_meta for p in vae.parameters())
        assert vae.config.latent_channels == spec.latent_channels
        latent_unet = S.build_unet(spec, device="meta", task="latent")
        assert latent_unet.config.in_channels == spec.latent_channels
        assert latent_unet.config.sample_size == spec.latent_resolution


def test_celeba64_matches_the_documented_recipe():
    spec = S.get_spec("celeba64")
    assert spec.latent_resolution == 32 and spec.resolution == 64 and spec.latent_channels == 4
    assert tuple(spec.unet["block_out_channels"]) == (64, 128, 256) and spec.unet["cross_attention_dim"] == 512
    assert spec.text_max_length == 77 and spec.text_encoder["hidden_size"] == 512
    assert spec.default_task == "latent"


def test_meta_build_works_under_an_outer_meta_context():
    with torch.device("meta"):
        unet = S.build_unet(S.get_spec("tiny"), device="meta")
    assert next(unet.parameters()).is_meta


def test_tiny_runs_forward_on_cpu_with_the_right_shapes():
    spec = S.get_spec("tiny")
    tok = build_tokenizer(all_captions(), spec.text_max_length)
    text = S.build_text_encoder(spec, len(tok))
    unet = S.build_unet(spec)
    ids = encode(tok, ["a red circle on a white background", ""])
    with torch.no_grad():
        h = text(ids).last_hidden_state
        out = unet(torch.randn(2, 3, spec.resolution, spec.resolution), torch.tensor([10, 900]),
                   encoder_hidden_states=h).sample
    assert h.shape == (2, spec.text_max_length, spec.text_encoder["hidden_size"])
    assert out.shape == (2, 3, spec.resolution, spec.resolution) and torch.isfinite(out).all()


def test_tiny_latent_task_shapes_chain_vae_and_unet():
    spec = S.get_spec("tiny")
    vae, unet = S.build_vae(spec), S.build_unet(spec, task="latent")
    text = S.build_text_encoder(spec, 20)
    with torch.no_grad():
        z = vae.encode(torch.randn(1, 3, spec.resolution, spec.resolution)).latent_dist.mode()
        assert z.shape == (1, spec.latent_channels, spec.latent_resolution, spec.latent_resolution)
        h = text(torch.zeros(1, spec.text_max_length, dtype=torch.long)).last_hidden_state
        assert unet(z, torch.tensor([5]), encoder_hidden_states=h).sample.shape == z.shape


def test_unknown_size_and_impossible_task_raise_config_errors():
    with pytest.raises(ConfigError, match="tiny"):
        S.get_spec("huge")
    with pytest.raises(ConfigError, match="latent"):
        S.build_unet(S.get_spec("ddpm64"), device="meta", task="latent")
    with pytest.raises(ConfigError):
        S.build_vae(S.get_spec("ddpm64"), device="meta")


def test_tokenizer_vocabulary_padding_and_truncation():
    tok = build_tokenizer(all_captions(), max_length=12)
    ids = encode(tok, ["A Red circle on a white background", "", "a red blob"])
    assert ids.shape == (3, 12) and ids.dtype == torch.long
    assert ids[0, 0] == BOS_ID and EOS_ID in ids[0].tolist() and ids[0, -1] == PAD_ID
    assert ids[1, :2].tolist() == [BOS_ID, EOS_ID]
    assert ids[2].tolist()[:4] == [BOS_ID, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("red"), UNK_ID]
    long = encode(tok, [" ".join(["red"] * 30)])
    assert long.shape == (1, 12) and long[0, -1] == EOS_ID  # truncated, still closed by eos
    # word ids do not depend on caption order
    assert build_tokenizer(reversed(all_captions()), 12).get_vocab() == tok.get_vocab()


def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    tok = build_tokenizer(all_captions(), max_length=16)
    tok.save_pretrained(tmp_path)
    prompts = ["a green triangle on a gray background", "a yellow square on a black background"]
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        assert loaded.model_max_length == 16
        assert torch.equal(encode(loaded, prompts), encode(tok, prompts))
        assert loaded.pad_token_id == PAD_ID and loaded.eos_token_id == EOS_ID


def test_tokenizer_rejects_too_short_max_length():
    with pytest.raises(ConfigError):
        build_tokenizer(all_captions(), max_length=2)
