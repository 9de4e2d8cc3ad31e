"""Canonical (hub / real SD checkpoint) names in the files lowvram writes from transformers CLIP models,
whatever transformers is installed (5.x names CLIPTextModel's weights without ``text_model.``)."""

from __future__ import annotations

import torch
from safetensors import safe_open
from sd_fixtures import BUILDERS, perturb_lora
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lowvram import lora as L
from lowvram.models import key_names as K


def _keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_canonical_names_map_back_onto_the_installed_models():
    cfg = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                         vocab_size=64, max_position_embeddings=8, projection_dim=8, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    for cls in (CLIPTextModel, CLIPTextModelWithProjection):
        model = cls(cfg)
        live = set(model.state_dict())
        canonical = {K.canonical_text_key(k) for k in live}
        assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in canonical), cls
        assert {K.live_text_key(k, model) for k in canonical} == live, cls
        assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in canonical


def test_lora_files_name_text_encoders_as_the_hub_does(tmp_path):
    """diffusers-format keys ``text_encoder.text_model.encoder.layers.N…``; kohya ``lora_te_text_model_…``."""
    pipe = BUILDERS["sdxl"](tmp_path)
    tes = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    L.attach_lora(pipe.unet, 4, 4.0)
    for te in tes.values():
        L.attach_text_lora(te, 4, 4.0)
    perturb_lora(pipe.unet, *tes.values())
    diff, _ = L.read_lora_file(L.save_lora_diffusers(tmp_path / "d.safetensors", pipe.unet, tes, "sdxl"))
    for name in tes:
        keys = [k for k in diff if k.startswith(name + ".")]
        assert len(keys) == 2 * 6 * 2  # 2 layers x 6 projections x (A, B)
        assert all(k.startswith(f"{name}.text_model.encoder.layers.") for k in keys), keys[0]
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_A.weight" in diff
    kohya, _ = L.read_lora_file(L.save_lora_kohya_from_models(tmp_path / "k.safetensors", pipe.unet, tes, "sdxl"))
    te_keys = [k for k in kohya if k.startswith("lora_te")]
    assert te_keys and all(k.startswith(("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"))
                           for k in te_keys)


def test_saved_pipeline_folder_has_the_hub_layout_and_loads_back(tmp_path):
    """What a full fine-tune and a merge write: text_model.… weights, and vocab.json + merges.txt beside
    tokenizer.json (transformers 4.x's CLIPTokenizer reads only those)."""
    from diffusers import StableDiffusionPipeline

    pipe = BUILDERS["sd1"](tmp_path)
    pipe.save_pretrained(tmp_path / "out")
    K.canonicalize_pipeline_folder(tmp_path / "out")
    keys = _keys(tmp_path / "out" / "text_encoder" / "model.safetensors")
    assert keys and all(k.startswith("text_model.") for k in keys)
    tok_dir = tmp_path / "out" / "tokenizer"
    slow = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    prompt = "a photo of sks dog on the beach"
    assert slow(prompt).input_ids == pipe.tokenizer(prompt).input_ids
    back = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    for a, b in zip(back.text_encoder.state_dict().values(), pipe.text_encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert K.canonicalize_pipeline_folder(tmp_path / "out") == 0  # idempotent
