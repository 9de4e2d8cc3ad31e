"""DreamBooth class images drawn by the base model (data.num_class_images): numbered, seeded per image,
written atomically with their prompt, and resumable: an interrupted generation draws exactly the missing
images, and they are the images an uninterrupted run draws.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sd_fixtures import finetune_argv, save_tiny

from lowvram.cli import main
from lowvram.config import ConfigBuilder
from lowvram.data import class_images
from lowvram.errors import ConfigError, DataError

RES = 32
PROMPT = "a photo of a dog"


class Interrupted(Exception):
    pass


def fake_draw(calls: list[int], stop_after: int | None = None):
    """A deterministic 'model': the image is a function of the seed; optionally dies mid-generation."""

    def draw(prompt: str, seed: int) -> torch.Tensor:
        if stop_after is not None and len(calls) == stop_after:
            raise Interrupted
        calls.append(seed)
        return torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    return draw


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_generation_resumes_with_exactly_the_missing_images(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for folder in (straight, resumed):  # the user's own class images count towards the total
        folder.mkdir()
        Image.new("RGB", (8, 8), "white").save(folder / "mine.jpg")
    want = 6

    calls: list[int] = []
    numbers = class_images.missing_numbers(straight, want)
    assert numbers == [0, 1, 2, 3, 4]
    class_images.generate(straight, numbers, PROMPT, seed=3, draw=fake_draw(calls), echo=None)
    assert len(calls) == 5 and class_images.missing_numbers(straight, want) == []

    # interrupted after two images, with a half-written file left behind as a kill would
    first: list[int] = []
    with pytest.raises(Interrupted):
        class_images.generate(resumed, class_images.missing_numbers(resumed, want), PROMPT, seed=3,
                              draw=fake_draw(first, stop_after=2), echo=None)
    (resumed / ".class-00002.png.tmp").write_bytes(b"\x89PNG half")
    assert sorted(p.name for p in resumed.glob("*.png")) == ["class-00000.png", "class-00001.png"]
    assert class_images.usable_images(resumed) == 3  # the temporary file is no image

    again: list[int] = []
    todo = class_images.missing_numbers(resumed, want)
    assert todo == [2, 3, 4]
    class_images.generate(resumed, todo, PROMPT, seed=3, draw=fake_draw(again), echo=None)
    assert first + again == calls  # exactly the missing ones, with their own seeds
    assert not list(resumed.glob(".*.tmp"))
    a, b = pixels(straight), pixels(resumed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (resumed / "class-00004.txt").read_text().strip() == PROMPT
    # another seed draws other images; an already full folder draws none
    assert class_images.image_seed(4, 0) != class_images.image_seed(3, 0)
    assert class_images.missing_numbers(resumed, 3) == []
    with pytest.raises(DataError, match="class_prompt"):
        class_images.generate(tmp_path / "x", [0], "  ", seed=0, draw=fake_draw([]), echo=None)
    # a stop request (Ctrl-C) is honoured between images: what is written stays, the rest is drawn later
    halted: list[int] = []
    written = class_images.generate(tmp_path / "halted", [0, 1, 2], PROMPT, seed=3, draw=fake_draw(halted),
                                    echo=None, stop=lambda: len(halted) == 2)
    assert len(written) == 2 and class_images.missing_numbers(tmp_path / "halted", 3) == [2]


def test_num_class_images_needs_a_folder_and_a_prompt():
    b = ConfigBuilder().set("run.task", "lora", "--task").set("model.pretrained", "/m", "--model")
    with pytest.raises(ConfigError, match="data.num_class_images"):
        b.set("data.num_class_images", 10, "--set").build()
    with pytest.raises(ConfigError, match="data.num_class_images"):
        b.set("data.class_data", "/c", "--set").set("data.num_class_images", -1, "--set").build()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("class_images")
    data = tmp / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a photo of sks dog")
    return {"tmp": tmp, "sd1": save_tiny(tmp, "sd1")["folder"], "data": data}


def run_sets(cls: Path) -> dict:
    return {"data.resolution": RES, "train.batch_size": 1, "lora.rank": 4, "run.checkpoint_every": 0,
            "run.sample_every": 0, "run.tensorboard": "false", "sample.steps": 2, "sample.cfg_scales": "2",
            "data.class_data": cls, "data.class_prompt": PROMPT, "data.num_class_images": 4, "run.log_every": 1}


def run_cli(world, name: str, cls: Path) -> Path:
    out = world["tmp"] / name
    sets = dict(run_sets(cls), **{"data.cache_dir": world["tmp"] / "cache"})
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        assert main(finetune_argv(world["sd1"], world["data"], out, sets, steps=2)) == 0, buf.getvalue()[-2000:]
    return out


def test_a_lora_run_draws_its_class_images_and_resumes_the_drawing(world, monkeypatch):
    from lowvram.train.finetune import FinetuneJob

    straight = run_cli(world, "straight", world["tmp"] / "cls_straight")
    drawn = pixels(world["tmp"] / "cls_straight")
    assert sorted(drawn) == [f"class-{k:05d}.png" for k in range(4)]
    assert all(a.shape == (RES, RES, 3) for a in drawn.values())
    assert len({a.tobytes() for a in drawn.values()}) == 4  # per-image seeds: four different images
    report = json.loads((straight / "data_report.json").read_text())
    assert report["class_data"]["used"] == 4
    steps = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert any("prior_loss" in s for s in steps if s["kind"] == "step")  # they train as class images

    # Ctrl-C while drawing (after 2 images): the drawing stops between images, the command exits 130 and
    # says how to go on; `--resume` draws exactly the 2 missing images, the same as the uninterrupted run
    original = FinetuneJob.draw_base
    seeds: list[int] = []

    def counting(self, prompt, seed):
        seeds.append(seed)
        if len(seeds) == 2 and not resumed:
            os.kill(os.getpid(), signal.SIGINT)  # the graceful-stop handler of `lowvram train` takes it
        return original(self, prompt, seed)

    resumed = False
    monkeypatch.setattr(FinetuneJob, "draw_base", counting)
    cls = world["tmp"] / "cls_resumed"
    killed, buf = world["tmp"] / "killed", io.StringIO()
    sets = dict(run_sets(cls), **{"data.cache_dir": world["tmp"] / "cache"})
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        assert main(finetune_argv(world["sd1"], world["data"], killed, sets, steps=2)) == 130, buf.getvalue()[-2000:]
    assert "nothing trained yet" in buf.getvalue() and f"lowvram train --resume {killed}" in buf.getvalue()
    assert sorted(p.name for p in cls.glob("*.png")) == ["class-00000.png", "class-00001.png"]
    resumed = True
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        assert main(["train", "--resume", str(killed), "--no-progress"]) == 0, buf.getvalue()[-2000:]
    seed = 0  # run.seed
    assert seeds == [class_images.image_seed(seed, k) for k in range(4)]  # 2 before, exactly 2 after
    again = pixels(cls)
    assert again.keys() == drawn.keys() and all(np.array_equal(again[k], drawn[k]) for k in drawn)
    assert (killed / "lora" / "pytorch_lora_weights.safetensors").is_file()  # and then it trained
    # a full folder is used as it is: nothing drawn, the base model's images come back from the cache
    seeds.clear()
    run_cli(world, "full", cls)
    assert seeds == []


def test_the_plan_profiles_the_drawing(world):
    """Drawing is a stage of the run's profile (every frozen weight on the card, the guidance batch, the VAE
    decode), planned before any model loads; a folder that is already full draws nothing."""
    from lowvram.config import RunConfig
    from lowvram.memory.run_plan import plan_run

    def plan(folder: str):
        cfg = RunConfig()
        cfg.run.task, cfg.model.pretrained, cfg.data.source = "lora", str(world["sd1"]), str(world["data"])
        cfg.data.resolution, cfg.train.batch_size, cfg.memory.vram_gib = RES, 1, 8.0
        cfg.data.class_data, cfg.data.class_prompt, cfg.data.num_class_images = folder, PROMPT, 3
        return plan_run(cfg, None)

    rp = plan(str(world["tmp"] / "cls_plan"))
    drawing = rp.record["stages"]["class images"]
    note = next(n for n in rp.record["notes"] if n.startswith("class images: 3 to draw"))
    assert drawing > 0 and f"{drawing / 2**30:.2f} GiB" in note and rp.record["job"]["class_images"] == 3
    # the drawing holds the UNet, VAE and text encoders at once: more than caching, which has no UNet
    assert drawing > rp.record["stages"]["cache"]
    full = plan(str(world["tmp"] / "cls_straight"))
    assert "class images" not in full.record["stages"] and full.record["job"]["class_images"] == 0


def test_drawing_profile_keeps_streamed_blocks_in_host_memory(world):
    """With memory.stream_blocks the UNet's frozen blocks live in host RAM while drawing too: the drawing
    stage counts them there, not on the card (else a streamed plan's drawing is refused for nothing)."""
    from lowvram.config import RunConfig
    from lowvram.memory.profiler import profile_step
    from lowvram.memory.run_plan import knobs_from_config
    from lowvram.memory.run_workload import workload_for
    from lowvram.presets import load_preset

    cfg = RunConfig()
    cfg.run.task, cfg.model.pretrained, cfg.data.source = "lora", str(world["sd1"]), str(world["data"])
    cfg.data.resolution, cfg.train.batch_size = RES, 1
    card = load_preset("rtx3070-8gb").card  # a card: host memory apart from the card's
    wl = workload_for(cfg).with_(class_images=2)
    knobs = knobs_from_config(cfg, None, card)
    plain, streamed = (profile_step(wl, knobs.with_(stream_blocks=s), card=card) for s in (0.0, 1.0))
    assert streamed.host_bytes.get("streamed_weights", 0) > 0 and "streamed_weights" not in plain.host_bytes
    assert streamed.stages["class images"] < plain.stages["class images"]
