"""LoRA on a model lowvram trained from scratch: ``--task lora --model RUN/final`` (or the run folder itself).

A from-scratch run saves its final model as a folder of diffusers/transformers components with
``lowvram_model.json`` (``lowvram.pipeline.TextToImage``): a pixel-space (or latent) UNet, the small CLIP text
encoder and its word-level tokenizer. SD fine-tunes (``train/finetune.py``) need an SD pipeline and a VAE;
this job reuses the from-scratch job instead (its loss, previews and data), with the base frozen and an
adapter on the UNet (and the text encoder with ``lora.text_encoder``). The objective follows the base model
(its saved scheduler: prediction type, zero-terminal-SNR betas), as a fine-tune follows its checkpoint.

The run writes ``lora/pytorch_lora_weights.safetensors`` (peft keys, as a diffusers LoRA file) and, so that
``lowvram sample``/``eval`` and ``load_run_model`` work on the run folder, ``final/``: the base with the
adapter merged in. Such a folder is the scratch family's (``families/scratch.py``: detection, the planner's
workload, the refusals); the run reaches this module by asking the family registry.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..errors import ConfigError
from ..families.scratch import ScratchFamily, model_resolution, scratch_model_folder
from ..fsutil import atomic_dir, save_safetensors_atomic
from ..pipeline import TextToImage
from ..run_folder import CONFIG_NAME, FINAL_DIR, LORA_FILE, RunResult
from .assemble import fit
from .events import Event, note
from .jobs import ScratchJob
from .loop import shuffled_batches
from .phases import PhaseClock
from .setup import Components


def attach_adapters(cfg: RunConfig, unet: nn.Module, text_encoder: nn.Module) -> None:
    """The configured adapter on the UNet (and the text encoder), fp32, seeded by ``run.seed``."""
    from ..lora import attach_lora, attach_text_lora
    from ..lora_attach import unet_targets

    lo = cfg.lora
    torch.manual_seed(cfg.run.seed)  # the adapter's random init: the same run gives the same adapter
    attach_lora(unet, lo.rank, lo.alpha, lo.dropout, conv=lo.conv, adapter=lo.type,
                target_modules=unet_targets(lo.targets))
    if lo.text_encoder:
        attach_text_lora(text_encoder, lo.rank, lo.alpha, lo.dropout, adapter=lo.type)


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its adapter merged into the base weights and the adapter layers removed."""
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    recurse_remove_peft_layers(out)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(out, attr):
            delattr(out, attr)
    return out.requires_grad_(False)


def load_base(folder: Path, device: torch.device) -> Components:
    """The frozen base model as the from-scratch job's components, with its own noise schedule."""
    from diffusers import DDPMScheduler

    model = TextToImage.load(folder, device)
    sched = dict(model.scheduler_config)
    for m in (model.unet, model.text_encoder, model.vae):
        if m is not None:
            m.requires_grad_(False).eval()
    return Components(
        unet=model.unet, text_encoder=model.text_encoder, tokenizer=model.tokenizer, vae=model.vae,
        scheduler_config=sched, alphas_cumprod=DDPMScheduler.from_config(sched).alphas_cumprod.float(),
        sample_shape=model.sample_shape, latent_scale=model.latent_scale, train_text_encoder=False,
    )


