"""DreamBooth-style prior preservation: class images paired with instance batches, and the prior loss.

What a user relies on: each step trains on instance + weight x class loss, the class image beside an
instance image has its bucket (so they stack) and is the same on every run with that seed (so a
crashed run resumes bit for bit), class images are cached and reported like instance ones, and a
missing class folder is a clear error before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sd_fixtures import finetune_argv, save_tiny, tiny_latent_unet

from lowvram.cli import main
from lowvram.config import ConfigBuilder, RunConfig
from lowvram.data.dataset import open_for_training
from lowvram.data.prior import open_class_images
from lowvram.errors import ConfigError, DataError
from lowvram.train.finetune import prior_preservation_loss
from lowvram.train.step import compute_loss

RES = 32
CLASS_PROMPT = "a photo of a dog"


def write_images(folder: Path, sizes: list[tuple[int, int]], caption: str | None, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        if caption is not None:
            (folder / f"img{i}.txt").write_text(f"{caption} {i}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD 1.x checkpoint, 4 square instance images, 5 square class images (no captions) + a bad file."""
    tmp = tmp_path_factory.mktemp("prior")
    write_images(tmp / "data", [(RES, RES)] * 4, "a photo of sks dog, photo", seed=0)
    write_images(tmp / "cls", [(RES, RES)] * 5, None, seed=1)
    (tmp / "cls" / "broken.png").write_bytes(b"not an image at all")
    return {"tmp": tmp, "sd1": save_tiny(tmp, "sd1")["folder"], "data": tmp / "data", "cls": tmp / "cls",
            "cache": tmp / "cache"}


@pytest.fixture(scope="module")
def prior_run(world):
    """A 3-step LoRA run with class images through the CLI (run once): (run folder, its stdout)."""
    run = world["tmp"] / "run"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(flags(world, run))
    assert code == 0, out.getvalue()[-2000:]
    return run, out.getvalue()


def flags(world, out: Path, *extra: str, steps: int = 3) -> list[str]:
    sets = {
        "data.resolution": RES, "train.batch_size": 1, "train.grad_accum": 2, "data.cache_dir": world["cache"],
        "lora.rank": 4, "train.lr": 1e-2, "train.warmup_steps": 0, "run.checkpoint_every": 2,
        "run.sample_every": 0, "run.log_every": 1, "run.tensorboard": "false", "sample.steps": 2,
        "sample.cfg_scales": "3", "sample.prompts": "a photo of sks dog", "data.class_data": world["cls"],
        "data.class_prompt": CLASS_PROMPT, "train.prior_loss_weight": 0.5,
    }
    return finetune_argv(world["sd1"], world["data"], out, sets, *extra, steps=steps)


def data_config(source: Path, class_data: Path | str, seed: int = 0) -> RunConfig:
    cfg = RunConfig()
    cfg.run.task, cfg.run.seed = "lora", seed
    cfg.data.source, cfg.data.resolution, cfg.data.class_data = str(source), RES, str(class_data)
    cfg.data.class_prompt, cfg.data.caption_prefix = CLASS_PROMPT, "sks, "
    cfg.train.batch_size = 1
    return cfg


# ---- the loss ----------------------------------------------------------------------------------------
def test_prior_loss_is_instance_plus_weighted_class_loss():
    unet = tiny_latent_unet()
    acp = torch.linspace(0.99, 0.01, 100)
    x0 = torch.randn(4, 4, 8, 8, requires_grad=True)  # rows 0-1 instance, 2-3 class
    cond = torch.randn(4, 5, 8)

    def per_sample(**kw):
        return compute_loss(unet, x0, cond, alphas_cumprod=acp, prediction="epsilon",
                            generator=torch.Generator().manual_seed(7), **kw)

    rows = per_sample(reduce=False)
    assert rows.shape == (4,)
    torch.testing.assert_close(rows.mean(), per_sample())  # the per-sample path is the same MSE
    for snr in (0.0, 5.0):  # min-SNR weights apply per sample too
        torch.testing.assert_close(per_sample(reduce=False, snr_gamma=snr).mean(), per_sample(snr_gamma=snr))

    for w in (0.0, 0.5, 1.0):
        total, inst, prior = prior_preservation_loss(per_sample(reduce=False), 2, w)
        torch.testing.assert_close(inst, rows[:2].mean())
        torch.testing.assert_close(prior, rows[2:].mean())
        torch.testing.assert_close(total.detach(), inst + w * prior)
        x0.grad = None
        total.backward()
        class_grad = x0.grad[2:].abs().sum().item()
        assert x0.grad[:2].abs().sum() > 0
        # weight 0 is instance-only training: the class images do not reach the gradient at all
        assert (class_grad == 0) == (w == 0), (w, class_grad)


