"""``memory.text_encoders`` (card / sequential / cpu) and previews drawn from the text cache.

Tiny SD 1.x / SDXL checkpoints trained through ``lowvram train`` on the CPU. The CPU is the training device
here, so where the text encoders are is checked by what the run does to them: every ``.to(...)`` call on them
and every forward, with the phase it happened in (no GPU to look at).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sd_fixtures import finetune_argv, save_tiny, tiny_workload, write_image_folder
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import lowvram.train.finetune as ft
from lowvram.cli import main
from lowvram.config import ConfigBuilder
from lowvram.errors import ConfigError
from lowvram.families.sd_preview import generate, sampling
from lowvram.memory.planner import candidates
from lowvram.memory.profiler import profile_step
from lowvram.memory.workloads import WORKLOADS, Knobs
from lowvram.presets import load_preset
from lowvram.train.prompts import PromptSpec

RES = 32
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("textcache")
    return {"tmp": tmp, "sdxl": save_tiny(tmp, "sdxl")["folder"], "sd1": save_tiny(tmp, "sd1")["folder"],
            "data": write_image_folder(tmp / "data", 2, RES, "a photo of sks dog")}


class Watch:
    """Records ``.to`` calls and forwards of the real text encoders (not the plan's models on ``meta``), with
    the run's phase at that moment."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reset()
        watch = self
        for cls in (CLIPTextModel, CLIPTextModelWithProjection):
            to, fwd = cls.to, cls.forward

            def moved(self, *args, _to=to, **kw):
                target = kw.get("device", args[0] if args else None)
                if isinstance(target, (str, torch.device)) and self.device.type != "meta":
                    watch.moves.append((watch.phase, str(target)))
                return _to(self, *args, **kw)

            def forward(self, *args, _fwd=fwd, **kw):
                if self.device.type != "meta" and not watch.depth:  # not the subclass's call of its base
                    watch.forwards.append(watch.phase)
                watch.depth += 1
                try:
                    return _fwd(self, *args, **kw)
                finally:
                    watch.depth -= 1

            monkeypatch.setattr(cls, "to", moved)
            monkeypatch.setattr(cls, "forward", forward)
        build, fit = ft.build_caches, ft.fit_job

        def build_caches(cfg, job):
            self.phase, self.job = "cache", job
            build(cfg, job)
            self.phase = "train"  # the steps, and the previews (which the preview wrapper marks)

        def fit_job(cfg, run_dir, job, *a, **kw):
            preview = job.preview

            def marked():
                self.phase = "preview"
                try:
                    return preview()
                finally:
                    self.phase = "train"

            job.preview = marked
            return fit(cfg, run_dir, job, *a, **kw)

        monkeypatch.setattr(ft, "build_caches", build_caches)
        monkeypatch.setattr(ft, "fit_job", fit_job)

    def reset(self) -> None:
        self.phase, self.depth = "load", 0
        self.moves: list[tuple[str, str]] = []  # (phase, target device) of .to calls that move
        self.forwards: list[str] = []
        self.job: Any = None

    def copy(self) -> Watch:
        out = object.__new__(Watch)
        out.phase, out.moves, out.forwards, out.job = self.phase, list(self.moves), list(self.forwards), self.job
        return out


@pytest.fixture
def watch(monkeypatch):
    return Watch(monkeypatch)


def train(world, family: str, name: str, place: str, watch: Watch, *extra: str) -> Watch:
    watch.reset()
    sets = {"data.resolution": RES, "train.batch_size": 2, "data.cache_dir": world["tmp"] / f"cache-{name}",
            "lora.rank": 4, "train.warmup_steps": 0, "train.lr": 1e-2, "run.checkpoint_every": 0,
            "run.sample_every": 1, "run.tensorboard": "false", "sample.steps": 2, "sample.cfg_scales": "3",
            "sample.prompts": f"{PROMPT} --n red", "sample.negative_prompt": "beach",
            "memory.offload_frozen": "true"}  # the cpu preset keeps them (its card is host RAM); a GPU's does not
    argv = finetune_argv(world[family], world["data"], world["tmp"] / name, sets,
                         f"memory.text_encoders={place}", *extra, steps=2)
    assert main(argv) == 0
    assert (world["tmp"] / name / "samples" / "final.png").is_file()
    return watch.copy()


def test_text_encoders_leave_the_card_and_the_cache_is_the_same(world, watch):
    runs = {place: train(world, "sdxl", f"xl-{place}", place, watch) for place in ("card", "sequential", "cpu")}
    card, seq, cpu = runs["card"], runs["sequential"], runs["cpu"]
    for w in runs.values():
        # no text encoder computes after caching: steps and previews read the cache (preview prompts included)
        assert w.forwards and set(w.forwards) == {"cache"}, w.forwards
        assert not any(phase in ("train", "preview") for phase, _ in w.moves), w.moves
        assert w.job.family.preview_text is not None and {PROMPT, "red", ""} <= w.job.family.preview_text.rows.keys()
        assert all(m is w.job.c.vae for m in w.job.frozen)  # previews bring the VAE back, not the encoders
    # card: both encoders join the VAE on the device at load and leave after caching
    assert [t for p, t in card.moves if p == "load"] == ["cpu", "cpu"] and \
        [t for p, t in card.moves if p == "cache"] == ["cpu", "cpu"]
    # sequential: each encoder visits the device for its own forward only, one at a time
    visits = [t for p, t in seq.moves if p == "cache"]
    assert len(visits) == 2 * len(seq.forwards) and visits[1::2] == ["cpu"] * len(seq.forwards)
    assert not [m for m in seq.moves if m[0] == "load"]
    # cpu: nothing ever moves them (their dtype cast at load is no move)
    assert cpu.moves == []
    # the caption caches agree across placements, preview prompts included
    captions = sorted(card.job.family.preview_text.rows)
    ref = card.job.data.text.get(captions)
    for w in (seq, cpu):
        got = w.job.data.text.get(captions)
        for k in ("embeds", "pooled"):
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["sdxl", "sd1"])
def test_preview_from_the_cache_is_the_pipelines_own_preview(world, watch, family):
    """The same seed drawn from cached embeddings and by the pipeline encoding the prompts itself (with and
    without negative prompts: SDXL zeros the unconditional half then, SD 1.x encodes the empty prompt)."""
    w = train(world, family, f"{family}-same", "card", watch)
    job = w.job
    cached = job.family.preview_text
    assert cached is not None
    for specs in ([PromptSpec(PROMPT, negative="red")], [PromptSpec(PROMPT, negative="")],
                  [PromptSpec(PROMPT, negative="red"), PromptSpec("", negative="")]):
        with sampling(job):
            new = generate(job, job.family, specs, 3.0)
        job.family.preview_text = None  # the old path: the pipeline encodes the prompts with the encoders
        try:
            with sampling(job):
                old = generate(job, job.family, specs, 3.0)
        finally:
            job.family.preview_text = cached
        for a, b in zip(new, old, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_text_encoder_lora_keeps_encoding_on_the_card(world, watch):
    """Trained text encoders: no preview cache; the encoders compute in the steps and the previews."""
    w = train(world, "sdxl", "xl-telora", "card", watch, "lora.text_encoder=true")
    assert w.job.family.preview_text is None
    assert {"train", "preview"} <= set(w.forwards)


@pytest.mark.parametrize("sets,why", [
    ({"lora.text_encoder": True}, "lora.text_encoder trains them"),
    ({"memory.cache_text": False}, "memory.cache_text=false"),
    ({"data.shuffle_tags": True}, "data.shuffle_tags"),
])
def test_off_the_card_needs_captions_encoded_once(sets, why):
    b = ConfigBuilder().apply({"run": {"task": "lora"}, "model": {"pretrained": "x"},
                               "memory": {"text_encoders": "cpu"}}, "test")
    b.apply({k.split(".")[0]: {k.split(".")[1]: v} for k, v in sets.items()}, "test")
    with pytest.raises(ConfigError, match="memory.text_encoders") as e:
        b.build()
    assert why in str(e.value)


# ---- the plan -------------------------------------------------------------------------------------------
def test_profile_drops_text_encoder_bytes_from_cache_and_preview(world):
    card = load_preset("gtx1650-4gb").card
    wl = tiny_workload(world["tmp"], "lora", "sdxl")
    knobs = Knobs(precision="fp32", frozen_dtype="fp16", cache_latents=True, cache_text=True, offload_frozen=True,
                  gradient_checkpointing=True, attention="chunked", attention_chunk=64, ema_on_cpu=True)
    te_bytes = sum(p.numel() * 4 for te in _encoders(world) for p in te.parameters())
    prof = {p: profile_step(wl, knobs.with_(text_encoders=p), card=card) for p in ("card", "sequential", "cpu")}
    card_p, seq, cpu = prof["card"], prof["sequential"], prof["cpu"]
    # cpu: the encoders are never on the card; their activations neither
    assert cpu.stages["cache"] <= card_p.stages["cache"] - te_bytes
    assert card_p.stages["cache"] > seq.stages["cache"] > cpu.stages["cache"]
    assert cpu.stages["train"] == card_p.stages["train"]  # the step never sees them
    # previews use the cached prompts in every placement: no encoder comes back
    assert cpu.stages["preview"] == card_p.stages["preview"] == seq.stages["preview"]
    assert cpu.host_bytes["frozen_weights"] >= te_bytes  # they wait in host RAM, counted there
    # with text-encoder LoRA they train on the card and the preview counts them
    telora = profile_step(wl.with_(lora_text_encoder=True), knobs, card=card)
    assert telora.stages["preview"] > card_p.stages["preview"] + te_bytes // 2


def _encoders(world):
    from transformers import CLIPTextModel as A
    from transformers import CLIPTextModelWithProjection as B

    folder = world["sdxl"]
    return [A.from_pretrained(folder / "text_encoder"), B.from_pretrained(folder / "text_encoder_2")]


def test_planner_places_text_encoders_late_and_only_where_it_applies():
    card = load_preset("gtx1650-4gb").card
    names = [n for n, _ in candidates(WORKLOADS["W2"], card)]
    seq = names.index("text encoders one at a time on the card (caching)")
    assert names.index("text encoders on the CPU (caching)") == seq + 1
    assert seq > names.index("fused backward (optimizer steps inside backward)")
    assert all(seq < i for i, n in enumerate(names) if n.startswith("stream "))
    for wl in (WORKLOADS["W4"], WORKLOADS["W5"], WORKLOADS["W2"].with_(lora_text_encoder=True),
               WORKLOADS["W2"].with_(text_every_step=True)):
        assert not any(k.text_encoders != "card" for _, k in candidates(wl, card))
