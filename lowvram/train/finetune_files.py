"""What a fine-tune's LoRA files say about their training (kohya ``ss_*`` metadata) and the per-step copies kept."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..run_folder import STEP_LORA_DIR


def dataset_tags(ds: Any, source: str) -> tuple[dict[str, dict[str, int]], dict[str, Counter]]:
    """kohya's ``ss_dataset_dirs`` (repeats, image count per folder) and tag counts per folder."""
    dirs: dict[str, dict[str, int]] = {}
    tags: dict[str, Counter] = {}
    for rec in getattr(ds, "records", []):
        folder = Path(rec.rel).parent.name or Path(source).name
        d = dirs.setdefault(folder, {"n_repeats": rec.repeats, "img_count": 0})
        d["img_count"] += 1
        tags.setdefault(folder, Counter()).update(t.strip() for t in rec.caption.split(",") if t.strip())
    return dirs, tags


def lora_metadata(job: Any, step: int) -> dict[str, Any]:
    """kohya ``ss_*`` keys (A1111/ComfyUI LoRA browsers show them) plus lowvram's own, before the family's."""
    cfg, ds = job.cfg, job.data.dataset
    report = ds.report
    dirs, tags = dataset_tags(ds, str(cfg.data.source))
    res = cfg.data.resolution or 512
    return {
        "ss_sd_model_name": Path(str(cfg.model.pretrained)).name,
        "ss_output_name": job.lora_name,
        "ss_resolution": f"({res}, {res})",
        "ss_num_train_images": str(report.samples),
        "ss_num_reg_images": str(report.class_data.used if getattr(report, "class_data", None) else 0),
        "ss_prior_loss_weight": str(cfg.train.prior_loss_weight),
        "ss_dataset_dirs": dirs,
        "ss_tag_frequency": {k: dict(v.most_common(200)) for k, v in tags.items()},
        "ss_max_train_steps": str(cfg.run.steps),
        "ss_steps": str(step),
        "ss_learning_rate": str(cfg.train.lr),
        "ss_unet_lr": str(cfg.train.lr),
        "ss_text_encoder_lr": str(cfg.train.lr if job.train_text else 0.0),
        "ss_network_train_unet_only": str(not job.train_text),
        "ss_lr_warmup_steps": str(cfg.train.warmup_steps),
        "ss_lr_scheduler": f"{cfg.train.lr_schedule}_with_warmup",
        "ss_optimizer": cfg.train.optimizer,
        "ss_batch_size_per_device": str(cfg.train.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.train.grad_accum),
        "ss_mixed_precision": {"fp32": "no"}.get(cfg.train.precision, cfg.train.precision),
        "ss_gradient_checkpointing": str(cfg.train.gradient_checkpointing),
        "ss_seed": str(cfg.run.seed),
        "ss_caption_dropout_rate": str(cfg.data.caption_dropout),
        "ss_network_dropout": str(cfg.lora.dropout),
        "ss_v_parameterization": str(job.prediction == "v_prediction"),
        "ss_enable_bucket": str(cfg.data.buckets),
        "ss_cache_latents": str(job.data.latents is not None),
        "lowvram_family": job.c.family,
        "lowvram_base_model": str(cfg.model.pretrained),
        "lowvram_prediction": job.prediction,
        "lowvram_frozen_dtype": cfg.memory.frozen_dtype,
        "lowvram_ema_decay": str(cfg.train.ema_decay),
    }


def keep_step_copy(run_dir: Path, lora_name: str, kohya: Path, step: int) -> Path:
    """A copy of the kohya file named by step, so that an earlier checkpoint's LoRA can be picked later."""
    from ..fsutil import write_bytes_atomic

    steps_dir = run_dir / STEP_LORA_DIR
    steps_dir.mkdir(parents=True, exist_ok=True)
    target = steps_dir / f"{lora_name}-step{step:08d}.safetensors"
    write_bytes_atomic(target, kohya.read_bytes())
    return target
