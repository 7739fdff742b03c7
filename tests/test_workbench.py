"""`flywheel up` as a newcomer runs it: after `flywheel demo`, the command starts the API, the
dashboards and the MLflow UI, prints their URLs; each opens in Chromium, a seeded item is rated with
the keyboard, the card's trace link opens in the MLflow UI it started (with the login `up` printed;
tests/test_workbench_security.py checks that UI's locks), and Ctrl-C (SIGINT) stops
every process it started (no orphans). Real processes, real Voila, real Chromium."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from processes import interrupt_up
from test_dashboards import browser  # noqa: F401  # the fixture (one Chromium per module)

from flywheel import store
from flywheel.demo.seed import JOKE_MODEL
from flywheel.demo.traffic import unrated

pytestmark = [pytest.mark.slow, pytest.mark.browser]

LOAD = 120_000
IDLE = 10  # FLYWHEEL_KERNEL_IDLE_TIMEOUT of the workbench here (seconds)
READY = "Ctrl-C stops all of it."
CARD = ".fw-item .fw-card"
MOVED_ON = (
    "t => { const c = document.querySelector('.fw-item .fw-card'); return !c || c.dataset.traceId !== t; }"
)
DOCS_SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temp folder; with FLYWHEEL_REFRESH_DOCS=1 its screenshots are copied over docs/screenshots/."""
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    if os.environ.get("FLYWHEEL_REFRESH_DOCS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for png in sorted(folder.glob("*.png")):
            shutil.copyfile(png, DOCS_SCREENSHOTS / png.name)


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
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "FLYWHEEL_KERNEL_IDLE_TIMEOUT": str(IDLE)}
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
        interrupt_up(proc)  # a test failed before its own Ctrl-C: stop it the same way


def wait_interactive(page: Any) -> str:
    page.wait_for_selector(CARD, timeout=LOAD)
    page.wait_for_function(
        "() => window.__fwKeys === true && !document.querySelector('button.fw-rate-up').disabled"
    )
    return str(page.get_attribute(CARD, "data-trace-id"))


def answers_of(home: store.Store, trace: str, by: str, want: int, timeout: float = 30) -> dict[str, Any]:
    """{assessment name: value} of `by` on `trace` once `want` of them are in MLflow (the kernel
    delivers them through its outbox)."""
    deadline = time.monotonic() + timeout
    while True:
        info = home.tracking.get_trace_info(trace)
        got = {
            a.name: a.value
            for a in info.assessments or []
            if a.valid is not False and a.source.source_id == by
        }
        if len(got) >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_up_opens_every_url_and_rates_with_the_keyboard(
    home: store.Store,
    up: Up,
    browser: Any,  # noqa: F811
    screenshots: Path,
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

    page.set_viewport_size({"width": 1100, "height": 1250})
    page.goto(urls["models"], wait_until="domcontentloaded", timeout=LOAD)
    page.wait_for_selector(".fw-models-panel .fw-versions table", timeout=LOAD)
    assert JOKE_MODEL in page.inner_text(".fw-models-panel")
    page.screenshot(path=str(screenshots / "workbench-models.png"), full_page=True)
    page.set_viewport_size({"width": 1100, "height": 900})

    waiting = set(unrated(home, JOKE_MODEL))
    page.goto(urls["rating"], wait_until="domcontentloaded", timeout=LOAD)
    trace = wait_interactive(page)
    assert trace in waiting
    legend = page.inner_text(".fw-legend")
    for key in ("1", "9", "P", "F", "U", "D", "S", "Z", "Ctrl+Enter", "Esc"):
        assert key in legend
    link = page.get_attribute(f"{CARD} a.fw-trace-link", "href")
    assert link.startswith(urls["MLflow UI"] + "/#/experiments/"), link  # the MLflow UI `up` started
    page.keyboard.press("u")
    page.wait_for_selector(".fw-status:has-text('Saved thumbs up as alice')")
    assert answers_of(home, trace, "alice", 1).get("user_rating") == "thumbs_up"

    # the MLflow UI asks for its login (printed once, at the first start): without it, 401 (Chromium
    # with no credentials to give fails the navigation: net::ERR_INVALID_AUTH_CREDENTIALS)
    assert httpx.get(urls["MLflow UI"], timeout=30).status_code == 401
    page.close()
    user, password = mlflow_login(up)
    page = browser.new_page(
        viewport={"width": 1100, "height": 900},
        http_credentials={"username": user, "password": password, "origin": urls["MLflow UI"]},
    )
    page.goto(urls["MLflow UI"], timeout=LOAD)
    page.wait_for_function("() => document.title.includes('MLflow')", timeout=LOAD)
    page.goto(link, timeout=LOAD)
    # MLflow's trace drawer names the trace by its id's first 8 hex digits, and shows its spans
    page.wait_for_selector(f"text={trace.removeprefix('tr-')[:8]}", timeout=LOAD)
    page.wait_for_selector("text=Predict.forward")
    page.close()


def mlflow_login(up: Up) -> tuple[str, str]:
    """The MLflow UI's login as `up` printed it at its first start."""
    found = [m for line in up.lines if (m := re.search(r"MLflow UI login: (\S+) / (\S+)", line))]
    assert len(found) == 1, up.lines
    return found[0].group(1), found[0].group(2)


def test_keys_pressed_right_after_typing_answer_every_question(
    home: store.Store,
    up: Up,
    browser: Any,  # noqa: F811
    screenshots: Path,
) -> None:
    """Type, then at once Esc and the answer keys and the rating key (or Ctrl+Enter in the box):
    everything typed and chosen is saved with that rating. Run it once with the CPU busy too."""
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(up.urls["rating"].replace("reviewer=alice", "reviewer=bob"), timeout=LOAD)
    first = wait_interactive(page)
    page.keyboard.press("2")  # the second answer of the first categorical question: tone = silly
    page.keyboard.press("f")  # family_friendly: fail
    page.fill(f".fw-comment.fw-for-{first} textarea", "typed, then keys at once")
    page.keyboard.press("Escape")
    page.screenshot(path=str(screenshots / "workbench-rating.png"), full_page=True)
    page.keyboard.press("u")
    page.wait_for_function(MOVED_ON, arg=first)
    got = answers_of(home, first, "bob", 4)
    assert got.get("user_rating") == "thumbs_up", got
    assert got.get("comment") == "typed, then keys at once", got
    assert got.get(f"{JOKE_MODEL}:tone") == "silly", got
    assert got.get(f"{JOKE_MODEL}:family_friendly") is False, got

    second = wait_interactive(page)
    page.keyboard.press("3")  # tone = dry
    page.fill(f".fw-correction-joke.fw-for-{second} textarea", "A better joke, typed fast.")
    page.keyboard.press("Control+Enter")  # from inside the box: thumbs down with the correction
    page.wait_for_function(MOVED_ON, arg=second)
    got = answers_of(home, second, "bob", 3)
    assert got.get("user_rating") == "thumbs_down", got
    assert got.get("corrected_output") == {"joke": "A better joke, typed fast."}, got
    assert got.get(f"{JOKE_MODEL}:tone") == "dry", got
    page.keyboard.press("z")  # undo: the second item is back, its answers with it
    page.wait_for_function(f"t => !({MOVED_ON})(t)", arg=second)
    page.close()


def kernel_of(page: Any) -> psutil.Process:
    """The kernel process behind a Voila page (its connection file is named after the kernel id)."""
    config = "document.getElementById('jupyter-config-data').textContent"
    kid = page.evaluate(f"() => JSON.parse({config}).kernelId")
    found = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(f"kernel-{kid}." in arg for arg in p.info["cmdline"] or [])
    ]
    assert len(found) == 1, (kid, found)
    return found[0]


