"""Load lowvram's kohya/LyCORIS files (LoRA, LoHa, LoKr, DoRA) with ComfyUI's own code and compare the image.

    python tools/comfyui_lora_check.py COMFYUI_DIR      # a ComfyUI checkout (only its comfy/ package is imported)

Needs einops, psutil and torchsde importable beside lowvram's environment (e.g. ``pip install --target DIR``
and DIR on PYTHONPATH); ComfyUI's model zoo is not imported (``comfy.model_base`` is stubbed). For each tiny SD 1.x
and SDXL model (text encoders and, for SDXL, 3x3 convs adapted), builds ComfyUI's key maps
(``model_lora_keys_unet``/``_clip``) over the model's LDM names, loads the file with ``load_lora`` and patches
each weight with ``calculate_weight``; prints keys, modules, patches, keys ComfyUI did not load, and the largest
difference between the patched model's image and peft's in-memory adapter. ``--dora-fix`` first replaces
ComfyUI's DoRA normalisation (by the norm of W) with the norm of W + dW, as its open fix does. Not part of CI:
ComfyUI is GPL and large; this is the by-hand check behind docs/recipes/lora.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_STUBBED = ("ACEStep AuraFlow Flux GenmoMochi HiDream HunyuanDiT HunyuanVideo Omnigen2 PixArt QwenImage SD3 "
            "StableCascade_C").split()


def _import_comfy(comfy_dir: Path):
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, str(comfy_dir))
    import comfy
    import comfy.options

    comfy.options.enable_args_parsing()
    stub = types.ModuleType("comfy.model_base")  # model_lora_keys_unet only asks isinstance() of these
    for name in _STUBBED:
        setattr(stub, name, type(name, (), {}))
    sys.modules["comfy.model_base"] = comfy.model_base = stub
    import comfy.lora

    return comfy


def _unet_config(cfg) -> dict:
    """ComfyUI's UNet description (what comfy.utils.unet_to_diffusers reads) of a diffusers UNet config."""
    n, lpb = len(cfg.block_out_channels), cfg.layers_per_block
    tl = cfg.transformer_layers_per_block
    tl = [tl] * n if isinstance(tl, int) else list(tl)
    down = [tl[i] if "CrossAttn" in cfg.down_block_types[i] else 0 for i in range(n) for _ in range(lpb)]
    up_tl = list(reversed(tl))
    out = [up_tl[i] if "CrossAttn" in cfg.up_block_types[i] else 0 for i in range(n) for _ in range(lpb + 1)]
    return {"num_res_blocks": [lpb] * n, "channel_mult": [1] * n, "transformer_depth": down,
            "transformer_depth_output": list(reversed(out)), "transformer_depth_middle": tl[-1]}


class _Model:
    def __init__(self, state: dict, unet_config: dict | None = None) -> None:
        self._state = state
        self.model_config = types.SimpleNamespace(unet_config=unet_config)

    def state_dict(self) -> dict:
        return self._state


def _dora_fix(comfy) -> None:
    import comfy.weight_adapter.lora as cwl

    def decompose(dora_scale, weight, lora_diff, alpha, strength, intermediate_dtype, function):
        calc = weight + function(lora_diff * alpha).type(weight.dtype)
        norm = calc.reshape(calc.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (calc.dim() - 1))
        calc = calc * (dora_scale.to(calc) / norm)
        return weight.copy_(weight + strength * (calc - weight))

    cwl.weight_decompose = decompose


def check(comfy, family: str, kind: str, tmp: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from sd_fixtures import BUILDERS, run, text_encoders

    from lowvram import lora as L
    from lowvram.models.key_names import canonical_text_key
    from lowvram.models.ldm_convert import unet_key_to_ldm

    pipe = BUILDERS[family](tmp)
    L.attach_lora(pipe.unet, 4, 2.0, conv=family == "sdxl", adapter=kind)
    for te in text_encoders(pipe).values():
        L.attach_text_lora(te, 4, 2.0, adapter=kind)
    gen = torch.Generator().manual_seed(0)
    for model in (pipe.unet, *text_encoders(pipe).values()):
        for p in model.parameters():
            if p.requires_grad:
                p.data += torch.randn(p.shape, generator=gen) * 0.2
    want = run(pipe)
    path = L.save_lora_kohya_from_models(tmp / f"{family}-{kind}.safetensors", pipe.unet, text_encoders(pipe), family)
    lora, _ = L.read_lora_file(path)
    fresh = BUILDERS[family](tmp)
    unet = {"diffusion_model." + unet_key_to_ldm(k, fresh.unet.config): (fresh.unet, k) for k in fresh.unet.state_dict()}
    clip = {}
    for comp, prefix in (("text_encoder", "clip_l.transformer."), ("text_encoder_2", "clip_g.transformer.")):
        if (te := getattr(fresh, comp, None)) is not None:
            clip.update({prefix + canonical_text_key(k): (te, k) for k in te.state_dict()})
    key_map: dict = {}
    comfy.lora.model_lora_keys_unet(_Model(unet, _unet_config(fresh.unet.config)), key_map)
    comfy.lora.model_lora_keys_clip(_Model(clip), key_map)
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    patches = comfy.lora.load_lora(lora, key_map)
    logging.getLogger().removeHandler(handler)
    with torch.no_grad():
        for key, adapter in patches.items():
            model, name = {**unet, **clip}[key]
            p = model.get_parameter(name)
            p.copy_(comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], p.detach().float().clone(), key))
    kinds = ", ".join(sorted({type(a).__name__ for a in patches.values()}))
    missed = sum("not loaded" in m for m in messages)
    return (f"{family} {kind}: {len(lora)} keys, {len({k.split('.')[0] for k in lora})} modules -> {len(patches)} "
            f"patches ({kinds}), keys not loaded {missed}, max |ComfyUI - peft| {(run(fresh) - want).abs().max():.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("comfyui", type=Path)
    ap.add_argument("--dora-fix", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    comfy = _import_comfy(args.comfyui)
    if args.dora_fix:
        _dora_fix(comfy)
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("sd1", "sdxl"):
            for kind in ("lora", "loha", "lokr", "dora"):
                print(check(comfy, family, kind, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
