"""The Voila dashboards in a real browser (Debian's Chromium through Playwright).

Voila serves dashboards/ over a seeded temp store with predictions waiting for
review; two reviewers rate with mouse and keyboard, a version is promoted, and
screenshots are taken (into a temp folder; FLYWHEEL_REFRESH_DOCS=1 copies them
over docs/screenshots/).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import flywheel
from flywheel import audit, registry, review, store
from flywheel.config import get_settings, load_settings
from flywheel.demo.seed import seed_demo
from flywheel.http.server import stop_background
from flywheel.runtime import Runtime, get_runtime, reset_runtime
from flywheel.runtime import submit_feedback as submit
from flywheel.ui.dashboards import (
    Launched,
    dashboards_dir,
    free_port,
    kernel_env,
    launch,
    voila_command,
    voila_env,
    wait_until_up,
    with_token,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path(os.environ.get("FLYWHEEL_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
JOKES = "joke-generator"
TOPICS = ["cats", "coffee", "mondays", "pizza", "robots", "trains"]
LOAD = 120_000  # ms: a fresh Voila kernel imports MLflow and DSPy first
STEP = 30_000
CARD = ".fw-item .fw-card"


def reset() -> None:
    stop_background()
    reset_runtime()
    get_settings.cache_clear()
    store.reset()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the screenshots go: a temp folder; with FLYWHEEL_REFRESH_DOCS=1 they are then copied over
    docs/screenshots/ (the only way a test run changes docs/)."""
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    if os.environ.get("FLYWHEEL_REFRESH_DOCS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for png in sorted(folder.glob("*.png")):
            shutil.copyfile(png, DOCS_SCREENSHOTS / png.name)


@pytest.fixture(scope="module")
def review_store(module_store: store.Store) -> Iterator[tuple[Runtime, list[str]]]:
    """The demo plus predictions waiting for review (and two rated ones, for the statistics)."""
    seed_demo(module_store, progress=lambda line: None)
    rt = get_runtime()
    rated = [flywheel.predict(JOKES, {"topic": t}, "1", runtime=rt).trace_id for t in ("tea", "jazz")]
    submit(rated[0], "thumbs_up", user_id="seed", runtime=rt)
    submit(rated[1], "thumbs_down", user_id="seed", runtime=rt)
    # every reviewer of these tests answers every item (k=3): their flows do not depend on the split
    review.create_queue(module_store, JOKES, ["rita", "bo", "flo"], k=3, backlog=False)
    waiting = [flywheel.predict(JOKES, {"topic": t}, runtime=rt).trace_id for t in TOPICS]
    assert rt.outbox.flush(timeout=30)
    yield rt, waiting
    reset()


@pytest.fixture(scope="module")
def voila(review_store: tuple[Runtime, list[str]]) -> Iterator[Launched]:
    launched = launch(port=free_port(0), open_api=True, api_port=0, block=False, echo=lambda line: None)
    try:
        yield launched
    finally:
        launched.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # fail, never skip: a CI without the browser must not pass with the browser tests unrun
    if not CHROMIUM.exists():
        pytest.fail("no /usr/bin/chromium: run scripts/install-test-deps (as root)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser: Any, url: str, height: int = 900) -> Any:
    page = browser.new_page(viewport={"width": 1100, "height": height})
    page.set_default_timeout(STEP)
    url = with_token(url, os.environ["FLYWHEEL_DASHBOARDS_TOKEN"])  # tests/conftest.py sets it
    page.goto(url, wait_until="domcontentloaded", timeout=LOAD)  # Voila answers once the kernel started
    return page


def shown(page: Any) -> str | None:
    card = page.query_selector(CARD)
    return card.get_attribute("data-trace-id") if card else None


def wait_moved_on(page: Any, old: str | None) -> str | None:
    page.wait_for_function(
        "old => { const c = document.querySelector('.fw-item .fw-card');"
        " return !c || c.dataset.traceId !== old; }",
        arg=old,
    )
    return shown(page)


def box(trace_id: str | None, field: str = "joke") -> str:
    """The correction box (or, with field=None, the comment box) drawn for that item: the card can be
    drawn before its boxes, and text typed into the last item's boxes goes with them."""
    which = f".fw-correction-{field}" if field else ".fw-comment"
    return f"{which}.fw-for-{trace_id} textarea"


def assert_clean(page: Any) -> None:
    """No code cells, no tracebacks, no error lines."""
    assert page.locator(".jp-CodeCell .jp-InputArea:visible, .cm-editor:visible").count() == 0
    assert "Traceback" not in page.content()
    assert page.locator("[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
    assert page.locator(".fw-msg-error").count() == 0


def ratings(
    rt: Runtime, trace_id: str, timeout: float = 30, by: str | None = None, count: int = 1
) -> dict[str, list[Any]]:
    """Valid assessments of a trace once its rating is in MLflow (the kernels deliver it; under load a
    delivery may hit a locked sqlite database and wait for the next pass, so poll)."""
    deadline = time.monotonic() + timeout
    while True:
        rt.outbox.flush(timeout=5)
        info = rt.store.tracking.get_trace_info(trace_id)
        found: dict[str, list[Any]] = {}
        for a in info.assessments or []:
            if a.valid is not False:
                found.setdefault(a.name, []).append(a)
        got = [a for a in found.get("user_rating", []) if by is None or a.source.source_id == by]
        if len(got) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_voila_command_and_launch(voila: Launched) -> None:
    import httpx

    cmd = voila_command(Path("dashboards"), 1234)
    assert cmd[1:4] == ["-m", "flywheel.ui.voila_app", "dashboards"] and "--no-browser" in cmd
    assert "--port=1234" in cmd
    wanted = {"FLYWHEEL_REVIEWER_HEADER": "X-User", "FLYWHEEL_KERNEL_IDLE_TIMEOUT": "30"}
    custom = load_settings(wanted, env_file=None)
    cmd = voila_command(Path("dashboards"), 1234, settings=custom)  # both launchers pass theirs
    assert "--MappingKernelManager.cull_idle_timeout=30" in cmd
    assert "--VoilaConfiguration.http_header_envs=['X-User']" in cmd
    assert set(voila.urls) == {"rating.ipynb", "models.ipynb", "pairwise.ipynb", "predict.ipynb"}
    env = kernel_env()  # the kernels run in dashboards/: they get the resolved settings
    assert Path(env["FLYWHEEL_HOME"]).is_absolute() and env["MLFLOW_TRACKING_URI"].startswith("sqlite:///")
    assert load_settings(env, env_file=None) == get_settings()
    assert voila.api_url and httpx.get(f"{voila.api_url}/health").json()["status"] == "healthy"
    signed_in = {"Authorization": f"token {voila.token}"}
    assert httpx.get(f"{voila.base_url}/voila/tree", headers=signed_in).status_code == 200
    # dashboards/voila.json: the widget manager's hashed scripts are kept by a returning browser
    # (Voila's default asks for each again on every page: a 304 per file, in three waves)
    page = httpx.get(voila.urls["models.ipynb"], headers=signed_in, timeout=120).text
    manager = "@jupyter-widgets/jupyterlab-manager"
    entry = re.search(rf'"load": "(static/remoteEntry\.[0-9a-f]+\.js)", "name": "{manager}"', page)
    assert entry, "the page names no widget manager script"
    script = httpx.get(f"{voila.base_url}/voila/labextensions/{manager}/{entry[1]}")
    assert script.status_code == 200 and "immutable" in script.headers["cache-control"]
    # and only the two widget extensions are loaded, whatever else the environment has installed
    config = re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', page, re.S)
    assert config, "the page carries no configuration"
    loaded = {e["name"] for e in json.loads(config[1])["federated_extensions"]}
    assert loaded == {manager, "@voila-dashboards/widgets-manager8"}
    # flywheel's template: Voila's script comes before the cells (it loads while they run)
    assert "--template=flywheel" in cmd
    assert 0 < page.index("/voila/static/voila.js") < page.index('<div cell-index="1">')
    assert page.count("/voila/static/voila.js") == 1


def test_a_page_never_waits_for_the_icon_cdn(voila: Launched, browser: Any) -> None:
    """Font Awesome (the icons on some buttons) comes from a CDN. In Voila's "lab" template its
    stylesheets held the page: where the network drops outside traffic, the rating page took 32 s
    to become interactive. flywheel's template makes them stylesheets only after the load event.
    Here the CDN's name leads to a socket that accepts and never answers: the page draws while
    no CDN request has finished, and the icons are still asked for."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        try:
            for _ in range(8):
                held.append(hole.accept()[0])
        except OSError:  # the socket is closed at the test's end
            pass

    threading.Thread(target=accept, daemon=True).start()
    rules = f"--host-resolver-rules=MAP cdn.jsdelivr.net 127.0.0.1:{hole.getsockname()[1]}"
    other = browser.browser_type.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, rules])
    try:
        page = open_page(other, voila.urls["models.ipynb"])
        page.wait_for_selector(".fw-panel", timeout=LOAD)  # the widgets are drawn
        finished = page.evaluate(
            "() => performance.getEntriesByType('resource')"
            ".filter(e => e.name.includes('cdn.jsdelivr.net')).length"
        )
        assert finished == 0, "the page was drawn only after the CDN's stylesheets gave up"
        assert page.locator('link[rel="stylesheet"][href*="cdn.jsdelivr.net"]').count() == 2
        deadline = time.monotonic() + STEP / 1000
        while not held and time.monotonic() < deadline:
            time.sleep(0.1)
        assert held, "the icons were never asked for"
        page.close()
    finally:
        other.close()
        for conn in held:
            conn.close()
        hole.close()


def test_two_reviewers_rate_with_mouse_and_keyboard(
    voila: Launched, browser: Any, review_store: tuple[Runtime, list[str]], screenshots: Path
) -> None:
    rt, waiting = review_store
    url = voila.urls["rating.ipynb"]
    rita = open_page(browser, f"{url}?reviewer=rita&model={JOKES}")
    bo = open_page(browser, f"{url}?reviewer=bo")  # both kernels start side by side
    rita.wait_for_selector(CARD, timeout=LOAD)
    bo.wait_for_selector(CARD, timeout=LOAD)
    assert_clean(rita)
    assert rita.input_value(".fw-reviewer input") == "rita"
    first, theirs = shown(rita), shown(bo)
    assert first in waiting and theirs in waiting  # k=3: both answer every item
    assert "6</b> remaining" in rita.inner_html(".fw-progress")

    rita.click("button.fw-rate-up")  # mouse
    second = wait_moved_on(rita, first)
    assert second not in (first, theirs)

    rita.fill(box(second), "Coffee has it rough: it gets mugged every morning.")
    rita.fill(box(second, None), "funnier this way")
    rita.keyboard.press("d")  # typing in a text box is not a shortcut
    assert rita.input_value(".fw-comment textarea") == "funnier this wayd" and shown(rita) == second
    rita.keyboard.press("Backspace")
    rita.keyboard.press("Escape")  # leave the text box, then the shortcut
    rita.keyboard.press("d")
    third = wait_moved_on(rita, second)

    rita.keyboard.press("s")  # skip, then undo the skip: the same item is back
    assert wait_moved_on(rita, third) != third
    rita.keyboard.press("z")
    rita.wait_for_function(
        "t => document.querySelector('.fw-item .fw-card').dataset.traceId === t", arg=third
    )
    rita.keyboard.press("u")
    wait_moved_on(rita, third)
    rita.wait_for_selector(".fw-progress:has-text('3 by you')")
    rita.wait_for_selector(".fw-status:has-text('Saved thumbs up as rita')")  # set after the progress line
    assert_clean(rita)
    rita.screenshot(path=str(screenshots / "rating.png"), full_page=True)

    bo.keyboard.press("u")
    wait_moved_on(bo, theirs)

    expected = {first: ("thumbs_up", "rita"), second: ("thumbs_down", "rita"), third: ("thumbs_up", "rita")}
    expected[theirs] = ("thumbs_up", "bo")
    for trace_id, (value, user) in expected.items():
        got = ratings(rt, trace_id, by=user)
        mine = [
            (a.value, a.source.source_id) for a in got.get("user_rating", []) if a.source.source_id == user
        ]
        assert mine == [(value, user)], (
            trace_id,
            {k: [(a.value, a.source.source_id) for a in v] for k, v in got.items()},
            first,
            second,
            third,
            theirs,
            rt.outbox.backlog(),
        )
    corrected = ratings(rt, second)
    assert corrected["corrected_output"][0].value == {
        "joke": "Coffee has it rough: it gets mugged every morning."
    }
    assert corrected["comment"][0].value == "funnier this way"
    rita.close()
    bo.close()


def test_a_fast_reviewer_under_load_loses_no_correction(
    voila: Launched, browser: Any, review_store: tuple[Runtime, list[str]]
) -> None:
    """Issue 10: with the CPU busy, a correction (or comment) typed just before the rating key or
    click is saved with that rating, and letters typed into a text box never rate."""
    rt, _ = review_store
    for topic in ("socks", "clouds", "bikes"):
        flywheel.predict(JOKES, {"topic": topic}, "2", runtime=rt)
    assert rt.outbox.flush(timeout=30)
    page = open_page(browser, f"{voila.urls['rating.ipynb']}?reviewer=flo&model={JOKES}&version=2")
    page.wait_for_selector(CARD, timeout=LOAD)
    page.set_default_timeout(LOAD)  # from here every step waits on a starved kernel
    burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(2)]
    try:
        one = shown(page)
        typed = "Socks ride off to a dud sock zoo."  # u, d, s and z: just text in a box
        page.click(box(one))
        page.keyboard.press("Control+A")
        page.keyboard.type(typed)
        page.keyboard.press("Control+Enter")  # at once: thumbs down with what was typed
        two = wait_moved_on(page, one)

        page.click(box(two, None))
        page.keyboard.type("sad, dizzy, used")
        page.keyboard.press("Escape")
        page.keyboard.press("u")  # at once, after leaving the box
        three = wait_moved_on(page, two)

        page.click(box(three))
        page.keyboard.press("Control+A")
        page.keyboard.type("Bikes are two tired.")
        page.click("button.fw-rate-down")  # the mouse, at once
        wait_moved_on(page, three)
        page.wait_for_selector(".fw-progress:has-text('3 by you')")  # three ratings, no more
        assert_clean(page)
    finally:
        for p in burners:
            p.kill()
            p.wait()
        page.close()

    def saved(trace_id: str | None) -> tuple[Any, ...]:
        assert trace_id is not None
        everyone = ratings(rt, trace_id, by="flo")
        got = {k: [a for a in v if a.source.source_id == "flo"] for k, v in everyone.items()}
        value = lambda name: [a.value for a in got.get(name, [])]  # noqa: E731
        return (  # flo's answers (k=3: rita and bo answer the same items)
            [(a.value, a.source.source_id) for a in got.get("user_rating", [])],
            value("corrected_output"),
            value("comment"),
        )

    assert saved(one) == ([("thumbs_down", "flo")], [{"joke": typed}], [])
    assert saved(two) == ([("thumbs_up", "flo")], [], ["sad, dizzy, used"])
    assert saved(three) == ([("thumbs_down", "flo")], [{"joke": "Bikes are two tired."}], [])


def test_promote_on_the_models_dashboard(
    voila: Launched, browser: Any, review_store: Any, screenshots: Path
) -> None:
    rt, _ = review_store
    page = open_page(browser, voila.urls["models.ipynb"], height=1250)  # all of it in the screenshot
    page.wait_for_selector(".fw-versions table", timeout=LOAD)
    page.wait_for_selector("img.fw-trend")
    assert_clean(page)
    assert "fw-badge-Production" in page.inner_html(".fw-versions")
    assert "50% (1/2)" in page.inner_text(".fw-versions")  # v1: the two seeded ratings

    page.select_option(".fw-promote-version select", label="v1 · Archived")
    page.click("button.fw-promote-production")
    page.wait_for_selector(".fw-confirm:visible")
    assert "v2 (now Production) will be archived" in page.inner_text(".fw-confirm")
    assert registry.resolve(JOKES, "Production", rt.store).version == "2"  # not before confirming
    page.screenshot(path=str(screenshots / "models.png"), full_page=True)
    page.click("button.fw-confirm-yes")
    page.wait_for_selector(".fw-status:has-text('v1 is now Production')")
    assert registry.resolve(JOKES, "Production", rt.store).version == "1"
    assert registry.get_version(JOKES, "2", rt.store).stage == "Archived"
    assert "v1 · Production" in page.inner_text(".fw-promote-version").replace("\xa0", " ")
    page.close()


def test_rollback_button_and_audit_timeline_on_the_models_dashboard(
    voila: Launched, browser: Any, review_store: Any, screenshots: Path
) -> None:
    rt, _ = review_store
    # a promotion to undo: v1 over v2 (whatever an earlier test left), by someone with a reason
    registry.promote(JOKES, "2", "Production", rt.store, actor="seed")
    registry.promote(JOKES, "1", "Production", rt.store, actor="ann", reason="v1 won the gate")
    page, other = (open_page(browser, voila.urls["models.ipynb"], height=1600) for _ in range(2))
    for tab in (page, other):  # two tabs (two people) judge the same Production
        tab.wait_for_selector(".fw-timeline li.fw-audit-promote", timeout=LOAD)
        tab.click("button.fw-rollback")
        tab.wait_for_selector(".fw-confirm:visible")
        assert "v1 out, v2 Production again" in tab.inner_text(".fw-confirm")
    assert_clean(page)
    assert "v1 won the gate" in page.inner_text(".fw-timeline")
    assert "requests" in page.inner_text(".fw-live")  # live figures per version from the traces
    assert registry.resolve(JOKES, "Production", rt.store).version == "1"  # not before confirming
    page.click("button.fw-confirm-yes")
    page.wait_for_selector(".fw-status:has-text('v2 is Production again')")
    assert registry.resolve(JOKES, "Production", rt.store).version == "2"
    assert registry.get_version(JOKES, "1", rt.store).stage == "Archived"
    page.wait_for_selector(".fw-timeline li.fw-audit-rollback")
    first = page.inner_text(".fw-timeline li >> nth=0")
    assert "rollback" in first and "models dashboard" in first and "rolled_back: 1" in first
    page.screenshot(path=str(screenshots / "models-rollback.png"), full_page=True)
    # the other tab confirms the same rollback late: refused in words, nothing moves
    other.click("button.fw-confirm-yes")
    other.wait_for_selector(".fw-status:has-text('Production is version 2 now, not 1')")
    assert registry.resolve(JOKES, "Production", rt.store).version == "2"
    assert sum(e.action == "rollback" for e in audit.timeline(rt.store, JOKES)) == 1
    page.close()
    other.close()


def test_pairwise_review_with_keys_a_and_b(voila: Launched, browser: Any, review_store: Any) -> None:
    from flywheel import canary

    rt, _ = review_store
    canary.set_shadow(rt.store, JOKES, "1", actor="test")
    try:
        served = [flywheel.predict(JOKES, {"topic": t}, runtime=rt).trace_id for t in ("owls", "kites")]
    finally:
        canary.set_shadow(rt.store, JOKES, None, actor="test")
    assert rt.outbox.flush(timeout=30)
    page = open_page(browser, f"{voila.urls['pairwise.ipynb']}?model={JOKES}&reviewer=ivy")
    page.wait_for_selector(".fw-pair .fw-card", timeout=LOAD)
    assert_clean(page)
    chosen = []
    for key in ("b", "a"):
        card = page.query_selector(".fw-pair .fw-card")
        a, b = card.get_attribute("data-a"), card.get_attribute("data-b")
        assert a in served and "v2" in page.inner_text(".fw-side-a") and "v1" in page.inner_text(".fw-side-b")
        page.keyboard.press(key)
        page.wait_for_function(
            "a => { const c = document.querySelector('.fw-pair .fw-card'); return !c || c.dataset.a !== a; }",
            arg=a,
        )
        chosen.append((key.upper(), a, b))
    page.close()
    assert rt.outbox.flush(timeout=30)
    for preferred, a, b in chosen:
        for trace_id, side in ((a, "A"), (b, "B")):
            info = rt.store.tracking.get_trace_info(trace_id)
            (pref,) = [x for x in info.assessments if x.name == "pairwise_preference"]
            value = pref.value if isinstance(pref.value, dict) else json.loads(pref.value)
            assert (
                value["preferred"] == preferred and value["side"] == side and pref.source.source_id == "ivy"
            )


def test_empty_store_is_a_friendly_page(
    browser: Any, tmp_path: Path, make_store: Callable[..., store.Store]
) -> None:
    make_store(tmp_path / "empty")
    launched = launch(port=free_port(0), open_api=False, block=False, echo=lambda line: None)
    try:
        page = open_page(browser, launched.urls["rating.ipynb"])
        page.wait_for_selector(".fw-empty", timeout=LOAD)
        assert "No models are registered yet" in page.inner_text(".fw-empty")
        assert_clean(page)
        page.close()
    finally:
        launched.stop()
        reset()


def start_host(home: Path, uri: str) -> Launched:
    """One more dashboard host: its own FLYWHEEL_HOME, the shared store."""
    port = free_port(0)
    env = voila_env(kernel_env({"FLYWHEEL_HOME": str(home), "MLFLOW_TRACKING_URI": uri}))
    directory = dashboards_dir()
    proc = subprocess.Popen(voila_command(directory, port), env=env, cwd=directory, start_new_session=True)
    host = Launched(proc, f"http://127.0.0.1:{port}", None)
    try:
        wait_until_up(f"{host.base_url}/voila/tree", proc)
    except BaseException:
        host.stop()
        raise
    return host


def test_two_hosts_four_reviewers_k2_in_parallel(
    browser: Any, review_store: tuple[Runtime, list[str]], tmp_path: Path
) -> None:
    """Issue 14: two Voila hosts (separate FLYWHEEL_HOMEs, one store), two reviewers on each, one
    queue with k=2; all four act at once. Every item is answered by exactly two different reviewers."""
    from collections import Counter

    rt, _ = review_store
    people = {"one": ["h1a", "h1b"], "two": ["h2a", "h2b"]}
    queue = review.create_queue(
        rt.store, JOKES, [p for ps in people.values() for p in ps], k=2, name="team", backlog=False
    )
    ids = [flywheel.predict(JOKES, {"topic": f"team {t}"}, runtime=rt).trace_id for t in TOPICS[:4]]
    assert rt.outbox.flush(timeout=30)
    hosts = {name: start_host(tmp_path / name, rt.store.tracking_uri) for name in people}
    try:
        pages = {
            who: open_page(
                browser,
                f"{hosts[name].base_url}/voila/render/rating.ipynb?reviewer={who}&model={JOKES}&queue=team",
            )
            for name, ps in people.items()
            for who in ps
        }
        for page in pages.values():
            page.wait_for_selector(f"{CARD}, .fw-empty", timeout=LOAD)
            assert_clean(page)
        answered: list[tuple[str, str]] = []
        while True:
            active = {who: shown(page) for who, page in pages.items()}
            active = {who: t for who, t in active.items() if t is not None}
            if not active:
                break
            for who in active:  # all at once: nobody waits for another reviewer
                pages[who].keyboard.press("u")
            for who, trace_id in active.items():
                answered.append((trace_id, who))
                wait_moved_on(pages[who], trace_id)
        for page in pages.values():
            assert_clean(page)
            page.close()
    finally:
        for host in hosts.values():
            host.stop()
    assert max(Counter(answered).values()) == 1  # nobody was shown an item twice
    per_item = Counter(t for t, _ in answered)
    assert {t: per_item[t] for t in ids} == {t: 2 for t in ids}
    for trace_id in ids:
        got = ratings(rt, trace_id, count=2)
        sources = sorted(a.source.source_id for a in got["user_rating"])
        assert len(set(sources)) == 2 and sources == sorted(w for t, w in answered if t == trace_id)

    import mlflow.genai.review_queues as rq

    with rt.store.fluent():
        items = {i.item_id: i for i in rq.list_review_queue_items(queue.queue_id, max_results=1000)}
    assert all(items[t].status == "complete" for t in ids)
