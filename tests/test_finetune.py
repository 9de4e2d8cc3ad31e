"""LoRA / full fine-tunes of tiny pretrained SD 1.x and SDXL checkpoints, through the CLI.

What a user relies on: the LoRA files a run writes load fully in diffusers, the base pipeline plus the
file draws exactly the trainer's own preview, the LoRA really changes the image, export/merge keep it,
and a crashed run resumes bit for bit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sd_fixtures import (
    BUILDERS,
    config_only,
    crash_at_first_checkpoint_then_resume,
    finetune_argv,
    save_tiny,
    write_image_folder,
)

from lowvram import lora as L
from lowvram.cli import main
from lowvram.errors import ConfigError
from lowvram.export import RUN_LORA_FILE, export_cli
from lowvram.train.prompts import PromptSpec, parse_prompt_line

PROMPT = "a photo of sks dog"
SCALES = (1.0, 3.0)
SEED = 1234
RES = 32  # pixels; the tiny VAE downsamples by 2, so the UNet sees 16x16 latents
# Preview PNG vs diffusers' pipeline with the saved file, both quantised to 8 bits: same fp32 math,
# so at most one level of rounding (measured: 0 for both formats and both families).
PREVIEW_TOL = 1
# The LoRA must move the image: mean |LoRA - base| in 8-bit levels (measured 5-10 after 3 steps at lr 1e-2).
MIN_LORA_EFFECT = 1.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny SD 1.x and SDXL checkpoints with CLIP's real tokenizers (folder + single file) and a 4-image folder."""
    tmp = tmp_path_factory.mktemp("ft")
    models = {fam: save_tiny(tmp, fam, clip_vocab=True) for fam in ("sd1", "sdxl")}
    for fam, paths in models.items():  # what describes a tiny single file's layout: configs, no tokenizer
        paths["config"] = config_only(paths["folder"], tmp / f"{fam}-config")
    data = write_image_folder(tmp / "data", 4, RES, PROMPT)
    return {"tmp": tmp, "models": models, "data": data, "cache": tmp / "cache"}


@pytest.fixture(scope="module")
def trained(world):
    """``trained(family, layout)``: the run folder of a 3-step LoRA run through the CLI (each trained once)."""
    runs: dict[tuple[str, str], Path] = {}

    def get(family: str, layout: str) -> Path:
        if (family, layout) not in runs:
            paths = world["models"][family]
            run = world["tmp"] / f"run-{family}-{layout}"
            extra = []
            if layout == "file":  # no tokenizer given: CLIP's shipped vocabulary; the tiny layout needs its configs
                extra = [f"model.config={paths['config']}"]
            assert main(flags(world, paths[layout], run, *extra)) == 0
            runs[(family, layout)] = run
        return runs[(family, layout)]

    return get


@pytest.fixture(scope="module")
def base_images(world):
    """The base pipelines' images at each guidance scale (what a LoRA must change)."""
    return {fam: {s: generate(base_pipeline(world, fam), s) for s in SCALES} for fam in ("sd1", "sdxl")}


def flags(world, model: Path, out: Path, *extra: str, steps: int = 3, task: str = "lora") -> list[str]:
    sets = {
        "data.resolution": RES, "train.batch_size": 2, "data.cache_dir": world["cache"], "lora.rank": 4,
        "lora.alpha": 2, "train.lr": 1e-2, "train.warmup_steps": 0, "run.checkpoint_every": 2,
        "run.sample_every": 0, "run.log_every": 1, "run.tensorboard": "false", "sample.steps": 2,
        "sample.cfg_scales": ",".join(map(str, SCALES)), "sample.prompts": PROMPT, "sample.seed": SEED,
    }
    return finetune_argv(model, world["data"], out, sets, *extra, steps=steps, task=task)


def generate(pipe, scale: float) -> np.ndarray:
    """What a diffusers user runs: the preview's prompt, size, steps, sampler and seed; 8-bit RGB."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw = {"original_size": (RES, RES), "target_size": (RES, RES)} if isinstance(pipe, StableDiffusionXLPipeline) else {}
    out = pipe(PROMPT, height=RES, width=RES, num_inference_steps=2, guidance_scale=scale,
               generator=torch.Generator().manual_seed(SEED), output_type="np", **kw).images[0]
    return (out * 255).round().astype(np.int16)


def preview_cell(run: Path, col: int) -> np.ndarray:
    """Cell (row 0, column ``col``) of the trainer's final grid (12 px label strip, 2 px padding)."""
    grid = np.asarray(Image.open(run / "samples" / "final.png").convert("RGB")).astype(np.int16)
    y, x = 12 + 2, 2 + col * (RES + 2)
    return grid[y : y + RES, x : x + RES]