class ScratchLoraJob(ScratchJob):
    """The from-scratch job over a frozen base with adapters: saves the adapter and the merged model."""

    def save_final(self, step: int) -> Path:
        from ..lora import ADAPTER, lora_state_dict_peft

        tes = {"text_encoder": self.c.text_encoder} if self.c.train_text_encoder else {}
        meta = {"lowvram_family": "scratch", "lowvram_base_model": str(self.cfg.model.pretrained),
                "lowvram_steps": str(step), "lowvram_prediction": self.cfg.model.prediction,
                "lowvram_adapter": self.cfg.lora.type}
        for name, m in {"unet": self.c.unet, **tes}.items():
            meta[f"{name}_lora_adapter_metadata"] = json.dumps(m.peft_config[ADAPTER].to_dict(), default=str)
        save_safetensors_atomic(lora_state_dict_peft(self.c.unet, tes), self.run_dir / LORA_FILE, meta)
        te = merged_copy(self.c.text_encoder) if tes else self.c.text_encoder
        merged = TextToImage(
            unet=merged_copy(self.c.unet), text_encoder=te, tokenizer=self.c.tokenizer,
            scheduler_config=self.c.scheduler_config, sample_shape=self.c.sample_shape, vae=self.c.vae,
            latent_scale=self.c.latent_scale, device=self.device,
        )
        final = self.run_dir / FINAL_DIR
        with atomic_dir(final) as tmp:  # a killed save never leaves a mix of two steps' files
            merged.save(tmp, {"task": "lora", "step": step, "base": str(self.cfg.model.pretrained),
                              "lora": str(LORA_FILE), "adapter": self.cfg.lora.type})
        return final


def follow_base(cfg: RunConfig, folder: Path, comps: Components) -> list[str]:
    """Set what the base model decides (objective, resolution) in ``cfg``; returns notes for the user."""
    notes = []
    prediction = comps.scheduler_config.get("prediction_type", "epsilon")
    if cfg.model.prediction != prediction:
        notes.append(f"model.prediction = {prediction} (the base model's)")
        cfg.model.prediction = prediction
    res = model_resolution(folder)
    if cfg.data.resolution != res:
        raise ConfigError(f"data.resolution = {cfg.data.resolution}, but the base model '{folder}' was trained at {res}",
                          f"leave data.resolution unset (or set it to {res})")
    return notes


def train_scratch_lora(cfg: RunConfig, run_dir: Path, device: torch.device, emit: Callable[[Event], None], *,
                       stop: Callable[[], bool] = lambda: False, resume: bool = False, world: Any = None,
                       clock: PhaseClock | None = None) -> RunResult:
    """LoRA-train ``model.pretrained`` (a from-scratch model folder) on ``data.source``; returns a ``RunResult``
    (``clock`` times its phases: load, data check, then the loop's)."""
    from ..distributed import SINGLE
    from .run import open_images, with_loss_weights

    world = world or SINGLE
    clock = clock or PhaseClock(emit)
    ScratchFamily.check_config(cfg, world)
    folder = scratch_model_folder(cfg.model.pretrained)
    assert folder is not None  # the registry dispatched here because it is one (families/scratch.py)
    with clock.phase("load"):
        comps = load_base(folder, device)
        notes = follow_base(cfg, folder, comps)
    if world.is_main:
        cfg.save(run_dir / CONFIG_NAME)  # with the objective the base decided
    with clock.phase("data check"):
        data = open_images(cfg, "train", run_dir)
    attach_adapters(cfg, comps.unet, comps.text_encoder)
    comps.train_text_encoder = cfg.lora.text_encoder
    comps.unet.train()
    if comps.train_text_encoder:
        comps.text_encoder.train()
    prompts = cfg.sample.prompts or data.sample_prompts[:4]
    job = ScratchLoraJob(cfg, run_dir, comps, device, None, prompts)
    emit(note(f"lora fine-tune of the from-scratch model {folder} ({comps.scheduler_config.get('prediction_type')})"
              + "".join(f"; {n}" for n in notes)))

    scale = comps.latent_scale

    def batch(idx: list[int]) -> dict[str, Any]:
        x0 = data.pixels(idx)
        if comps.vae is not None:  # a latent model: encoded as its base run encoded (small models: no cache)
            from .autoencoder import encode_all

            with torch.no_grad():
                x0 = encode_all(comps.vae, lambda j: x0[j], len(idx), scale, device)
        return with_loss_weights(cfg, data, idx, {"x0": x0, "captions": data.captions(idx)})

    batches = data.epoch_batches or shuffled_batches(len(data), cfg.train.batch_size, cfg.run.seed)
    return fit(cfg, run_dir, job, batch, batches, device, emit, stop=stop, resume=resume, world=world, clock=clock)
