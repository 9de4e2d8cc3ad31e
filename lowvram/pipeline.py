"""A trained text-to-image model ready to sample: text encoder, UNet, optional VAE, noise schedule.

Training (sample grids), ``lowvram sample`` and ``lowvram eval`` all draw images through this one
class, so what the grids show during training is what a user gets afterwards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .models.key_names import canonicalize_text_encoder_folder
from .models.tokenizer import encode as _encode
from .run_folder import MODEL_JSON
from .sample import make_grid, make_sampler, sample


@dataclass
class TextToImage:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]
    sample_shape: tuple[int, int, int]  # (C, H, W) of what the UNet denoises
    vae: torch.nn.Module | None = None
    latent_scale: float = 1.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Token ids → the text encoder's last hidden states (the UNet's cross-attention input)."""
        ids = _encode(self.tokenizer, [p.lower() for p in prompts]).to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """UNet space → pixels in [-1, 1] (identity in pixel space)."""
        if self.vae is None:
            return x.clamp(-1, 1)
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((x / self.latent_scale).to(vae_dtype)).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        cfg_scale: float = 3.0,
        steps: int = 25,
        sampler: str = "ddim",
        seed: int = 0,
        negative_prompt: str = "",
        guidance_rescale: float = 0.0,
    ) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] for ``prompts``; the same seed gives the same images."""
        was_training = (self.unet.training, self.text_encoder.training)
        self.unet.eval()
        self.text_encoder.eval()
        try:
            cond = self.encode_prompts(prompts)
            uncond = self.encode_prompts([negative_prompt] * len(prompts))

            def denoise(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
                return self.unet(x.to(self.dtype), t, encoder_hidden_states=c).sample.float()

            x = sample(
                denoise,
                (len(prompts), *self.sample_shape),
                scheduler=make_sampler(sampler, self.scheduler_config),
                cond=cond,
                uncond=uncond,
                guidance_scale=cfg_scale,
                steps=steps,
                seed=seed,
                device=self.device,
                guidance_rescale=guidance_rescale,
            )
            return self.decode(x)
        finally:
            self.unet.train(was_training[0])
            self.text_encoder.train(was_training[1])

    def grid(self, prompts: list[str], cfg_scales: list[float], **kw: Any) -> Any:
        """A PIL grid: one row per prompt, one column per guidance scale, same noise along a row."""
        columns = [self.generate(prompts, cfg_scale=s, **kw) for s in cfg_scales]
        images = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: prompt, then scale
        return make_grid(images, nrow=len(cfg_scales))

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write each component in diffusers/transformers format plus a small JSON descriptor."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        canonicalize_text_encoder_folder(folder / "text_encoder")  # text_model.… keys on any transformers
        self.tokenizer.save_pretrained(folder / "tokenizer")
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        (folder / "scheduler").mkdir(exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=1))
        desc = {
            "sample_shape": list(self.sample_shape),
            "latent_scale": self.latent_scale,
            "has_vae": self.vae is not None,
            **(extra or {}),
        }
        (folder / MODEL_JSON).write_text(json.dumps(desc, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> TextToImage:
        """Load a folder written by :meth:`save` (local files only)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        from .models.local import load_local, read_json

        folder = Path(folder)
        desc = read_json(folder / MODEL_JSON, ("sample_shape",))
        dev = torch.device(device)
        unet = load_local(UNet2DConditionModel, folder / "unet").to(dev)
        te = load_local(CLIPTextModel, folder / "text_encoder").to(dev)
        tok = load_local(AutoTokenizer, folder / "tokenizer", weights=False)
        vae = None
        if desc.get("has_vae"):
            vae = load_local(AutoencoderKL, folder / "vae").to(dev)
        sched = read_json(folder / "scheduler" / "scheduler_config.json")
        shape = desc["sample_shape"]
        if not (isinstance(shape, list) and len(shape) == 3 and shape[0] == unet.config.in_channels
                and (vae is None) == (not desc.get("has_vae"))):
            from .errors import CheckpointError

            raise CheckpointError(f"'{folder / MODEL_JSON}' says sample_shape {shape!r}, which does not fit "
                                  f"the UNet's {unet.config.in_channels} input channels",
                                  "the run's saved model is damaged: train again, or resume the run")
        return cls(
            unet=unet,
            text_encoder=te,
            tokenizer=tok,
            scheduler_config=sched,
            sample_shape=tuple(desc["sample_shape"]),
            vae=vae,
            latent_scale=float(desc.get("latent_scale", 1.0)),
            device=dev,
        )
