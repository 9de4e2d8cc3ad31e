"""LoHa, LoKr and DoRA beside LoRA: attach, save (diffusers/peft and kohya/LyCORIS), load back, merge.

The kohya-style file is checked by applying it with the LyCORIS math that A1111 and ComfyUI implement
(``comfy/weight_adapter``: ``w1a@w1b * w2a@w2b`` for LoHa, ``kron(w1, w2)`` for LoKr with alpha/rank only on
a rank-decomposed factor, ``dora_scale`` as the per-output-row magnitude of ``W + ΔW``): the base weights
patched from the file must draw what the in-memory peft adapter draws.
"""

from __future__ import annotations

import pytest
import torch
from sd_fixtures import BUILDERS, run, save_tiny, text_encoders

from lowvram import adapters as A
from lowvram import lora as L
from lowvram.export import RUN_LORA_FILE, export_lora, merge_lora
from lowvram.models.pretrained import load_pretrained

RANK, ALPHA = 4, 2.0
TOL = 1e-4  # the same fp32 computation two ways (patched weights vs adapter forward): rounding only
# every tensor suffix ComfyUI's load_lora / A1111's networks read for these types: nothing else may be written
CONSUMED = {"alpha", "dora_scale", "lora_up.weight", "lora_down.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a",
            "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
KINDS = ("loha", "lokr", "dora")


def _perturb(*models, seed: int = 0, scale: float = 0.2) -> None:
    """Move every adapter weight, as training would (LoHa/LoKr start with a zero factor, DoRA at |W|)."""
    g = torch.Generator().manual_seed(seed)
    for m in models:
        for _, p in m.named_parameters():
            if p.requires_grad:
                p.data = p.data + torch.randn(p.shape, generator=g) * scale


@pytest.fixture(scope="module", params=[(k, fam) for k in KINDS for fam in ("sd1", "sdxl")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def adapted(request, tmp_path_factory):
    kind, family = request.param
    tmp = tmp_path_factory.mktemp(f"{kind}-{family}")
    base_out = run(BUILDERS[family](tmp))
    pipe = BUILDERS[family](tmp)
    conv = family == "sdxl"  # LoCon 3x3 convs too (4-D LoKr factors, flattened LoHa factors)
    params = L.attach_lora(pipe.unet, RANK, ALPHA, conv=conv, adapter=kind)
    for te in text_encoders(pipe).values():
        params += L.attach_text_lora(te, RANK, ALPHA, adapter=kind)
    _perturb(pipe.unet, *text_encoders(pipe).values())
    return {"kind": kind, "family": family, "tmp": tmp, "pipe": pipe, "params": params, "base_out": base_out,
            "mem_out": run(pipe), "conv": conv}


def _kohya_patched(family: str, tmp, path) -> torch.Tensor:
    """A fresh base pipeline with the kohya file applied as A1111/ComfyUI apply it; its image."""
    pipe = BUILDERS[family](tmp)
    state, _ = L.read_lora_file(path)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = value
    targets = {}
    for comp, model in {"unet": pipe.unet, **text_encoders(pipe)}.items():
        for mod_name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d):
                targets[L._kohya_module(comp, mod_name, family, pipe.unet.config)] = mod
    assert set(modules) <= set(targets), sorted(set(modules) - set(targets))[:3]
    with torch.no_grad():
        for name, t in modules.items():
            w = targets[name].weight
            w.copy_(_lycoris_weight(w.float(), t))
    return run(pipe)


def _lycoris_weight(w: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """W' of one module from its kohya/LyCORIS tensors (the consumers' formulas, written from their code)."""
    alpha = t["alpha"].item() if "alpha" in t else None
    if "hada_w1_a" in t:
        diff = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
    elif "lokr_w2" in t or "lokr_w2_a" in t:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
        diff = torch.kron(w1[..., None, None] if w2.ndim == 4 else w1, w2)
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
    else:
        diff = t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)
        scale = alpha / t["lora_down.weight"].shape[0]
    merged = w + scale * diff.reshape(w.shape)
    if "dora_scale" in t:  # output-axis decomposition: dora_scale (out, 1, ...) is the norm of each output row
        assert t["dora_scale"].shape[0] == w.shape[0] and t["dora_scale"].numel() == w.shape[0]
        norm = merged.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
        merged = merged * t["dora_scale"] / norm
    return merged


def test_adapter_changes_the_output_and_trains_only_adapter_weights(adapted):
    assert (adapted["mem_out"] - adapted["base_out"]).abs().max() > 1e-2
    pipe = adapted["pipe"]
    assert A.type_of_model(pipe.unet) == adapted["kind"]
    assert all(p.dtype == torch.float32 for p in adapted["params"])
    trainable = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    markers = {"loha": "hada_", "lokr": "lokr_", "dora": "lora_"}[adapted["kind"]]
    assert trainable and all(markers in n for n in trainable)


def test_kohya_file_has_lycoris_names_and_draws_the_adapters_image(adapted):
    kind, family, pipe, tmp = adapted["kind"], adapted["family"], adapted["pipe"], adapted["tmp"]
    path = L.save_lora_kohya_from_models(tmp / "kohya.safetensors", pipe.unet, text_encoders(pipe), family, steps=3)
    state, meta = L.read_lora_file(path)
    assert {k.partition(".")[2] for k in state} <= CONSUMED  # ComfyUI logs "lora key not loaded" for anything else
    counts = L.count_saved_modules(state)
    assert counts == {n: L.count_loaded_modules(m) for n, m in {"unet": pipe.unet, **text_encoders(pipe)}.items()}
    assert meta["ss_network_module"] == "lycoris.kohya" and f'"algo": "{"lora" if kind == "dora" else kind}"' in \
        meta["ss_network_args"]
    prefixes = {"sd1": {"lora_unet", "lora_te"}, "sdxl": {"lora_unet", "lora_te1", "lora_te2"}}[family]
    assert {"_".join(k.split("_")[:2]) for k in state} == prefixes
    if kind == "dora":
        scales = [v for k, v in state.items() if k.endswith(".dora_scale")]
        assert scales and all(v.shape[1:] in ((1,), (1, 1, 1)) for v in scales)
    if kind == "lokr":  # full factors: peft's alpha/rank is baked in and no alpha is written (scale 1 there)
        full = {k.partition(".")[0] for k in state if k.endswith(".lokr_w2")}
        assert full and not any(f"{m}.alpha" in state for m in full)
    assert torch.allclose(_kohya_patched(family, tmp, path), adapted["mem_out"], atol=TOL)


def test_peft_file_loads_back_exactly_and_where_diffusers_reads_it(adapted):
    kind, family, pipe, tmp = adapted["kind"], adapted["family"], adapted["pipe"], adapted["tmp"]
    tes = text_encoders(pipe)
    path = L.save_lora_diffusers(tmp / "peft.safetensors", pipe.unet, tes, family)
    state, header = L.read_lora_file(path)
    assert header["lowvram_adapter"] == kind and A.type_of_state(state) == kind
    assert all(k.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.text_model.")) for k in state)
    fresh = BUILDERS[family](tmp)
    loaded = L.load_adapter_file(fresh, path)  # peft: every type
    assert loaded == L.count_saved_modules(state) and set(loaded) == {"unet", *tes}
    assert torch.allclose(run(fresh), adapted["mem_out"], atol=TOL)
    if kind in ("dora", "lokr"):
        # diffusers reads the UNet's DoRA through its pipeline loader, and a peft LoKr at the model level given the
        # config the header carries (its text encoders' DoRA magnitudes it drops with transformers 5.x, and text
        # encoder LoKr it does not read: lowvram merges through peft)
        unet_only = L.save_lora_diffusers(tmp / "unet.safetensors", pipe.unet, {}, family)
        other, ref = BUILDERS[family](tmp), BUILDERS[family](tmp)
        if kind == "dora":
            other.load_lora_weights(str(unet_only))
        else:
            import json

            u_state, u_header = L.read_lora_file(unet_only)
            meta = {k[5:]: v for k, v in json.loads(u_header["lora_adapter_metadata"]).items() if k.startswith("unet.")}
            other.unet.load_lora_adapter({k[5:]: v for k, v in u_state.items()}, prefix=None, metadata=meta)
        assert L.ensure_lora_loaded(other, unet_only)["unet"] == loaded["unet"]
        L.load_adapter_file(ref, unet_only)
        assert torch.allclose(run(other), run(ref), atol=TOL)
    else:  # LoHa: no diffusers loader reads it; the pipeline refuses loudly rather than loading part of it
        with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
            BUILDERS[family](tmp).load_lora_weights(str(path))


def test_export_and_merge_keep_the_adapter(adapted, tmp_path):
    kind, family, pipe = adapted["kind"], adapted["family"], adapted["pipe"]
    paths = save_tiny(tmp_path, family)
    run_dir = tmp_path / "run"
    L.save_lora_diffusers(run_dir / RUN_LORA_FILE, pipe.unet, text_encoders(pipe), family, {"ss_steps": 5})
    exported = export_lora(run_dir, tmp_path / "exp.safetensors", "kohya")
    direct = L.save_lora_kohya_from_models(tmp_path / "direct.safetensors", pipe.unet, text_encoders(pipe), family)
    a, meta = L.read_lora_file(exported)
    b, _ = L.read_lora_file(direct)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["lowvram_adapter"] == kind and meta["ss_steps"] == "5"
    out = merge_lora(paths["folder"], run_dir, tmp_path / "merged", single_file=False, save_dtype="fp32")
    merged = load_pretrained(out["diffusers"])
    assert L.count_loaded_modules(merged.unet) == 0  # folded into the weights
    assert torch.allclose(run(merged.pipeline(pipe.scheduler)), adapted["mem_out"], atol=TOL)


def test_dora_with_fp8_frozen_weights_reads_true_weights(tmp_path):
    """DoRA reads its base weight (for the norm) outside the stored layer's forward, which alone applies fp8's
    per-tensor scale: those layers are stored unscaled (fp16), so the step computes what fp32 weights give."""
    from lowvram.quant import StoredConv2d, StoredLinear, store_frozen_weights

    def dora_unet():
        unet = BUILDERS["sd1"](tmp_path).unet
        L.attach_lora(unet, RANK, ALPHA, adapter="dora")
        _perturb(unet)
        return unet

    def to_q(unet):  # one DoRA-adapted attention projection
        return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q

    x = torch.randn(3, 5, to_q(dora_unet()).in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = to_q(dora_unet())(x)
        unet = dora_unet()
        store_frozen_weights(unet, "fp8", unscaled=A.weight_readers(unet))
        bases = A.weight_readers(unet)
        assert bases and all(isinstance(m, StoredLinear | StoredConv2d) and m.weight.dtype == torch.float16
                             and m.weight_scale is None for m in bases)
        out = to_q(unet)(x)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-3  # fp16 rounding of the base weight only
        naive = dora_unet()
        store_frozen_weights(naive, "fp8")  # fp8 bases whose scale peft's DoRA does not apply: silently wrong
        assert ((to_q(naive)(x) - ref).norm() / ref.norm()).item() > 0.5


def test_every_config_type_has_an_adapter():
    from lowvram.config import LORA_TYPES, LoraSection, field_help

    assert LORA_TYPES == A.ADAPTER_TYPES and LoraSection().type == "lora"
    assert all(t in field_help("lora.type") for t in LORA_TYPES)