def base_pipeline(world, family: str):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(world["models"][family]["folder"])


def test_prompt_line_options():
    assert parse_prompt_line("a cat --n blurry, dark --w 512 --h 768 --d 7 --l 5.5 --s 30") == PromptSpec(
        "a cat", "blurry, dark", 512, 768, 7, 5.5, 30)
    assert parse_prompt_line("  a--b c  ") == PromptSpec("a--b c")  # '--' inside a word is text
    with pytest.raises(ConfigError, match="--x"):
        parse_prompt_line("a cat --x 3")
    with pytest.raises(ConfigError, match="--d needs a int"):
        parse_prompt_line("a cat --d seven")
    with pytest.raises(ConfigError, match="multiple of 8"):
        parse_prompt_line("a cat --w 100")


@pytest.mark.parametrize(("family", "layout"), [("sd1", "folder"), ("sd1", "file"), ("sdxl", "folder"),
                                                ("sdxl", "file")])
def test_lora_via_cli_loads_in_diffusers_and_draws_the_preview(world, trained, base_images, family, layout):
    run = trained(family, layout)
    paths = world["models"][family]
    files = {"diffusers": run / RUN_LORA_FILE, "kohya": run / "lora" / f"{run.name}.safetensors"}
    assert (run / "lora" / "steps" / f"{run.name}-step00000002.safetensors").is_file()

    _, meta = L.read_lora_file(files["kohya"])
    assert meta["ss_base_model_version"] == L.BASE_MODEL_VERSION[family]
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"]) == ("4", "2.0", "3")
    assert meta["ss_sd_model_name"] == paths[layout].name and meta["lowvram_family"] == family
    assert meta["ss_num_train_images"] == "4"
    if family == "sdxl":  # kohya's SDXL names are the original (LDM) block names
        assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(str(files["kohya"])))

    # folder runs check both files at every scale; single-file runs (same code after loading) the kohya file
    checks = files if layout == "folder" else {"kohya": files["kohya"]}
    scales = SCALES if layout == "folder" else SCALES[-1:]
    for fmt, path in checks.items():
        pipe = base_pipeline(world, family)
        pipe.load_lora_weights(str(path))
        loaded = L.ensure_lora_loaded(pipe, path)  # raises if diffusers dropped modules
        assert loaded["unet"] == L.count_saved_modules(load_file(str(path)))["unet"] > 0
        for s in scales:
            img = generate(pipe, s)
            diff = np.abs(img - preview_cell(run, SCALES.index(s))).max()
            assert diff <= PREVIEW_TOL, f"{fmt} cfg {s}: preview differs by {diff} levels"
            effect = np.abs(img - base_images[family][s]).mean()
            assert effect > MIN_LORA_EFFECT, f"{fmt}: the LoRA does not change the image ({effect})"

    # the kohya export from the run equals the trainer's own kohya file (SDXL: layout from the header)
    exported = export_cli(run, "kohya", out=world["tmp"] / f"exp-{family}-{layout}")
    a, b = load_file(str(exported[0])), load_file(str(files["kohya"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_merge_reproduces_base_plus_lora(trained):
    from diffusers import DiffusionPipeline

    run = trained("sd1", "folder")
    written = export_cli(run, "both", merge=True, out=run / "export", dtype="fp32")
    names = {p.name for p in written}
    assert {f"{run.name}.safetensors", "pytorch_lora_weights.safetensors", "diffusers",
            f"{run.name}-merged.safetensors"} <= names
    merged = DiffusionPipeline.from_pretrained(run / "export" / f"{run.name}-merged" / "diffusers")
    assert L.count_loaded_modules(merged.unet) == 0  # fused into the weights, no adapter left
    for col, s in enumerate(SCALES):
        # fused W + BA vs the unfused adapter: fp32 rounding only
        assert np.abs(generate(merged, s) - preview_cell(run, col)).max() <= PREVIEW_TOL


def test_crashed_lora_run_resumes_bitwise(world, trained, capsys):
    straight, crashed = trained("sd1", "folder"), world["tmp"] / "crashed"
    # the same run (same flags), dying right after its step-2 checkpoint
    argv = flags(world, world["models"]["sd1"]["folder"], crashed)
    assert crash_at_first_checkpoint_then_resume(argv, crashed) == 0, capsys.readouterr().err

    for name in ("model", "ema", "optimizer"):  # step 3 is the first batch of epoch 2
        a = load_file(str(straight / "checkpoints" / "step-00000003" / f"{name}.safetensors"))
        c = load_file(str(crashed / "checkpoints" / "step-00000003" / f"{name}.safetensors"))
        assert a.keys() == c.keys() and a
        for key in a:
            assert torch.equal(a[key], c[key]), f"{name}:{key} differs after resume"
    a, c = load_file(str(straight / RUN_LORA_FILE)), load_file(str(crashed / RUN_LORA_FILE))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_streamed_lora_run_equals_the_resident_run(world, trained, capsys):
    """Frozen UNet blocks streamed from host memory (with checkpointing): the same LoRA, bit for bit, and the
    same preview (drawn through the streaming hooks too)."""
    resident, streamed = trained("sd1", "folder"), world["tmp"] / "run-streamed"
    argv = flags(world, world["models"]["sd1"]["folder"], streamed, "memory.stream_blocks=1",
                 "train.gradient_checkpointing=true")
    assert main(argv) == 0, capsys.readouterr().err
    assert "streaming" in capsys.readouterr().out
    a, b = load_file(str(resident / RUN_LORA_FILE)), load_file(str(streamed / RUN_LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(preview_cell(resident, 1), preview_cell(streamed, 1))


def test_v_prediction_comes_from_the_checkpoint_not_the_config_default(tmp_path):
    from lowvram.config import RunConfig
    from lowvram.train.finetune_models import load_base

    pipe = BUILDERS["sd2"](tmp_path, prediction="v_prediction")
    pipe.save_pretrained(tmp_path / "sd2v")
    cfg = RunConfig()
    cfg.run.task, cfg.model.pretrained = "lora", str(tmp_path / "sd2v")
    assert cfg.model.prediction == "epsilon"  # the config default ...
    assert load_base(cfg).prediction_type == "v_prediction"  # ... does not override the checkpoint


def test_fp8_frozen_unet_with_text_encoder_lora(world, capsys):
    """fp8 storage of the frozen UNet (per-layer upcast) and LoRA on the text encoder: both load back fully."""
    run = world["tmp"] / "run-fp8-te"
    argv = flags(world, world["models"]["sd1"]["folder"], run, "memory.frozen_dtype=fp8", "lora.text_encoder=true",
                 steps=2)
    assert main(argv) == 0, capsys.readouterr().err
    kohya = load_file(str(run / "lora" / f"{run.name}.safetensors"))
    assert any(k.startswith("lora_te_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)
    pipe = base_pipeline(world, "sd1")
    pipe.load_lora_weights(str(run / RUN_LORA_FILE))
    loaded = L.ensure_lora_loaded(pipe, run / RUN_LORA_FILE)
    assert loaded["text_encoder"] > 0 and loaded["unet"] > 0


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_adapter_types_train_and_load_back(world, base_images, kind, capsys):
    """lora.type through the CLI (text encoder too): the run's files load back whole and draw the trainer's preview.

    LoHa and LoKr start from a zero factor inside a product, so their first steps move the image less than
    LoRA's: a higher learning rate gets the same visible effect in the same 3 steps."""
    run = world["tmp"] / f"run-{kind}"
    extra = ["lora.text_encoder=true", f"lora.type={kind}", "train.lr=5e-2"]
    assert main(flags(world, world["models"]["sd1"]["folder"], run, *extra)) == 0, capsys.readouterr().err
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in steps if r["kind"] == "step")
    kohya, meta = L.read_lora_file(run / "lora" / f"{run.name}.safetensors")
    assert meta["lowvram_adapter"] == kind and meta["ss_network_module"] == "lycoris.kohya"
    suffix = {"loha": ".hada_w1_a", "lokr": ".lokr_w1", "dora": ".dora_scale"}[kind]
    assert any(k.startswith("lora_te_") and k.endswith(suffix) for k in kohya)
    pipe = base_pipeline(world, "sd1")
    loaded = L.load_adapter_file(pipe, run / RUN_LORA_FILE)
    assert loaded == L.count_saved_modules(kohya) and loaded["text_encoder"] > 0
    img = generate(pipe, SCALES[-1])
    assert np.abs(img - preview_cell(run, len(SCALES) - 1)).max() <= PREVIEW_TOL
    assert np.abs(img - base_images["sd1"][SCALES[-1]]).mean() > MIN_LORA_EFFECT


def test_attention_targets_adapt_only_the_attention_projections(world, trained, base_images, capsys):
    """lora.targets=attention through the CLI: the file holds the attention projections only (fewer modules
    than the default set), loads whole in diffusers and draws the trainer's preview."""
    run = world["tmp"] / "run-attention"
    assert main(flags(world, world["models"]["sd1"]["folder"], run, "lora.targets=attention")) == 0, \
        capsys.readouterr().err
    kohya, _ = L.read_lora_file(run / "lora" / f"{run.name}.safetensors")
    modules = {k.split(".")[0] for k in kohya}
    assert modules and all(re.search(r"_attn[12]_to_(q|k|v|out_0)$", m) for m in modules), sorted(modules)[:4]
    every = L.count_saved_modules(L.read_lora_file(trained("sd1", "folder") / RUN_LORA_FILE)[0])  # lora.targets=all
    pipe = base_pipeline(world, "sd1")
    loaded = L.load_adapter_file(pipe, run / RUN_LORA_FILE)
    assert loaded["unet"] == len(modules) < every["unet"]
    img = generate(pipe, SCALES[-1])
    assert np.abs(img - preview_cell(run, len(SCALES) - 1)).max() <= PREVIEW_TOL
    assert np.abs(img - base_images["sd1"][SCALES[-1]]).mean() > MIN_LORA_EFFECT


def test_full_finetune_saves_a_loadable_changed_model(world, capsys):
    from diffusers import DiffusionPipeline

    run = world["tmp"] / "run-full"
    assert main(flags(world, world["models"]["sd1"]["folder"], run, "train.lr=1e-3", steps=2, task="full")) == 0, \
        capsys.readouterr().err
    assert (run / "final" / f"{run.name}.safetensors").is_file()
    final = run / "final" / "diffusers"  # the hub layout, which transformers 4.x reads too
    assert all(k.startswith("text_model.") for k in load_file(str(final / "text_encoder" / "model.safetensors")))
    assert (final / "tokenizer" / "vocab.json").is_file() and (final / "tokenizer" / "merges.txt").is_file()
    tuned = DiffusionPipeline.from_pretrained(run / "final" / "diffusers")
    assert np.abs(generate(tuned, 3.0) - preview_cell(run, 1)).max() <= PREVIEW_TOL
    assert np.abs(generate(tuned, 3.0) - generate(base_pipeline(world, "sd1"), 3.0)).mean() > MIN_LORA_EFFECT
    with pytest.raises(Exception, match="not a LoRA run"):
        export_cli(run)


def test_cache_command_builds_once_and_is_reused(world, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["cache", "--preset", "cpu", "--model", str(world["models"]["sd1"]["folder"]), "--data", str(world["data"]),
            "--out", str(tmp_path / "c"), "--set", f"data.resolution={RES}", "--set", f"data.cache_dir={cache}"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    # 4 captions + the empty prompt that guidance dropout trains on
    assert "4 latents, 0 reused, 4 encoded" in first and "5 captions, 0 reused" in first
    assert (tmp_path / "c" / "data_report.json").is_file()
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "4 latents, 4 reused, 0 encoded" in second and "5 captions, 5 reused" in second


def test_preview_rows_drawn_in_one_call_match_each_prompt_alone(world, capsys):
    """The grid draws the prompts that share a guidance scale in one batched pipeline call; each row is still
    what diffusers draws for that prompt alone with the saved LoRA (its own --d seed)."""
    from diffusers import DDIMScheduler

    run = world["tmp"] / "run-batched-preview"
    rows = [("a photo of sks dog", 7), ("a red cat on the beach", 9)]
    argv = flags(world, world["models"]["sd1"]["folder"], run, "sample.cfg_scales=3.0",
                 "sample.prompts=" + ",".join(f"{p} --d {seed}" for p, seed in rows), steps=1)
    assert main(argv) == 0, capsys.readouterr().err
    grid = np.asarray(Image.open(run / "samples" / "final.png").convert("RGB")).astype(np.int16)
    pipe = base_pipeline(world, "sd1")
    pipe.load_lora_weights(str(run / RUN_LORA_FILE))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for r, (prompt, seed) in enumerate(rows):
        alone = pipe(prompt, height=RES, width=RES, num_inference_steps=2, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
        y = 12 + 2 + r * (RES + 2)
        cell = grid[y : y + RES, 2 : 2 + RES]
        assert np.abs((alone * 255).round().astype(np.int16) - cell).max() <= PREVIEW_TOL, f"row {r}"
