"""Model families as plug-ins: the registry says which family a checkpoint is, and a family registered only here
(a stand-in, its own file layout) trains through the normal ``lowvram train`` path, planner included, without
any change to the loop, the planner or the shells."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from flux_fixtures import save_tiny_flux
from safetensors import safe_open
from safetensors.torch import save_file
from sd_fixtures import finetune_argv, save_tiny, write_image_folder

from lowvram import families
from lowvram.cli import main
from lowvram.errors import ModelLoadError
from lowvram.families.flux import FluxFamily
from lowvram.families.sd import SDFamily
from lowvram.families.sdxl import SDXLFamily
from lowvram.train.finetune_models import load_base

RES = 32
MARKER = "tiny_family.json"


class TinyWrappedSD(SDFamily):
    """A new family as a plug-in author writes one: a folder holding ``tiny_family.json`` and an SD 1.x
    diffusers folder under ``model/``. Everything but detection, loading and its own metadata key is inherited."""

    name = "tiny-wrapped"
    label = "tiny wrapped SD (test)"
    variants = ("tiny-wrapped",)
    loads = 0

    @classmethod
    def detect(cls, path: Path, allow_pickle: bool = False) -> bool:
        marker = path / MARKER
        return marker.is_file() and json.loads(marker.read_text())["family"] == cls.name

    @classmethod
    def inner(cls, cfg):
        """The config as the SD family reads it: ``model.pretrained`` pointing at the wrapped folder."""
        inner = copy.deepcopy(cfg)
        inner.model.pretrained = str(Path(cfg.model.pretrained) / "model")
        return inner

    @classmethod
    def workload(cls, cfg, res, batch, extra, common):
        return super().workload(cls.inner(cfg), res, batch, extra, common)

    def load(self):
        type(self).loads += 1
        return load_base(self.inner(self.cfg))

    def metadata(self, job, meta):
        return {**super().metadata(job, meta), "lowvram_test_family": self.name}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    models = {fam: save_tiny(tmp, fam, clip_vocab=fam == "sd1") for fam in ("sd1", "sdxl")}
    _, flux = save_tiny_flux(tmp)
    wrapped = tmp / "wrapped"
    wrapped.mkdir()
    (wrapped / MARKER).write_text(json.dumps({"family": TinyWrappedSD.name}))
    models["sd1"]["folder"].rename(wrapped / "model")
    models["sd1"]["folder"] = wrapped / "model"
    data = write_image_folder(tmp / "data", 4, RES, "a photo of sks dog")
    return {"tmp": tmp, "models": models, "flux": flux, "wrapped": wrapped, "data": data}


def test_detection_asks_each_family(world):
    m = world["models"]
    assert families.detect(m["sd1"]["folder"]) is SDFamily
    assert families.detect(m["sd1"]["file"]) is SDFamily
    assert families.detect(m["sdxl"]["folder"]) is SDXLFamily
    assert families.detect(m["sdxl"]["file"]) is SDXLFamily
    for layout in ("folder", "bfl", "aio", "scaled"):  # ComfyUI's prefix is SD's UNet prefix: still FLUX.1
        assert families.detect(world["flux"][layout]) is FluxFamily, layout
    assert {SDFamily, SDXLFamily, FluxFamily} <= set(families.families())
    assert families.family_named("sd2-v") is SDFamily and families.family_named("flux-schnell") is FluxFamily


def test_unknown_checkpoints_get_a_clear_error(world, tmp_path):
    stray = tmp_path / "stray.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(stray))
    with pytest.raises(ModelLoadError, match="not a checkpoint of a model family lowvram trains") as e:
        families.detect(stray)
    assert "FLUX.1" in str(e.value) and "SDXL" in str(e.value) and ".safetensors" in str(e.value)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.png").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"a folder holding cat\.png"):
        families.detect(folder)
    with pytest.raises(ModelLoadError, match="does not exist"):
        families.detect(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="unknown model family 'sd3'.*sd1"):
        families.family_named("sd3")
    # the wrapped folder belongs to no built-in family until its plug-in is registered
    with pytest.raises(ModelLoadError, match="not a checkpoint"):
        families.detect(world["wrapped"])
    refiner = tmp_path / "refiner.safetensors"  # an SD file SDXL recognises, refused with the reason
    save_file({"conditioner.embedders.0.model.positional_embedding": torch.zeros(2)}, str(refiner))
    with pytest.raises(ModelLoadError, match="refiner"):
        families.detect(refiner)


def test_two_families_claiming_one_checkpoint_is_said_plainly(world):
    class Greedy(SDFamily):
        name, label, variants = "greedy", "greedy (test)", ("greedy",)

        @classmethod
        def detect(cls, path, allow_pickle=False):
            return True

    with families.registered(Greedy), pytest.raises(ModelLoadError, match=r"several model families \(sd, greedy\)"):
        families.detect(world["models"]["sd1"]["file"])
    assert families.detect(world["models"]["sd1"]["file"]) is SDFamily  # the registry as it was


def test_a_family_registered_in_a_test_trains_through_the_normal_path(world):
    """Only the plug-in above differs from a built-in family: ``lowvram train`` plans, loads, caches, trains 2
    steps and writes the LoRA files through it."""
    out = world["tmp"] / "run-wrapped"
    sets = {"data.resolution": RES, "train.batch_size": 2, "data.cache_dir": world["tmp"] / "cache", "lora.rank": 4,
            "run.checkpoint_every": 2, "run.sample_every": 0, "run.tensorboard": "false", "sample.steps": 2,
            "sample.cfg_scales": "2.0"}
    TinyWrappedSD.loads = 0
    with families.registered(TinyWrappedSD):
        assert families.detect(world["wrapped"]) is TinyWrappedSD
        assert main(finetune_argv(world["wrapped"], world["data"], out, sets, steps=2)) == 0
    assert TinyWrappedSD not in families.families()  # registered for the block only
    assert TinyWrappedSD.loads == 1
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["kind"] == "step"][-1] == 2
    plan = (out / "plan.yaml").read_text()
    assert "sd15 lora" in plan  # the planner profiled the wrapped SD 1.x model through the family
    with safe_open(str(out / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["lowvram_test_family"] == "tiny-wrapped" and meta["ss_steps"] == "2"
    assert any("lora" in k for k in keys) and (out / "samples" / "final.png").is_file()
