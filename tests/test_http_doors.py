"""The HTTP API's doors (issue 31, findings 4, 7, 10, 11a): what is refused before any route runs.

A cross-site write without a CORS preflight (415), a Host header of another name (400, DNS
rebinding), a body that never finishes arriving (408, and `/health` keeps answering), numbers
JSON cannot hold (422; export never fails on one already stored), model names in `/metrics`
(the registry key under REGISTRY_NEEDS_KEY). Real servers: the API in a thread of this process,
and `flywheel serve --workers 2` with headless Chromium for the slow tests.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dspy
import httpx
import pytest
from processes import free_port, serve_command, stop_group, wait_until_up

from flywheel import audit, export, feedback, registry, serving
from flywheel.errors import FeedbackError, InputError
from flywheel.http.server import start_background, stop_background
from flywheel.runtime import get_runtime
from flywheel.store import Store
from flywheel.tracing import TraceRecord, new_trace_id

JOKES = "joke-generator"
CHROMIUM = Path(os.environ.get("FLYWHEEL_TEST_CHROMIUM", "/usr/bin/chromium"))
EVIL_ORIGIN = "http://127.0.0.1:9999"


@pytest.fixture(scope="module")
def store(demo_store_rw: Store) -> Store:
    """The demo store with a rollback possible: Production 2 replaced 1."""
    registry.promote(JOKES, "1", "Production", demo_store_rw)
    registry.promote(JOKES, "2", "Production", demo_store_rw)
    return demo_store_rw


@pytest.fixture(scope="module")
def url(store: Store) -> Iterator[str]:
    yield start_background(port=0)
    stop_background()


@pytest.fixture
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.fixture
def settings_of_runtime() -> Iterator[Any]:
    """Lets a test change the serving runtime's settings; they are put back after it."""
    runtime = get_runtime()
    original = runtime.settings
    yield runtime
    runtime.settings = original


def _production(store: Store) -> str:
    return next(v.version for v in registry.list_versions(JOKES, store) if v.stage == "Production")


def _rollbacks(store: Store) -> int:
    return sum(e.action == "rollback" for e in audit.timeline(store, JOKES))


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


# --- finding 4: writes a browser can send cross-site without a preflight --------------------------


def test_a_cross_site_write_without_a_preflight_is_415_and_production_stays(
    http: httpx.Client, store: Store
) -> None:
    rollback = f"/models/{JOKES}/rollback"
    before = _rollbacks(store)
    assert _production(store) == "2"
    # what fetch(url, {method: "POST", mode: "no-cors"}) sends from a page on another port
    shapes = [
        {"Origin": EVIL_ORIGIN},
        {"Origin": EVIL_ORIGIN, "Content-Type": "text/plain;charset=UTF-8"},
        {"Origin": EVIL_ORIGIN, "Content-Type": "application/x-www-form-urlencoded"},
        {"Origin": EVIL_ORIGIN, "Content-Type": "multipart/form-data; boundary=x"},
    ]
    for headers in shapes:
        r = http.post(rollback, headers=headers)
        assert r.status_code == 415, (headers, r.status_code, r.text)
        assert "Content-Type: application/json" in r.json()["detail"]
    # a JSON body sent as a Blob without a type carries no Content-Type: FastAPI would read it
    promote = json.dumps({"version": "1", "stage": "Production"}).encode()
    r = http.post(f"/models/{JOKES}/stage", content=promote, headers={"Origin": EVIL_ORIGIN})
    assert r.status_code == 415, r.text
    r = http.put(
        f"/models/{JOKES}/canary", content=b'{"ref": "1", "share": 0.5}', headers={"Origin": EVIL_ORIGIN}
    )
    assert r.status_code == 415, r.text
    assert _production(store) == "2" and _rollbacks(store) == before  # nothing moved

    # the API's own clients send the header: the same rollback goes through, and is put back
    done = http.post(rollback, headers={"Content-Type": "application/json; charset=utf-8"})
    assert done.status_code == 200 and done.json()["version"]["version"] == "1", done.text
    registry.promote(JOKES, "2", "Production", store)


