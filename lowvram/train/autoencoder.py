"""The autoencoder stage of latent training: reconstruction + KL, then the latent scale.

Latent diffusion needs an autoencoder; without a pretrained one (``model.vae``) the latent task
trains a small AutoencoderKL first and freezes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import RunConfig
from ..models import scratch
from .events import Event
from .step import phase_range

AE_DIR = "autoencoder"
SCALE_JSON = "latent_scale.json"


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, 1)) averaged over elements."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def train_autoencoder(
    cfg: RunConfig,
    images: Callable[[list[int]], torch.Tensor],
    num_items: int,
    steps: int,
    device: torch.device,
    emit: Callable[[Event], None],
) -> torch.nn.Module:
    """Train a fresh AutoencoderKL of the model size on ``images(indices)`` for ``steps`` steps."""
    spec = scratch.MODEL_SIZES[cfg.model.size]
    torch.manual_seed(cfg.run.seed)
    vae = scratch.build_vae(spec).to(device).train()
    # foreach=False: the per-tensor loop, no multi-tensor temporaries (what the memory profile assumes)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.train.autoencoder_lr, foreach=False)
    gen = torch.Generator().manual_seed(cfg.run.seed + 17)
    bs = cfg.train.batch_size
    emit(Event("start", 0, {"stage": "autoencoder", "total": steps}))
    for step in range(1, steps + 1):
        idx = torch.randint(0, num_items, (bs,), generator=gen).tolist()
        with phase_range("autoencoder"):
            x = images(idx).to(device)
            posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=None)
            recon = vae.decode(z).sample
            rec_loss = torch.nn.functional.mse_loss(recon.float(), x.float())
            loss = rec_loss + cfg.train.kl_weight * kl_divergence(posterior.mean, posterior.logvar)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            # freed at once: not alive through the next forward, nor (after the last step) the whole run
            opt.zero_grad(set_to_none=True)
            del x, posterior, z, recon
        if step % cfg.run.log_every == 0 or step == steps:
            emit(Event("step", step, {"stage": "autoencoder", "loss": loss.item(), "recon_mse": rec_loss.item()}))
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_scale(vae: torch.nn.Module, images: torch.Tensor, batch: int | None = None) -> float:
    """1 / std of the latents, so the diffusion model sees unit-variance inputs (SD's 0.18215 idea).

    ``batch``: images encoded at once (the training micro-batch: this stage never needs more memory)."""
    step = batch or len(images)
    z = torch.cat([vae.encode(images[i:i + step]).latent_dist.mean.float() for i in range(0, len(images), step)])
    return float(1.0 / z.std().clamp_min(1e-6))


def save_autoencoder(vae: torch.nn.Module, scale: float, run_dir: Path) -> Path:
    folder = run_dir / AE_DIR
    from ..fsutil import atomic_dir

    with atomic_dir(folder) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / SCALE_JSON).write_text(json.dumps({"latent_scale": scale}))
    return folder


def load_autoencoder(run_dir: Path) -> tuple[torch.nn.Module, float] | None:
    """The run's finished autoencoder stage, or None when it has not completed."""
    from diffusers import AutoencoderKL

    folder = run_dir / AE_DIR
    if not (folder / SCALE_JSON).is_file():
        return None
    from ..models.local import load_local, read_json

    scale = read_json(folder / SCALE_JSON, ("latent_scale",))["latent_scale"]
    return load_local(AutoencoderKL, folder).eval().requires_grad_(False), float(scale)


@torch.no_grad()
def encode_all(vae: torch.nn.Module, images: Callable[[list[int]], torch.Tensor], num_items: int,
               scale: float, device: torch.device, batch: int = 64) -> torch.Tensor:
    """Every image's latent (the posterior mean, scaled), encoded once: the in-memory latent cache."""
    out: list[torch.Tensor] = []
    for start in range(0, num_items, batch):
        idx = list(range(start, min(start + batch, num_items)))
        out.append((vae.encode(images(idx).to(device)).latent_dist.mean * scale).cpu())
    return torch.cat(out)

