"""Tiny Stable Diffusion 1.x / 2.x / SDXL pipelines built from the real diffusers/transformers classes.

They keep the real block layout (4 UNet blocks with 2 layers for SD 1.x/2.x, 3 for SDXL) so that
module names, LDM key names and kohya LoRA names are the real ones, only the widths are tiny.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lowvram.models.clip_vocab import bytes_to_unicode, clip_tokenizer
from lowvram.models.pretrained import CONFIGS_DIR

WORDS = ["a", "photo", "of", "cat", "dog", "red", "sks", "person", "on", "the", "beach"]


def write_tiny_clip_vocab(folder: Path) -> Path:
    """A CLIP BPE vocabulary of every byte plus a few whole words, written as vocab.json + merges.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in WORDS:
        # merge the word left to right: ((p h) o) ... so that the whole word becomes one token
        current = word[0]
        for i, ch in enumerate(word[1:], start=1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merge = f"{current} {nxt}"
            current = current + nxt
            if merge not in merges:
                merges.append(merge)
                vocab_list.append(current)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def tiny_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    write_tiny_clip_vocab(folder)
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token)
    tok.model_max_length = 16  # short prompts keep the tiny pipelines fast
    return tok


def sd_tokenizer(tmp: Path, family: str, name: str, pad_token: str, clip_vocab: bool) -> CLIPTokenizer:
    """The real CLIP tokenizer of ``family`` (shipped vocabulary, 77 tokens) or a tiny one (16 tokens)."""
    if clip_vocab:
        return clip_tokenizer(CONFIGS_DIR / family / name / "tokenizer_config.json")
    return tiny_tokenizer(tmp / f"tok_{family}{name.removeprefix('tokenizer')}", pad_token=pad_token)


def _text_config(tok: CLIPTokenizer, hidden: int, layers: int = 2, act: str = "quick_gelu") -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=len(tok),
        max_position_embeddings=tok.model_max_length,
        projection_dim=hidden,  # diffusers' OpenCLIP converter splits in_proj by the projection width
        hidden_act=act,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    )


def _sd_scheduler(prediction: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, prediction_type=prediction, steps_offset=1,
    )


def tiny_latent_unet(seed: int = 0) -> UNet2DConditionModel:
    """A two-block UNet on 4-channel 8x8 latents with 8-wide cross-attention: for loss and gradient tests."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_sd1(tmp: Path, seed: int = 0, clip_vocab: bool = False) -> StableDiffusionPipeline:
    """SD 1.x layout: CLIP-L-like text encoder, conv proj_in, cross-attention width = text width (32).

    ``clip_vocab``: the real CLIP tokenizer (49,408 tokens, 77 long) and a text encoder sized for it."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        attention_head_dim=2,
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    tok = sd_tokenizer(tmp, "sd1", "tokenizer", "<|endoftext|>", clip_vocab)
    torch.manual_seed(seed + 1)
    te = CLIPTextModel(_text_config(tok, 32))
    return StableDiffusionPipeline(
        unet=unet, vae=_vae(seed + 2), text_encoder=te, tokenizer=tok, scheduler=_sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sd2(tmp: Path, seed: int = 0, prediction: str = "epsilon", clip_vocab: bool = False) -> StableDiffusionPipeline:
    """SD 2.x layout: OpenCLIP-like text encoder (gelu), linear proj_in, upcast attention."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        attention_head_dim=(2, 2, 4, 4),
        cross_attention_dim=48,
        use_linear_projection=True,
        upcast_attention=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    tok = sd_tokenizer(tmp, "sd2", "tokenizer", "!", clip_vocab)
    torch.manual_seed(seed + 1)
    te = CLIPTextModel(_text_config(tok, 48, act="gelu"))
    return StableDiffusionPipeline(
        unet=unet, vae=_vae(seed + 2), text_encoder=te, tokenizer=tok, scheduler=_sd_scheduler(prediction),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl(tmp: Path, seed: int = 0, clip_vocab: bool = False) -> StableDiffusionXLPipeline:
    """SDXL layout: 3 UNet blocks, text_time added embedding, CLIP-L-like (32) + OpenCLIP-bigG-like (64)."""
    tok = sd_tokenizer(tmp, "sdxl", "tokenizer", "<|endoftext|>", clip_vocab)
    tok2 = sd_tokenizer(tmp, "sdxl", "tokenizer_2", "!", clip_vocab)
    torch.manual_seed(seed + 1)
    te = CLIPTextModel(_text_config(tok, 32))
    te2 = CLIPTextModelWithProjection(_text_config(tok2, 64, act="gelu"))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        attention_head_dim=(2, 2, 4),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=32 + 64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=64 + 6 * 8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        unet=unet, vae=_vae(seed + 2), text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
        scheduler=sched, force_zeros_for_empty_prompt=True,
    )


def run(pipe, prompt: str = "a photo of sks cat", seed: int = 0) -> torch.Tensor:
    """The pipeline's image for a fixed seed (2 steps, 32x32), as a float tensor."""
    gen = torch.Generator().manual_seed(seed)
    kw = {"original_size": (32, 32), "target_size": (32, 32)} if isinstance(pipe, StableDiffusionXLPipeline) else {}
    out = pipe(
        prompt, num_inference_steps=2, height=32, width=32, guidance_scale=3.0, generator=gen,
        output_type="pt", **kw,
    )
    return out.images.float()


BUILDERS = {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}


def text_encoders(pipe) -> dict:
    return {n: m for n in ("text_encoder", "text_encoder_2") if (m := getattr(pipe, n, None)) is not None}


def save_tiny(tmp: Path, family: str, clip_vocab: bool = False) -> dict[str, Path]:
    """Save a tiny pipeline as a diffusers folder and as an A1111-layout single file (``clip_vocab``: with the
    real CLIP tokenizer, so that the single file trains without a tokenizer folder)."""
    from safetensors.torch import save_file

    from lowvram.models.ldm_convert import pipeline_to_ldm

    pipe = BUILDERS[family](tmp, clip_vocab=clip_vocab)
    name = family + ("-clip" if clip_vocab else "")
    folder = tmp / name
    pipe.save_pretrained(folder)
    single = tmp / f"{name}.safetensors"
    sd = pipeline_to_ldm(pipe.unet, pipe.vae, text_encoders(pipe), family)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(single))
    return {"folder": folder, "file": single}


