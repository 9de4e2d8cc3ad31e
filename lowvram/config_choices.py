"""The allowed values of the config's choice fields (tasks, model sizes, optimizers, ...), each named once."""

TASKS = ("text2img", "latent", "autoencoder", "lora", "full")
FINETUNE_TASKS = ("lora", "full")  # start from model.pretrained; the other tasks train a model from scratch
MODEL_SIZES = ("tiny", "celeba64", "ddpm64")
SCHEDULES = ("linear", "cosine", "scaled_linear")
PREDICTIONS = ("epsilon", "v_prediction")
PRECISIONS = ("fp32", "fp16", "bf16")
FROZEN_DTYPES = ("fp32", "fp16", "bf16", "fp8")
OPTIMIZERS = ("adamw", "adamw8bit", "adamw8bit_portable", "adafactor")
ATTENTION = ("auto", "sdpa", "math", "chunked", "xformers")
SAMPLERS = ("ddpm", "ddim", "dpm++")
LR_SCHEDULES = ("constant", "cosine", "linear")
LORA_TYPES = ("lora", "loha", "lokr", "dora")  # lowvram/adapters.py: one entry each
# lora.targets: which layers of the denoiser an adapter adapts (lora_attach.unet_targets, flux_lora_keys)
LORA_TARGET_SETS = ("all", "attention")
DEVICES = ("auto", "cpu", "cuda", "mps")
# memory.text_encoders: where frozen text encoders encode the caption cache (train/text_cache.py)
TEXT_PLACES = ("card", "sequential", "cpu")
