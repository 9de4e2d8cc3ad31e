"""Named failures: damaged run folders, hostile YAML, pipes and devices where files belong, a full or
read-only disk. Each ends in one line that names the file or folder and the fix; nothing saved is lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import assert_checkpoints_equal

from lowvram.cli import main
from lowvram.config import load_yaml
from lowvram.errors import ConfigError, DataError
from lowvram.fsutil import storage_error, sweep_leftovers
from lowvram.train import checkpoint as ckpt

STEP2, STEP4 = "step-00000002", "step-00000004"


@pytest.fixture
def run(finished_tiny_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_tiny_run, out)
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---- damaged run folders ------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, file", [
    (lambda c: (c / "rng.safetensors").unlink(), "rng.safetensors"),
    (lambda c: (c / "state.json").write_text(json.dumps({"step": 4})), "state.json"),
    (lambda c: (c / "state.json").write_text("{oops"), "state.json"),
    (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:100]), "model.safetensors"),
    (lambda c: (c / "optimizer.safetensors").write_bytes(b"\0" * 4096), "optimizer.safetensors"),
    (lambda c: (c / "ema.safetensors").unlink(), "ema.safetensors"),
], ids=["rng-missing", "state-incomplete", "state-bad-json", "model-truncated", "optimizer-zeroed", "ema-missing"])
def test_resume_of_a_damaged_checkpoint_names_the_file(run, capsys, damage, file):
    damage(run / "checkpoints" / STEP4)
    before = sorted(p.name for p in run.rglob("*"))
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert str(run / "checkpoints" / STEP4 / file) in line and "--from-checkpoint" in line
    assert sorted(p.name for p in run.rglob("*")) == before  # refused before anything was written


def test_stray_folders_in_checkpoints_are_ignored(run):
    (run / "checkpoints" / "step-abc").mkdir()
    shutil.copytree(run / "checkpoints" / STEP2, run / "checkpoints" / "step-00000400.bak")
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == [STEP2, STEP4]


def test_from_checkpoint_resumes_an_older_one_bitwise(run, tmp_path, capsys):
    straight = tmp_path / "straight"
    shutil.copytree(run, straight)
    (run / "checkpoints" / STEP4 / "model.safetensors").write_bytes(b"\0" * 64)  # the newest is damaged
    assert main(["train", "--resume", str(run), "--from-checkpoint", "step-2", "--no-progress"]) == 0
    assert "set aside 1 newer checkpoint" in capsys.readouterr().out
    assert (run / "checkpoints" / f"{STEP4}.abandoned").is_dir()
    assert_checkpoints_equal(straight, run, 4, "after resuming from the older checkpoint")


def test_unknown_from_checkpoint_lists_the_ones_there(run, capsys):
    assert main(["train", "--resume", str(run), "--from-checkpoint", "step-7"]) == 2
    assert f"available: {STEP2}, {STEP4}" in one_error_line(capsys)


@pytest.mark.parametrize("damage, needle", [
    (lambda r: (r / "final" / "lowvram_model.json").write_text("{"), "lowvram_model.json"),
    (lambda r: (r / "final" / "lowvram_model.json").write_bytes(b"\0" * 32), "lowvram_model.json"),
    (lambda r: shutil.rmtree(r / "final" / "text_encoder"), "text_encoder"),
    (lambda r: (r / "final" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64), "unet"),
], ids=["bad-json", "zeroed-json", "missing-part", "zeroed-weights"])
def test_sample_of_a_damaged_final_model_names_it_and_never_asks_a_hub(run, capsys, monkeypatch, damage, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # even allowed to go online, nothing may try
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("a hub lookup was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    damage(run)
    assert main(["sample", "--run", str(run), "--steps", "2", "--which", "final"]) == 2
    line = one_error_line(capsys)
    assert needle in line and str(run / "final") in line


def test_a_killed_final_save_leaves_the_old_final_whole(run, monkeypatch):
    """Extending a finished run and dying mid-save: final/ is the old model, whole; the leftover is swept."""
    from lowvram.pipeline import TextToImage

    old = (run / "final" / "lowvram_model.json").read_text()
    real = TextToImage.save

    def die_half_way(self, folder, extra=None):
        self.unet.save_pretrained(Path(folder) / "unet")
        raise KeyboardInterrupt  # killed after the UNet of the new step was written

    monkeypatch.setattr(TextToImage, "save", die_half_way)
    assert main(["train", "--resume", str(run), "--steps", "5", "--no-progress"]) == 130
    assert (run / "final" / "lowvram_model.json").read_text() == old
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    monkeypatch.setattr(TextToImage, "save", real)
    os.makedirs(run / "checkpoints" / ".tmp-step-00000009-999999999")  # a dead process's leftover
    assert main(["train", "--resume", str(run), "--steps", "5", "--no-progress"]) == 0
    assert json.loads((run / "final" / "lowvram_model.json").read_text())["step"] == 5
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_sweep_keeps_leftovers_of_live_processes(tmp_path):
    live = tmp_path / f".tmp-step-00000001-{os.getppid()}"
    dead = tmp_path / ".tmp-step-00000001-999999999"
    live.mkdir(), dead.mkdir()
    assert sweep_leftovers(tmp_path) == [dead] and live.is_dir()


# ---- hostile YAML -------------------------------------------------------------------------------------
def _bomb() -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]")
    return "\n".join(lines)


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_text(_bomb()), "aliases"),
    (lambda p: p.write_text("run: " + "[" * 200 + "]" * 200), "nested"),
    (lambda p: p.write_bytes(b"#" * (2 << 20)), "bytes"),
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: p.symlink_to("/dev/zero"), "not a regular file"),
    (lambda p: p.mkdir(), "a folder"),
], ids=["alias-bomb", "deep-nesting", "huge", "fifo", "device", "folder"])
def test_hostile_yaml_is_refused_at_once(tmp_path, make, words):
    path = tmp_path / "config.yaml"
    make(path)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=words) as e:
        load_yaml(path)
    assert str(path) in str(e.value) and time.monotonic() - start < 30


# ---- data that is not an image ------------------------------------------------------------------------
def test_fifo_and_device_captions_are_reported_not_read(tmp_path):
    from test_data_sources import _img

    from lowvram.data.sources import list_folder

    for name in ("a", "b", "c"):
        _img(tmp_path / f"{name}.png")
    os.mkfifo(tmp_path / "a.txt")  # reading it would block the run forever
    (tmp_path / "b.txt").symlink_to("/dev/zero")  # reading it would never end
    (tmp_path / "c.txt").write_text("x" * (200 << 10))
    found = {c.rel: c for c in list_folder(tmp_path)}
    assert found["a.png"].caption is None and "not a regular file" in found["a.png"].caption_warning[1]
    assert found["b.png"].caption is None and "not a regular file" in found["b.png"].caption_warning[1]
    assert found["c.png"].caption_warning[0] == "caption_too_long" and len(found["c.png"].caption) == 64 << 10


def test_kohya_repeat_counts_are_bounded(tmp_path):
    from test_data_sources import _img

    from lowvram.data.report import DataReport
    from lowvram.data.sources import list_kohya

    _img(tmp_path / "99999999999999999999_big" / "a.png")
    with pytest.raises(DataError, match="repeats"):
        list_kohya(tmp_path, DataReport())


# ---- full and read-only disks -------------------------------------------------------------------------
@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only")])
def test_disk_errors_while_training_are_one_line_and_the_run_resumes(finished_tiny_run, tmp_path, capsys,
                                                                      monkeypatch, code, words):
    out = tmp_path / "run"
    real = ckpt.save_file

    def refuse(tensors, path, *a, **k):
        if STEP4 in str(path) and str(path).endswith("optimizer.safetensors"):
            raise OSError(code, os.strerror(code), str(path))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", refuse)
    # the finished run's own config: the same run, in another folder
    argv = ["train", "--preset", "cpu", "--config", str(finished_tiny_run / "config.yaml"), "--out", str(out),
            "--no-progress"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert words in line and f"'{out / 'checkpoints'}'" in line and f"resume with `lowvram train --resume {out}`" in line
    assert "MiB free" in line and "needs about" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == [STEP2]  # the earlier save is intact, no leftover
    if code == errno.ENOSPC:  # once space is back, the run resumes to the very weights of the uninterrupted one
        monkeypatch.setattr(ckpt, "save_file", real)
        assert main(["train", "--resume", str(out), "--no-progress"]) == 0
        assert_checkpoints_equal(finished_tiny_run, out, 4, "after the disk error and a resume")


def test_storage_errors_of_other_writers_are_recognised(tmp_path):
    rust = RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space\" })")
    err = storage_error(rust, tmp_path)
    assert err is not None and "disk is full" in str(err) and f"--resume {tmp_path}" in str(err)
    assert storage_error(ValueError("shape mismatch")) is None