def config_only(folder: Path, dest: Path) -> Path:
    """The JSON configs of a diffusers folder without weights or tokenizers: what ``model.config`` needs to
    describe a tiny single file's layout (real checkpoints use the configs shipped with lowvram)."""
    import shutil

    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "tokenizer*"))
    return dest


def perturb_lora(*models, seed: int = 0, scale: float = 0.3) -> None:
    """Make lora_B non-zero, as a few training steps would (peft starts it at zero)."""
    g = torch.Generator().manual_seed(seed)
    for m in models:
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=g) * scale


def finetune_argv(model: Path, data: Path, out: Path, sets: dict, *extra: str, steps: int = 3,
                  task: str = "lora") -> list[str]:
    """``lowvram train`` arguments of a short CPU fine-tune: ``sets`` and ``extra`` become ``--set`` items."""
    argv = ["train", "--preset", "cpu", "--task", task, "--model", str(model), "--data", str(data),
            "--steps", str(steps), "--out", str(out), "--no-progress"]
    for item in [f"{k}={v}" for k, v in sets.items()] + list(extra):
        argv += ["--set", item]
    return argv


def tiny_workload(tmp: Path, mode: str = "lora", family: str = "sd1", batch: int = 2, **kw):
    """A memory Workload of the tiny pipeline ``family`` (its own UNet / VAE / text encoder configs, the real
    fine-tune path of the profiler) for ``mode`` lora or full at 32 px (16x16 latents)."""
    from lowvram.memory.run_workload import _text_config
    from lowvram.memory.workloads import Workload

    pipe = BUILDERS[family](tmp)
    unet = {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}
    vae = {k: v for k, v in dict(pipe.vae.config).items() if not k.startswith("_")}
    tes = tuple(_text_config(te.config.to_dict()) for te in text_encoders(pipe).values())
    model = {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl"}[family]
    return Workload(f"tiny-{family}-{mode}", "test", model, mode, 32, batch, **{"lora_rank": 4, **kw},
                    unet_overrides=unet, vae_overrides=vae, text_encoder_overrides=tes)


def write_image_folder(folder: Path, n: int, res: int, caption: str) -> Path:
    """``n`` random RGB images of ``res``² with ``.txt`` captions "{caption}, photo {i}": a fine-tune's data."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"{caption}, photo {i}")
    return folder


class Crash(Exception):
    pass


def crash_at_first_checkpoint_then_resume(argv: list[str], out: Path) -> int:
    """Run ``lowvram train argv`` (resolved as the CLI does) until its first checkpoint is written, die there,
    then ``lowvram train --resume out``; returns the resume's exit code."""
    import pytest

    from lowvram.cli import build_parser, main, resolve_config
    from lowvram.train.run import train

    cfg, _, _ = resolve_config(build_parser().parse_args(argv))

    def crash(event):
        if event.kind == "checkpoint":
            raise Crash

    with pytest.raises(Crash):
        train(cfg, listeners=[crash], progress=False)
    assert not (out / "samples").exists()
    return main(["train", "--resume", str(out), "--no-progress"])
