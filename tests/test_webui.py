"""The web panel's callbacks without a browser: field checks, config messages, a real tiny job, crashes."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from lowvram.errors import ConfigError, DataError, LowvramError
from lowvram.webui import callbacks as cb
from lowvram.webui.jobs import Job, JobManager, describe_exit
from lowvram.webui.tail import JsonlTail

# The rest of conftest.TINY_RUN, typed into the panel's "extra settings" box.
TINY_EXTRA = "\n".join([
    "data.num_images=24", "sample.steps=2", "sample.cfg_scales=1,3", "run.sample_every=2",
    "run.checkpoint_every=2", "run.val_every=2", "run.log_every=1", "run.tensorboard=false",
    "train.warmup_steps=1", "sample.prompts=a red circle on a blue background",
])


def tiny_form(out: Path, **kw) -> cb.Form:
    values = dict(preset="cpu", task="text2img", data="builtin", model="tiny", out=str(out), steps=200,
                  lr="2e-4", rank=16, resolution=16, batch_size=4, grad_accum=1, extra=TINY_EXTRA)
    values.update(kw)
    return cb.Form(**values)


def wait_for(manager: JobManager, done, what: str, limit: float = 300.0):
    """Poll like the page does until ``done(status)``; the limit only guards against a hung child."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        s = manager.status()
        if done(s):
            return s
        if not s.active and not done(s):
            pytest.fail(f"job ended ({s.state}) before {what}: {s.error}")
        time.sleep(0.2)
    pytest.fail(f"no {what} within {limit:.0f} s; last status {manager.status()}")


# ---- field checks show the CLI's messages ------------------------------------------------------------
def test_missing_data_folder_shows_the_cli_message(tmp_path):
    from lowvram.data.report import DataReport
    from lowvram.data.sources import list_source

    missing = tmp_path / "nope"
    with pytest.raises(DataError) as cli:
        list_source(missing, "auto", DataReport())
    check = cb.check_data(str(missing))
    assert not check.ok and check.message == str(cli.value)
    assert "does not exist" in check.message and "--data" in check.message


