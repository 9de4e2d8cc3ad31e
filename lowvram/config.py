"""The typed run configuration: every knob a run has, each documented once.

A ``RunConfig`` is built in layers — preset, then ``--config FILE``, then flags, then ``--set`` —
and each value remembers which layer set it, so a bad value is reported with its source. The help
text in ``field(metadata={"help": ...})`` is reused by ``--help``, the web panel's tooltips and
the preset comments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

# the choices, the bounds, the checks, the defaults and the YAML reader are re-exported: callers read them as config.*
from .config_checks import ITEMS_LIMIT, TEXT_LIMIT, UPPER_BOUNDS, closest, coerce, validate  # noqa: F401
from .config_choices import (  # noqa: F401
    ATTENTION,
    DEVICES,
    FINETUNE_TASKS,
    FROZEN_DTYPES,
    LORA_TARGET_SETS,
    LORA_TYPES,
    LR_SCHEDULES,
    MODEL_SIZES,
    OPTIMIZERS,
    PRECISIONS,
    PREDICTIONS,
    SAMPLERS,
    SCHEDULES,
    TASKS,
    TEXT_PLACES,
)
from .config_defaults import FINETUNE_RESOLUTION, default_resolution, fill_defaults  # noqa: F401
from .config_yaml import load_yaml  # noqa: F401
from .errors import ConfigError


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    """A dataclass field with its one-line documentation (and allowed values)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class RunSection:
    out: str = _f("runs/latest", "Run folder: config.yaml, metrics, samples, checkpoints and the final model.")
    seed: int = _f(0, "Seed for weights, data order, noise and samples; same seed, same run.")
    steps: int = _f(1200, "Optimizer steps to train (each is batch_size x grad_accum images).")
    task: str = _f(
        "text2img",
        "text2img: pixel-space text-to-image; latent: text-to-image on autoencoder latents "
        "(trains the autoencoder first unless model.vae is given); autoencoder: the autoencoder alone; "
        "lora / full: fine-tune a pretrained checkpoint.",
        TASKS,
    )
    device: str = _f("auto", "Where to train: auto picks the GPU if there is one, else the CPU.", DEVICES)
    checkpoint_every: int = _f(200, "Write a resumable checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = _f(2, "How many step checkpoints to keep (the newest); older ones are deleted.")
    sample_every: int = _f(400, "Write a sample grid every N steps (0: only at the end).")
    val_every: int = _f(200, "Compute the held-out validation loss every N steps (0: never).")
    log_every: int = _f(10, "Append a line to metrics.jsonl every N steps.")
    max_nonfinite: int = _f(5, "Stop the run after this many non-finite losses in a row.")
    tensorboard: bool = _f(True, "Write TensorBoard event files into the run folder.")


@dataclass
class ModelSection:
    size: str = _f("tiny", "Named from-scratch model size.", MODEL_SIZES)
    pretrained: str | None = _f(None, "Local diffusers folder or single .safetensors checkpoint (lora/full tasks).")
    family: str | None = _f(
        None,
        "Model family of the pretrained checkpoint; default: detected (SD 2.x 768-v single files need sd2-v "
        "unless a .yaml beside them says so).",
        ("sd1", "sd2", "sd2-v", "sdxl"),
    )
    tokenizer: str | None = _f(
        None, "Folder with the CLIP tokenizer for a single-file checkpoint (any diffusers SD folder, or vocab.json + "
        "merges.txt); default: CLIP's vocabulary, shipped with lowvram."
    )
    vae: str | None = _f(None, "Local pretrained VAE folder to use instead of training an autoencoder (FLUX.1 "
                         "transformer-only file: ae.safetensors or a VAE folder).")
    text_encoder: str | None = _f(
        None, "Local pretrained CLIP text encoder folder (with its tokenizer); default: train a small one jointly."
    )
    config: str | None = _f(
        None, "Diffusers folder whose configs describe a single-file checkpoint's layout (default: the shipped config of its family)."
    )
    clip: str | None = _f(None, "FLUX.1 transformer-only file: CLIP-L text encoder (clip_l.safetensors or a folder).")
    t5: str | None = _f(None, "FLUX.1 transformer-only file: T5-XXL text encoder (t5xxl_*.safetensors, fp16/fp8, or a folder).")
    t5_tokenizer: str | None = _f(
        None, "FLUX.1 single file: folder with the T5 tokenizer.json (a FLUX.1 diffusers folder's tokenizer_2/, or "
        "ComfyUI's comfy/text_encoders/t5_tokenizer/)."
    )
    allow_pickle: bool = _f(False, "Allow loading pickled .ckpt files (weights_only=True). Only for files you trust.")
    schedule: str = _f("linear", "Noise schedule: linear 1e-4..0.02, cosine, or scaled_linear (SD).", SCHEDULES)
    prediction: str = _f("epsilon", "What the UNet predicts: the noise (epsilon) or v.", PREDICTIONS)
    timesteps: int = _f(1000, "Number of diffusion timesteps T.")
    zero_terminal_snr: bool = _f(
        False, "Rescale the schedule to zero terminal SNR (needs v-prediction): the model learns mean colours."
    )


@dataclass
class DataSection:
    source: str = _f("builtin", "Data: 'builtin' (generated shapes, no download) or a local folder.")
    format: str = _f("auto", "Source format: auto (detected), folder, kohya, metadata, celeba, builtin.")
    resolution: int | None = _f(None, "Training resolution in pixels (square side; buckets keep the area); default: the model size's.")
    num_images: int = _f(4096, "Images generated by the builtin source.")
    builtin_exclude: list[str] = _f(
        [], "Builtin source: attribute values never drawn (e.g. yellow, triangle), to hold a concept out of a base "
        "model; its word then is not in the model's vocabulary."
    )
    caption_dropout: float = _f(0.1, "Share of captions replaced by the empty prompt (classifier-free guidance).")
    flip: bool = _f(False, "Random horizontal flips.")
    workers: int = _f(2, "Threads that decode images ahead while the VAE encodes (the latent cache's pass; 0: decode in turn).")
    caption_ext: str = _f(".txt", "Caption sidecar extension tried first (.txt or .caption; the other is the fallback).")
    crop: str = _f("center", "Crop after resize-to-cover: center or random (random is not cached).", ("center", "random"))
    buckets: bool = _f(True, "Aspect-ratio buckets (area <= resolution^2); off: every image is resolution x resolution.")
    bucket_step: int = _f(64, "Bucket side step in pixels; 8 is used below 4 steps of resolution.")
    bucket_max_ratio: float = _f(4.0, "Largest bucket aspect ratio (long side / short side).")
    keep_tokens: int = _f(0, "With shuffle_tags: number of leading tags kept in place.")
    shuffle_tags: bool = _f(False, "Shuffle comma-separated caption tags on every draw.")
    caption_prefix: str = _f("", "Text added before every caption (e.g. a trigger word).")
    caption_suffix: str = _f("", "Text added after every caption.")
    max_pixels: int = _f(89478485, "Images with more pixels are skipped (decompression-bomb guard, read from the header).")
    min_size: int = _f(16, "Images whose shorter side is below this many pixels are skipped.")
    background: str = _f("white", "Colour transparent images are composited onto (name, #rrggbb or r,g,b).")
    celeba_split: str = _f("train", "CelebA split: train, val, test or all.", ("train", "val", "test", "all"))
    missing_caption: str = _f(
        "auto", "Images without a caption: auto (kohya folder name, else empty), empty, folder, filename, skip.",
        ("auto", "empty", "folder", "filename", "skip"),
    )
    cache_dir: str = _f("", "Latent/text cache folder (default: $LOWVRAM_CACHE or ~/.cache/lowvram).")
    class_data: str = _f(
        "", "Folder of class (regularisation) images for prior preservation, e.g. photos of 'a dog' (lora/full); "
        "empty: off."
    )
    class_prompt: str = _f("", "Caption of class images that have no caption file (e.g. 'a photo of a dog').")
    num_class_images: int = _f(
        0, "With data.class_data: draw class images with the base model (prompt data.class_prompt) until the folder "
        "holds this many; resumable. 0: use the folder as it is."
    )
    masked_loss: str = _f(
        "auto", "Loss masks: auto uses mask files where they exist (<name>-masklabel.png beside an image, or the "
        "same name under data.mask_dir); alpha also masks images without one by their transparency; off: none.",
        ("auto", "alpha", "off"),
    )
    mask_dir: str = _f("", "Folder of loss masks named like the images (same relative path and stem); white trains, black not.")
    unmasked_weight: float = _f(0.0, "Loss weight of masked-out (black) pixels, 0-1; 0: they do not count at all.")


@dataclass
class TrainSection:
    batch_size: int = _f(32, "Micro-batch: images per forward/backward.")
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step.")
    lr: float = _f(2e-4, "Peak learning rate (AdamW).")
    warmup_steps: int = _f(50, "Linear learning-rate warm-up steps.")
    lr_schedule: str = _f(
        "constant", "After warm-up: constant, or decay to 0 at run.steps (cosine, linear); short runs gain most "
        "from a decay.", LR_SCHEDULES
    )
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    grad_clip: float = _f(1.0, "Clip the gradient norm to this value (0: off).")
    optimizer: str = _f(
        "adamw",
        "adamw; adamw8bit (bitsandbytes, ~2 bytes state/param); adamw8bit_portable (plain PyTorch 8-bit, "
        "works where bitsandbytes does not, e.g. gfx803); adafactor.",
        OPTIMIZERS,
    )
    precision: str = _f("fp32", "Compute precision: fp32, fp16 (GradScaler, fp32 trainable weights) or bf16.", PRECISIONS)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: less memory, ~30 % slower.")
    snr_gamma: float = _f(0.0, "Min-SNR-gamma loss weighting (e.g. 5): converges faster; 0 is the plain MSE.")
    prior_loss_weight: float = _f(1.0, "Weight of the class images' loss with data.class_data (prior preservation).")
    ema_decay: float = _f(0.999, "EMA decay of the weights that samples are drawn from (0: no EMA).")
    ema_on_cpu: bool = _f(False, "Keep the EMA copy in CPU memory instead of on the card.")
    autoencoder_steps: int = _f(600, "Steps of the autoencoder stage that the latent task runs first (no model.vae).")
    autoencoder_lr: float = _f(1e-3, "Learning rate of the autoencoder stage.")
    kl_weight: float = _f(1e-6, "Weight of the KL term in the autoencoder loss (keeps latents near N(0, 1)).")


@dataclass
class SampleSection:
    prompts: list[str] = _f([], "Prompts for the sample grids (default: from the data source).")
    negative_prompt: str = _f("", "Negative prompt used in place of the empty prompt for guidance.")
    cfg_scales: list[float] = _f([1.0, 3.0, 5.0, 7.0], "Guidance scales shown side by side in the grids.")
    guidance: float = _f(3.0, "Guidance scale of `lowvram sample` and `lowvram eval` when --cfg is not given.")
    sampler: str = _f("ddim", "Sampler: ddpm, ddim or dpm++ (DPM-Solver++).", SAMPLERS)
    steps: int = _f(25, "Sampling steps.")
    final: bool = _f(True, "Draw a sample grid when training ends (samples/final.png); false skips it, the final model "
                     "is saved all the same.")
    seed: int = _f(1234, "Seed of the sample noise (fixed, so grids are comparable across steps).")
    guidance_rescale: float = _f(0.0, "Guidance rescale phi (0-1, e.g. 0.7): keeps strong guidance from over-exposing.")


@dataclass
class MemorySection:
    attention: str = _f(
        "auto", "Attention kernel: auto (from the card), sdpa, math, chunked (O(N) memory anywhere), xformers.", ATTENTION
    )
    attention_chunk: int = _f(1024, "Query rows per chunk for chunked attention.")
    frozen_dtype: str = _f("fp32", "Storage dtype of frozen weights (fp8: stored in 8 bits, upcast per layer).", FROZEN_DTYPES)
    cache_latents: bool = _f(True, "Encode images through the VAE once and train from the cached latents.")
    cache_text: bool = _f(True, "Encode captions once with a frozen text encoder and train from the cache.")
    offload_frozen: bool = _f(True, "Move the VAE and text encoder off the training device after caching.")
    trainable_dtype: str = _f(
        "fp32", "Storage dtype of trainable weights; bf16 halves them (cards with bf16 only).", ("fp32", "bf16")
    )
    fused_backward: bool = _f(
        False, "Step the optimizer inside backward, freeing each gradient at once (one process only: not with DDP)."
    )
    zero_stage: int = _f(
        0, "DeepSpeed ZeRO stage: 0 (off) or 2 (optimizer state and gradients partitioned over the processes; "
        "needs lowvram[deepspeed] and a CUDA GPU; profiled, not trained yet)."
    )
    offload_optimizer: bool = _f(False, "With zero_stage 2: keep the optimizer state in host memory (DeepSpeed ZeRO-Offload).")
    stream_blocks: float = _f(
        0.0, "Fraction (0-1) of the frozen UNet block weights kept in host RAM and copied to the card one block "
        "ahead of use (LoRA only; costs bus time every step; 0 = off, the planner turns it on when nothing else fits)."
    )
    vae_tiling: bool = _f(
        False, "Encode and decode with the VAE in overlapping tiles (caching, previews, class images of "
        "fine-tunes): far less memory at 1024², slower, tiles blend with little visible change; the planner "
        "turns it on when the VAE sets the peak."
    )
    text_encoders: str = _f("card", "Where frozen text encoders encode the caption cache and the preview prompts: card, "
                            "sequential (on the card one at a time) or cpu (never on the card; slower, once). Off the "
                            "card needs cached, static captions; the planner picks it when they set the peak.", TEXT_PLACES)
    vram_gib: float | None = _f(None, "Memory budget in GiB (default: the preset's card).")
    ram_gib: float | None = _f(None, "Host RAM in GiB the plan is checked against (default: this machine's).")
    force: bool = _f(False, "Train even when the plan does not fit the budget.")


@dataclass
class LoraSection:
    type: str = _f(
        "lora",
        "Adapter: lora; loha (LyCORIS Hadamard product of two low-rank pairs: twice LoRA's weights, more "
        "expressive); lokr (LyCORIS Kronecker product: tiny files; a rank of at least half a factor's side "
        "makes the factors full matrices); dora (LoRA plus a learned magnitude per output channel). A1111/"
        "ComfyUI files use the LyCORIS names; diffusers loads the lora and dora files (not loha/lokr).",
        LORA_TYPES,
    )
    rank: int = _f(16, "LoRA rank: width of the low-rank update (file size and capacity grow with it).")
    alpha: float = _f(16.0, "LoRA alpha (scale = alpha / rank).")
    dropout: float = _f(0.0, "Dropout on the adapter during training (lora/dora: its input; loha/lokr: its rank dimension).")
    targets: str = _f(
        "all",
        "Layers the adapter adapts: all (kohya's and A1111's LoRA layers: attention, feed-forward and the "
        "transformer blocks' proj_in/proj_out; FLUX.1: attention and MLP of every block) or attention (the "
        "attention projections only, as diffusers' train_text_to_image_lora.py: about half the adapter "
        "weights, a faster step, less capacity).",
        LORA_TARGET_SETS,
    )
    conv: bool = _f(False, "Also adapt 3x3 convolutions (LoCon).")
    text_encoder: bool = _f(False, "Also train LoRA on the text encoder(s).")


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    memory: MemorySection = field(default_factory=MemorySection)
    lora: LoraSection = field(default_factory=LoraSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML; ``--config`` on it reproduces the run."""
        from .fsutil import write_text_atomic

        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS: dict[str, type] = {f.name: get_type_hints(RunConfig)[f.name] for f in dataclasses.fields(RunConfig)}


def field_help(dotted: str) -> str:
    """The one documentation string of ``section.key``."""
    section, key = dotted.split(".", 1)
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name == key:
            return f.metadata.get("help", "")
    raise KeyError(dotted)


def all_fields() -> list[tuple[str, dataclasses.Field]]:
    """Every ``section.key`` with its dataclass field, in declaration order."""
    return [(f"{s}.{f.name}", f) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


class ConfigBuilder:
    """Merges config layers, remembering which layer set each value, then validates once."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = {}
        self.problems: list[str] = []
        self._types = {
            name: {k: v for k, v in get_type_hints(cls).items()} for name, cls in SECTIONS.items()
        }

    def apply(self, data: dict[str, Any] | None, source: str) -> ConfigBuilder:
        """Merge a nested ``{section: {key: value}}`` mapping set by ``source``."""
        if not data:
            return self
        if not isinstance(data, dict):
            self.problems.append(f"{source}: expected a mapping of sections, got {type(data).__name__}")
            return self
        for section, body in data.items():
            if section not in SECTIONS:
                self.problems.append(
                    f"{source}: unknown section '{section}'." + closest(str(section), list(SECTIONS))
                )
                continue
            if body is None:
                continue
            if not isinstance(body, dict):
                self.problems.append(f"{source}: section '{section}' must be a mapping, got {body!r}")
                continue
            for key, value in body.items():
                self.set(f"{section}.{key}", value, source)
        return self

    def set(self, dotted: str, value: Any, source: str) -> ConfigBuilder:
        """Set one ``section.key`` from ``source`` (e.g. ``--set train.lr=1e-4``)."""
        if "." not in dotted:
            self.problems.append(f"{source}: '{dotted}' must be written section.key, e.g. train.lr")
            return self
        section, key = dotted.split(".", 1)
        if section not in SECTIONS:
            self.problems.append(f"{source}: unknown section '{section}'." + closest(section, list(SECTIONS)))
            return self
        types = self._types[section]
        if key not in types:
            options = [f"{section}.{k}" for k in types] + [name for name, _ in all_fields()]
            self.problems.append(f"{source}: unknown key '{dotted}'." + closest(dotted, list(dict.fromkeys(options))))
            return self
        try:
            coerced = coerce(value, types[key], dotted)
        except ValueError as e:
            self.problems.append(f"{dotted} = {value!r} (from {source}): {e}")
            return self
        self.values[dotted] = coerced
        self.sources[dotted] = source
        return self

    def source_of(self, dotted: str) -> str:
        return self.sources.get(dotted, "default")

    def all_sources(self) -> dict[str, str]:
        """The source of every field (``default`` where no layer set it), in declaration order."""
        return {name: self.source_of(name) for name, _ in all_fields()}

    def build(self) -> RunConfig:
        """The validated config (``ConfigError`` lists every problem at once); ``config_defaults.fill_defaults``
        fills what no layer set (the size's recipe, the resolution) here, once: a built config is final."""
        fill_defaults(self, self.values.get("model.size", ModelSection.size),
                      self.values.get("run.task", RunSection.task))
        cfg = RunConfig()
        for dotted, value in self.values.items():
            section, key = dotted.split(".", 1)
            setattr(getattr(cfg, section), key, value)
        problems = list(self.problems) + validate(cfg, self.source_of)
        if problems:
            # one line however many: each problem names its field and source, separated by "; "
            err = ConfigError(
                "invalid configuration: " + "; ".join(problems),
                "lowvram train --help documents each field" if len(problems) == 1
                else f"fix these {len(problems)} values (lowvram train --help documents each field)",
            )
            err.problems = problems  # each names its field and source; callers may list them their own way
            raise err
        return cfg
