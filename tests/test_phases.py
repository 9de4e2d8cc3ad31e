"""The time account of a run: phases that add up, reach every listener, land in metrics.jsonl and the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowvram.train import phases as phases_module
from lowvram.train.events import Event, JsonlLogger, ProgressBar
from lowvram.train.phases import PhaseClock, summary_lines
from lowvram.train.run import train


class FakeTime:
    """perf_counter that only moves when told to: durations are exact, no timed assertions."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_time(monkeypatch):
    t = FakeTime()
    monkeypatch.setattr(phases_module.time, "perf_counter", t)
    return t


def test_a_phase_inside_another_pauses_it_and_the_phases_add_up(fake_time):
    events: list[Event] = []
    clock = PhaseClock()  # nobody listens yet: events are kept
    with clock.phase("plan"):
        fake_time.now += 2
    clock.attach(events.append)
    clock.enter("steps")
    fake_time.now += 5
    with clock.phase("checkpoints", step=10):
        fake_time.now += 1
    fake_time.now += 3
    clock.leave()
    fake_time.now += 0.5  # between phases: "other"
    assert clock.totals == {"plan": 2, "steps": 8, "checkpoints": 1}
    kinds = [(e.data["phase"], e.data["state"]) for e in events]
    assert kinds == [("plan", "start"), ("plan", "end"), ("steps", "start"), ("checkpoints", "start"),
                     ("checkpoints", "end"), ("steps", "start"), ("steps", "end")]
    summary = clock.summary(step=10)
    assert summary.kind == "phases" and summary.data["seconds"] == {"plan": 2, "steps": 8, "checkpoints": 1}
    assert summary.data["wall_s"] == pytest.approx(11.5) and summary.data["other_s"] == pytest.approx(0.5)
    text = "\n".join(summary_lines(summary.data))
    assert "11.5 s in all" in text and "steps" in text and "other" in text


def test_progress_bar_names_the_phase():
    bar = ProgressBar(total=3, disable=True)
    bar(Event("phase", 0, {"phase": "caching", "state": "start"}))
    assert bar.bar.desc == "caching"
    bar(Event("phase", 0, {"phase": "caching", "state": "end", "seconds": 1.0}))
    assert bar.bar.desc == "caching"  # until the next phase starts


def test_metrics_keep_finished_phases_and_the_account(tmp_path):
    log = JsonlLogger(tmp_path / "m.jsonl")
    log(Event("phase", 0, {"phase": "load", "state": "start"}))
    log(Event("phase", 0, {"phase": "load", "state": "end", "seconds": 1.5}))
    log(Event("phases", 4, {"seconds": {"load": 1.5}, "wall_s": 2.0}))
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["kind"], r.get("phase")) for r in rows] == [("phase", "load"), ("phases", None)]


def test_a_run_accounts_for_every_phase(tiny_cfg):
    seen: list[Event] = []
    result = train(tiny_cfg(run__sample_every=2), listeners=[seen.append], progress=False)
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    finished = {r["phase"] for r in rows if r["kind"] == "phase"}
    assert {"data check", "load", "steps", "validation", "previews", "checkpoints", "final saves"} <= finished
    account = [r for r in rows if r["kind"] == "phases"]
    assert len(account) == 1 and account[0]["seconds"] == result.phases["seconds"]
    seconds = result.phases["seconds"]
    assert sum(seconds.values()) <= result.phases["wall_s"] + 1e-6
    assert 0 < result.phases["first_step_s"] <= result.phases["wall_s"]
    # the steps phase excludes the pauses: checkpoints and previews are their own
    started = [e.data["phase"] for e in seen if e.kind == "phase" and e.data["state"] == "start"]
    assert started.index("steps") < started.index("checkpoints") and "steps" in started[started.index("checkpoints"):]


def test_final_grid_is_skippable(tiny_cfg):
    result = train(tiny_cfg(sample__final=False), progress=False)
    run = Path(result.run_dir)
    assert not (run / "samples" / "final.png").exists()
    assert (run / "final" / "unet").is_dir()  # the model is saved all the same
    assert "previews" not in result.phases["seconds"]


def test_no_final_samples_flag_sets_the_field():
    from lowvram.cli import build_parser, resolve_config

    cfg, _, _ = resolve_config(build_parser().parse_args(["train", "--preset", "cpu", "--no-final-samples"]))
    assert cfg.sample.final is False
    cfg, _, _ = resolve_config(build_parser().parse_args(["train", "--preset", "cpu"]))
    assert cfg.sample.final is True


def test_a_stopped_run_still_gets_its_account(tiny_cfg):
    """A stop (Ctrl-C, SIGTERM, the panel's Stop) at a step boundary: the checkpoint it writes is its own
    phase, the steps phase ends, and the account is written as for a finished run."""
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3  # asked at the top of every step: stop before the fourth

    result = train(tiny_cfg(run__checkpoint_every=0), stop=stop, progress=False)
    assert result.status == "stopped" and result.step == 3
    seconds = result.phases["seconds"]
    assert "steps" in seconds and "checkpoints" in seconds and "previews" not in seconds
    rows = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["seconds"] for r in rows if r["kind"] == "phases"] == [seconds]

    # resuming it through the command line with --no-final-samples finishes without the grid
    from lowvram.cli import main

    assert main(["train", "--resume", str(result.run_dir), "--no-final-samples", "--no-progress"]) == 0
    assert (Path(result.run_dir) / "final" / "unet").is_dir()
    assert not (Path(result.run_dir) / "samples" / "final.png").exists()
