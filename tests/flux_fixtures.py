"""Tiny FLUX.1 pipelines from the real classes, saved in the layouts people have.

The transformer keeps FLUX.1's block structure (double + single blocks, 2×2 packing of 16 latent channels,
guidance embedding for dev) at a tiny width, so module names, BFL key names and LoRA names are the real
ones. Files: a diffusers folder, the BFL transformer file, ae / clip_l / t5xxl files, ComfyUI's all-in-one
checkpoint, and fp8 / ComfyUI "scaled fp8" transformer files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file
from sd_fixtures import WORDS, _text_config, tiny_tokenizer
from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from lowvram.models.flux_lora_keys import DOUBLE, DOUBLE_BFL, SINGLE, SINGLE_BFL, part_modules
from lowvram.models.ldm_convert import vae_to_ldm

T5_LEN = 16  # max_sequence_length of the tiny pipelines: short prompts keep them fast
PROMPT = "a photo of sks dog"
# diffusers name → BFL name of the layers outside the blocks (ComfyUI's comfy/utils.py flux_to_diffusers MAP_BASIC)
TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
       "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
       "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
       "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
       "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
       "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
       "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
NORMS = {DOUBLE: {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                  "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"},
         SINGLE: {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}}


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A Unigram T5 tokenizer with the special tokens at T5's ids (pad 0, eos 1, unk 2) and a few words."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tok.model_max_length = T5_LEN
    return tok


def tiny_transformer(guidance: bool = True, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=(2, 2, 4),
    )


def tiny_flux(tmp: Path, variant: str = "flux-dev", seed: int = 0) -> FluxPipeline:
    """FLUX.1 layout at tiny width: 16 latent channels, CLIP-L-like (32) pooled vector, T5-like (32) sequence."""
    tok = tiny_tokenizer(tmp / "tok_flux")
    tok2 = tiny_t5_tokenizer()
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(_text_config(tok, 32))
    t5 = T5EncoderModel(T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=len(tok2),
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0,
                                 eos_token_id=1, decoder_start_token_id=0))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=4, layers_per_block=1,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
        shift_factor=0.1159, force_upcast=True,
    )
    dev = variant == "flux-dev"
    sched = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                            max_shift=1.15, shift=3.0 if dev else 1.0, use_dynamic_shifting=dev)
    # eval(): T5's dropout (0.1) is on in a freshly built model; loaded models are in eval mode
    return FluxPipeline(scheduler=sched, vae=vae.eval(), text_encoder=clip.eval(), tokenizer=tok,
                        text_encoder_2=t5.eval(), tokenizer_2=tok2, transformer=tiny_transformer(dev, seed))


def to_bfl(transformer: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """The transformer's weights under BFL's names (flux1-dev.safetensors), q/k/v fused as the original."""
    sd = transformer.state_dict()
    out: dict[str, torch.Tensor] = {}
    for d, b in TOP.items():
        for kind in ("weight", "bias"):
            if f"{d}.{kind}" in sd:
                out[f"{b}.{kind}"] = sd[f"{d}.{kind}"]
    for kind in ("weight", "bias"):  # BFL's final AdaLN is (shift, scale), diffusers' (scale, shift)
        scale, shift = sd[f"norm_out.linear.{kind}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])
    for blocks, table, bfl in ((DOUBLE, DOUBLE_BFL, "double_blocks"), (SINGLE, SINGLE_BFL, "single_blocks")):
        n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(blocks + "."))
        for i in range(n):
            for layer in {lay for lay, _, _ in table.values()}:
                first = next(m for m, (lay, p, _) in table.items() if lay == layer and p == 0)
                parts = part_modules(f"{blocks}.{i}.{first}")
                for kind in ("weight", "bias"):
                    out[f"{bfl}.{i}.{layer}.{kind}"] = torch.cat([sd[f"{p}.{kind}"] for p in parts])
            for d, b in NORMS[blocks].items():
                out[f"{bfl}.{i}.{b}.scale"] = sd[f"{blocks}.{i}.{d}.weight"]
    return out


def clip_file_state(clip: CLIPTextModel) -> dict[str, torch.Tensor]:
    """clip_l.safetensors layout: transformers' CLIP names under ``text_model.``."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in clip.state_dict().items()}


def t5_file_state(t5: T5EncoderModel) -> dict[str, torch.Tensor]:
    """t5xxl_fp16.safetensors layout: the encoder's names with the embedding once, as ``shared``."""
    return {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}


