"""`flywheel up` as a newcomer runs it: after `flywheel demo`, the command starts the API, the
dashboards and the MLflow UI, prints their URLs; each opens in Chromium, a seeded item is rated with
the keyboard, the card's trace link opens in the MLflow UI it started, and Ctrl-C (SIGINT) stops
every process it started (no orphans). Real processes, real Voila, real Chromium."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from flywheel import store
from flywheel.demo.seed import JOKE_MODEL
from flywheel.demo.traffic import unrated

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path(os.environ.get("FLYWHEEL_TEST_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
LOAD = 120_000
READY = "Ctrl-C stops all of it."


@pytest.fixture(scope="module")
def home(make_module_store: Any, tmp_path_factory: pytest.TempPathFactory) -> store.Store:
    s: store.Store = make_module_store(tmp_path_factory.mktemp("workbench") / "home")
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    done = subprocess.run(
        [sys.executable, "-m", "flywheel", "demo"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return s


class Up:
    def __init__(self, proc: subprocess.Popen[str], lines: list[str]) -> None:
        self.proc, self.lines = proc, lines
        self.urls = {
            m.group(1).strip(): m.group(2)
            for line in lines
            if (m := re.match(r"\s+([A-Za-z ]+):\s+(http\S+)", line))
        }


@pytest.fixture(scope="module")
def up(home: store.Store) -> Iterator[Up]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    cmd = [sys.executable, "-m", "flywheel", "up", "--api-port", "0", "--dashboards-port", "0"]
    proc = subprocess.Popen(
        cmd + ["--mlflow-port", "0"], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("Dashboards"):  # warm, or not within its bound
                break
        assert any(READY in line for line in lines), lines
        yield Up(proc, lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # only when the test failed before its own Ctrl-C
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail("no /usr/bin/chromium: run scripts/install-test-deps (as root)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def test_up_opens_every_url_rates_with_the_keyboard_and_stops_everything_on_ctrl_c(
    home: store.Store, up: Up, browser: Any
) -> None:
    urls = up.urls
    assert {"API docs", "rating", "models", "MLflow UI"} <= set(urls), up.lines
    urls["api"] = urls["API docs"].removesuffix("/docs")

    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.set_default_timeout(30_000)
    # FastAPI's Swagger page loads its script from a CDN, which this machine cannot reach: the page
    # and the OpenAPI document it draws are checked, not the drawing
    page.goto(urls["API docs"], wait_until="domcontentloaded", timeout=LOAD)
    assert "Swagger UI" in page.title() and page.locator("#swagger-ui").count() == 1
    assert "/predict" in page.request.get(urls["api"] + "/openapi.json").json()["paths"]

    page.goto(urls["models"], wait_until="domcontentloaded", timeout=LOAD)
    page.wait_for_selector(".fw-models-panel .fw-versions table", timeout=LOAD)
    assert JOKE_MODEL in page.inner_text(".fw-models-panel")

    waiting = set(unrated(home, JOKE_MODEL))
    page.goto(urls["rating"], wait_until="domcontentloaded", timeout=LOAD)
    page.wait_for_selector(".fw-item .fw-card", timeout=LOAD)
    page.wait_for_function("() => window.__fwKeys === true")
    trace = page.get_attribute(".fw-item .fw-card", "data-trace-id")
    assert trace in waiting
    link = page.get_attribute(".fw-item .fw-card a.fw-trace-link", "href")
    assert link.startswith(urls["MLflow UI"] + "/#/experiments/"), link  # the MLflow UI `up` started
    page.keyboard.press("u")
    page.wait_for_selector(".fw-status:has-text('Saved thumbs up as alice')")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = home.tracking.get_trace_info(trace)
        got = [(a.name, a.value, a.source.source_id) for a in info.assessments or [] if a.valid is not False]
        if ("user_rating", "thumbs_up", "alice") in got:
            break
        time.sleep(0.5)
    assert ("user_rating", "thumbs_up", "alice") in got

    page.goto(urls["MLflow UI"], timeout=LOAD)
    page.wait_for_function("() => document.title.includes('MLflow')", timeout=LOAD)
    page.goto(link, timeout=LOAD)
    # MLflow's trace drawer names the trace by its id's first 8 hex digits, and shows its spans
    page.wait_for_selector(f"text={trace.removeprefix('tr-')[:8]}", timeout=LOAD)
    page.wait_for_selector("text=Predict.forward")
    page.close()

    # Ctrl-C: every process `up` started (servers, workers, kernels) is gone, and it exits 0
    family = psutil.Process(up.proc.pid).children(recursive=True)
    assert len(family) >= 3
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=60) == 0
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