# ---- pairing -----------------------------------------------------------------------------------------
def test_class_images_share_the_bucket_and_are_drawn_deterministically(tmp_path):
    # instance images in two buckets (square and 2:1), class images all square: the wide bucket is filled
    write_images(tmp_path / "inst", [(RES, RES)] * 3 + [(2 * RES, RES)] * 2, "photo", seed=0)
    write_images(tmp_path / "cls", [(RES, RES)] * 4, None, seed=1)
    (tmp_path / "cls" / "img0.txt").write_text("a dog on the beach")  # a caption file wins over class_prompt

    def open_pairs(seed: int):
        cfg = data_config(tmp_path / "inst", tmp_path / "cls", seed)
        run = tmp_path / f"run{seed}"
        ds, _ = open_for_training(cfg, run)
        return ds, open_class_images(cfg, ds, run, echo=None), run

    ds, prior, run = open_pairs(0)
    n = len(ds)
    streams = list(range(6 * n))  # six epochs
    pairs = prior.pairs(streams)
    cls = prior.dataset
    for s, c in zip(streams, pairs, strict=True):
        inst_bucket = ds.source_bucket(ds.plan(s).source)
        assert cls.source_bucket(cls.plan(c).source) == inst_bucket
    assert len({ds.source_bucket(u) for u in range(ds.num_sources())}) == 2

    # per bucket, class images cycle: every one is used once before any repeats
    square = ds.source_bucket(0)
    draws = [cls.plan(c).source for s, c in zip(streams, pairs, strict=True)
             if ds.source_bucket(ds.plan(s).source) == square]
    pool = sorted({u for u in range(cls.num_sources()) if cls.source_bucket(u) == square})
    assert len(pool) == 4
    for k in range(0, len(draws) - len(pool) + 1, len(pool)):
        assert sorted(draws[k : k + len(pool)]) == pool

    # captions: the class prompt for captionless images, the sidecar otherwise, never the instance prefix
    captions = {cls.plan(c).caption for c in pairs}
    assert captions == {CLASS_PROMPT, "a dog on the beach"}
    assert all(ds.plan(s).caption.startswith("sks, ") for s in streams)

    # the same seed draws the same class image at every step (what resume relies on); another seed does not
    _, again, _ = open_pairs(0)
    assert again.pairs(streams) == pairs
    assert [again.pair(s) for s in reversed(streams)] == pairs[::-1]  # no hidden state: any order
    _, other, _ = open_pairs(1)
    assert other.pairs(streams) != pairs

    report = json.loads((run / "data_report.json").read_text())["class_data"]
    assert report["used"] == 4
    assert [w["kind"] for w in report["warnings"]] == ["class_bucket_filled"]


def test_resumed_run_reuses_the_class_verdicts(tmp_path, monkeypatch):
    """The order train_finetune opens the data in: a second open of the same run decodes no image again."""
    from lowvram.data import images
    from lowvram.data.prior import scan_class_images

    write_images(tmp_path / "inst", [(RES, RES)] * 2, "photo", seed=0)
    write_images(tmp_path / "cls", [(RES, RES)] * 3, None, seed=1)
    cfg, run = data_config(tmp_path / "inst", tmp_path / "cls"), tmp_path / "run"

    def open_all():
        scan = scan_class_images(cfg, run, echo=None)
        ds, _ = open_for_training(cfg, run)
        return open_class_images(cfg, ds, run, echo=None, scan=scan)

    first = open_all()

    def no_decode(*a, **k):
        raise AssertionError("an image was decoded again")

    monkeypatch.setattr(images, "check_image", no_decode)
    again = open_all()
    assert again.dataset.report.used == 3 and again.pairs(list(range(8))) == first.pairs(list(range(8)))


@pytest.mark.parametrize("case", ["missing", "empty", "all_bad", "not_a_folder"])
def test_unusable_class_folder_is_a_clear_error(tmp_path, case):
    write_images(tmp_path / "inst", [(RES, RES)] * 2, "photo", seed=0)
    cls = tmp_path / "cls"
    if case == "empty":
        cls.mkdir()
    elif case == "all_bad":
        cls.mkdir()
        (cls / "a.png").write_bytes(b"")
        (cls / "b.jpg").write_bytes(b"garbage")
    elif case == "not_a_folder":
        cls.write_text("x")
    cfg = data_config(tmp_path / "inst", cls)
    ds, _ = open_for_training(cfg, tmp_path / "run")
    with pytest.raises(DataError) as err:
        open_class_images(cfg, ds, tmp_path / "run", echo=None)
    assert "data.class_data" in err.value.problem and str(cls) in err.value.problem
    assert "class_prompt" in err.value.fix and "unset data.class_data" in err.value.fix


