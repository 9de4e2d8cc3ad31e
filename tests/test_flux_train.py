"""FLUX.1 LoRA through ``lowvram train --task lora --model DIR`` and the web panel, on a tiny FLUX.1 of the real
classes saved as a diffusers folder: the run is planned, trains (the loss on its own images falls), previews
with the flow-matching sampler what diffusers' FluxPipeline draws with the saved file, writes a diffusers file
(every module loads) and a kohya/BFL file ComfyUI's key mapping takes whole, and resumes bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flux_fixtures import (
    PROMPT,
    T5_LEN,
    comfy_delta,
    comfy_key_map,
    comfy_load,
    save_tiny_flux,
    tiny_transformer,
    to_bfl,
)
from PIL import Image
from safetensors.torch import load_file
from sd_fixtures import config_only, crash_at_first_checkpoint_then_resume, finetune_argv, write_image_folder

from lowvram import lora as L
from lowvram.cli import main
from lowvram.export import RUN_LORA_FILE
from lowvram.models import flux_cond as fc
from lowvram.models.flux_lora_keys import bfl_layer, lora_target_names, part_modules

RES = 32  # pixels; the tiny VAE downsamples by 2 → 16×16 latents → 64 packed tokens
SEED = 1234
RANK, ALPHA = 4, 2.0  # alpha ≠ rank: a file that loses alpha draws something else
STEPS = 8
GUIDANCE = 3.5  # the preview's guidance input (FluxPipeline's default)
PREVIEW_TOL = 1  # 8-bit levels: the same fp32 math in the trainer's preview and in FluxPipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fluxrun")
    pipe, files = save_tiny_flux(tmp)
    data = write_image_folder(tmp / "data", 4, RES, PROMPT)
    return {"tmp": tmp, "pipe": pipe, "folder": files["folder"], "files": files, "data": data, "cache": tmp / "cache"}


SETS = {"data.resolution": RES, "train.batch_size": 2, "lora.rank": RANK, "lora.alpha": ALPHA, "train.lr": 3e-2,
        "train.warmup_steps": 0, "run.checkpoint_every": 4, "run.sample_every": 0, "run.log_every": 1,
        "run.tensorboard": "false", "sample.steps": 2, "sample.prompts": PROMPT, "sample.seed": SEED}


def flags(world, out: Path, *extra: str, steps: int = STEPS, task: str = "lora", model: Path | None = None) -> list[str]:
    return finetune_argv(model or world["folder"], world["data"], out, {**SETS, "data.cache_dir": world["cache"]}, *extra,
                         steps=steps, task=task)


@pytest.fixture(scope="module")
def trained(world):
    run = world["tmp"] / "run"
    assert main(flags(world, run)) == 0
    return run


def fresh_pipeline(world):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(world["folder"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe) -> np.ndarray:
    """What a diffusers user runs with the preview's prompt, size, steps, seed and guidance; 8-bit RGB."""
    out = pipe(PROMPT, height=RES, width=RES, num_inference_steps=2, guidance_scale=GUIDANCE, max_sequence_length=T5_LEN,
               generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    return (out * 255).round().astype(np.int16)


def preview_cell(run: Path) -> np.ndarray:
    grid = np.asarray(Image.open(run / "samples" / "final.png").convert("RGB")).astype(np.int16)
    return grid[14 : 14 + RES, 2 : 2 + RES]  # 12 px label strip, 2 px padding


def loss_on_the_images(world, transformer) -> float:
    """The flow loss on the run's 4 images and captions at fixed noise and σ (8 draws): what training lowers."""
    from lowvram.data.cache import encode_latents

    pipe = world["pipe"]
    paths = sorted(world["data"].glob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
                          for p in paths])
    x0 = encode_latents(pipe.vae, pixels)
    caps = [(world["data"] / f"{p.stem}.txt").read_text() for p in paths]
    text = fc.encode_prompts(pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2, caps, T5_LEN)
    with torch.no_grad():
        return float(np.mean([fc.training_loss(transformer, x0, text, generator=torch.Generator().manual_seed(s)).item()
                              for s in range(8)]))