def test_data_folder_with_images_is_counted(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a caption")
    check = cb.check_data(str(tmp_path))
    assert check.ok and "3 image files" in check.message
    assert cb.check_data("builtin").ok


def test_model_checks_follow_the_task(tmp_path):
    assert cb.check_model("tiny", "text2img").ok
    bad_size = cb.check_model("huge", "latent")
    assert not bad_size.ok and "tiny" in bad_size.message
    missing = cb.check_model(str(tmp_path / "sd15"), "lora")
    assert not missing.ok and "does not exist" in missing.message
    assert not cb.check_model("tiny", "lora").ok  # a LoRA needs a checkpoint, not a size


def test_output_folder_holding_a_run_points_to_resume(tmp_path):
    assert cb.check_out(str(tmp_path / "new")).ok
    (tmp_path / "run" / "checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-00000002" / "state.json").write_text("{}")
    check = cb.check_out(str(tmp_path / "run"))
    assert not check.ok and "already holds a run" in check.message and "--resume" in check.message
    assert not cb.check_out("").ok


def test_bad_numbers_are_reported_by_field_and_source(tmp_path):
    form = tiny_form(tmp_path / "run", lr="fast", steps=-3, resolution=20)
    with pytest.raises(ConfigError) as err:
        cb.build_config(form)
    text = str(err.value)
    assert "train.lr = 'fast' (from panel: Learning rate)" in text
    assert "run.steps = -3 (from panel: Steps)" in text
    assert "data.resolution = 20 (from panel: Resolution): expected a multiple of 8" in text
    shown = cb.check_settings(form)
    assert "train.lr" in shown and "run.steps" in shown and shown.startswith("✗")


def test_extra_settings_lines_are_checked(tmp_path):
    cfg = cb.build_config(tiny_form(tmp_path / "run"))
    assert cfg.sample.cfg_scales == [1.0, 3.0] and cfg.run.sample_every == 2 and cfg.data.resolution == 16
    assert cfg.train.optimizer == "adamw"  # from the cpu preset
    with pytest.raises(ConfigError) as err:
        cb.build_config(tiny_form(tmp_path / "run", extra="train.lr 1e-4\ntrain.lrr=1"))
    assert "line 1" in str(err.value) and "section.key=value" in str(err.value)
    assert "unknown key 'train.lrr'" in str(err.value) and "train.lr" in str(err.value)


def test_start_refuses_an_invalid_form_and_launches_nothing(tmp_path):
    state = cb.PanelState(JobManager(tmp_path / "state"))
    text = cb.start_job(state, tiny_form(tmp_path / "run", data=str(tmp_path / "missing"), batch_size=0))
    assert text.startswith("### Not started")
    assert "does not exist" in text and "train.batch_size" in text
    assert state.manager.job is None and state.manager.status().state == "idle"


def test_start_plans_against_the_card_and_refuses_a_job_that_cannot_fit(tmp_path):
    state = cb.PanelState(JobManager(tmp_path / "state"))
    text = cb.start_job(state, tiny_form(tmp_path / "run", extra=TINY_EXTRA + "\nmemory.vram_gib=0.001"))
    assert text.startswith("### Not started") and "GiB" in text, text
    assert state.manager.job is None and state.manager.status().state == "idle"


def test_preset_knobs_and_card(tmp_path):
    knobs = cb.preset_knobs("gtx1650-4gb", "lora", "")
    assert knobs["batch_size"] == 1 and knobs["grad_accum"] == 4 and knobs["resolution"] == 512
    assert cb.preset_knobs("cpu", "text2img", "tiny")["resolution"] == 24
    card = cb.preset_card("gtx1650-4gb")
    assert "GTX 1650" in card and "3.35 GiB" in card  # 4 - 0.35 context - 0.3 margin
    assert "not profiled yet" in card or "Memory table" in card
    table = "\n".join(cb.memory_table({"budget_gib": 3.35, "workloads": {"W1": {"peak_gib": 2.5, "fits": True},
                                                                           "W3": {"peak_gib": 7.1, "fits": False}}}))
    assert "| W1 |" in table and "2.50 GiB | ✓ fits" in table and "7.10 GiB | ✗ does not fit" in table
    assert "unknown preset" in cb.preset_card("no-such-card")


def test_plan_reports_memory_and_config(tmp_path):
    text = cb.plan_report(tiny_form(tmp_path / "run"))
    assert "Resolved config" in text and "resolution: 16" in text
    assert "GiB" in text  # the planner's profile (or the card budget when it is missing)
    bad = cb.plan_report(tiny_form(tmp_path / "run", lr="x"))
    assert bad.startswith("### Cannot plan yet") and "train.lr" in bad


# ---- serving safety -----------------------------------------------------------------------------------
def test_only_loopback_is_served_without_credentials():
    from lowvram.webui.auth import resolve_auth

    assert resolve_auth("127.0.0.1", None, env={}) is None
    assert resolve_auth("::1", None, env={}) is None and resolve_auth("localhost", None, env={}) is None
    with pytest.raises(LowvramError, match="without a password"):
        resolve_auth("192.168.1.5", None, env={})
    with pytest.raises(LowvramError, match="--auth"):
        resolve_auth("0.0.0.0", None, env={})
    assert resolve_auth("0.0.0.0", "ann:secret", env={}) == ("ann", "secret")
    assert resolve_auth("0.0.0.0", None, env={"LOWVRAM_UI_AUTH": "bob:pw:x"}) == ("bob", "pw:x")
    with pytest.raises(LowvramError, match="USER:PASS"):
        resolve_auth("127.0.0.1", "nopassword", env={})


# ---- following files --------------------------------------------------------------------------------
def test_jsonl_tail_waits_for_complete_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = JsonlTail(path)
    assert tail.read() == []
    with path.open("w") as f:
        f.write(json.dumps({"step": 1}) + "\n" + '{"step": ')
    assert tail.read() == [{"step": 1}]
    with path.open("a") as f:
        f.write('2}\nnot json\n{"step": 3}\n')
    assert tail.read() == [{"step": 2}, {"step": 3}]
    assert tail.read() == [] and not tail.restarted
    path.write_text(json.dumps({"step": 1}) + "\n")  # a new run in the same folder
    assert tail.read() == [{"step": 1}] and tail.restarted


def test_loss_frame_splits_series_and_drops_nonfinite():
    rows = [{"kind": "step", "step": 1, "loss": 1.0, "stage": "autoencoder"},
            {"kind": "step", "step": 1, "loss": 0.9}, {"kind": "step", "step": 2, "loss": "nan"},
            {"kind": "val", "step": 2, "val_loss": 0.8}, {"kind": "nonfinite", "step": 3, "loss": "inf"}]
    df = cb.loss_frame(rows)
    assert sorted(df.series.unique()) == ["autoencoder", "train", "validation"]
    assert len(df) == 3 and df[df.series == "validation"].loss.item() == 0.8
    assert str(df.step.dtype) == "int64" and str(df.loss.dtype) == "float64"  # numeric axes, not categories
    assert cb.loss_frame([{"kind": "start", "step": 0}]) is None


# ---- crashing training processes ----------------------------------------------------------------------
CRASHER = """
import json, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"kind": "start", "step": 0, "data": {"total": 10}}) + "\\n")
    f.write(json.dumps({"kind": "step", "step": 1, "data": {"loss": 0.5, "it_s": 2.0}}) + "\\n")
print("Traceback (most recent call last):\\nRuntimeError: HIP error: invalid device function", file=sys.stderr)
sys.exit(1)
"""


def test_a_crashing_process_is_reported_not_raised(tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    job = Job(job_dir, [sys.executable, "-c", CRASHER, str(job_dir / "events.jsonl")], str(tmp_path / "run"),
              "text2img", dict(os.environ))
    s = job.wait(60)
    assert s.state == "failed" and s.exit_code == 1 and s.step == 1
    assert "HIP error: invalid device function" in s.error and "exit code 1" in s.error
    shown = cb.error_markdown(s)
    assert "failed" in shown and "HIP error" in shown
    assert "failed" in cb.status_html(s)


def cuda_plan(folder: Path) -> Path:
    """A saved plan that asks for run.device=cuda: on a machine without a GPU the child refuses it (exit 2)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU (run.device=cuda must fail)")
    from lowvram import api

    planned = api.plan(api.resolve("cpu", settings=[api.Setting("run.device", "cuda", "test")], config_file=None,
                                   probe_hardware=False))
    api.save_plan(planned, folder / "plan")
    return folder / "plan"


def test_child_turns_a_config_error_into_an_event(tmp_path):
    from lowvram.webui import child

    cuda_plan(tmp_path)
    events = tmp_path / "events.jsonl"
    code = child.main(["--plan", str(tmp_path / "plan"), "--events", str(events), "--stop-file", str(tmp_path / "stop")])
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    assert code == 2
    assert rows[-1]["kind"] == "error" and "run.device" in rows[-1]["data"]["message"]


def test_child_stops_when_asked_or_when_the_panel_is_gone(tmp_path, monkeypatch):
    from lowvram.webui import child

    stop = child.stop_requested(tmp_path / "stop", parent_pid=os.getppid())
    assert not stop()
    (tmp_path / "stop").touch()
    assert stop()
    orphan = child.stop_requested(tmp_path / "other", parent_pid=os.getppid())
    monkeypatch.setattr(child.os, "getppid", lambda: 1)  # re-parented: the panel died
    assert orphan()


def test_exit_codes_read_like_sentences():
    assert describe_exit(2) == "exit code 2"
    assert "SIGKILL" in describe_exit(-signal.SIGKILL) and "out-of-memory" in describe_exit(-signal.SIGKILL)


# ---- a real tiny job ------------------------------------------------------------------------------------
def test_tiny_job_runs_previews_samples_stops_and_survives_a_kill(tmp_path):
    state = cb.PanelState(JobManager(tmp_path / "state"))
    run = tmp_path / "run"
    form = tiny_form(run)
    started = cb.start_job(state, form)
    assert started.startswith("Started"), started
    assert "already running" in cb.start_job(state, tiny_form(tmp_path / "other"))  # one job at a time

    s = wait_for(state.manager, lambda s: s.step >= 1, "a training step")
    assert s.loss is not None and s.it_s and s.peak_mem_mib and s.total == 200
    assert 'id="lv-step"' in cb.status_html(s)
    s = wait_for(state.manager, lambda s: s.last_sample and s.last_checkpoint, "a sample grid and a checkpoint")
    assert Path(s.last_sample).is_file()
    assert cb.sample_files(str(run)) and cb.gallery_items(cb.sample_files(str(run)))
    assert {"train", "validation"} <= set(cb.loss_frame(cb.read_metrics(state, str(run))).series)

    # Sample now: the latest checkpoint's EMA weights in this process, while the job goes on
    image, info = cb.sample_now(state, str(run), "a red circle on a blue background", "", 4.0, 2, 3, "ddim")
    assert image is not None, info
    assert image.size[0] >= cb.PREVIEW_MIN_SIDE and "guidance 4" in info and "EMA weights" in info
    again, _ = cb.sample_now(state, str(run), "a red circle on a blue background", "", 4.0, 2, 3, "ddim")
    assert state._model is not None

    assert "stopping" in cb.stop_job(state)
    s = wait_for(state.manager, lambda s: not s.active, "the end of the job")
    assert s.state == "stopped" and s.exit_code == 0, s.error
    from lowvram.train.checkpoint import latest_checkpoint

    last = latest_checkpoint(run / "checkpoints")
    assert last is not None and Path(s.last_checkpoint) == last and int(last.name[5:]) == s.step
    assert not (run / "final").exists()

    # the same folder is now a run to resume, not to overwrite
    assert "already holds a run" in cb.start_job(state, form)
    assert cb.resume_job(state, str(run), 300).startswith("Resuming")
    os.kill(state.manager.job.proc.pid, signal.SIGKILL)  # what the out-of-memory killer does
    s = state.manager.job.wait(60)
    assert s.state == "failed" and "SIGKILL" in s.error
    assert "failed" in cb.error_markdown(s)
    # the panel is unharmed: it reports, checks and still refuses bad input as before
    assert cb.check_out(str(run)).ok is False and latest_checkpoint(run / "checkpoints") == last
    assert cb.stop_job(state) == "the job is not running"
