"""The fuzz test: bad invocations of every subcommand (tests/fuzz_cli.py) run in-process against the real
entry point, each within a time bound; every one must exit 2 with one line on stderr, no traceback, and
write nothing. A seeded subset runs by default; the whole corpus with -m slow.
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest
from fuzz_cli import Workspace, corpus, sample_of

from lowvram.cli import main

CASE_SECONDS = 60  # a case that runs longer is a hang
DEFAULT_CASES = 60
SEED = 17


class Hang(BaseException):
    """Raised by the alarm; a BaseException so no `except Exception` in the code under test swallows it."""


def snapshot(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``roots`` with its kind, size and modification time: what "written" compares
    (rewriting a file with the same bytes counts as a write too)."""
    out: dict[str, tuple[int, int, int]] = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            for name in dirs + files:
                st = os.lstat(os.path.join(dirpath, name))
                out[os.path.join(dirpath, name)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def run_case(argv: tuple[str, ...], capsys) -> tuple[int | str, str]:
    """(exit code or what went wrong, stderr) of ``lowvram argv`` in this process, within CASE_SECONDS."""
    def on_alarm(signum, frame):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(CASE_SECONDS)
    try:
        code: int | str = main(list(argv))
    except Hang:
        code = "hang"
    except SystemExit as e:
        code = f"SystemExit({e.code})"
    except BaseException as e:  # noqa: BLE001 — any escape is what the test looks for
        code = f"traceback: {type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, finished_tiny_run) -> Workspace:
    import shutil

    root = tmp_path_factory.mktemp("fuzz")
    good = root / "runs" / "good"
    shutil.copytree(finished_tiny_run, good)
    ws = Workspace(root, good)
    corpus(ws)  # make every file and damaged run the cases name, before any snapshot
    return ws


def check(cases, workspace, capsys, monkeypatch) -> None:
    cwd = workspace.root / "cwd"
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("LOWVRAM_CACHE", str(workspace.root / "cache"))
    failures = []
    for case in cases:
        before = snapshot(workspace.root)
        code, err = run_case(case.argv, capsys)
        after = snapshot(workspace.root)
        lines = err.strip().splitlines()
        problems = []
        if code != 2:
            problems.append("silent acceptance" if code == 0 else f"exit {code}")
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"stderr is {len(lines)} lines: {err.strip()[-300:]!r}")
        if "Traceback" in err:
            problems.append("traceback on stderr")
        if before != after:
            changed = sorted(set(before.items()) ^ set(after.items()))[:3]
            problems.append(f"wrote {changed}")
        if problems:
            failures.append(f"{case.name} {list(case.argv)[:6]}: {'; '.join(problems)}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


def test_corpus_covers_every_subcommand_with_hundreds_of_cases(workspace):
    from lowvram.cli import COMMANDS

    cases = corpus(workspace)
    assert len(cases) >= 500
    assert {c.argv[0] for c in cases if c.argv} >= set(COMMANDS)
    assert corpus(workspace) == cases  # deterministic: the same corpus every time


def test_seeded_subset_of_bad_invocations_fails_cleanly(workspace, capsys, monkeypatch):
    check(sample_of(corpus(workspace), DEFAULT_CASES, SEED), workspace, capsys, monkeypatch)


@pytest.mark.slow
def test_every_bad_invocation_fails_cleanly(workspace, capsys, monkeypatch):
    check(corpus(workspace), workspace, capsys, monkeypatch)