def test_lora_via_cli_trains_previews_and_loads_in_diffusers(world, trained, capsys):
    run = trained
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r["kind"] == "step"]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    diffusers_file = run / RUN_LORA_FILE
    tensors, meta = L.read_lora_file(diffusers_file)
    assert all(k.startswith("transformer.") for k in tensors)
    assert meta["lowvram_family"] == "flux-dev" and meta["lowvram_prediction"] == "flow"
    assert (run / "lora" / "steps" / f"{run.name}-step00000004.safetensors").is_file()

    names = lora_target_names(tiny_transformer())
    pipe = fresh_pipeline(world)
    base_img = draw(pipe)
    base_loss = loss_on_the_images(world, pipe.transformer)
    pipe.load_lora_weights(str(diffusers_file))
    assert L.count_loaded_modules(pipe.transformer) == len(names) == 34  # every adapted layer of the file
    img = draw(pipe)
    lora_loss = loss_on_the_images(world, pipe.transformer)
    print(f"loss on the run's images: base {base_loss:.4f}, with the LoRA {lora_loss:.4f}; image change "
          f"{np.abs(img - base_img).mean():.2f} levels, preview vs diffusers max {np.abs(img - preview_cell(run)).max()}")
    assert lora_loss < 0.9 * base_loss  # training lowered it (the file carries what was trained)
    assert np.abs(img - base_img).mean() > 1.0  # the LoRA changes the image …
    assert np.abs(img - preview_cell(run)).max() <= PREVIEW_TOL  # … into the trainer's own preview


def test_comfyui_file_of_the_run_maps_every_key_with_the_trained_update(world, trained):
    run = trained
    comfy, meta = L.read_lora_file(run / "lora" / f"{run.name}.safetensors")
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
    assert (meta["ss_steps"], meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(STEPS), str(RANK), str(ALPHA))
    tr = tiny_transformer()
    model_keys = ["diffusion_model." + k for k in to_bfl(tr)]
    patches, not_loaded = comfy_load(comfy, comfy_key_map(model_keys, tr.config.num_attention_heads * tr.config.attention_head_dim))
    assert not_loaded == set() and len(patches) == 2 * 8 + 2 * 2  # q/k/v fused as in the original model
    peft = load_file(str(run / RUN_LORA_FILE))

    def peft_delta(module: str) -> torch.Tensor:
        a, b = peft[f"transformer.{module}.lora_A.weight"], peft[f"transformer.{module}.lora_B.weight"]
        return b @ a * (ALPHA / RANK)

    names = lora_target_names(tr)
    for target, (up, down, alpha) in patches.items():
        bfl = target.removeprefix("diffusion_model.").removesuffix(".weight")
        first = next(n for n in names if bfl_layer(n)[0] == bfl)
        expect = torch.cat([peft_delta(p) for p in part_modules(first)])
        assert torch.allclose(comfy_delta(up, down, alpha), expect, atol=1e-6), target


def test_export_copies_both_files_and_refuses_a_merge(trained, tmp_path):
    from lowvram.errors import ModelLoadError
    from lowvram.export import export_cli

    written = export_cli(trained, "both", out=tmp_path / "export")
    assert sorted(p.name for p in written) == sorted([f"{trained.name}.safetensors", "pytorch_lora_weights.safetensors"])
    assert (tmp_path / "export" / f"{trained.name}.safetensors").read_bytes() == \
        (trained / "lora" / f"{trained.name}.safetensors").read_bytes()
    with pytest.raises(ModelLoadError, match="merging a LoRA into the FLUX.1 transformer"):
        export_cli(trained, "kohya", merge=True, out=tmp_path / "merged")


