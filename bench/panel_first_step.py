"""The panel's job path (webui/jobs.py) on the same job: first step after Start, warm spare against a fresh process.

Run through ``python bench/first_step.py --panel`` (it builds the tiny pipeline and data). Per repeat, in
turn: (a) a fresh child (``JobManager(warm_start=False)``), (b) the spare (the shipped policy: the next
spare starts after the job's first step), (c) the spare while the next spare imports at once (the policy
not taken). Each reads ``first_step_s`` from the run's account (a fresh child counts from its process's
start, a spare from the hand-over) and the wall time of ``JobManager.start`` (saving the plan, handing over).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from vs_diffusers import med, ratio

MODES = ("fresh", "warm", "warm, next spare at once")


def planned_job(work: Path, out: Path):
    """The tiny LoRA job of ``first_step.second_run``, planned as the panel's Start does."""
    from lowvram import api

    items = {"run.task": "lora", "model.pretrained": str(work / "tiny-sd1"), "data.source": str(work / "data-64"),
             "run.steps": 2, "run.out": str(out), "run.seed": 0, "sample.final": False, "train.batch_size": 4,
             "lora.rank": 4, "lora.alpha": 4, "data.resolution": 64, "train.warmup_steps": 0}
    settings = [api.Setting(k, v, "bench") for k, v in items.items()]
    return api.plan(api.resolve("cpu", settings=settings, probe_hardware=False), processes=1)


def wait_spare(manager) -> None:
    while manager.status() is not None and not (manager.spare and manager.spare.ready_file.exists()):
        time.sleep(0.1)


def one_job(manager, work: Path, at_once: bool = False) -> tuple[float, float]:
    """Start the job, wait for its end; (first_step_s from its account, seconds inside ``start``)."""
    from lowvram.webui.spare import Spare

    out = work / "panel-out"
    shutil.rmtree(out, ignore_errors=True)
    planned = planned_job(work, out)
    t0 = time.perf_counter()
    job = manager.start(planned)
    start_s = time.perf_counter() - t0
    extra = Spare(manager._new_job_dir(), manager.python, manager._child_env()) if at_once else None
    while manager.status().active:
        time.sleep(0.05)
    if extra is not None:
        extra.close()
    if job.status.state != "done":
        raise SystemExit(f"panel job failed: {job.status.error}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["kind"] == "phases")["first_step_s"], start_s


def spare_rss_mib(manager) -> float:
    status = Path(f"/proc/{manager.spare.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def panel_bench(work: Path, repeats: int, threads: int) -> None:
    from lowvram.webui.jobs import JobManager

    os.environ.update({"OMP_NUM_THREADS": str(threads), "LOWVRAM_CACHE": str(work / "cache-panel")})
    fresh = JobManager(work / "panel-fresh")
    one_job(fresh, work)  # the first run: plan profiled, latents encoded
    warm = JobManager(work / "panel-warm", warm_start=True)
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    rss: list[float] = []
    try:
        for r in range(repeats):
            wait_spare(warm)  # no spare importing while the fresh child runs
            results["fresh"].append(one_job(fresh, work))
            for mode, at_once in (("warm", False), ("warm, next spare at once", True)):
                wait_spare(warm)  # an idle spare, imports done: what the user finds after a while
                rss.append(spare_rss_mib(warm))
                results[mode].append(one_job(warm, work, at_once))
            print(f"  repeat {r + 1}/{repeats}: first step " + ", ".join(f"{m} {results[m][-1][0]:.2f} s" for m in MODES),
                  flush=True)
    finally:
        warm.shutdown()
    print("\n| panel job | first step from Start, s | inside JobManager.start, s | first step / fresh |")
    print("|---|---|---|---|")
    base = [f for f, _ in results["fresh"]]
    for mode in MODES:
        first = [f for f, _ in results[mode]]
        print(f"| {mode} | {med(first)} | {med([s for _, s in results[mode]])} | {ratio(first, base)} |")
    print(f"\nidle spare's resident memory (VmRSS): {med(rss)} MiB")


def main() -> None:
    """``python bench/panel_first_step.py [...]`` is ``python bench/first_step.py --panel [...]``."""
    import sys

    import first_step

    sys.argv = [sys.argv[0], "--panel", *sys.argv[1:]]
    first_step.main()


if __name__ == "__main__":
    main()
