"""FLUX.1 on tiny models of the real classes: loading every layout, conditioning and sampler against
diffusers' FluxPipeline, the flow-matching objective, attention kernels, LoRA training and both LoRA
formats (diffusers loads one, ComfyUI's key mapping takes every key of the other), and W5/W6 profiling."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from flux_fixtures import (
    PROMPT,
    T5_LEN,
    comfy_delta,
    comfy_key_map,
    comfy_load,
    fp8,
    save,
    save_tiny_flux,
    tiny_flux,
    tiny_transformer,
    to_bfl,
)

from lowvram.errors import ModelLoadError
from lowvram.flow import (
    FlowSampling,
    flow_loss,
    noisy_input,
    sample_sigmas,
    shift_mu,
    time_shift,
    velocity_target,
)
from lowvram.lora import attach_lora, count_loaded_modules, read_lora_file
from lowvram.models import flux_cond as fc
from lowvram.models.flux import FluxSources, detect_variant, load_flux, load_t5_tokenizer
from lowvram.models.flux_lora_keys import (
    bfl_layer,
    block_out_features,
    lora_target_names,
    part_modules,
    save_lora_comfy,
    save_lora_diffusers,
    to_kohya,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux")
    pipe, files = save_tiny_flux(tmp)
    return pipe, files, tmp


def _sources(files, **changes):
    given = {"vae": files["ae"], "clip": files["clip"], "t5": files["t5"], "tokenizer": files["folder"],
             "t5_tokenizer": files["folder"]}
    return FluxSources(**{**given, **changes})


def _same(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


# ---- loading ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["folder", "bfl", "aio"])
def test_every_layout_loads_the_saved_weights_exactly(tiny, layout):
    pipe, files, _ = tiny
    # the all-in-one carries VAE and both text encoders itself; a transformer-only file takes them from sources
    sources = FluxSources(tokenizer=files["folder"], t5_tokenizer=files["folder"]) if layout == "aio" else _sources(files)
    config = None if layout == "folder" else files["folder"]  # tiny widths: the tiny model's own configs
    comps = load_flux(files[layout], dtype="fp32", sources=sources, config=config)
    assert comps.variant == "flux-dev" and comps.guidance_embeds and comps.max_sequence_length == 512
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert _same(getattr(pipe, name), getattr(comps, name)) == 0.0, name
    assert not any(p.requires_grad for p in comps.transformer.parameters())
    text = fc.encode_prompts(comps.text_encoder, comps.tokenizer, comps.text_encoder_2, comps.tokenizer_2, [PROMPT], T5_LEN)
    ref = fc.encode_prompts(pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2, [PROMPT], T5_LEN)
    assert torch.equal(text.t5, ref.t5) and torch.equal(text.pooled, ref.pooled)
    if layout == "bfl":  # the loaded parts assemble into a FluxPipeline that draws what the original draws
        kw = {"num_inference_steps": 2, "height": 32, "width": 32, "max_sequence_length": T5_LEN, "output_type": "pt"}
        again = comps.pipeline()(PROMPT, generator=torch.Generator().manual_seed(2), **kw).images
        assert torch.equal(again, pipe(PROMPT, generator=torch.Generator().manual_seed(2), **kw).images)


def test_fp8_and_scaled_fp8_files_load_their_stored_values(tiny):
    pipe, files, _ = tiny
    ref = to_bfl(pipe.transformer)
    plain = load_flux(files["fp8"], dtype="fp32", sources=_sources(files), config=files["folder"], text_encoders=False)
    scaled = load_flux(files["scaled"], dtype="fp32", sources=_sources(files), config=files["folder"], text_encoders=False)
    w = ref["double_blocks.0.img_attn.qkv.weight"][:16]  # BFL fuses q, k, v: rows 0-15 are to_q
    got_plain = plain.transformer.transformer_blocks[0].attn.to_q.weight
    assert torch.equal(got_plain, w.to(torch.float8_e4m3fn).float())
    stored = fp8({"qkv.weight": ref["double_blocks.0.img_attn.qkv.weight"]}, scaled=True)
    expect = (stored["qkv.weight"].float() * stored["qkv.scale_weight"])[:16]
    assert torch.allclose(scaled.transformer.transformer_blocks[0].attn.to_q.weight, expect, rtol=0, atol=1e-7)
    assert 0 < (got_plain - w).abs().max() < 0.1 * w.abs().max()  # really rounded, and only rounded


def test_text_encoders_load_without_the_transformer(tiny):
    pipe, files, _ = tiny
    comps = load_flux(files["aio"], dtype="fp32", sources=_sources(files, clip=None, t5=None), config=files["folder"],
                      transformer=False)
    assert comps.transformer is None and comps.guidance_embeds
    assert _same(pipe.text_encoder_2, comps.text_encoder_2) == 0.0 and _same(pipe.vae, comps.vae) == 0.0
    comps.drop_text_encoders()
    assert comps.text_encoder is None and comps.text_encoder_2 is None


def test_schnell_is_detected_and_has_no_guidance_input(tmp_path, tiny):
    _, files, _ = tiny
    path = save(to_bfl(tiny_transformer(guidance=False)), tmp_path / "flux1-schnell.safetensors")
    assert detect_variant(path) == "flux-schnell"
    comps = load_flux(path, dtype="fp32", sources=_sources(files), config=files["folder"], text_encoders=False)
    assert comps.variant == "flux-schnell" and not comps.guidance_embeds and comps.max_sequence_length == 256
    assert json.loads((files["folder"] / "transformer" / "config.json").read_text())["guidance_embeds"] is True


def test_files_that_are_not_flux1_text_to_image_are_refused_with_the_fix(tmp_path, tiny):
    _, files, _ = tiny
    bfl = to_bfl(tiny_transformer())
    chroma = save({**bfl, "distilled_guidance_layer.in_proj.bias": torch.zeros(4)}, tmp_path / "chroma.safetensors")
    with pytest.raises(ModelLoadError, match="Chroma"):
        detect_variant(chroma)
    fill = dict(bfl, **{"img_in.weight": torch.zeros(16, 384)})
    with pytest.raises(ModelLoadError, match="Fill/Depth"):
        detect_variant(save(fill, tmp_path / "fill.safetensors"))
    with pytest.raises(ModelLoadError, match="no FLUX.1 transformer"):
        detect_variant(files["ae"])
    with pytest.raises(ModelLoadError, match=r"no VAE.*--vae"):
        load_flux(files["bfl"], dtype="fp32", config=files["folder"], text_encoders=False)
    with pytest.raises(ModelLoadError, match="no T5 tokenizer"):
        load_flux(files["bfl"], dtype="fp32", sources=_sources(files, t5_tokenizer=None), config=files["folder"])


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is not None, reason="sentencepiece is installed")
def test_t5_tokenizer_without_tokenizer_json_names_both_fixes(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(ModelLoadError) as e:
        load_t5_tokenizer(tmp_path)
    assert "sentencepiece" in str(e.value) and "tokenizer.json" in str(e.value)


# ---- conditioning, objective, sampler --------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["flux-dev", "flux-schnell"])
def test_encoding_packing_and_sampler_reproduce_flux_pipeline(tmp_path, variant):
    pipe = tiny_flux(tmp_path, variant)
    gen = torch.Generator().manual_seed(5)
    ref = pipe(PROMPT, num_inference_steps=3, height=32, width=32, guidance_scale=3.5, generator=gen,
               max_sequence_length=T5_LEN, output_type="latent").images
    text = fc.encode_prompts(pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2, [PROMPT], T5_LEN)
    lat = fc.sample_latents(pipe.transformer, text, dict(pipe.scheduler.config), height=16, width=16, steps=3,
                            guidance=3.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(fc.pack(lat), ref)  # same noise, ids, guidance, σ grid (dynamic shift for dev)
    assert torch.equal(fc.unpack(fc.pack(lat), 16, 16), lat)
    assert lat.abs().max() < 50
    image = pipe(PROMPT, num_inference_steps=3, height=32, width=32, guidance_scale=3.5, max_sequence_length=T5_LEN,
                 generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert torch.allclose(fc.decode_images(pipe.vae, lat), image, atol=1e-6)


def test_latent_normalization_uses_the_vae_factors(tiny):
    pipe, _, _ = tiny
    z = torch.randn(1, 16, 4, 4)
    n = fc.normalize_latents(z, pipe.vae.config)
    assert torch.allclose(n, (z - 0.1159) * 0.3611) and torch.allclose(fc.denormalize_latents(n, pipe.vae.config), z, atol=1e-6)


def test_flow_objective_noising_target_and_loss_sign():
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(noisy_input(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(noisy_input(x0, noise, torch.ones(3)), noise)
    x = noisy_input(x0, noise, torch.tensor([0.25, 0.5, 0.75]))
    assert torch.allclose(x[1], 0.5 * x0[1] + 0.5 * noise[1])
    assert torch.equal(velocity_target(x0, noise), noise - x0)

    clean = torch.randn(4, 2, 4, 4)

    def loss_of(predict):
        return flow_loss(predict, clean, FlowSampling("uniform"), 4, generator=torch.Generator().manual_seed(1))

    exact = loss_of(lambda x, s: (x - clean) / s.reshape(-1, 1, 1, 1))  # (x_t - x0)/σ = ε - x0
    zero = loss_of(lambda x, s: torch.zeros_like(x))
    flipped = loss_of(lambda x, s: -(x - clean) / s.reshape(-1, 1, 1, 1))
    assert exact < 1e-8 and zero > 0.5 and flipped == pytest.approx(4 * zero.item(), rel=1e-4)


def test_timestep_sampling_follows_flux_shift():
    assert shift_mu(256) == pytest.approx(0.5) and shift_mu(4096) == pytest.approx(1.15)

    def draw(mode, seq, **kw):
        return sample_sigmas(20000, FlowSampling(mode, **kw), seq, generator=torch.Generator().manual_seed(0))

    s = draw("flux_shift", 4096)
    assert 0 < s.min() and s.max() < 1
    assert s.median() == pytest.approx(time_shift(1.15, torch.tensor(0.5)).item(), abs=0.01)  # 0.760
    assert draw("flux_shift", 1024).median() < s.median()  # smaller images: less shift towards noise
    # at 1024² FLUX's shift equals sd-scripts' documented fixed shift 3.1582 (= e^1.15)
    assert torch.allclose(s, draw("shift", 1, shift=3.1582), atol=1e-4)
    assert draw("sigmoid", 4096).median() == pytest.approx(0.5, abs=0.01)
    assert draw("uniform", 1).mean() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(draw("flux_shift", 4096), s)  # seeded: reproducible


@pytest.mark.parametrize("kind", ["sdpa", "math", "chunked"])
def test_flux_attention_kernels_match_diffusers_processor(kind):
    from lowvram.attention import set_attention

    tr = tiny_transformer()
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.8])
    text = fc.FluxText(torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g))

    def run():
        tr.zero_grad()
        out = fc.predict(tr, x, sigma, text, 1.0)
        out.square().mean().backward()
        return out.detach(), tr.single_transformer_blocks[1].attn.to_k.weight.grad.clone()

    ref, ref_grad = run()  # diffusers' own FluxAttnProcessor
    set_attention(tr, kind, chunk=7)
    out, grad = run()
    tol = 0 if kind == "sdpa" else 1e-5
    assert (out - ref).abs().max() <= tol and (grad - ref_grad).abs().max() <= tol * ref_grad.abs().max()


# ---- LoRA ------------------------------------------------------------------------------------------------

RANK, ALPHA = 4, 2.0  # alpha ≠ rank: a file that loses alpha gives a different output


def _train_lora(tmp_path, steps=30):
    pipe = tiny_flux(tmp_path)
    tr = pipe.transformer
    names = lora_target_names(tr)
    params = attach_lora(tr, RANK, ALPHA, target_modules=names)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 16, 8, 8, generator=g)
    text = fc.encode_prompts(pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2,
                             [PROMPT, "a red cat"], T5_LEN)
    opt = torch.optim.AdamW(params, lr=3e-2)
    from lowvram.train.step import optimizer_step

    losses = []
    for _ in range(steps):  # the same noise and σ every step: the loss must fall
        loss = fc.training_loss(tr, x0, text, generator=torch.Generator().manual_seed(7))
        loss.backward()
        optimizer_step(opt, params, grad_clip=1.0)
        losses.append(loss.item())
    return pipe, names, text, losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train_lora(tmp_path_factory.mktemp("lora"))


def test_lora_trains_and_the_diffusers_file_loads_with_every_module(trained, tmp_path):
    pipe, names, text, losses = trained
    assert losses[-1] < 0.8 * losses[0], losses  # 2.40 → 1.71 here (rank 4 on a 16-wide model)
    assert len(names) == 2 * 12 + 2 * 5  # 12 layers per double block, 5 per single block
    path = save_lora_diffusers(tmp_path / "flux_lora.safetensors", pipe.transformer, metadata={"ss_steps": 30})
    tensors, header = read_lora_file(path)
    assert all(k.startswith("transformer.") and re.search(r"\.lora_[AB]\.weight$", k) for k in tensors)
    assert header["ss_steps"] == "30" and header["lowvram_family"] == "flux-dev"

    fresh = tiny_flux(tmp_path / "fresh")  # same seeds: the same base weights
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(11))
    sigma = torch.tensor([0.6])
    one = fc.FluxText(text.t5[:1], text.pooled[:1])
    base = fc.predict(fresh.transformer, x, sigma, one, 1.0)
    fresh.load_lora_weights(str(path))
    assert count_loaded_modules(fresh.transformer) == len(names)
    with torch.no_grad():
        loaded = fc.predict(fresh.transformer, x, sigma, one, 1.0)
        trained_out = fc.predict(pipe.transformer, x, sigma, one, 1.0)
    assert (loaded - base).abs().max() > 1e-3  # the LoRA changes the output …
    assert torch.allclose(loaded, trained_out, atol=1e-5)  # … exactly as trained (alpha/rank kept)


def _peft_delta(transformer, name):
    layer = transformer.get_submodule(name)
    return layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]


def test_comfyui_format_every_key_maps_and_fused_updates_are_exact(trained, tmp_path):
    pipe, names, _, _ = trained
    tr = pipe.transformer
    path = save_lora_comfy(tmp_path / "flux_lora_comfy.safetensors", tr, metadata={"note": "x"}, steps=30)
    lora, header = read_lora_file(path)
    assert header["ss_base_model_version"] == "flux1" and header["ss_network_module"] == "networks.lora_flux"
    assert header["modelspec.architecture"] == "flux-1-dev/lora"
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in lora)
    base = tiny_transformer()  # the model ComfyUI holds: BFL keys under diffusion_model.
    model_keys = ["diffusion_model." + k for k in to_bfl(base)]
    hidden = tr.config.num_attention_heads * tr.config.attention_head_dim
    patches, not_loaded = comfy_load(lora, comfy_key_map(model_keys, hidden))
    assert not_loaded == set()
    assert len(patches) == 2 * 8 + 2 * 2  # 8 BFL layers per double block (q/k/v fused), 2 per single block
    for target, (up, down, alpha) in patches.items():
        delta = comfy_delta(up, down, alpha)
        bfl = target.removeprefix("diffusion_model.").removesuffix(".weight")
        first = next(n for n in names if bfl_layer(n)[0] == bfl)
        expect = torch.cat([_peft_delta(tr, p) for p in part_modules(first)])
        assert torch.allclose(delta, expect, atol=1e-6), target

    # ComfyUI also maps the diffusers file (transformer.* with q/k/v slices), but reads alpha only from
    # ".alpha" tensors, which diffusers' format does not have: scale 1 instead of alpha/rank.
    diffusers_file = save_lora_diffusers(tmp_path / "d.safetensors", tr)
    dl, _ = read_lora_file(diffusers_file)
    patches, not_loaded = comfy_load(dl, comfy_key_map(model_keys, hidden))
    assert not_loaded == set() and len(patches) == len(names)
    assert not any(k.endswith(".alpha") for k in dl) and ALPHA != RANK


def test_fusing_some_of_qkv_leaves_the_others_zero():
    torch.manual_seed(0)
    a = {m: torch.randn(2, 8) for m in ("to_q", "to_v")}
    b = {m: torch.randn(8, 2) for m in ("to_q", "to_v")}
    state = {f"transformer_blocks.0.attn.{m}.lora_{x}.weight": t for m in a for x, t in (("A", a[m]), ("B", b[m]))}
    outs = {f"transformer_blocks.0.attn.to_{c}": 8 for c in "qkv"}
    out = to_kohya(state, 3.0, outs)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    assert out[f"{name}.alpha"].item() == 6.0 and out[f"{name}.lora_down.weight"].shape == (4, 8)
    delta = comfy_delta(out[f"{name}.lora_up.weight"], out[f"{name}.lora_down.weight"], out[f"{name}.alpha"].item())
    assert torch.allclose(delta[:8], b["to_q"] @ a["to_q"] * 1.5) and torch.allclose(delta[16:], b["to_v"] @ a["to_v"] * 1.5)
    assert torch.equal(delta[8:16], torch.zeros(8, 8))


def test_modulation_layers_are_optional_targets():
    tr = tiny_transformer()
    plain, mod = lora_target_names(tr), lora_target_names(tr, modulation=True)
    assert set(mod) - set(plain) == {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                                     "transformer_blocks.1.norm1.linear", "transformer_blocks.1.norm1_context.linear",
                                     "single_transformer_blocks.0.norm.linear", "single_transformer_blocks.1.norm.linear"}
    assert "proj_out" not in plain and "single_transformer_blocks.1.proj_out" in plain  # never the final layer
    assert block_out_features(tr)["single_transformer_blocks.0.proj_mlp"] == 64


def test_attention_targets_are_the_attention_projections_and_the_plan_adapts_the_same_layers():
    """lora.targets=attention: the trainer's names (families/flux.py) are the attn.* layers of every block, and the
    planner's FLUX.1 workload adapts exactly those layers of the same transformer (fewer trainable weights)."""
    from lowvram.memory.flux_workload import flux_targets

    tr = tiny_transformer()
    every, attention = lora_target_names(tr), lora_target_names(tr, attention_only=True)
    assert attention and set(attention) < set(every)
    assert all(n.split(".", 2)[2].startswith("attn.") for n in attention)
    assert "single_transformer_blocks.0.attn.to_q" in attention and "single_transformer_blocks.0.proj_out" not in attention
    for kind, names in (("all", every), ("attention", attention)):
        planned = [n for n in lora_target_names(tr, modulation=True) if n.split(".", 2)[2] in flux_targets(kind)]
        assert planned == names, kind