def test_openapi_states_the_content_type_rule_and_the_doors(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    assert "Content-Type: application/json" in schema["info"]["description"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert {"400", "408", "413"} <= codes, (method, path, codes)
            if method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
                assert "415" in codes, (method, path, codes)


# --- finding 4: DNS rebinding -------------------------------------------------------------------


def test_a_host_header_of_another_name_is_400_before_any_work(
    http: httpx.Client, url: str, settings_of_runtime: Any
) -> None:
    port = url.rsplit(":", 1)[1]
    served = http.get("/metrics").json()["request_count"]
    for path in ("/health", "/models", f"/models/{JOKES}/versions"):
        r = http.get(path, headers={"Host": f"evil.example:{port}"})
        assert r.status_code == 400, (path, r.text)
        assert "API_ALLOWED_HOSTS" in r.json()["detail"] and "evil.example" in r.json()["detail"]
    body = {"model": JOKES, "inputs": {"topic": "rebound"}}
    assert http.post("/predict", json=body, headers={"Host": "evil.example:8000"}).status_code == 400
    assert http.get("/metrics").json()["request_count"] == served  # nothing ran
    for good in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST", "127.0.0.1"):
        assert http.get("/health", headers={"Host": good}).status_code == 200, good

    runtime = settings_of_runtime
    runtime.settings = replace(runtime.settings, api_allowed_hosts="api.example.com, *.corp.example")
    assert http.get("/health", headers={"Host": "api.example.com:443"}).status_code == 200
    assert http.get("/health", headers={"Host": "a.b.corp.example"}).status_code == 200
    assert http.get("/health", headers={"Host": "corp.example"}).status_code == 400
    assert http.get("/health", headers={"Host": "evil.example"}).status_code == 400
    runtime.settings = replace(runtime.settings, api_allowed_hosts="*")  # behind a proxy that checks
    assert http.get("/health", headers={"Host": "evil.example"}).status_code == 200


def test_allowed_hosts_follow_api_host_and_the_address_a_connection_came_to(settings_of_runtime: Any) -> None:
    from flywheel.http.api import allowed_hosts, host_allowed, host_name

    settings = settings_of_runtime.settings
    assert host_name("[::1]:8000") == "::1" and host_name("Example.COM.:80") == "example.com"
    assert allowed_hosts(replace(settings, api_host="0.0.0.0")) == ("localhost", "127.0.0.1", "::1")
    assert "10.0.0.5" in allowed_hosts(replace(settings, api_host="10.0.0.5"))
    defaults = allowed_hosts(replace(settings, api_host="0.0.0.0"))
    assert host_allowed("10.1.2.3", defaults, own_address="10.1.2.3")  # http://10.1.2.3:8000 directly
    assert not host_allowed("evil.example", defaults, own_address="10.1.2.3")


# --- finding 7: slow bodies ---------------------------------------------------------------------


def _slow_sender(port: int, path: str = "/predict") -> socket.socket:
    """Headers, `Content-Length: 1000`, then 12 bytes, and no more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    sock.sendall(head.encode() + b'{"model": "j')
    return sock


def _answer(sock: socket.socket) -> bytes:
    """What the server sends before it closes (b"" when it closes without a word)."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def test_a_body_that_stops_arriving_is_408(url: str, settings_of_runtime: Any) -> None:
    runtime = settings_of_runtime
    runtime.settings = replace(runtime.settings, body_read_timeout=1.0)
    sock = _slow_sender(int(url.rsplit(":", 1)[1]))
    try:
        answer = _answer(sock)  # the server closes after its answer
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"BODY_READ_TIMEOUT" in answer


class _Held:
    """An LM engine that waits until `release` is set (so a prediction stays at work)."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def complete(self, request: object) -> object:
        self.entered.set()
        self.release.wait(60)
        raise RuntimeError("released")

    async def acomplete(self, request: object) -> object:
        self.entered.set()
        while not self.release.is_set():
            await asyncio.sleep(0.02)
        raise RuntimeError("released")

    def stream(self, request: object) -> object:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _AsyncHeld:
    def __init__(self, held: _Held) -> None:
        self.held = held

    async def complete(self, request: object) -> object:
        return await self.held.acomplete(request)

    def stream(self, request: object) -> object:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


def test_requests_past_api_limit_concurrency_are_503_and_health_stays_200(
    http: httpx.Client, settings_of_runtime: Any
) -> None:
    runtime = settings_of_runtime
    held = _Held()
    original_lm = runtime.lm
    runtime.settings = replace(runtime.settings, api_limit_concurrency=1)
    runtime.lm = dspy.LM("flywheel/held", engine=held, async_engine=_AsyncHeld(held), cache=False)
    first: list[httpx.Response] = []
    body = {"model": JOKES, "inputs": {"topic": "held"}}
    worker = threading.Thread(target=lambda: first.append(http.post("/predict", json=body)))
    try:
        worker.start()
        assert held.entered.wait(60), "the first prediction never reached the LM"
        r = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "one too many"}}, timeout=20)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "API_LIMIT_CONCURRENCY" in r.json()["detail"]
        assert http.get("/health", timeout=20).status_code == 200  # never counted, never refused
    finally:
        held.release.set()
        worker.join(60)
        runtime.lm = original_lm
    assert first and first[0].status_code != 503


# --- finding 10: numbers JSON cannot hold --------------------------------------------------------


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_non_finite_numbers_are_422_and_nothing_is_queued(http: httpx.Client, number: str) -> None:
    served = http.get("/metrics").json()["request_count"]
    json_type = {"content-type": "application/json"}
    predict = '{"model": "' + JOKES + '", "inputs": {"topic": ' + number + "}}"
    r = http.post("/predict", content=predict.encode(), headers=json_type)
    assert r.status_code == 422 and "not a finite number" in r.json()["detail"], r.text
    assert "inputs.topic" in r.json()["detail"]
    r = http.post("/predict/stream", content=predict.encode(), headers=json_type)
    assert r.status_code == 422 and "not a finite number" in r.json()["detail"], r.text
    trace_id = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "finite"}}).json()["trace_id"]
    rate = (
        '{"trace_id": "'
        + trace_id
        + '", "rating": "thumbs_up", "corrected_output": {"joke": '
        + number
        + "}}"
    )
    r = http.post("/feedback", content=rate.encode(), headers=json_type)
    assert r.status_code == 422 and "not a finite number" in r.json()["detail"], r.text
    share = '{"ref": "1", "share": ' + number + "}"
    assert http.put(f"/models/{JOKES}/canary", content=share.encode(), headers=json_type).status_code == 422
    runtime = get_runtime()
    assert runtime.outbox.flush(), runtime.outbox.last_error
    assert not runtime.store.tracking.get_trace_info(trace_id).assessments  # the feedback was never queued
    assert http.get("/metrics").json()["request_count"] == served + 1  # only the finite prediction ran


def test_in_process_entry_points_refuse_non_finite_numbers(store: Store) -> None:
    runtime = get_runtime()
    with pytest.raises(InputError, match="not a finite number"):
        serving.predict(runtime, JOKES, {"topic": math.nan})
    trace_id = serving.predict(runtime, JOKES, {"topic": "finite"}).trace_id
    with pytest.raises(FeedbackError, match="not a finite number"):
        feedback.submit(runtime, trace_id, "thumbs_down", corrected_output={"joke": math.inf})
    assert runtime.outbox.flush(), runtime.outbox.last_error
    assert not runtime.store.tracking.get_trace_info(trace_id).assessments


def test_export_of_a_store_holding_nan_is_valid_json(http: httpx.Client, store: Store) -> None:
    """A trace written before the check (or by other code) with NaN in its inputs, then rated."""
    runtime = get_runtime()
    trace_id = new_trace_id()
    now = time.time_ns()
    info = registry.get_version(JOKES, "2", store)
    inputs = {"topic": math.nan, "more": [1.0, math.inf]}
    runtime.record_trace(TraceRecord.ok(trace_id, info, inputs, {"joke": "j"}, now, now))
    assert runtime.outbox.flush(), runtime.outbox.last_error
    assert http.post("/feedback", json={"trace_id": trace_id, "rating": "thumbs_up"}).status_code == 200
    assert runtime.outbox.flush(), runtime.outbox.last_error

    r = http.get("/export", params={"model": JOKES, "format": "json"})
    assert r.status_code == 200, r.text
    row = next(row for row in _strict_json(r.text)["rows"] if row["trace_id"] == trace_id)
    assert row["topic"] is None and row["more"] == [1.0, None]
    r = http.get("/export", params={"model": JOKES, "format": "jsonl"})
    assert r.status_code == 200 and "NaN" not in r.text and "Infinity" not in r.text
    assert any(_strict_json(line)["trace_id"] == trace_id for line in r.text.splitlines())
    r = http.get("/export", params={"model": JOKES, "format": "csv"})
    assert r.status_code == 200
    line = next(line for line in r.text.splitlines() if trace_id in line)
    assert "nan" not in line.lower() and "infinity" not in line.lower(), line
    rows = export.export_rows(runtime, JOKES)
    for text in (export.to_json(rows), export.to_jsonl(rows)):
        assert "NaN" not in text and "Infinity" not in text


# --- finding 11a: model names in /metrics --------------------------------------------------------


def test_metrics_name_models_only_with_a_registry_key_when_registry_needs_key(
    http: httpx.Client, settings_of_runtime: Any
) -> None:
    assert http.post("/predict", json={"model": JOKES, "inputs": {"topic": "named"}}).status_code == 200
    assert JOKES in http.get("/metrics").json()["models_served"]  # REGISTRY_NEEDS_KEY off: open
    runtime = settings_of_runtime
    runtime.settings = replace(
        runtime.settings, registry_needs_key=True, flywheel_predict_key="p-key", flywheel_admin_key="a-key"
    )
    for headers in ({}, {"X-API-Key": "wrong"}):
        report = http.get("/metrics", headers=headers)
        assert report.status_code == 200 and "models_served" not in report.json(), report.text
        assert report.json()["request_count"] >= 1  # the totals stay
        text = http.get("/metrics", params={"format": "prometheus"}, headers=headers).text
        assert JOKES not in text and "flywheel_model_served" not in text and "flywheel_requests_total" in text
    for key in ("p-key", "a-key"):
        assert JOKES in http.get("/metrics", headers={"X-API-Key": key}).json()["models_served"]
        text = http.get("/metrics", params={"format": "prometheus"}, headers={"X-API-Key": key}).text
        assert f'flywheel_model_served{{model="{JOKES}"}} 1' in text


# --- a real `flywheel serve`: slow sockets, and a real browser on another port ---------------------

SLOW_SOCKETS = 205
BODY_TIMEOUT = 15  # seconds: long enough that /health is polled while the sockets are held


@pytest.fixture(scope="module")
def served(store: Store) -> Iterator[str]:
    """`flywheel serve --workers 2` over the module's store; 20 requests at work per process."""
    port = free_port()
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        API_LIMIT_CONCURRENCY="20",
        BODY_READ_TIMEOUT=str(BODY_TIMEOUT),
    )
    proc = subprocess.Popen(
        serve_command(port, workers=2),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", timeout=180, proc=proc)
        yield url
    finally:
        stop_group(proc)


@pytest.mark.slow
def test_slow_bodies_leave_health_answering_then_get_408(served: str) -> None:
    port = int(served.rsplit(":", 1)[1])
    sockets = [_slow_sender(port) for _ in range(SLOW_SOCKETS)]
    try:
        with httpx.Client(base_url=served, timeout=30) as http:
            for _ in range(5):
                r = http.get("/health")
                assert r.status_code == 200, (r.status_code, r.text)
            r = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "meanwhile"}})
            assert r.status_code == 200, r.text  # slow senders hold no place of API_LIMIT_CONCURRENCY
        answers = [_answer(sock) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    refused = sum(a.startswith(b"HTTP/1.1 408") for a in answers)
    closed = sum(a == b"" for a in answers)
    others = [a[:80] for a in answers if a and not a.startswith(b"HTTP/1.1 408")]
    print(f"{SLOW_SOCKETS} slow senders: {refused} answered 408, {closed} closed without an answer")
    assert not others, others[:3]
    assert refused + closed == SLOW_SOCKETS


class _Page(BaseHTTPRequestHandler):
    html = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.html)))
        self.end_headers()
        self.wfile.write(self.html)

    def log_message(self, *args: object) -> None:
        pass