def test_class_data_outside_fine_tunes_is_refused():
    b = ConfigBuilder().set("run.task", "text2img", "--task").set("data.class_data", "/x", "--set")
    with pytest.raises(ConfigError, match="data.class_data"):
        b.build()
    with pytest.raises(ConfigError, match="prior_loss_weight"):
        ConfigBuilder().set("train.prior_loss_weight", -1, "--set").build()


# ---- through the CLI -------------------------------------------------------------------------------------
def test_prior_run_logs_both_losses_caches_and_reports_class_images(prior_run):
    run, out = prior_run
    assert "latent cache (class images): 5 latents, 0 reused, 5 encoded" in out
    assert "profiled at 2 images" in out  # the memory plan profiles instance + class images
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        # the logged loss is the step's mean over its 2 micro-batches of instance + 0.5 x prior
        assert r["loss"] == pytest.approx(r["instance_loss"] + 0.5 * r["prior_loss"], rel=1e-6)
        assert r["prior_loss"] > 0
    report = json.loads((run / "data_report.json").read_text())
    assert report["used"] == 4 and report["class_data"]["used"] == 5
    assert [s["path"] for s in report["class_data"]["skipped"]] == ["broken.png"]
    from lowvram.lora import read_lora_file

    _, header = read_lora_file(run / "lora" / f"{run.name}.safetensors")
    assert (header["ss_num_reg_images"], header["ss_prior_loss_weight"]) == ("5", "0.5")


class Crash(Exception):
    pass


def test_crashed_prior_run_resumes_bitwise(world, prior_run, capsys):
    from lowvram.cli import build_parser, resolve_config
    from lowvram.train.run import train

    straight, crashed = prior_run[0], world["tmp"] / "crashed"
    cfg, _, _ = resolve_config(build_parser().parse_args(flags(world, crashed)))

    def crash(event):
        if event.kind == "checkpoint":
            raise Crash

    with pytest.raises(Crash):
        train(cfg, listeners=[crash], progress=False)
    assert main(["train", "--resume", str(crashed), "--no-progress"]) == 0, capsys.readouterr().err
    # step 3 draws the class images of epoch 1 (4 instance images, 2 per step): the pairing must resume too
    for name in ("model", "ema", "optimizer"):
        a = load_file(str(straight / "checkpoints" / "step-00000003" / f"{name}.safetensors"))
        c = load_file(str(crashed / "checkpoints" / "step-00000003" / f"{name}.safetensors"))
        assert a.keys() == c.keys() and a
        for key in a:
            assert torch.equal(a[key], c[key]), f"{name}:{key} differs after resume"
    rows = [json.loads(x) for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "step"][-1]
    assert last["step"] == 3 and "prior_loss" in last


def test_memory_plan_profiles_the_class_images_too(world):
    """train.batch_size counts instance images; the profile holds as many class images beside them, and the
    planner's micro-batch comes back in instance images."""
    from lowvram.memory.run_plan import plan_run

    def planned(class_data: str, vram: float | None):
        cfg = data_config(world["data"], class_data)
        cfg.model.pretrained, cfg.train.batch_size, cfg.memory.vram_gib = str(world["sd1"]), 2, vram
        # every saving before the micro-batch already on: halving it is the planner's next step
        cfg.memory.frozen_dtype, cfg.train.optimizer, cfg.train.gradient_checkpointing = "fp8", "adamw8bit_portable", True
        cfg.memory.attention, cfg.train.ema_on_cpu = "chunked", True
        return plan_run(cfg, None)

    plain, prior = planned("", None), planned(str(world["cls"]), None)
    assert prior.record["job"]["prior"] and not plain.record["job"]["prior"]
    # twice the images in the step: the activations double, the weights do not
    assert prior.record["by_category"]["activations"] > 1.8 * plain.record["by_category"]["activations"]
    assert prior.record["by_category"]["frozen_weights"] == plain.record["by_category"]["frozen_weights"]
    # a card between the two: the plain job fits as configured, the prior one only with 1 + 1 images per micro-batch
    vram = (plain.peak_bytes + prior.peak_bytes) / 2 / 2**30 + 0.35 + 0.3  # + the default context and margin
    assert planned("", vram).verdict == "fits"
    fitted = planned(str(world["cls"]), vram)
    assert fitted.verdict == "planned" and fitted.config.train.batch_size == 1
    assert fitted.config.train.grad_accum == 2  # the same instance images per optimizer step
    assert fitted.sources["train.batch_size"].startswith("planner: micro-batch 1")
    assert any("prior preservation" in n for n in fitted.record["notes"])
