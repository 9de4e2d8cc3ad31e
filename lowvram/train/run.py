"""The one Python API behind ``lowvram train`` and the web panel: resolve, prepare, train, save.

``train(cfg)`` runs a job in the current process and returns where its results are; nothing here is
process-global, so two runs in a row in one process do not interfere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import FINETUNE_TASKS, RunConfig
from ..distributed import World, check_zero, computed_once, main_first, training_device, wait, world
from ..errors import ConfigError
from ..fsutil import sweep_leftovers, write_text_atomic
from ..run_folder import CHECKPOINTS_DIR, CONFIG_NAME, RunResult, load_run_config
from .assemble import fit
from .autoencoder import encode_all, latent_scale, load_autoencoder, save_autoencoder, train_autoencoder
from .checkpoint import (
    check_checkpoint,
    checkpoint_step,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
)
from .events import Event, JsonlLogger, Listener, ProgressBar, TensorBoardLogger, note, print_notes
from .jobs import ScratchJob
from .loop import shuffled_batches
from .phases import PhaseClock
from .setup import build_components, load_vae, resolve_defaults, resolve_device
from .step import phase_range

VAL_ITEMS = 64


@dataclass
class ImageData:
    """Images and captions addressed by index; what the loop and the autoencoder stage read.

    ``epoch_batches`` (bucketed folders) gives each epoch's batches; indices may be stream indices
    ``epoch * len + i`` that let the dataset vary flips and crops per epoch.
    """

    pixels: Callable[[list[int]], torch.Tensor]
    captions: Callable[[list[int]], list[str]]
    size: int
    sample_prompts: list[str]
    epoch_batches: Callable[[int], list[list[int]]] | None = None
    all_captions: list[str] | None = None
    masks: Callable[[list[int]], torch.Tensor] | None = None  # loss masks [B, 1, H, W] (masked loss), if any

    def __len__(self) -> int:
        return self.size


def open_images(cfg: RunConfig, split: str, run_dir: Path | None = None) -> ImageData:
    """The configured data source as indexable images; ``split`` is 'train' or 'val' (held out)."""
    if cfg.data.source == "builtin":
        from ..data.builtin import ShapesDataset, eval_prompts, holdout

        res, exclude = cfg.data.resolution, tuple(cfg.data.builtin_exclude)
        ds = (ShapesDataset(cfg.data.num_images, res, exclude=exclude) if split == "train"
              else holdout(VAL_ITEMS, res, exclude=exclude))
        items = [ds[i] for i in range(len(ds))]
        # generated images are small: materialise once instead of redrawing every step
        pixels = torch.stack([it["pixel_values"] for it in items])
        caps = [it["caption"] for it in items]
        return ImageData(lambda idx: pixels[idx], lambda idx: [caps[i] for i in idx], len(caps), eval_prompts(),
                         all_captions=caps)
    from ..data.dataset import open_for_training

    ds, epoch_batches = open_for_training(cfg, run_dir)
    n = len(ds)

    def pixels(idx: list[int]) -> torch.Tensor:
        return torch.stack([ds[i]["pixel_values"] for i in idx])

    def captions(idx: list[int]) -> list[str]:
        return [ds.plan(i).caption for i in idx]

    def masks(idx: list[int]) -> torch.Tensor:
        return torch.stack([ds.mask(i) for i in idx])

    caps = captions(list(range(n)))
    return ImageData(pixels, captions, n, cfg.sample.prompts or caps[:4], epoch_batches, caps,
                     masks if ds.has_masks else None)


def prepare_run_dir(cfg: RunConfig, resume: bool, write: bool = True,
                    record: Mapping[str, str] | None = None) -> Path:
    """Check the run folder (every process, so all refuse alike); ``write``: create it, save the config
    (``record``: the plan's files, config.yaml among them, written as they are)."""
    run_dir = Path(cfg.run.out)
    if not resume and latest_checkpoint(run_dir / CHECKPOINTS_DIR) is not None:
        raise ConfigError(
            f"run folder '{run_dir}' already holds a run",
            f"continue it with `lowvram train --resume {run_dir}`, or choose another --out",
        )
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        if record:
            for name, text in record.items():
                write_text_atomic(run_dir / name, text)
        else:
            cfg.save(run_dir / CONFIG_NAME)
    return run_dir


def make_emitter(run_dir: Path, cfg: RunConfig, listeners: Iterable[Listener], progress: bool,
                 initial: int, w: World | None = None) -> tuple[Callable[[Event], None], list[Listener]]:
    """Metrics, TensorBoard, progress bar and ``listeners``; on processes other than the main one, none."""
    if w is not None and not w.is_main:
        return (lambda event: None), []
    outs: list[Listener] = [JsonlLogger(run_dir / "metrics.jsonl")]
    if cfg.run.tensorboard:
        outs.append(TensorBoardLogger(run_dir / "tensorboard"))
    # notes (what loading, caching and resuming decided) reach stdout: above the bar, or printed plainly
    outs.append(ProgressBar(cfg.run.steps, initial=initial) if progress else print_notes)
    outs.extend(listeners)

    def emit(event: Event) -> None:
        for listener in outs:
            listener(event)

    return emit, outs


def train(
    cfg: RunConfig,
    *,
    listeners: Iterable[Listener] = (),
    stop: Callable[[], bool] | None = None,
    progress: bool = True,
    resume: bool = False,
    from_checkpoint: str | None = None,
    record: Mapping[str, str] | None = None,
    clock: PhaseClock | None = None,
) -> RunResult:
    """Run the job ``cfg`` describes; with ``resume`` continue its run folder's latest checkpoint (or
    ``from_checkpoint``, an older one: the newer ones are set aside).

    ``record``: the plan's files to keep in the run folder (``lowvram.api.train`` passes them). ``clock``
    times the phases (the CLI passes one that already holds resolve and plan); the result carries the
    account, also written to ``metrics.jsonl`` as a ``phases`` row.
    Under ``accelerate launch`` / ``torchrun`` every process calls this; only the main one writes files."""
    clock = clock or PhaseClock()
    resolve_defaults(cfg)
    device = resolve_device(cfg.run.device)
    check_zero(cfg.memory.zero_stage, cfg.memory.offload_optimizer, device)
    w = world(cpu=device.type == "cpu")
    device = training_device(w, device)
    run_dir = prepare_run_dir(cfg, resume, write=w.is_main, record=record)
    emit, _ = make_emitter(run_dir, cfg, listeners, progress, initial=0, w=w)
    clock.attach(emit)
    if w.is_main:
        # what earlier processes left half-written (killed saves) only fills the disk
        sweep_leftovers(run_dir, run_dir / CHECKPOINTS_DIR)
        if from_checkpoint and (moved := set_aside_newer(run_dir / CHECKPOINTS_DIR, from_checkpoint)):
            emit(note(f"note: set aside {len(moved)} newer checkpoint(s) as {', '.join(m.name for m in moved)} "
                      "(delete them to free the space)"))
    wait(w)
    if cfg.run.task in FINETUNE_TASKS:
        from ..families import family_of

        # the registry says which family the checkpoint is; the family says how it trains (the fine-tune job,
        # or its own: a model lowvram trained from scratch)
        result = family_of(cfg.model).train(cfg, run_dir, device, emit, stop=stop or (lambda: False), resume=resume,
                                            world=w, clock=clock)
    else:
        result = train_from_scratch(cfg, run_dir, device, emit, w, clock, stop=stop, resume=resume)
    summary = clock.summary(result.step)
    emit(summary)
    result.phases = summary.data
    return result


def train_from_scratch(cfg: RunConfig, run_dir: Path, device: torch.device, emit: Callable[[Event], None], w: World,
                       clock: PhaseClock, *, stop: Callable[[], bool] | None, resume: bool) -> RunResult:
    """The text2img / latent / autoencoder tasks: data, (autoencoder stage, latent cache), models, the loop."""
    with clock.phase("data check"):
        train_data = open_images(cfg, "train", run_dir)
        val_data = open_images(cfg, "val") if cfg.data.source == "builtin" else None
    if cfg.run.task == "autoencoder":
        with clock.phase("autoencoder"), main_first(w):  # one process trains the autoencoder stage
            if w.is_main:
                fit_autoencoder(cfg, run_dir, train_data, cfg.run.steps, device, emit)
        emit(Event("end", cfg.run.steps, {"final": str(run_dir / "autoencoder")}))
        return RunResult(run_dir, "done", cfg.run.steps)

    vae, scale = None, 1.0
    x0_of: Callable[[list[int]], torch.Tensor] = train_data.pixels
    val_x0 = val_data.pixels(list(range(len(val_data)))) if val_data else None
    if cfg.run.task == "latent":
        vae, scale, x0_of, val_x0 = _latent_inputs(cfg, run_dir, train_data, val_data, val_x0, device, emit,
                                                    clock, w)

    comps = _scratch_components(cfg, run_dir, train_data, device, vae, scale, clock, w, resume)

    def data(idx: list[int]) -> dict[str, Any]:
        return with_loss_weights(cfg, train_data, idx, {"x0": x0_of(idx), "captions": train_data.captions(idx)})

    val_batch = {"x0": val_x0, "captions": val_data.all_captions} if val_data is not None else None
    prompts = cfg.sample.prompts or train_data.sample_prompts[:4]
    job = ScratchJob(cfg, run_dir, comps, device, val_batch, prompts)
    batches = train_data.epoch_batches or shuffled_batches(len(train_data), cfg.train.batch_size, cfg.run.seed)
    return fit(cfg, run_dir, job, data, batches, device, emit, stop=stop or (lambda: False), resume=resume, world=w,
               clock=clock)


def _latent_inputs(cfg: RunConfig, run_dir: Path, train_data: ImageData, val_data: ImageData | None,
                   val_x0: torch.Tensor | None, device: torch.device, emit: Callable[[Event], None], clock: PhaseClock,
                   w: World) -> tuple[Any, float, Callable[[list[int]], torch.Tensor], torch.Tensor | None]:
    """The latent task's autoencoder (trained or loaded) and its latent caches: (vae, scale, the latents of
    a batch, the validation latents in place of the validation pixels ``val_x0``)."""
    with main_first(w):  # the main process trains (or loads) the autoencoder, the others then load it
        vae, scale = latent_stage(cfg, run_dir, train_data, device, emit, clock)
    # the latent cache is encoded once, by the main process, and read by the others
    shared = run_dir / "cache"
    with clock.phase("caching"), phase_range("cache"):
        latents = computed_once(w, shared / "train_latents.safetensors",
                                lambda: encode_all(vae, train_data.pixels, len(train_data), scale, device,
                                                   cfg.train.batch_size))
        if val_x0 is not None:
            val_x0 = computed_once(w, shared / "val_latents.safetensors",
                                   lambda: encode_all(vae, val_data.pixels, len(val_data), scale, device,
                                                      cfg.train.batch_size))
    n = len(train_data)
    x0_of = lambda idx: latents[[i % n for i in idx]]  # noqa: E731 — the cache is a tensor lookup
    # the latents are cached: the autoencoder only decodes previews, so it waits in host memory
    # with memory.offload_frozen (the job brings it to the card for each preview)
    vae = vae.to("cpu" if cfg.memory.offload_frozen else device)
    return vae, scale, x0_of, val_x0


def _scratch_components(cfg: RunConfig, run_dir: Path, train_data: ImageData, device: torch.device, vae: Any,
                        scale: float, clock: PhaseClock, w: World, resume: bool) -> Any:
    """The from-scratch models; the main process builds and saves the tokenizer, the others (and a resumed
    run) load it."""
    tokenizer = None
    tok_dir = run_dir / "tokenizer"
    with clock.phase("load"), main_first(w):  # the main process builds and saves the tokenizer; the others load it
        if (resume or not w.is_main) and tok_dir.is_dir():
            from transformers import AutoTokenizer

            from ..models.local import load_local

            tokenizer = load_local(AutoTokenizer, tok_dir, weights=False)
        comps = build_components(cfg, train_data.all_captions or [], device, vae=vae, latent_scale=scale,
                                 tokenizer=tokenizer)
        if w.is_main and not tok_dir.is_dir():
            comps.tokenizer.save_pretrained(tok_dir)
    return comps


def with_loss_weights(cfg: RunConfig, data: ImageData, idx: list[int], batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with the loss weights of its images' masks on the UNet's grid, when the data has masks."""
    if data.masks is not None:
        from ..data.masks import batch_weights

        batch["loss_weights"] = batch_weights(list(data.masks(idx)), batch["x0"].shape[-2:], cfg.data.unmasked_weight)
    return batch


def latent_stage(cfg: RunConfig, run_dir: Path, data: ImageData, device: torch.device,
                 emit: Callable[[Event], None], clock: PhaseClock) -> tuple[torch.nn.Module, float]:
    """The frozen autoencoder for latent training: given, already trained in this run, or trained now."""
    with clock.phase("load"):
        if cfg.model.vae:
            vae = load_vae(cfg.model.vae).to(device).eval().requires_grad_(False)
            scale = float(getattr(vae.config, "scaling_factor", 1.0))
            return vae, scale
        done = load_autoencoder(run_dir)
        if done is not None:
            return done[0].to(device), done[1]
    with clock.phase("autoencoder"):
        return fit_autoencoder(cfg, run_dir, data, cfg.train.autoencoder_steps, device, emit)


def fit_autoencoder(cfg: RunConfig, run_dir: Path, data: ImageData, steps: int, device: torch.device,
                    emit: Callable[[Event], None]) -> tuple[torch.nn.Module, float]:
    """Train the autoencoder stage, measure its latent scale on up to 256 images, and save both."""
    vae = train_autoencoder(cfg, data.pixels, len(data), steps, device, emit)
    with phase_range("cache"):
        scale = latent_scale(vae, data.pixels(list(range(min(256, len(data))))).to(device), cfg.train.batch_size)
    save_autoencoder(vae, scale, run_dir)
    return vae, scale


def set_aside_newer(ckpt_dir: Path, name: str) -> list[Path]:
    """Resuming from an older checkpoint: rename the newer ones ``step-N.abandoned`` (kept, but never
    resumed from or pruned into the new line of checkpoints); returns the new names."""
    chosen = checkpoint_step(find_checkpoint(ckpt_dir, name)) or 0
    moved = []
    for p in list_checkpoints(ckpt_dir):
        if (checkpoint_step(p) or 0) > chosen:
            target = p.with_name(p.name + ".abandoned")
            if target.exists():
                import shutil

                shutil.rmtree(target)
            p.rename(target)
            moved.append(target)
    return moved


def resume(run_dir: str | Path, overrides: dict[str, Any] | None = None, *, from_checkpoint: str | None = None,
           **kw: Any) -> RunResult:
    """Continue a run folder from its latest checkpoint, or the older one ``from_checkpoint``
    (``overrides`` may extend ``run.steps``)."""
    cfg = load_run_config(run_dir, overrides)
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    # refuse an unknown name or a damaged checkpoint before any work (and before anything is written)
    ckpt = find_checkpoint(ckpt_dir, from_checkpoint) if from_checkpoint else latest_checkpoint(ckpt_dir)
    if ckpt is not None:
        check_checkpoint(ckpt, ema=cfg.train.ema_decay > 0)
    return train(cfg, resume=True, from_checkpoint=from_checkpoint, **kw)