def command_lines(up: Up) -> list[list[str]]:
    """The command lines of every process `up` started, down to the kernels. Kernels come and go
    (the pool refills, closed tabs' kernels are culled): one gone between the listing and the
    reading is skipped, not an error."""
    lines = []
    for p in psutil.Process(up.proc.pid).children(recursive=True):
        try:
            lines.append(p.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return lines


def test_the_mlflow_ui_runs_no_job_runner(up: Up) -> None:
    """`mlflow server` starts seven `huey_consumer` processes by default, for jobs launched from its
    UI that flywheel never submits; they took both cores for about 40 s after the URLs were printed,
    the moment a newcomer opens them. The MLflow UI that `up` starts answers without any of them."""
    lines = command_lines(up)
    servers = [line for line in lines if "mlflow" in " ".join(line) and "server" in line]
    assert servers, lines  # the MLflow UI is one of them
    consumers = [line for line in lines if "huey" in " ".join(line)]
    assert consumers == []
    assert httpx.get(up.urls["MLflow UI"] + "/health", timeout=30).status_code == 200


def test_a_closed_tab_s_kernel_is_shut_down_and_an_open_one_kept(
    up: Up,
    browser: Any,  # noqa: F811
) -> None:
    """Voila's own shutdown when a tab closes is refused (403: voila-dashboards/voila#1458), so
    every visit used to leave its kernel running until the dashboards stopped. A page left open
    keeps its kernel past FLYWHEEL_KERNEL_IDLE_TIMEOUT; once closed, the kernel goes."""
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(up.urls["rating"], timeout=LOAD)
    wait_interactive(page)
    kernel = kernel_of(page)
    time.sleep(IDLE + 8)  # open and idle past the timeout: a reviewer reading the card
    assert kernel.is_running()
    page.keyboard.press("s")  # and the page still works: the skip is acted on
    page.wait_for_selector(".fw-status :text('Skipped')", timeout=30_000)
    page.close(run_before_unload=True)
    kernel.wait(timeout=IDLE + 60)  # psutil.TimeoutExpired if it is never shut down


def test_ctrl_c_stops_every_process_it_started(up: Up) -> None:
    family = psutil.Process(up.proc.pid).children(recursive=True)
    assert len(family) >= 3
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=60) == 0
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
