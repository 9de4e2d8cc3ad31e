"""Open a finished (or running) run folder as a sampler: the final model, or a checkpoint's EMA weights."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointError
from .pipeline import MODEL_JSON, TextToImage
from .run_folder import CHECKPOINTS_DIR, FINAL_DIR, load_run_config


def load_run_model(run_dir: str | Path, device: str | torch.device = "cpu", which: str = "auto") -> TextToImage:
    """``which``: 'final' (the saved model), 'latest' (newest checkpoint, EMA weights) or 'auto' (final if any)."""
    run_dir = Path(run_dir)
    final = run_dir / FINAL_DIR
    if which in ("auto", "final") and (final / MODEL_JSON).is_file():
        return TextToImage.load(final, device)
    if which == "final":
        raise CheckpointError(f"run '{run_dir}' has no final model yet", "use --which latest, or let the run finish")
    return _from_checkpoint(run_dir, torch.device(device))


def _from_checkpoint(run_dir: Path, device: torch.device) -> TextToImage:
    from transformers import AutoTokenizer

    from .models.local import load_local
    from .train.autoencoder import load_autoencoder
    from .train.checkpoint import latest_checkpoint, load_checkpoint
    from .train.setup import build_components

    cfg = load_run_config(run_dir)
    ckpt = latest_checkpoint(run_dir / CHECKPOINTS_DIR)
    if ckpt is None:
        raise CheckpointError(f"run '{run_dir}' has no final model and no checkpoint", "train it first (lowvram train)")
    tok = load_local(AutoTokenizer, run_dir / "tokenizer", weights=False)
    vae, scale = None, 1.0
    if cfg.run.task == "latent":
        loaded = load_autoencoder(run_dir)
        if loaded is None:
            raise CheckpointError(f"run '{run_dir}' has no finished autoencoder stage", "resume the run")
        vae, scale = loaded
        vae = vae.to(device)
    comps = build_components(cfg, [], device, vae=vae, latent_scale=scale, tokenizer=tok)
    tensors, _ = load_checkpoint(ckpt)
    model = torch.nn.ModuleDict(comps.trainable_modules())
    try:
        model.load_state_dict(tensors["model"])
        if "ema" in tensors:
            from .ema import EMA

            ema = EMA(model, decay=cfg.train.ema_decay or 0.999, device=device)
            ema.load_state_dict(tensors["ema"])
            ema.copy_to(model)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{ckpt}' does not fit the run's model: {str(e).splitlines()[0][:200]}",
                              "use --which final, or resume the run from another checkpoint") from None
    return TextToImage(
        unet=comps.unet, text_encoder=comps.text_encoder, tokenizer=tok, scheduler_config=comps.scheduler_config,
        sample_shape=comps.sample_shape, vae=comps.vae, latent_scale=scale, device=device,
    )
