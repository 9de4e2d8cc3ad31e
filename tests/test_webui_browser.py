"""The panel in a real browser: fill the form, start a tiny job, watch it, sample it, stop it.

Needs the ``playwright`` Python package and Debian's chromium (``apt-get install chromium``); it never
downloads a browser. Set LOWVRAM_UPDATE_DOCS_SCREENSHOT=1 to refresh docs/img/webui.png from this run.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
CHROMIUM = os.environ.get("LOWVRAM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set LOWVRAM_CHROMIUM)",
                allow_module_level=True)

from lowvram.webui import callbacks as cb  # noqa: E402
from lowvram.webui.app import serve  # noqa: E402
from lowvram.webui.jobs import JobManager  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT_MS = 300_000  # only guards against a hung job; nothing here is a timing assertion
EXTRA = "\n".join([
    "data.num_images=24", "sample.steps=2", "sample.cfg_scales=1,3,5", "run.sample_every=2",
    "run.checkpoint_every=2", "run.val_every=2", "run.log_every=1", "run.tensorboard=false",
    "train.warmup_steps=1", "sample.prompts=a red circle on a blue background,a green square on a white background",
])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def panel(tmp_path):
    port = free_port()
    demo, state = serve("127.0.0.1", port, block=False, state=cb.PanelState(JobManager(tmp_path / "state")))
    yield f"http://127.0.0.1:{port}/", state
    state.manager.shutdown(timeout=30)
    demo.close()


def fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id}").locator("textarea, input").first
    box.fill(value)
    box.press("Tab")  # the change event fires when the field is left


def step_at_least(page, n: int) -> None:
    page.wait_for_function(
        "n => { const e = document.querySelector('#lv-step'); return e && parseInt(e.textContent) >= n }",
        arg=n, timeout=WAIT_MS)


def test_train_watch_sample_stop_in_the_browser(panel, tmp_path):
    url, state = panel
    run = tmp_path / "run"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#lv-status .lv-tile", timeout=WAIT_MS)

            # the form: a bad number first, to see the message naming the field
            fill(page, "lv-lr", "fast")
            page.get_by_text("train.lr = 'fast' (from panel: Learning rate)").wait_for(timeout=WAIT_MS)
            fill(page, "lv-lr", "2e-4")
            fill(page, "lv-out", str(run))
            fill(page, "lv-steps", "300")
            fill(page, "lv-resolution", "16")
            fill(page, "lv-batch", "4")
            page.get_by_text("Extra settings").click()
            fill(page, "lv-extra", EXTRA)
            page.get_by_text("settings valid").wait_for(timeout=WAIT_MS)

            page.locator("#lv-start").click()
            page.get_by_text("Started").wait_for(timeout=WAIT_MS)
            step_at_least(page, 1)
            page.wait_for_selector("#lv-gallery img", timeout=WAIT_MS)  # a preview grid

            # a reload re-attaches to the running job
            page.reload()
            step_at_least(page, 2)
            assert page.locator("#lv-out").locator("textarea, input").first.input_value() == str(run)
            assert page.locator("#lv-steps input").input_value() == "300"  # the job's form, not the defaults

            # Sample now at guidance 7, while the job goes on
            fill(page, "lv-sample-steps", "2")
            fill(page, "lv-guidance", "7")
            page.locator("#lv-sample-btn").click()
            page.wait_for_selector("#lv-sample img", timeout=WAIT_MS)
            page.get_by_text("guidance 7, ddim 2 steps").wait_for(timeout=WAIT_MS)
            assert state.manager.status().active  # sampling did not end the run

            step_at_least(page, 6)  # a few more points on the loss plot for the screenshot
            shot = tmp_path / "webui.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("LOWVRAM_UPDATE_DOCS_SCREENSHOT") == "1":
                (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, REPO / "docs" / "img" / "webui.png")

            page.locator("#lv-stop").click()
            page.wait_for_function(
                "() => document.querySelector('#lv-state')?.textContent === 'stopped'", timeout=WAIT_MS)
        finally:
            browser.close()

    status = state.manager.status()
    assert status.state == "stopped" and status.exit_code == 0, status.error
    from lowvram.train.checkpoint import latest_checkpoint

    last = latest_checkpoint(run / "checkpoints")
    assert last is not None and int(last.name.removeprefix("step-")) == status.step
    assert shot.stat().st_size > 10_000