# ---- memory ----------------------------------------------------------------------------------------------

def _small(wid="W5"):
    from lowvram.memory.workloads import WORKLOADS

    return WORKLOADS[wid].with_(unet_overrides={"num_layers": 1, "num_single_layers": 1})


def test_w5_profiles_on_meta_with_the_flux_step():
    from lowvram.memory.profiler import profile_step
    from lowvram.memory.workloads import Knobs, build

    knobs = Knobs(precision="bf16", frozen_dtype="bf16", attention="sdpa", gradient_checkpointing=True)
    built = build(_small(), knobs)
    lora = sum(p.numel() for p in built.trainable)
    frozen = sum(p.numel() * p.element_size() for p in built.unet.parameters() if not p.requires_grad)
    assert len({n.rsplit(".lora_", 1)[0] for n, p in built.unet.named_parameters() if p.requires_grad}) == 12 + 5
    assert built.latent_shape == (16, 64, 64) and built.text_tokens == 512
    assert built.unet.config.joint_attention_dim == 4096
    whole = profile_step(_small(), knobs)  # the W5 row: the step and the run's preview (T5 encodes on the CPU)
    assert whole.stages["preview"] > 0 and "cache" not in whole.stages
    prof = profile_step(_small().with_(preview=None), knobs)  # the step alone: what each category holds there
    assert prof.by_category["trainable_weights"] == 4 * lora
    assert prof.by_category["frozen_weights"] == frozen
    math = profile_step(_small().with_(preview=None), knobs.with_(attention="math", gradient_checkpointing=False))
    assert math.peak_bytes > prof.peak_bytes + (1024 + 512) ** 2 * 24 * 2  # the (tokens²·heads) matrix appears
    uncached = profile_step(_small().with_(preview=None), knobs.with_(cache_text=False, cache_latents=False,
                                                                     offload_frozen=False))
    # CLIP-L (123 M) and T5-XXL's encoder (4.76 G) in bf16 join the frozen weights
    assert uncached.by_category["frozen_weights"] - frozen > 2 * 4.8e9


