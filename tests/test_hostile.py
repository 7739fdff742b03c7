"""Hostile input and safe defaults (issue #10): a real server over the seeded demo store."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from flywheel import limits
from flywheel.http.server import start_background, stop_background
from flywheel.runtime import get_runtime
from flywheel.store import Store

JOKES = "joke-generator"


@pytest.fixture(scope="module")
def url(demo_store_rw: Store) -> Iterator[str]:
    yield start_background(port=0)
    stop_background()


@pytest.fixture
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


def _predict(http: httpx.Client, topic: str) -> str:
    r = http.post("/predict", json={"model": JOKES, "inputs": {"topic": topic}})
    assert r.status_code == 200, r.text
    return r.json()["trace_id"]


def _raw(http: httpx.Client, path: str, text: str) -> httpx.Response:
    """POST a JSON text as is: its \\u escapes reach the server undecoded."""
    return http.post(path, content=text.encode(), headers={"content-type": "application/json"})


def _body(inputs_json: str) -> str:
    return '{"model": "' + JOKES + '", "inputs": ' + inputs_json + "}"


# 1. validation before anything is queued or run


def test_lone_surrogates_are_422_and_export_keeps_working(http: httpx.Client) -> None:
    trace_id = _predict(http, "surrogate")
    backlog = get_runtime().outbox.backlog()
    comment = json.dumps({"trace_id": trace_id, "rating": "thumbs_up", "comment": "SURROGATE"})
    r = _raw(http, "/feedback", comment.replace("SURROGATE", "x\\udfffy"))
    assert r.status_code == 422 and "UTF-8" in r.json()["detail"], r.text
    assert get_runtime().outbox.backlog() == backlog  # nothing queued
    r = _raw(http, "/predict", _body('{"topic": "\\ud800"}'))
    assert r.status_code == 422 and "UTF-8" in r.json()["detail"]
    r = _raw(http, "/predict", _body('{"\\udfff": "x"}'))
    assert r.status_code == 422
    for fmt in ("csv", "json", "jsonl"):
        assert http.get("/export", params={"model": JOKES, "format": fmt}).status_code == 200


def test_end_date_at_the_end_of_time_is_422(http: httpx.Client) -> None:
    r = http.get("/export", params={"model": JOKES, "end_date": "9999-12-31"})
    assert r.status_code == 422 and "end_date" in r.json()["detail"]
    assert http.get("/export", params={"model": JOKES, "end_date": "9999-12-30"}).status_code == 200


def test_version_numbers_beyond_the_store_are_422(http: httpx.Client) -> None:
    huge = "9" * 20
    r = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "x"}, "version": huge})
    assert r.status_code == 422 and "out of range" in r.json()["detail"]
    r = http.post(f"/models/{JOKES}/stage", json={"version": huge, "stage": "Staging"})
    assert r.status_code == 422 and "out of range" in r.json()["detail"]
    r = http.post(f"/models/{JOKES}/stage", json={"version": "-1", "stage": "Staging"})
    assert r.status_code == 422
    assert http.post(f"/models/{JOKES}/stage", json={"version": "42", "stage": "Staging"}).status_code == 404


def test_inputs_nested_beyond_the_limit_are_422(http: httpx.Client) -> None:
    deep: object = "x"
    for _ in range(500):
        deep = {"a": deep}
    r = http.post("/predict", json={"model": JOKES, "inputs": {"topic": deep}})
    assert r.status_code == 422 and f"deeper than {limits.MAX_DEPTH}" in r.json()["detail"]
    r = _raw(http, "/predict", _body('{"topic": ' + "[" * 500 + "]" * 500 + "}"))
    assert r.status_code == 422
    ok: object = "x"
    for _ in range(limits.MAX_DEPTH - 2):  # the body is level 0, `inputs` 1, `topic` 2
        ok = [ok]
    r = http.post("/predict", json={"model": JOKES, "inputs": {"topic": ok}})
    assert r.status_code != 422 or "deeper" not in r.json()["detail"]
    assert r.status_code != 500, r.text


def test_a_non_ascii_api_key_is_refused_never_500(http: httpx.Client) -> None:
    runtime = get_runtime()
    original = runtime.settings
    try:
        runtime.settings = replace(original, flywheel_predict_key="p-kéy")
        body = {"model": JOKES, "inputs": {"topic": "cat"}}
        for key in ("ключ".encode(), "p-kéy".encode("latin-1"), b"\xff\xfe", b"p-key"):
            r = http.post("/predict", json=body, headers={"X-API-Key": key})
            assert r.status_code == 403, (key, r.text)
        r = http.post("/predict", json=body, headers={"X-API-Key": "p-kéy".encode()})
        assert r.status_code == 200, r.text  # a UTF-8 key sent as UTF-8 bytes matches
    finally:
        runtime.settings = original


# 2. CSV export neutralises formulas


def test_csv_cells_that_start_a_formula_are_quoted_json_keeps_them() -> None:
    from flywheel.export import to_csv, to_jsonl

    hostile = ["=1+1", "+SUM(A1)", "-2+3", "@cmd", "\tx", "\rx", "plain", "'quoted"]
    rows = [{"joke": value, "trace_id": "t", "rating": "thumbs_up", "n": -3} for value in hostile]
    cells = [row["joke"] for row in csv.DictReader(io.StringIO(to_csv(rows)))]
    assert cells == ["'=1+1", "'+SUM(A1)", "'-2+3", "'@cmd", "'\tx", "'\rx", "plain", "'quoted"]
    assert [json.loads(line)["joke"] for line in to_jsonl(rows).splitlines()] == hostile
    assert {row["n"] for row in csv.DictReader(io.StringIO(to_csv(rows)))} == {"-3"}  # a number


def test_csv_export_over_http_is_neutralised(http: httpx.Client) -> None:
    trace_id = _predict(http, "formula")
    body = {"trace_id": trace_id, "rating": "thumbs_down", "corrected_output": {"joke": "=HYPERLINK(1)"}}
    assert http.post("/feedback", json=body).status_code == 200
    get_runtime().outbox.flush()
    text = http.get("/export", params={"model": JOKES, "format": "csv"}).text
    row = next(r for r in csv.DictReader(io.StringIO(text)) if r["trace_id"] == trace_id)
    assert row["joke"] == "'=HYPERLINK(1)"
    rows = http.get("/export", params={"model": JOKES, "format": "json"}).json()["rows"]
    assert next(r for r in rows if r["trace_id"] == trace_id)["joke"] == "=HYPERLINK(1)"


# 3. a row's rating and correction come from one reviewer


def test_rating_and_correction_come_from_the_same_reviewer(http: httpx.Client) -> None:
    trace_id = _predict(http, "disagreement")
    ann = {
        "trace_id": trace_id,
        "rating": "thumbs_down",
        "user_id": "ann",
        "corrected_output": {"joke": "Ann's better joke."},
        "comment": "not funny",
    }
    assert http.post("/feedback", json=ann).status_code == 200
    assert get_runtime().outbox.flush()
    bob = {"trace_id": trace_id, "rating": "thumbs_up", "user_id": "bob"}  # later, and disagrees
    assert http.post("/feedback", json=bob).status_code == 200
    assert get_runtime().outbox.flush()
    rows = http.get("/export", params={"model": JOKES}).json()["rows"]
    row = next(r for r in rows if r["trace_id"] == trace_id)
    assert row["rating"] == "thumbs_up"
    assert row["joke"] != "Ann's better joke." and row["comment"] is None  # not Ann's
    assert row["decision_rule"] == "latest"  # a tie nobody adjudicated: the newest (EXPORT_POLICY)
    carl = {**ann, "user_id": "carl", "corrected_output": {"joke": "Carl's."}, "comment": "meh"}
    assert http.post("/feedback", json=carl).status_code == 200
    assert get_runtime().outbox.flush()
    rows = http.get("/export", params={"model": JOKES}).json()["rows"]
    row = next(r for r in rows if r["trace_id"] == trace_id)
    assert (row["rating"], row["joke"], row["comment"]) == ("thumbs_down", "Carl's.", "meh")
    # Ann and Carl agree, but as end users (/feedback) they are no majority (issue 31): the newest, whole
    assert row["decision_rule"] == "latest"


# 4. limits as documented settings


def test_request_bodies_over_the_limit_are_413_also_chunked(http: httpx.Client) -> None:
    runtime = get_runtime()
    original = runtime.settings
    try:
        runtime.settings = replace(original, max_request_bytes=2048)
        big = {"model": JOKES, "inputs": {"topic": "x" * 5000}}
        r = http.post("/predict", json=big)
        assert r.status_code == 413 and "MAX_REQUEST_BYTES" in r.json()["detail"]

        def chunks() -> Iterator[bytes]:
            text = json.dumps(big).encode()
            for i in range(0, len(text), 512):
                yield text[i : i + 512]

        r = http.post("/predict", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        small = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "x" * 100}})
        assert small.status_code == 200
    finally:
        runtime.settings = original


def test_stored_text_is_truncated_with_a_marker(http: httpx.Client) -> None:
    runtime = get_runtime()
    original = runtime.settings
    try:
        runtime.settings = replace(original, max_field_chars=200, max_trace_chars=1000)
        trace_id = _predict(http, "long " * 1000)
        body = {"trace_id": trace_id, "rating": "thumbs_up", "comment": "c" * 5000}
        receipt = http.post("/feedback", json=body).json()
        assert receipt["comment"].endswith(limits.TRUNCATED) and len(receipt["comment"]) == 200
        assert runtime.outbox.flush()
    finally:
        runtime.settings = original
    row = next(
        r for r in http.get("/export", params={"model": JOKES}).json()["rows"] if r["trace_id"] == trace_id
    )
    assert row["topic"].endswith(limits.TRUNCATED) and len(row["topic"]) == 200
    assert row["comment"].endswith(limits.TRUNCATED)


def test_the_stored_helper_keeps_objects_and_bounds_the_whole() -> None:
    assert limits.stored({"a": "short"}, 100, 1000) == {"a": "short"}
    cut = limits.stored({f"k{i}": "v" * 500 for i in range(10)}, 400, 1000)
    assert set(cut) == {f"k{i}" for i in range(10)} and len(json.dumps(cut)) <= 1000
    assert all(v.endswith(limits.TRUNCATED) for v in cut.values())
    assert limits.stored(None, 10, 100) is None


def test_uvicorn_connection_limits_come_from_settings(url: str) -> None:
    from flywheel.config import Settings
    from flywheel.http import server

    config = server._background.server.config  # type: ignore[union-attr]
    defaults = Settings()
    # uvicorn's limit counts connections (slow senders too) and refuses /health past it: it is only a
    # high cap (API_MAX_CONNECTIONS); the API bounds the requests at work (API_LIMIT_CONCURRENCY)
    assert (config.limit_concurrency, config.timeout_keep_alive) == (
        defaults.api_max_connections,
        defaults.api_timeout_keep_alive,
    )
    assert defaults.api_max_connections >= 5 * defaults.api_limit_concurrency
    tuned = replace(defaults, api_max_connections=7, api_timeout_keep_alive=3)
    assert server.connection_limits(tuned) == {"limit_concurrency": 7, "timeout_keep_alive": 3}


# 5. safe defaults


def test_default_bind_is_loopback_and_exposed_without_keys_warns(capsys: pytest.CaptureFixture) -> None:
    from flywheel.config import Settings
    from flywheel.http.server import warn_if_exposed

    assert Settings().api_host == "127.0.0.1"
    assert warn_if_exposed("127.0.0.1", Settings()) is None
    warning = warn_if_exposed("0.0.0.0", replace(Settings(), flywheel_admin_key="a"))
    assert warning and "FLYWHEEL_PREDICT_KEY, FLYWHEEL_FEEDBACK_KEY are unset" in warning
    assert "WARNING" in capsys.readouterr().err
    keyed = replace(Settings(), flywheel_predict_key="p", flywheel_feedback_key="f", flywheel_admin_key="a")
    assert warn_if_exposed("0.0.0.0", keyed) is None


def test_registry_routes_need_a_key_only_when_configured(http: httpx.Client) -> None:
    runtime = get_runtime()
    original = runtime.settings
    try:
        runtime.settings = replace(original, flywheel_predict_key="p", flywheel_admin_key="a")
        assert http.get("/models").status_code == 200  # REGISTRY_NEEDS_KEY=false: open
        runtime.settings = replace(runtime.settings, registry_needs_key=True)
        for path in ("/models", f"/models/{JOKES}/versions"):
            assert http.get(path).status_code == 401
            assert http.get(path, headers={"X-API-Key": "wrong"}).status_code == 403
            assert http.get(path, headers={"X-API-Key": "p"}).status_code == 200
            assert http.get(path, headers={"X-API-Key": "a"}).status_code == 200
        assert http.get("/health").status_code == 200
    finally:
        runtime.settings = original


# 7. CI fails without Chromium


def test_install_test_deps_fails_when_it_cannot_install_chromium(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "install-test-deps"
    env = {"FLYWHEEL_TEST_CHROMIUM": str(tmp_path / "no-chromium"), "PATH": str(tmp_path)}  # no apt-get
    done = subprocess.run(["/bin/bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "/usr/bin/chromium" in done.stderr, done


def test_browser_tests_fail_not_skip_without_chromium(tmp_path: Path) -> None:
    tests = Path(__file__).resolve().parent
    (tmp_path / "test_needs_browser.py").write_text(
        "from test_dashboards import browser  # noqa: F401\n\n\ndef test_uses(browser):\n    pass\n"
    )
    env = {
        **os.environ,
        "FLYWHEEL_TEST_CHROMIUM": str(tmp_path / "no-chromium"),
        "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "no /usr/bin/chromium" in done.stdout, done.stdout
    assert "skipped" not in done.stdout.lower(), done.stdout
