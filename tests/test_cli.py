"""The `lowvram` command line: exit codes, one-line errors, and the commands on a tiny run."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_RUN

from lowvram.cli import main


def tiny_flags(out) -> list[str]:
    flags = ["--preset", "cpu", "--out", str(out), "--no-progress"]
    for key, value in TINY_RUN.items():
        if isinstance(value, list):
            value = ",".join(map(str, value))
        flags += ["--set", f"{key}={value}"]
    return flags


def test_plan_prints_the_resolved_config(capsys):
    assert main(["plan", "--preset", "cpu", "--steps", "17", "--set", "train.lr=3e-4"]) == 0
    out = capsys.readouterr().out
    assert "steps: 17" in out and "lr: 0.0003" in out and "preset: cpu" in out
    assert "# memory: the run peaks at" in out and "(fits; budget" in out
    # each value's source, as the run folder keeps it
    assert "run.steps: --steps" in out and "train.lr: --set train.lr=3e-4" in out


def test_train_refuses_a_job_no_plan_fits(capsys, tmp_path):
    # the cpu preset keeps 0.5 GiB for the process and 1.5 GiB of margin: 2.01 GiB leaves ~10 MiB for tensors
    code = main(["train", "--preset", "cpu", "--vram", "2.01", "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "GiB" in err and err.startswith("error:")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_bad_value_is_one_line_naming_field_and_flag(capsys, tmp_path):
    code = main(["train", "--preset", "cpu", "--out", str(tmp_path / "r"), "--set", "train.lr=fast"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "train.lr" in err and "--set train.lr=fast" in err and "expected a number" in err
    assert not (tmp_path / "r").exists()


def test_unknown_preset_lists_the_available_ones(capsys):
    assert main(["plan", "--preset", "rx5700"]) == 2
    err = capsys.readouterr().err
    assert "rx570" in err and "gtx1650-4gb" in err


def test_presets_lists_every_card(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("cpu", "rx570", "rx570-8gb", "gtx1650-4gb", "rtx2060-6gb", "rtx3070-8gb", "rx6600-8gb"):
        assert name in out


def test_doctor_reports_the_cpu(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "cpu"
    assert report["recommended_preset"] == "cpu"


def test_gpu_preset_on_cpu_warns_once_and_plans(capsys):
    assert main(["plan", "--preset", "rx570"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "rx570" in err


def test_train_sample_eval_and_resume_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_flags(out), "--set", "sample.guidance=1.5"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    png = tmp_path / "s.png"
    assert main(["sample", "--run", str(out), "--prompt", "a red circle on a blue background",
                 "--cfg", "1", "4", "--steps", "2", "--out", str(png)]) == 0
    assert png.is_file()
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--samples", "1", "--steps", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["overall"] <= 1.0 and report["samples"] == len(report["per_prompt"])
    assert report["cfg_scale"] == 1.5  # no --cfg: the run's sample.guidance
    assert (out / "eval.json").is_file()
    # extend the finished run by two steps
    assert main(["train", "--resume", str(out), "--steps", "6", "--no-progress"]) == 0
    assert "done: 6 steps" in capsys.readouterr().out


def test_resume_of_a_folder_that_is_no_run_fails_clearly(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a lowvram run folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--help"], ["plan", "--help"], ["sample", "--help"],
                                  ["eval", "--help"], ["doctor", "--help"], ["presets", "--help"]])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "usage: lowvram" in capsys.readouterr().out