@pytest.mark.parametrize("knobs", [dict(attention="math"), dict(attention="math", frozen_dtype="fp16", precision="bf16"),
                                   dict(attention="chunked", attention_chunk=64, frozen_dtype="fp8",
                                        gradient_checkpointing=True)], ids=["math", "fp16frozen-bf16", "fp8-chunked-ckpt"])
def test_flux_profile_predicts_the_real_cpu_peak(knobs):
    """The meta prediction of a (narrow) FLUX.1 step against the CPU allocator's own peak (memory/fidelity.py)."""
    from lowvram.memory.fidelity import compare
    from lowvram.memory.workloads import Knobs

    narrow = _small().with_(resolution=128, lora_rank=4, unet_overrides=dict(
        num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=4, axes_dims_rope=(8, 12, 12),
        joint_attention_dim=256), preview=None)  # compare() measures the step; previews are the run fidelity's
    predicted, measured, _ = compare(narrow, Knobs(batch_size=2, **knobs))
    assert abs(predicted.peak_bytes - measured) <= 0.01 * measured, (predicted.peak_bytes, measured)


def test_planner_computes_flux_in_fp32_on_a_card_without_bf16():
    from lowvram.memory.planner import baseline
    from lowvram.memory.workloads import WORKLOADS
    from lowvram.presets import load_preset

    card = load_preset("rx570").card  # gfx803: fp16 works (at fp32 speed), bf16 does not
    assert baseline(WORKLOADS["W1"], card).precision == "fp16"
    assert baseline(WORKLOADS["W5"], card).precision == "fp32"
    assert baseline(WORKLOADS["W5"], None).precision == "bf16"


@pytest.mark.slow
def test_w5_full_size_frozen_weights_are_flux1_dev():
    from lowvram.memory.profiler import profile_step
    from lowvram.memory.workloads import WORKLOADS, Knobs

    prof = profile_step(WORKLOADS["W5"], Knobs(precision="bf16", frozen_dtype="bf16", attention="sdpa",
                                               gradient_checkpointing=True))
    assert prof.by_category["frozen_weights"] / 2 == pytest.approx(11.9e9, rel=0.01)  # 11.9 B parameters in bf16
    assert prof.by_category["trainable_weights"] / 4 == pytest.approx(65.3e6, rel=0.01)