_ATTACK = """<!doctype html><script>
const api = "API";
const cases = [
  ["rollback, no body", api + "/models/MODEL/rollback", {method: "POST", mode: "no-cors"}],
  ["rollback, text/plain", api + "/models/MODEL/rollback",
   {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain;charset=UTF-8"}, body: "{}"}],
  ["stage, untyped JSON blob", api + "/models/MODEL/stage",
   {method: "POST", mode: "no-cors", body: new Blob([JSON.stringify({version: "1", stage: "Production"})])}],
  ["rollback, JSON with cors", api + "/models/MODEL/rollback",
   {method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"}],
];
window.results = {};
(async () => {
  for (const [name, target, options] of cases) {
    try { await fetch(target, options); window.results[name] = "answered"; }
    catch (error) { window.results[name] = "failed: " + error; }
  }
  window.done = true;
})();
</script>"""


@pytest.mark.slow
@pytest.mark.browser
def test_a_page_on_another_port_cannot_roll_production_back(served: str, store: Store) -> None:
    if not CHROMIUM.exists():  # fail, never skip
        pytest.fail("no /usr/bin/chromium: run scripts/install-test-deps (as root)", pytrace=False)
    from playwright.sync_api import sync_playwright

    before = _rollbacks(store)
    assert _production(store) == "2"
    _Page.html = _ATTACK.replace("API", served).replace("MODEL", JOKES).encode()
    page_server = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=page_server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{page_server.server_address[1]}/")
                page.wait_for_function("window.done === true", timeout=60_000)
                results = page.evaluate("window.results")
            finally:
                browser.close()
    finally:
        page_server.shutdown()
        page_server.server_close()
    print(results)
    # the no-cors requests reached the API and were answered (415, unreadable to the page) ...
    assert all(results[name] == "answered" for name in list(results)[:3]), results
    # ... and the JSON one needed a preflight, which the API never grants: it was never sent
    assert results["rollback, JSON with cors"].startswith("failed"), results
    assert _production(store) == "2" and _rollbacks(store) == before
    versions = {v.version: v.stage for v in registry.list_versions(JOKES, store)}
    assert versions["1"] != "Production"