def test_cache_command_encodes_flux_text_once(world, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["cache", "--preset", "cpu", "--model", str(world["folder"]), "--data", str(world["data"]),
            "--out", str(tmp_path / "c"), "--set", f"data.resolution={RES}", "--set", f"data.cache_dir={cache}"]
    assert main(argv) == 0
    assert "4 latents, 0 reused, 4 encoded" in capsys.readouterr().out
    assert main(argv) == 0
    assert "5 captions, 5 reused" in capsys.readouterr().out  # T5 + CLIP outputs of 4 captions and ""


def test_crashed_flux_run_resumes_bitwise(world, trained, capsys):
    crashed = world["tmp"] / "crashed"
    assert crash_at_first_checkpoint_then_resume(flags(world, crashed), crashed) == 0, capsys.readouterr().err
    assert "text cache" in capsys.readouterr().out  # the resumed run reads the cache its first part wrote
    last = f"step-{STEPS:08d}"
    for name in ("model", "ema", "optimizer"):
        a = load_file(str(trained / "checkpoints" / last / f"{name}.safetensors"))
        c = load_file(str(crashed / "checkpoints" / last / f"{name}.safetensors"))
        assert a.keys() == c.keys() and a
        assert all(torch.equal(a[k], c[k]) for k in a), name
    for rel in (RUN_LORA_FILE, Path("lora") / f"{trained.name}.safetensors"):
        a, c = load_file(str(trained / rel)), load_file(str(crashed / Path(rel).parent / Path(rel).name.replace(
            trained.name, crashed.name)))
        assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_streamed_flux_run_equals_the_resident_run(world, trained, capsys):
    """The frozen transformer blocks streamed from host memory (with checkpointing): the same LoRA, bit for bit."""
    streamed = world["tmp"] / "streamed"
    assert main(flags(world, streamed, "memory.stream_blocks=1", "train.gradient_checkpointing=true")) == 0
    assert "streaming 4 transformer blocks" in capsys.readouterr().out
    a, b = load_file(str(trained / RUN_LORA_FILE)), load_file(str(streamed / RUN_LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(preview_cell(trained), preview_cell(streamed))


def test_the_planners_memory_knobs_train_and_save_a_loadable_lora(world, tmp_path, capsys):
    """fp8 frozen storage, chunked attention, checkpointing, portable 8-bit AdamW, fused backward; a preview row
    with its own size and guidance."""
    run = tmp_path / "lean"
    extra = ["memory.frozen_dtype=fp8", "memory.attention=chunked", "memory.attention_chunk=16",
             "train.gradient_checkpointing=true", "train.optimizer=adamw8bit_portable", "memory.fused_backward=true",
             f"sample.prompts={PROMPT} --w 48 --h 32 --l 2.0"]
    assert main(flags(world, run, *extra, steps=2)) == 0, capsys.readouterr().err
    assert "fp8 (stored, upcast per layer); attention: chunked" in capsys.readouterr().out
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in steps if r["kind"] == "step")
    assert Image.open(run / "samples" / "final.png").size == (48 + 4, 32 + 4 + 12)  # one 48×32 cell
    pipe = fresh_pipeline(world)
    pipe.load_lora_weights(str(run / RUN_LORA_FILE))
    assert L.count_loaded_modules(pipe.transformer) == 34


def test_transformer_file_with_separate_components_trains_the_same_lora(world, trained, capsys):
    """flux1-dev.safetensors (BFL names) + ae / clip_l / t5xxl files, as ComfyUI users have them: the same LoRA."""
    files, run = world["files"], world["tmp"] / "single-file"
    configs = config_only(world["folder"], world["tmp"] / "flux-configs")  # the tiny widths; real files use the shipped ones
    extra = [f"model.vae={files['ae']}", f"model.clip={files['clip']}", f"model.t5={files['t5']}",
             f"model.tokenizer={world['folder']}", f"model.t5_tokenizer={world['folder']}", f"model.config={configs}"]
    assert main(flags(world, run, *extra, model=files["bfl"])) == 0, capsys.readouterr().err
    a, b = load_file(str(trained / RUN_LORA_FILE)), load_file(str(run / RUN_LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, meta = L.read_lora_file(run / RUN_LORA_FILE)
    assert meta["ss_sd_model_name"] == files["bfl"].name


def test_plan_profiles_the_flux_transformer_and_keeps_fp16_off_a_card_without_bf16(world):
    from lowvram.cli import build_parser, resolve_config
    from lowvram.memory.run_plan import plan_run

    cfg, preset, _ = resolve_config(build_parser().parse_args(
        flags(world, world["tmp"] / "plan") + ["--preset", "rx570"]), check_paths=False)
    assert cfg.train.precision == "fp16"  # what the rx570 preset asks for
    from lowvram.memory.run_workload import workload_for

    wl = workload_for(cfg)
    assert (wl.model, wl.lora_rank, wl.unet_overrides["num_layers"]) == ("flux-dev", RANK, 2)  # the tiny model's own config
    rp = plan_run(cfg, preset.card)
    assert rp.profile is not None and rp.profile.knobs["precision"] == "fp32"
    # the plan's config computes in fp32 and says why; the caller's config is not changed
    assert rp.config.train.precision == "fp32" and cfg.train.precision == "fp16"
    assert rp.sources["train.precision"] == "planner: FLUX.1 precision" and any("overflow fp16" in n for n in rp.lines())
    # the tiny run peaks while caching (the VAE's attention, unfused on a card without flash), before the
    # transformer and its LoRA are loaded; the training step with the plan's knobs holds the LoRA in fp32
    assert rp.profile.peak_phase == "cache" and rp.profile.by_category["trainable_weights"] == 0
    from lowvram.memory.knobs import knobs_from_config
    from lowvram.memory.profiler import profile_step

    step = profile_step(workload_for(rp.config).with_(caching_pass=False, preview=None),
                        knobs_from_config(rp.config, None, preset.card), card=preset.card)
    assert step.by_category["trainable_weights"] == 4 * sum(p.numel() for p in _lora_params(RANK))


def _bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in module.parameters()) * dtype.itemsize


def test_plan_replays_the_caching_pass_and_the_flow_matching_preview(world):
    """The plan's stages hold FLUX.1's caching pass (VAE, CLIP-L and T5 on the card, where they fit, before the
    transformer loads) and its previews (the transformer and the VAE back on the card). A tiny run peaks in its
    training step (tests/test_plan_fidelity.py measures the whole run), so the two stages are checked by size."""
    from lowvram.cli import build_parser, resolve_config
    from lowvram.memory.run_plan import plan_run
    from lowvram.train.finetune_models import LOAD_DTYPES

    def plan(*sets: str):
        cfg, preset, _ = resolve_config(build_parser().parse_args(
            flags(world, world["tmp"] / "plan-stages", *sets) + ["--preset", "rtx3070-8gb"]), check_paths=False)
        return plan_run(cfg, preset.card).record

    on_card = plan()
    pipe = world["pipe"]
    frozen = LOAD_DTYPES[on_card["knobs"]["frozen_dtype"]]
    vae = _bytes(pipe.vae, torch.float32 if frozen == torch.float16 else frozen)  # force_upcast: fp32 over fp16
    encoders = _bytes(pipe.text_encoder, frozen) + _bytes(pipe.text_encoder_2, frozen)
    transformer = _bytes(pipe.transformer, frozen)
    assert {"cache", "train", "preview"} <= set(on_card["stages"])
    # caching: the VAE and both text encoders on the card (they fit in its free memory)
    assert vae + encoders < on_card["stages"]["cache"]
    # memory.text_encoders=cpu: they encode in host memory, the card holds the VAE's encoding alone
    on_cpu = plan("memory.text_encoders=cpu")
    assert vae < on_cpu["stages"]["cache"] <= on_card["stages"]["cache"] - encoders
    # previews: the frozen transformer and the VAE on the card, sampling one image
    assert on_card["stages"]["preview"] > transformer + vae
    assert "preview" not in plan("sample.final=false")["stages"]  # run.sample_every is 0: no preview is drawn


def _lora_params(rank: int) -> list[torch.nn.Parameter]:
    from lowvram.lora import attach_lora

    tr = tiny_transformer()
    return attach_lora(tr, rank, rank, target_modules=lora_target_names(tr))


@pytest.mark.parametrize(("change", "message"), [
    (["--task", "full"], "FLUX.1 trains as a LoRA only"),
    (["--set", "lora.type=loha"], "plain LoRA"),
    (["--set", "lora.text_encoder=true"], "text encoders stay frozen"),
])
def test_what_flux_cannot_do_is_refused_in_one_line(world, tmp_path, capsys, change, message):
    argv = flags(world, tmp_path / "r", steps=1)
    if change[0] == "--task":
        argv[argv.index("--task") + 1] = change[1]
    else:
        argv += change
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_class_images_still_to_draw_are_refused_for_flux(world, tmp_path, capsys):
    (tmp_path / "class").mkdir()
    argv = flags(world, tmp_path / "r", "data.class_data=" + str(tmp_path / "class"), "data.num_class_images=2",
                 "data.class_prompt=a photo of a dog", steps=1)
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "2 class images are still to be drawn" in err and "Traceback" not in err


def test_panel_lora_job_on_a_flux_folder(world, tmp_path):
    from test_webui import wait_for

    from lowvram.webui import callbacks as cb
    from lowvram.webui.jobs import JobManager

    check = cb.check_model(str(world["folder"]), "lora")
    assert check.ok and check.message.startswith("FLUX.1 model, flux-dev"), check.message
    assert not cb.check_model(str(world["folder"]), "full").ok
    run = tmp_path / "panel-run"
    extra = [f"data.cache_dir={world['cache']}", f"lora.alpha={ALPHA}", "train.warmup_steps=0", "run.sample_every=0",
             "run.checkpoint_every=2", "run.log_every=1", "run.tensorboard=false", "sample.steps=2",
             f"sample.prompts={PROMPT}", f"sample.seed={SEED}"]
    form = cb.Form(preset="cpu", task="lora", data=str(world["data"]), model=str(world["folder"]), out=str(run),
                   steps=2, lr="3e-2", rank=RANK, resolution=RES, batch_size=2, grad_accum=1, extra="\n".join(extra))
    plan = cb.plan_report(form)
    assert "flux-dev" in plan and "not profiled" not in plan, plan
    state = cb.PanelState(JobManager(tmp_path / "state"))
    started = cb.start_job(state, form)
    assert started.startswith("Started"), started
    s = wait_for(state.manager, lambda s: not s.active, "the end of the job")
    assert s.state == "done" and s.exit_code == 0, s.error
    pipe = fresh_pipeline(world)
    pipe.load_lora_weights(str(run / RUN_LORA_FILE))
    assert L.count_loaded_modules(pipe.transformer) == 34
    assert (run / "lora" / f"{run.name}.safetensors").is_file() and (run / "samples" / "final.png").is_file()
