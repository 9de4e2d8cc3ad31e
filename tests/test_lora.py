"""LoRA via peft: attach, save (diffusers/peft and kohya), load back with diffusers, names, counting."""

from __future__ import annotations

import pytest
import torch
from sd_fixtures import BUILDERS, perturb_lora, run, text_encoders

from lowvram import lora as L
from lowvram.errors import ModelLoadError

RANK, ALPHA = 4, 2.0  # alpha != rank: a file that loses alpha gives a different image
TOL = 1e-5  # loaded-from-file vs in-memory LoRA, same fp32 computation (measured: 0.0)

# Real kohya names (sd-scripts / A1111 / ComfyUI) for modules that exist in the real models too.
KOHYA_SD1 = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_mid_block_attentions_0_proj_in",
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
    "lora_unet_up_blocks_3_attentions_2_proj_out",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te_text_model_encoder_layers_1_mlp_fc2",
}
KOHYA_SDXL = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_input_blocks_5_1_proj_in",
    "lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_out_0",
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2",
    "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_k",
    "lora_te1_text_model_encoder_layers_0_self_attn_k_proj",
    "lora_te2_text_model_encoder_layers_1_self_attn_out_proj",
    # LoCon (conv=True): ResNet and sampler convs, original names
    "lora_unet_input_blocks_1_0_in_layers_2",
    "lora_unet_input_blocks_3_0_op",
    "lora_unet_output_blocks_2_2_conv",
    "lora_unet_middle_block_2_out_layers_3",
}


@pytest.fixture(scope="module", params=[("sd1", False), ("sdxl", True)], ids=["sd1", "sdxl-conv"])
def trained(request, tmp_path_factory):
    family, conv = request.param
    tmp = tmp_path_factory.mktemp(family)
    base_out = run(BUILDERS[family](tmp))
    pipe = BUILDERS[family](tmp)
    params = L.attach_lora(pipe.unet, RANK, ALPHA, conv=conv)
    for te in text_encoders(pipe).values():
        params += L.attach_text_lora(te, RANK, ALPHA)
    perturb_lora(pipe.unet, *text_encoders(pipe).values())
    return {"family": family, "tmp": tmp, "pipe": pipe, "base_out": base_out, "mem_out": run(pipe),
            "params": params, "conv": conv}


def test_lora_changes_the_output_and_trains_only_lora(trained):
    assert (trained["mem_out"] - trained["base_out"]).abs().max() > 1e-2
    assert all(p.dtype == torch.float32 for p in trained["params"])
    trainable = {n for n, p in trained["pipe"].unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_saved_lora_loads_fully_in_diffusers_and_reproduces_the_output(trained, fmt):
    family, pipe, tmp = trained["family"], trained["pipe"], trained["tmp"]
    tes = text_encoders(pipe)
    if fmt == "diffusers":
        path = L.save_lora_diffusers(tmp / f"{fmt}.safetensors", pipe.unet, tes, family, {"ss_steps": 3})
    else:
        path = L.save_lora_kohya_from_models(tmp / f"{fmt}.safetensors", pipe.unet, tes, family, steps=3)
    fresh = BUILDERS[family](tmp)
    fresh.load_lora_weights(str(path))
    loaded = L.ensure_lora_loaded(fresh, path)
    assert loaded["unet"] == L.count_loaded_modules(pipe.unet)
    assert set(loaded) == {"unet", *tes}
    out = run(fresh)
    assert torch.allclose(out, trained["mem_out"], atol=TOL)
    assert (out - trained["base_out"]).abs().max() > 1e-2


def test_kohya_names_alpha_and_metadata_match_the_table(trained):
    family, pipe = trained["family"], trained["pipe"]
    path = L.save_lora_kohya_from_models(trained["tmp"] / "names.safetensors", pipe.unet, text_encoders(pipe),
                                         family, metadata={"ss_num_train_images": 12}, steps=7)
    state, meta = L.read_lora_file(path)
    modules = {k.split(".")[0] for k in state}
    expected = KOHYA_SD1 if family == "sd1" else KOHYA_SDXL
    assert expected <= modules, sorted(expected - modules)
    assert not any(".lora_A" in k or k.startswith(("unet", "text_encoder")) for k in state)
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(state)
        assert state[f"{m}.alpha"].item() == ALPHA
    if family == "sd1":
        assert L.count_saved_modules(state)["unet"] == 192  # the SD 1.5 count A1111 reports (same layout)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == ALPHA
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert meta["ss_steps"] == "7" and meta["ss_num_train_images"] == "12" and "lowvram_version" in meta


def test_peft_state_dict_is_unconverted_and_counted(trained):
    pipe = trained["pipe"]
    state = L.lora_state_dict_peft(pipe.unet, text_encoders(pipe))
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in state)
    counts = L.count_saved_modules(state)
    assert counts["unet"] == L.count_loaded_modules(pipe.unet)
    assert counts["text_encoder"] == L.count_loaded_modules(pipe.text_encoder)


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
def test_partly_loaded_lora_is_detected(tmp_path):
    """The REFERENCE.md trap: convert_state_dict_to_diffusers output loads only the non-attention modules."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipe = BUILDERS["sd1"](tmp_path)
    L.attach_lora(pipe.unet, RANK, ALPHA)
    converted = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "trap", unet_lora_layers=converted)
    fresh = BUILDERS["sd1"](tmp_path)
    fresh.load_lora_weights(str(tmp_path / "trap" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ModelLoadError, match="loaded only partly"):
        L.ensure_lora_loaded(fresh, {"unet": L.count_loaded_modules(pipe.unet)})


def test_lora_on_fp16_base_keeps_fp32_trainables_and_real_sdxl_target_count(tmp_path):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from lowvram.models.pretrained import CONFIGS_DIR

    unet = BUILDERS["sd1"](tmp_path).unet.to(torch.float16)
    params = L.attach_lora(unet, RANK, ALPHA, dropout=0.1)
    assert params and all(p.dtype == torch.float32 for p in params)
    assert next(unet.conv_in.parameters()).dtype == torch.float16
    with init_empty_weights():
        xl = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS_DIR / "sdxl" / "unet"))
    names = L.lora_target_names(xl, L.UNET_TARGETS)
    assert len(names) == 722  # kohya's SDXL UNet LoRA module count
    kohya = {L._kohya_module("unet", n, "sdxl", xl.config) for n in names}
    assert "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_v" in kohya
    assert "lora_unet_output_blocks_2_1_transformer_blocks_9_ff_net_2" in kohya


def test_load_lora_into_for_resume(trained, tmp_path):
    family, pipe = trained["family"], trained["pipe"]
    other = BUILDERS[family](tmp_path)
    L.attach_lora(other.unet, RANK, ALPHA, conv=trained["conv"])
    unet_state = L.split_components(L.lora_state_dict_peft(pipe.unet))["unet"]
    L.load_lora_into(other.unet, unet_state)
    for (n, a), (_, b) in zip(pipe.unet.named_parameters(), other.unet.named_parameters(), strict=True):
        if "lora_" in n:
            assert torch.equal(a, b), n


def test_bad_rank_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="lora.rank"):
        L.attach_lora(BUILDERS["sd1"](tmp_path).unet, 0, 1.0)
