"""One place assembles every run (``train/assemble.py``), the Trainer calls the job's hooks directly, and a fine-tune
reaches its trainer through the model-family registry (a model lowvram trained from scratch is the scratch family's).

The job here is a real Trainer's job over a tiny module: its hooks record what the Trainer shows them, so the
tests see the checkpoint steps, the EMA weights in place during ``on_checkpoint`` and the live ones after it,
the job's numbers in the logged steps, and ``after_fit`` with the loop's outcome (also after a stop and a resume).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lowvram import families
from lowvram.config import ConfigBuilder
from lowvram.distributed import SINGLE
from lowvram.errors import ConfigError, ModelLoadError
from lowvram.families.scratch import ScratchFamily, scratch_model_folder
from lowvram.families.sd import SDFamily
from lowvram.memory.run_plan import family_of_run, workload_for
from lowvram.run_folder import RunResult
from lowvram.train.assemble import fit
from lowvram.train.events import Event, JsonlLogger, note
from lowvram.train.jobs import JobHooks
from lowvram.train.phases import PhaseClock
from lowvram.train.run import make_emitter
from lowvram.train.run import train as run_train


def _cfg(out: Path, **values):
    b = ConfigBuilder()
    base = {"run.out": str(out), "run.steps": 4, "run.checkpoint_every": 2, "run.log_every": 1,
            "run.sample_every": 0, "run.val_every": 0, "run.tensorboard": "false", "sample.final": "false",
            "train.ema_decay": 0.5, "train.lr": 0.1, "train.warmup_steps": 0, "train.batch_size": 2,
            "train.gradient_checkpointing": "false", "train.precision": "fp32", "memory.fused_backward": "false"}
    for k, v in {**base, **values}.items():
        b.set(k, v, "test")
    return b.build()


class RecordingJob(JobHooks):
    """A job over one linear layer whose hooks record what the Trainer hands them."""

    has_validation = False
    sample_prompts: list[str] = []

    def __init__(self, run_dir: Path, events: list[Event]) -> None:
        torch.manual_seed(0)
        self.unet = nn.Linear(3, 1)
        self.run_dir, self.events = run_dir, events
        self.checkpoints: list[dict] = []
        self.logged = 0
        self.ended: list[str] = []

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def loss(self, batch, gen):
        return ((self.unet(batch["x"]) - batch["y"]) ** 2).mean()

    def validate(self) -> float:
        raise AssertionError("no validation in this job")

    def preview(self):
        raise AssertionError("no previews in this job")

    def save_final(self, step: int) -> Path:
        return self.run_dir

    def on_checkpoint(self, step: int, trainer) -> None:
        live = self.unet.weight.detach().clone()
        with trainer.ema_weights():
            in_ema = self.unet.weight.detach().clone()
        shadow = trainer.ema.shadow["unet.weight"].clone()
        self.checkpoints.append({"step": step, "live": live, "ema": in_ema, "shadow": shadow,
                                 "after": self.unet.weight.detach().clone(),
                                 "on_disk": (trainer.ckpt_dir / f"step-{step:08d}").is_dir(),
                                 "events_before": [e.step for e in self.events if e.kind == "checkpoint"]})

    def step_metrics(self) -> dict[str, float]:
        self.logged += 1
        return {"job_metric": float(self.logged)}

    def after_fit(self, status: str) -> None:
        self.ended.append(status)


def _fit(cfg, job, events, *, resume=False, stop=lambda: False) -> RunResult:
    data = torch.randn(8, 3)

    def batch(idx):
        return {"x": data[idx], "y": data[idx].sum(1, keepdim=True)}

    def epoch_batches(epoch):
        return [[2 * i, 2 * i + 1] for i in range(4)]

    run_dir = Path(cfg.run.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    def listen(event: Event) -> None:  # a checkpoint event means "on disk" (the panel and the CLI read it so)
        if event.kind == "checkpoint":
            assert Path(event.data["path"]).is_dir() and event.data["path"].endswith(f"step-{event.step:08d}")
        events.append(event)

    return fit(cfg, run_dir, job, batch, epoch_batches, torch.device("cpu"), listen, stop=stop,
               resume=resume, world=SINGLE, clock=PhaseClock(events.append))


def test_the_trainer_calls_the_jobs_hooks_with_the_ema_weights_at_hand(tmp_path):
    events: list[Event] = []
    cfg = _cfg(tmp_path / "run")
    job = RecordingJob(tmp_path / "run", events)
    result = _fit(cfg, job, events)
    assert (result.status, result.step) == ("done", 4)
    # every checkpoint step, in order, with the weights of its step (a periodic checkpoint's folder may still
    # be written in the background then); its event goes out once the folder is on disk (``listen``), the
    # earlier checkpoint's before the next one's hook, and the last one is on disk when the run ends
    assert [c["step"] for c in job.checkpoints] == [2, 4]
    assert [e.step for e in events if e.kind == "checkpoint"] == [2, 4]
    assert job.checkpoints[-1]["on_disk"]
    for i, c in enumerate(job.checkpoints):
        assert c["events_before"] == [2, 4][:i]
        # inside ema_weights the module holds the EMA's shadow, outside it the live weights, put back exactly
        assert torch.equal(c["ema"], c["shadow"].view_as(c["ema"])) and torch.equal(c["after"], c["live"])
        assert not torch.equal(c["ema"], c["live"])  # decay 0.5 after updates: the two differ
    # the job's numbers ride in every logged step event, beside the loss
    steps = [e for e in events if e.kind == "step"]
    assert [e.data["job_metric"] for e in steps] == [1.0, 2.0, 3.0, 4.0] and all("loss" in e.data for e in steps)
    assert job.ended == ["done"]


def test_hooks_after_a_stop_and_a_resume(tmp_path):
    events: list[Event] = []
    cfg = _cfg(tmp_path / "run")
    stopped = RecordingJob(tmp_path / "run", events)
    calls = iter([False, False, False, True])  # stop at the top of the fourth step: step 3 is saved
    result = _fit(cfg, stopped, events, stop=lambda: next(calls))
    assert (result.status, result.step) == ("stopped", 3)
    assert [c["step"] for c in stopped.checkpoints] == [2, 3] and stopped.ended == ["stopped"]
    resumed = RecordingJob(tmp_path / "run", events)
    result = _fit(_cfg(tmp_path / "run", **{"run.steps": 6}), resumed, events, resume=True)
    assert (result.status, result.step) == ("done", 6)
    assert [c["step"] for c in resumed.checkpoints] == [4, 6] and resumed.ended == ["done"]
    assert [e.step for e in events if e.kind == "resume"] == [3]


def test_the_default_hooks_do_nothing():
    hooks = JobHooks()
    assert hooks.on_checkpoint(1, None) is None and hooks.step_metrics() == {} and hooks.after_fit("done") is None


def test_notes_are_printed_not_logged_as_metrics(tmp_path):
    cfg = _cfg(tmp_path / "run")
    (tmp_path / "run").mkdir()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        emit, outs = make_emitter(tmp_path / "run", cfg, [], progress=False, initial=0)
        emit(note("note: something the run decided"))
        emit(Event("step", 1, {"loss": 0.5}))
    assert out.getvalue() == "note: something the run decided\n"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["step"] and any(isinstance(o, JsonlLogger) for o in outs)


# ---- the registry dispatches a fine-tune ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch_model(tmp_path_factory) -> Path:
    """A from-scratch model folder as a from-scratch run's ``final/`` is written: the tiny size's real UNet and
    text encoder, untrained, saved by ``TextToImage.save`` inside a run folder."""
    from lowvram.pipeline import TextToImage
    from lowvram.train.setup import build_components, resolve_defaults

    run = tmp_path_factory.mktemp("scratch") / "base"
    cfg = resolve_defaults(_cfg(run))
    c = build_components(cfg, ["a red circle", "a blue square"], torch.device("cpu"))
    pipe = TextToImage(unet=c.unet, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                       scheduler_config=c.scheduler_config, sample_shape=c.sample_shape, device=torch.device("cpu"))
    pipe.save(run / "final", {"task": "text2img", "step": 0, "size": cfg.model.size})
    return run


def test_a_scratch_model_is_the_scratch_familys(scratch_model):
    final = scratch_model / "final"
    assert scratch_model_folder(scratch_model) == final and scratch_model_folder(final) == final
    assert families.detect(final) is ScratchFamily and families.detect(scratch_model) is ScratchFamily
    assert not SDFamily.detect(final)  # its UNet folder looks like SD 1.x's: SD used to claim it
    assert ScratchFamily.tasks == ("lora",)
    assert ScratchFamily.describe(final).startswith("lowvram from-scratch model (")
    cfg = _cfg(scratch_model.parent / "lora", **{"run.task": "lora", "model.pretrained": str(final),
                                                  "data.source": str(scratch_model)})
    assert family_of_run(cfg) is ScratchFamily
    wl = workload_for(cfg)  # the planner's job: the family's workload, the from-scratch LoRA's
    assert wl.base_from_scratch and wl.mode == "lora"
    with pytest.raises(ModelLoadError, match="lowvram cache is for"):
        ScratchFamily(cfg, torch.device("cpu")).load()
    full = _cfg(scratch_model.parent / "full", **{"run.task": "full", "model.pretrained": str(final)})
    with pytest.raises(ConfigError, match="--task lora"):
        ScratchFamily.check_config(full)


def test_a_fine_tune_reaches_its_trainer_through_the_registry(scratch_model, tmp_path, monkeypatch):
    """``train`` asks the registry which family ``model.pretrained`` is and calls that family's ``train``: the
    scratch family hands its model to the from-scratch LoRA, a family registered in a test to its own."""
    import lowvram.train.scratch_lora as scratch_lora

    calls = []

    def fake(cfg, run_dir, device, emit, **kw):
        calls.append(("scratch", cfg.model.pretrained, sorted(kw)))
        return RunResult(run_dir, "done", 0)

    monkeypatch.setattr(scratch_lora, "train_scratch_lora", fake)
    cfg = _cfg(tmp_path / "lora", **{"run.task": "lora", "model.pretrained": str(scratch_model),
                                      "data.source": str(scratch_model)})
    assert run_train(cfg, progress=False).status == "done"
    assert calls == [("scratch", str(scratch_model), ["clock", "resume", "stop", "world"])]

    class OwnTrainer(ScratchFamily):
        name, label, variants = "own-trainer", "test family", ("own-trainer",)

        @classmethod
        def detect(cls, path, allow_pickle=False):
            return (path / "own.json").is_file()

        @classmethod
        def train(cls, cfg, run_dir, device, emit, **kw):
            calls.append(("own", cfg.model.pretrained, sorted(kw)))
            return RunResult(run_dir, "done", 7)

    own = tmp_path / "own"
    own.mkdir()
    (own / "own.json").write_text("{}")
    with families.registered(OwnTrainer):
        cfg = _cfg(tmp_path / "own-run", **{"run.task": "lora", "model.pretrained": str(own),
                                             "data.source": str(own)})
        assert run_train(cfg, progress=False).step == 7
    assert calls[-1] == ("own", str(own), ["clock", "resume", "stop", "world"])


def test_export_of_a_scratch_lora_refuses_kohya_and_merge_in_one_line(scratch_model, tmp_path):
    """The kohya form used to end in a KeyError traceback (kohya metadata has no 'scratch' base model)."""
    from lowvram.export import export_cli
    from lowvram.run_folder import CONFIG_NAME, LORA_FILE

    run = tmp_path / "lora-run"
    cfg = _cfg(run, **{"run.task": "lora", "model.pretrained": str(scratch_model / "final"),
                       "data.source": str(scratch_model)})
    (run / LORA_FILE).parent.mkdir(parents=True)
    cfg.save(run / CONFIG_NAME)
    (run / LORA_FILE).write_bytes(b"")  # never read: the family refuses first
    with pytest.raises(ModelLoadError, match="no kohya form") as e:
        export_cli(run, "kohya", out=tmp_path / "out")
    assert "--format diffusers" in e.value.fix
    with pytest.raises(ModelLoadError, match="already is the base model with this LoRA merged in"):
        export_cli(run, "diffusers", merge=True, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written
