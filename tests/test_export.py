"""Export: LDM key mapping (checked against diffusers' own converters), LoRA export, merge into the base."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from sd_fixtures import BUILDERS, perturb_lora, run, save_tiny, text_encoders

from lowvram import lora as L
from lowvram.errors import ModelLoadError
from lowvram.export import RUN_LORA_FILE, export_lora, merge_lora
from lowvram.models import ldm_convert as C
from lowvram.models.pretrained import CONFIGS_DIR, load_pretrained

RANK, ALPHA = 4, 2.0
MERGE_TOL = 1e-4  # fused (W + BA) vs unfused LoRA forward, fp32: only rounding differs


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_real_size_unet_names_round_trip_through_diffusers_converter(family):
    """Our diffusers→LDM names on the real SD 1.5 / SDXL UNet layout, converted back by diffusers itself."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = UNet2DConditionModel.load_config(CONFIGS_DIR / family / "unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg)
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    ldm = C.unet_to_ldm({k: torch.empty(0) for k in shapes}, cfg)
    known = {  # names every A1111/ComfyUI checkpoint of the family has
        "sd1": ["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight", "middle_block.1.proj_in.weight", "input_blocks.3.0.op.weight",
                "output_blocks.0.0.skip_connection.weight", "out.2.weight", "time_embed.0.weight"],
        "sdxl": ["label_emb.0.0.weight", "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                 "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight", "output_blocks.2.2.conv.weight",
                 "output_blocks.5.2.conv.weight", "middle_block.1.transformer_blocks.9.norm3.weight"],
    }[family]
    assert {C.UNET_PREFIX + k for k in known} <= set(ldm)
    back = convert_ldm_unet_checkpoint(ldm, dict(cfg))
    assert set(back) == set(shapes)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp")
    paths = save_tiny(tmp, "sd1")
    base = BUILDERS["sd1"](tmp)
    base_out = run(base)
    pipe = BUILDERS["sd1"](tmp)
    L.attach_lora(pipe.unet, RANK, ALPHA)
    L.attach_text_lora(pipe.text_encoder, RANK, ALPHA)
    perturb_lora(pipe.unet, pipe.text_encoder)
    run_dir = tmp / "run"
    L.save_lora_diffusers(run_dir / RUN_LORA_FILE, pipe.unet, text_encoders(pipe), "sd1", {"ss_steps": 5})
    return {"tmp": tmp, "paths": paths, "pipe": pipe, "base_out": base_out, "mem_out": run(pipe), "run": run_dir}


def test_export_from_run_dir_equals_direct_kohya_save(sd1):
    out = export_lora(sd1["run"], sd1["tmp"] / "exp_kohya.safetensors", "kohya")
    direct = L.save_lora_kohya_from_models(sd1["tmp"] / "direct.safetensors", sd1["pipe"].unet,
                                           text_encoders(sd1["pipe"]), "sd1")
    a, meta = L.read_lora_file(out)
    b, _ = L.read_lora_file(direct)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["ss_network_alpha"] == str(ALPHA) and meta["ss_network_dim"] == str(RANK)
    assert meta["ss_steps"] == "5"


def test_export_diffusers_format_loads_fully(sd1):
    out = export_lora(sd1["run"], sd1["tmp"] / "exp_diff.safetensors", "diffusers", metadata={"note": "x"})
    fresh = BUILDERS["sd1"](sd1["tmp"])
    fresh.load_lora_weights(str(out))
    L.ensure_lora_loaded(fresh, out)
    assert torch.allclose(run(fresh), sd1["mem_out"], atol=1e-5)


def test_export_errors(sd1):
    with pytest.raises(ModelLoadError, match="unknown LoRA format"):
        export_lora(sd1["run"], sd1["tmp"] / "x.safetensors", "ckpt")
    kohya = export_lora(sd1["run"], sd1["tmp"] / "k2.safetensors")
    with pytest.raises(ModelLoadError, match="already in kohya"):
        export_lora(kohya, sd1["tmp"] / "x.safetensors")
    with pytest.raises(ModelLoadError, match="no LoRA found"):
        export_lora(sd1["tmp"] / "nonexistent_run_dir_with_nothing", sd1["tmp"] / "x.safetensors")


def test_merge_reproduces_base_plus_lora_as_folder_and_single_file(sd1):
    out = merge_lora(sd1["paths"]["folder"], sd1["run"], sd1["tmp"] / "merged", single_file=True, save_dtype="fp32")
    folder = load_pretrained(out["diffusers"])
    single = load_pretrained(out["single_file"], config=sd1["paths"]["folder"], tokenizer=sd1["paths"]["folder"])
    for comps in (folder, single):
        assert L.count_loaded_modules(comps.unet) == 0  # fused, no adapter left
        merged_out = run(comps.pipeline(sd1["pipe"].scheduler))
        assert torch.allclose(merged_out, sd1["mem_out"], atol=MERGE_TOL)
        assert (merged_out - sd1["base_out"]).abs().max() > 1e-2
    assert out["single_file"].name == "merged.safetensors"
    te = load_file(str(out["diffusers"] / "text_encoder" / "model.safetensors"))  # hub layout: transformers 4.x too
    assert te and all(k.startswith("text_model.") for k in te)
    assert (out["diffusers"] / "tokenizer" / "vocab.json").is_file()


def test_merge_fp16_single_file_is_fp16(sd1):
    from safetensors import safe_open

    out = merge_lora(sd1["paths"]["file"], sd1["run"], sd1["tmp"] / "m16", single_file=True,
                     config=sd1["paths"]["folder"], tokenizer=sd1["paths"]["folder"])
    with safe_open(str(out["single_file"]), framework="pt") as f:
        key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
        assert f.get_tensor(key).dtype == torch.float16
        assert f.metadata()["lowvram_family"] == "sd1"
