"""The HTTP API on a real uvicorn server (a thread of this process) over a real sqlite store."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import dspy
import httpx
import pytest

from flywheel import registry
from flywheel.http.client import APIError, AsyncClient, Client
from flywheel.http.server import start_background, stop_background
from flywheel.runtime import get_runtime
from flywheel.store import Store

ROOT = Path(__file__).resolve().parent.parent
JOKES = "joke-generator"


@pytest.fixture(scope="module")
def url(demo_store_rw: Store) -> Iterator[str]:
    yield start_background(port=0)
    stop_background()


@pytest.fixture
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


def _assessments(trace_id: str) -> list:
    runtime = get_runtime()
    assert runtime.outbox.flush(), runtime.outbox.last_error
    return list(runtime.store.tracking.get_trace_info(trace_id).assessments)


def test_spec_sequence_end_to_end(http: httpx.Client) -> None:
    r = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "cat"}, "stage": "Production"})
    assert r.status_code == 200, r.text
    first = r.json()
    assert set(first) == {"result", "trace_id", "model_version", "latency_ms"}
    assert first["result"] == {
        "joke": "My cat sits on my keyboard because it wants to keep an eye on the mouse."
    }
    assert re.fullmatch(r"tr-[0-9a-f]{32}", first["trace_id"]) and first["model_version"] == "2"
    assert first["latency_ms"] > 0

    up = http.post("/feedback", json={"trace_id": first["trace_id"], "rating": "thumbs_up", "user_id": "ann"})
    assert up.status_code == 200 and up.json()["status"] == "success"

    second = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "coffee"}}).json()
    down = http.post(
        "/feedback",
        json={
            "trace_id": second["trace_id"],
            "rating": "thumbs_down",
            "user_id": "bob",
            "corrected_output": {"joke": "Espresso yourself."},
            "comment": "too long",
        },
    )
    assert down.status_code == 200, down.text

    exported = http.get("/export", params={"model": JOKES, "format": "json"}).json()["rows"]
    by_trace = {row["trace_id"]: row for row in exported}
    assert by_trace[first["trace_id"]]["rating"] == "thumbs_up"
    assert by_trace[second["trace_id"]] == {
        "topic": "coffee",
        "joke": "Espresso yourself.",
        "trace_id": second["trace_id"],
        "model_version": "2",
        "rating": "thumbs_down",
        "comment": "too long",
        "decision_rule": "single",
    }
    as_csv = http.get("/export", params={"model": JOKES, "format": "csv", "rating": "thumbs_down"})
    assert as_csv.headers["content-disposition"] == 'attachment; filename="joke-generator-thumbs_down.csv"'
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [r["joke"] for r in rows if r["trace_id"] == second["trace_id"]] == ["Espresso yourself."]
    assert list(rows[0])[:2] == ["topic", "joke"]

    models = http.get("/models").json()["models"]
    assert {m["name"] for m in models} >= {JOKES, "support-router"}
    versions = http.get(f"/models/{JOKES}/versions").json()["versions"]
    assert [(v["version"], v["stage"]) for v in versions][:2] == [("2", "Production"), ("1", "Archived")]

    promoted = http.post(f"/models/{JOKES}/stage", json={"version": "1", "stage": "Production"})
    assert promoted.status_code == 200 and promoted.json()["version"]["aliases"] == ["Production"]
    after = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "cat"}}).json()
    assert after["model_version"] == "1"
    http.post(f"/models/{JOKES}/stage", json={"version": "2", "stage": "Production"})

    health = http.get("/health").json()
    assert health["status"] == "healthy" and health["mlflow_connected"] is True
    assert health["loaded_models_count"] >= 2 and health["uptime_seconds"] >= 0
    metrics = http.get("/metrics").json()
    assert set(metrics) == {"request_count", "error_count", "average_latency_ms", "models_served"}
    assert metrics["request_count"] >= 3 and JOKES in metrics["models_served"]


def test_every_trace_of_a_concurrent_burst_reaches_mlflow(url: str) -> None:
    async def burst() -> list[dict]:
        async with AsyncClient(url) as client:
            calls = [client.predict(JOKES, {"topic": f"topic {i}"}) for i in range(200)]
            return await asyncio.gather(*calls)

    answers = asyncio.run(burst())
    ids = {a["trace_id"] for a in answers}
    assert len(ids) == 200
    runtime = get_runtime()
    assert runtime.outbox.flush()
    store = runtime.store.tracking
    for trace_id in ids:
        info = store.get_trace_info(trace_id)
        assert info.tags["flywheel.model"] == JOKES and info.tags["flywheel.model_version"] == "2"
    trace = runtime.store.client.get_trace(next(iter(ids)))
    assert trace.data.spans[0].inputs["topic"].startswith("topic ")
    assert "joke" in trace.data.spans[0].outputs


def test_trace_links_to_the_logged_model_of_its_version(http: httpx.Client) -> None:
    one = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "cat"}, "version": "1"}).json()
    two = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "cat"}, "version": "2"}).json()
    runtime = get_runtime()
    runtime.outbox.flush()
    store = runtime.store.tracking
    for answer in (one, two):
        info = store.get_trace_info(answer["trace_id"])
        expected = registry.get_version(JOKES, answer["model_version"]).model_id
        assert info.trace_metadata["mlflow.modelId"] == expected


def test_feedback_right_after_predict_and_rerating_overrides(http: httpx.Client) -> None:
    trace_id = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "dog"}}).json()["trace_id"]
    for rating in ("thumbs_up", "thumbs_down", "thumbs_up"):
        assert (
            http.post("/feedback", json={"trace_id": trace_id, "rating": rating, "user_id": "cy"}).status_code
            == 200
        )
    assert http.post("/feedback", json={"trace_id": trace_id, "rating": "thumbs_down"}).status_code == 200
    ratings = [a for a in _assessments(trace_id) if a.name == "user_rating"]
    cy = [a for a in ratings if a.source.source_id == "cy"]
    assert len(cy) == 3 and [a.valid for a in sorted(cy, key=lambda a: a.create_time_ms)] == [
        False,
        False,
        True,
    ]
    latest = max(cy, key=lambda a: a.create_time_ms)
    assert latest.value == "thumbs_up" and latest.overrides is not None
    assert str(latest.source.source_type).endswith("HUMAN")
    anonymous = [a for a in ratings if a.source.source_id == "anonymous"]
    assert len(anonymous) == 1 and anonymous[0].valid
    # the export counts only the latest valid rating: the anonymous thumbs_down came last
    rows = http.get("/export", params={"model": JOKES}).json()["rows"]
    assert [r["rating"] for r in rows if r["trace_id"] == trace_id] == ["thumbs_down"]


def test_a_plain_string_correction_is_accepted_for_a_single_output(http: httpx.Client) -> None:
    trace_id = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "gym"}}).json()["trace_id"]
    r = http.post(
        "/feedback", json={"trace_id": trace_id, "rating": "thumbs_down", "corrected_output": "Lift."}
    )
    assert r.status_code == 200 and r.json()["corrected_output"] == {"joke": "Lift."}
    corrections = [a for a in _assessments(trace_id) if a.name == "corrected_output"]
    assert [a.value for a in corrections] == [{"joke": "Lift."}]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": JOKES, "inputs": {}}, 422, "missing input field 'topic'"),
        ({"model": JOKES, "inputs": {"topic": "x", "mood": "y"}}, 422, "unknown input field 'mood'"),
        ({"model": JOKES, "inputs": {"topic": "  "}}, 422, "input field 'topic' is empty"),
        ({"model": JOKES}, 422, "inputs: Field required"),
        ({"model": JOKES, "inputs": {"topic": "x"}, "stage": "Staging", "version": "1"}, 422, "at most one"),
        ({"model": JOKES, "inputs": {"topic": "x"}, "extra": 1}, 422, "extra: Extra inputs"),
        ({"model": "nope", "inputs": {"topic": "x"}}, 404, "Model not found: 'nope'"),
        ({"model": JOKES, "inputs": {"topic": "x"}, "version": "99"}, 404, "Model not found"),
        ({"model": JOKES, "inputs": {"topic": "x"}, "stage": "Staging"}, 404, "Model not found"),
        ({"model": JOKES, "inputs": {"topic": "x"}, "alias": "ghost"}, 404, "Model not found"),
        ({"model": "it's", "inputs": {"topic": "x"}}, 404, "Model not found"),
    ],
)
def test_predict_errors(http: httpx.Client, body: dict, status: int, message: str) -> None:
    r = http.post("/predict", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_empty_or_malformed_bodies_are_422(http: httpx.Client) -> None:
    for path in ("/predict", "/feedback", f"/models/{JOKES}/stage"):
        assert http.post(path, content=b"", headers={"content-type": "application/json"}).status_code == 422
        assert (
            http.post(path, content=b"{not json", headers={"content-type": "application/json"}).status_code
            == 422
        )


def test_feedback_errors(http: httpx.Client) -> None:
    trace_id = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "x"}}).json()["trace_id"]
    cases = [
        ({"trace_id": trace_id, "rating": "meh"}, 422, "rating"),
        (
            {"trace_id": trace_id, "rating": "thumbs_up", "corrected_output": {"punchline": "x"}},
            422,
            "'punchline', which the program does not output",
        ),
        ({"trace_id": trace_id, "rating": "thumbs_up", "corrected_output": {}}, 422, "at least one"),
        ({"trace_id": "tr-0000", "rating": "thumbs_up"}, 404, "Trace not found"),
        ({}, 422, "trace_id: Field required"),
    ]
    for body, status, message in cases:
        r = http.post("/feedback", json=body)
        assert r.status_code == status, (body, r.text)
        assert message in r.json()["detail"]


def test_export_filters_and_errors(http: httpx.Client) -> None:
    assert http.get("/export", params={"model": "nope"}).status_code == 404
    assert http.get("/export", params={"model": "it's"}).json()["detail"].startswith("Model not found")
    empty = http.get("/export", params={"model": "support-router", "format": "csv"})
    assert empty.status_code == 200
    assert empty.text.strip() == "trace_id,model_version,rating,comment,decision_rule"  # header only
    assert http.get("/export", params={"model": JOKES, "format": "xml"}).status_code == 422
    assert http.get("/export", params={"model": JOKES, "start_date": "yesterday"}).status_code == 422
    assert http.get("/export", params={"model": JOKES, "limit": 0}).status_code == 422
    trace_id = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "ocean"}}).json()["trace_id"]
    http.post("/feedback", json={"trace_id": trace_id, "rating": "thumbs_up"})
    today = time.strftime("%Y-%m-%d", time.gmtime())
    rows = http.get("/export", params={"model": JOKES, "start_date": today, "end_date": today}).json()["rows"]
    assert trace_id in {r["trace_id"] for r in rows}
    old = http.get("/export", params={"model": JOKES, "end_date": "2020-01-01"}).json()
    assert old["rows"] == []
    assert len(http.get("/export", params={"model": JOKES, "limit": 1}).json()["rows"]) == 1
    lines = http.get("/export", params={"model": JOKES, "format": "jsonl"}).text.splitlines()
    assert lines and all(line.startswith("{") for line in lines)
    backwards = http.get("/export", params={"model": JOKES, "start_date": today, "end_date": "2020-01-01"})
    assert backwards.status_code == 422


def test_models_and_stage_errors(http: httpx.Client) -> None:
    assert http.get("/models/nope/versions").status_code == 404
    r = http.post(f"/models/{JOKES}/stage", json={"version": "1", "stage": "Prod"})
    assert r.status_code == 422 and "None, Staging, Production, Archived" in r.json()["detail"]
    assert http.post(f"/models/{JOKES}/stage", json={"version": "42", "stage": "Staging"}).status_code == 404


class _SlowEngine:
    """An LM engine that takes far longer than the request timeout."""

    def complete(self, request: object) -> object:
        time.sleep(5)
        raise AssertionError("unreachable")

    def stream(self, request: object) -> object:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _AsyncSlowEngine:
    async def complete(self, request: object) -> object:
        await asyncio.sleep(5)
        raise AssertionError("unreachable")

    def stream(self, request: object) -> object:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


def test_timeout_is_504_and_lm_failure_is_502(http: httpx.Client) -> None:
    runtime = get_runtime()
    original_lm, original_settings = runtime.lm, runtime.settings
    try:
        runtime.settings = replace(original_settings, request_timeout=0.3)
        runtime.lm = dspy.LM(
            "flywheel/slow", engine=_SlowEngine(), async_engine=_AsyncSlowEngine(), cache=False
        )
        r = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "slow"}})
        assert r.status_code == 504 and "REQUEST_TIMEOUT" in r.json()["detail"]
        runtime.settings = original_settings  # a refused connection must not race a 0.3 s timeout
        runtime.lm = dspy.LM(
            "openai/unreachable", api_base="http://127.0.0.1:9/v1", api_key="none", num_retries=0, cache=False
        )
        r = http.post("/predict", json={"model": JOKES, "inputs": {"topic": "fail"}})
        assert r.status_code == 502, r.text
        assert "language model call failed" in r.json()["detail"]
        assert "connect" in r.json()["detail"].lower()
    finally:
        runtime.lm, runtime.settings = original_lm, original_settings


def test_metrics_in_prometheus_format(http: httpx.Client) -> None:
    text = http.get("/metrics", headers={"Accept": "text/plain"}).text
    assert "flywheel_requests_total " in text and 'flywheel_model_served{model="joke-generator"} 1' in text
    assert http.get("/metrics", params={"format": "prometheus"}).text.startswith("# HELP")
    assert "flywheel_outbox_backlog" in text


def test_openapi_docs_and_every_endpoint_is_documented(http: httpx.Client) -> None:
    assert http.get("/docs").status_code == 200 and http.get("/redoc").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    routes = {(method.upper(), path) for path, ops in paths.items() for method in ops}
    assert routes == {
        ("POST", "/predict"),
        ("POST", "/predict/stream"),
        ("POST", "/feedback"),
        ("GET", "/export"),
        ("GET", "/models"),
        ("GET", "/models/{name}/versions"),
        ("POST", "/models/{name}/stage"),
        ("POST", "/models/{name}/rollback"),
        ("PUT", "/models/{name}/canary"),
        ("PUT", "/models/{name}/shadow"),
        ("GET", "/models/{name}/live"),
        ("GET", "/models/{name}/audit"),
        ("POST", "/feedback/preference"),
        ("GET", "/health"),
        ("GET", "/metrics"),
    }
    doc = (ROOT / "docs" / "api.md").read_text()
    for method, path in routes:
        assert f"{method} {path}" in doc, f"{method} {path} is not documented in docs/api.md"


def test_python_client_sync(url: str) -> None:
    with Client(url) as client:
        answer = client.predict(JOKES, {"topic": "music"}, stage="Production")
        assert client.feedback(answer["trace_id"], "thumbs_up", user_id="dee")["status"] == "success"
        assert any(r["trace_id"] == answer["trace_id"] for r in client.export(JOKES)["rows"])
        assert "trace_id" in client.export(JOKES, format="csv")
        assert {m["name"] for m in client.models()} >= {JOKES}
        assert client.versions(JOKES)[0]["version"] == "2"
        assert client.promote(JOKES, "2", "Production")["version"]["stage"] == "Production"
        assert client.health()["status"] == "healthy"
        with pytest.raises(APIError) as info:
            client.predict("nope", {"topic": "x"})
        assert info.value.status_code == 404 and "Model not found" in info.value.detail


def test_feedback_for_a_fresh_unknown_trace_is_202_then_lands(http: httpx.Client) -> None:
    import os

    from flywheel.tracing import TraceRecord, new_trace_id

    early = new_trace_id()
    r = http.post("/feedback", json={"trace_id": early, "rating": "thumbs_up", "user_id": "early"})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "pending" and r.json()["trace_id"] == early
    assert r.headers["x-flywheel-worker"] == str(os.getpid())
    stale = new_trace_id(at=time.time() - 2 * 86400)
    assert http.post("/feedback", json={"trace_id": stale, "rating": "thumbs_up"}).status_code == 404
    now = time.time_ns()
    info = registry.get_version(JOKES, "2")
    get_runtime().record_trace(TraceRecord.ok(early, info, {"topic": "late"}, {"joke": "j"}, now, now))
    ratings = [a for a in _assessments(early) if a.name == "user_rating"]
    assert [(a.value, a.source.source_id) for a in ratings] == [("thumbs_up", "early")]


def test_openapi_documents_202_pending_and_503_with_retry_after(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert {"200", "202", "404", "503"} <= set(paths["/feedback"]["post"]["responses"])
    assert "503" in paths["/predict"]["post"]["responses"]
    doc = (ROOT / "docs" / "api.md").read_text()
    assert "202" in doc and "503" in doc and "Retry-After" in doc and "FEEDBACK_WAIT" in doc


def test_api_keys_protect_predict_feedback_and_admin(
    tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    from flywheel.demo.seed import seed_demo

    store = make_store(
        tmp_path / "home",
        FLYWHEEL_PREDICT_KEY="p-key",
        FLYWHEEL_FEEDBACK_KEY="f-key",
        FLYWHEEL_ADMIN_KEY="a-key",
    )
    seed_demo(store, progress=lambda line: None)
    url = start_background(port=0)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            body = {"model": JOKES, "inputs": {"topic": "cat"}}
            assert http.post("/predict", json=body).status_code == 401
            assert http.post("/predict", json=body, headers={"X-API-Key": "a-key"}).status_code == 403
            answer = http.post("/predict", json=body, headers={"X-API-Key": "p-key"})
            assert answer.status_code == 200
            rating = {"trace_id": answer.json()["trace_id"], "rating": "thumbs_up"}
            assert http.post("/feedback", json=rating).status_code == 401
            assert http.post("/feedback", json=rating, headers={"X-API-Key": "f-key"}).status_code == 200
            promote = {"version": "1", "stage": "Staging"}
            assert http.post(f"/models/{JOKES}/stage", json=promote).status_code == 401
            assert (
                http.get("/export", params={"model": JOKES}, headers={"X-API-Key": "p-key"}).status_code
                == 403
            )
            assert (
                http.get("/export", params={"model": JOKES}, headers={"X-API-Key": "a-key"}).status_code
                == 200
            )
            ok = http.post(f"/models/{JOKES}/stage", json=promote, headers={"X-API-Key": "a-key"})
            assert ok.status_code == 200
            assert http.get("/health").status_code == 200  # health and metrics stay open for probes
            with Client(url, api_key="p-key") as client:
                assert client.predict(JOKES, {"topic": "dog"})["model_version"] == "2"
    finally:
        stop_background()  # make_store resets the rest