def fp8(state: dict[str, torch.Tensor], scaled: bool = False) -> dict[str, torch.Tensor]:
    """Matrices in float8_e4m3fn (Kijai's fp8 files) or ComfyUI's "scaled fp8" (weight/scale + scale_weight)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if v.ndim != 2:
            out[k] = v
        elif scaled:
            scale = v.abs().amax().float() / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v.to(torch.float8_e4m3fn)
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def save_tiny_flux(tmp: Path, variant: str = "flux-dev") -> tuple[FluxPipeline, dict[str, Path]]:
    """A tiny pipeline and its files: diffusers folder, BFL/fp8/scaled-fp8 transformer, ae, clip_l, t5, all-in-one."""
    pipe = tiny_flux(tmp, variant)
    files = {"folder": tmp / variant}
    pipe.save_pretrained(files["folder"])
    bfl = to_bfl(pipe.transformer)
    ae = {k.removeprefix("first_stage_model."): v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()}
    clip, t5 = clip_file_state(pipe.text_encoder), t5_file_state(pipe.text_encoder_2)
    files["bfl"] = save(bfl, tmp / f"{variant}.safetensors")
    files["fp8"] = save(fp8(bfl), tmp / f"{variant}-fp8.safetensors")
    files["scaled"] = save({"model.diffusion_model." + k: v for k, v in fp8(bfl, scaled=True).items()},
                           tmp / f"{variant}-scaled-fp8.safetensors")
    files["ae"] = save(ae, tmp / "ae.safetensors")
    files["clip"] = save(clip, tmp / "clip_l.safetensors")
    files["t5"] = save(t5, tmp / "t5xxl_fp16.safetensors")
    aio = {"model.diffusion_model." + k: v for k, v in bfl.items()}
    aio.update({"vae." + k: v for k, v in ae.items()})
    aio.update({"text_encoders.clip_l.transformer." + k: v for k, v in clip.items()})
    aio.update({"text_encoders.t5xxl.transformer." + k: v for k, v in t5.items()})
    files["aio"] = save(aio, tmp / f"{variant}-comfy-checkpoint.safetensors")
    return pipe, files


# ComfyUI's key mapping for FLUX, re-implemented from comfy/lora.py (model_lora_keys_unet: "lora_unet_" + the
# model key with "." → "_", the bare key, and for comfy.model_base.Flux "transformer." + the diffusers name via
# comfy/utils.py flux_to_diffusers, where q/k/v are (key, (dim, offset, size)) slices of the fused layer) and
# comfy/weight_adapter/lora.py LoRAAdapter.load (lora_up/lora_down, lora_B/lora_A, ".alpha"; scale alpha/rank).
def comfy_key_map(model_keys, hidden):
    key_map = {}
    for k in model_keys:
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
            key_map[k[:-len(".weight")]] = k
    double = sorted({int(k.split(".")[2]) for k in model_keys if ".double_blocks." in k})
    single = sorted({int(k.split(".")[2]) for k in model_keys if ".single_blocks." in k})
    simple_d = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
                "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
                "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
    for i in double:
        src, dst = f"transformer.transformer_blocks.{i}.", f"diffusion_model.double_blocks.{i}."
        for j, (q, t) in enumerate([("to_q", "img"), ("to_k", "img"), ("to_v", "img")]):
            key_map[f"{src}attn.{q}"] = (f"{dst}{t}_attn.qkv.weight", (0, j * hidden, hidden))
        for j, q in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            key_map[f"{src}attn.{q}"] = (f"{dst}txt_attn.qkv.weight", (0, j * hidden, hidden))
        for d, b in simple_d.items():
            key_map[src + d] = f"{dst}{b}.weight"
    for i in single:
        src, dst = f"transformer.single_transformer_blocks.{i}.", f"diffusion_model.single_blocks.{i}."
        for j, q in enumerate(("to_q", "to_k", "to_v")):
            key_map[f"{src}attn.{q}"] = (f"{dst}linear1.weight", (0, j * hidden, hidden))
        key_map[f"{src}proj_mlp"] = (f"{dst}linear1.weight", (0, 3 * hidden, 4 * hidden))
        key_map[f"{src}norm.linear"] = f"{dst}modulation.lin.weight"
        key_map[f"{src}proj_out"] = f"{dst}linear2.weight"
    return key_map


def comfy_load(lora, key_map):
    """(patches: target → (up, down, alpha), keys ComfyUI would warn about as 'lora key not loaded')."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        if f"{x}.alpha" in lora:
            loaded.add(f"{x}.alpha")
        for up, down in ((f"{x}.lora_up.weight", f"{x}.lora_down.weight"), (f"{x}.lora_B.weight", f"{x}.lora_A.weight")):
            if up in lora:
                patches[target] = (lora[up], lora[down], alpha)
                loaded.update((up, down))
                break
    return patches, set(lora) - loaded


def comfy_delta(up, down, alpha):
    return (alpha / down.shape[0] if alpha is not None else 1.0) * (up @ down)
