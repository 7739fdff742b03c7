"""Streamed predictions: POST /predict/stream from a real `flywheel serve` (two uvicorn workers) over a
real sqlite store, the Python clients, and `streaming.astream` in process.

The server answers with tests/stream_lms.py's stand-in LM: the offline LM's answers, a few words
per stream delta, a pause before each delta (STREAM_TEST_PACE), and a refused connection for inputs
saying `unreachable`. The browser half (the predict panel's text growing) is in
test_stream_dashboard.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dspy
import httpx
import programs_zoo as zoo
import pytest
from processes import free_port, serve_command, stop_group, wait_until_up

from flywheel import errors, registry, streaming
from flywheel.demo.seed import seed_demo
from flywheel.http.client import APIError, AsyncClient, Client
from flywheel.lm import OfflineLM, RetrievalEngine, deltas
from flywheel.runtime import get_runtime
from flywheel.store import Store

ROOT = Path(__file__).resolve().parent.parent
JOKES, CAPITAL = "joke-generator", "capital"
PACE = 0.15  # seconds before each delta, on the server
LONG_CAPITALS = {
    "France": "Paris, on the river Seine, in the north of the country",
    "Japan": "Tokyo, on the Pacific coast of the island of Honshu",
    "Kenya": "Nairobi, in the highlands of the south of the country",
}


def capital_program() -> zoo.CapitalQA:
    """programs_zoo's forward-only CapitalQA, its answers long enough to come in several chunks."""
    program = zoo.capital_qa()
    for demo in program.qa.predict.demos:
        demo["capital"] = LONG_CAPITALS[demo["country"]]
    return program


@pytest.fixture(scope="module")
def stream_store(tmp_path_factory: pytest.TempPathFactory, make_module_store: Callable[..., Store]) -> Store:
    store = make_module_store(tmp_path_factory.mktemp("stream") / "home")
    seed_demo(store, progress=lambda line: None)
    info = registry.register_program(capital_program(), CAPITAL, store=store)
    registry.promote(CAPITAL, info.version, "Production", store)
    for name, program in {"pipeline": zoo.summarize_pipeline(), "slow": zoo.SlowSync(2.0)}.items():
        info = registry.register_program(program, name, store=store)
        registry.promote(name, info.version, "Production", store)
    return store


@pytest.fixture(scope="module")
def server(stream_store: Store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    where = tmp_path_factory.mktemp("serve")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "FLYWHEEL_HOME": str(stream_store.settings.flywheel_home),
        "FLYWHEEL_LM": "py:stream_lms:stand_in",
        "STREAM_TEST_PACE": str(PACE),
    }
    log = (where / "serve.log").open("wb")
    proc = subprocess.Popen(
        serve_command(port), cwd=where, env=env, stdout=log, stderr=log, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", timeout=120, proc=proc)
        yield url
    finally:
        stop_group(proc)
        log.close()


def sse(url: str, body: dict[str, Any]) -> tuple[httpx.Headers, list[tuple[str, dict[str, Any], float]]]:
    """POST /predict/stream read off the wire: headers, [(event name, its JSON data, seconds since sent)]."""
    events: list[tuple[str, dict[str, Any], float]] = []
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/predict/stream", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        name, data = None, []
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data.append(line.removeprefix("data: "))
            elif line == "" and data:
                events.append((str(name), json.loads("\n".join(data)), time.perf_counter() - t0))
                name, data = None, []
        return r.headers, events


def stored_trace(store: Store, trace_id: str, timeout: float = 60) -> Any:
    """The trace once the server's delivery thread has written it to MLflow."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            trace = store.client.get_trace(trace_id)
            if trace is not None:
                return trace
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.3)


def assert_streamed(events: list[tuple[str, dict[str, Any], float]], field: str) -> dict[str, Any]:
    """Several chunks of `field`, then one result whose value is exactly the chunks joined."""
    names = [name for name, _, _ in events]
    assert names[-1] == "result" and set(names[:-1]) == {"chunk"}, names
    assert all(data["event"] == name for name, data, _ in events)
    chunks = [data for _, data, _ in events[:-1]]
    assert len(chunks) >= 3 and {c["field"] for c in chunks} == {field}
    result = events[-1][1]
    assert set(result) == {"event", "result", "trace_id", "model_version", "latency_ms"}
    assert "".join(c["chunk"] for c in chunks) == result["result"][field]
    return result


# --- the offline LM streams -------------------------------------------------------------------


def test_offline_lm_streams_its_answer_in_pieces_of_a_few_words() -> None:
    text = "[[ ## joke ## ]]\nMy cat sits on my keyboard to watch the mouse.\n\n[[ ## completed ## ]]"
    assert "".join(deltas(text)) == text and len(deltas(text)) >= 5
    assert all(len(piece.split()) <= 3 for piece in deltas(text))

    program = dspy.Predict("topic -> joke")
    program.demos = [dspy.Example(topic="cats", joke="My cat sits on my keyboard to watch the mouse.")]
    with dspy.context(lm=OfflineLM()):
        request = None
        engine = RetrievalEngine()
        original = engine.complete

        def keep(req: Any) -> Any:
            nonlocal request
            request = req
            return original(req)

        engine.complete = keep  # type: ignore[method-assign]
        with dspy.context(lm=dspy.LM("flywheel/offline", engine=engine, cache=False)):
            program(topic="cats")
    text_deltas = [e.delta.text for e in RetrievalEngine().stream(request) if e.type == "delta"]
    assert len(text_deltas) >= 5 and "".join(text_deltas) == RetrievalEngine().complete(request).message.text


# --- over HTTP: a real `flywheel serve` -------------------------------------------------------


@pytest.mark.slow
def test_a_forward_only_module_streams_over_http(server: str, stream_store: Store) -> None:
    headers, events = sse(server, {"model": CAPITAL, "inputs": {"country": "France"}})
    result = assert_streamed(events, "capital")
    assert result["result"] == {"capital": LONG_CAPITALS["France"]} and result["model_version"] == "1"
    assert headers["x-flywheel-route"] == "stable"
    first_chunk, answered = events[0][2], events[-1][2]
    assert answered - first_chunk > 2 * PACE, events  # it came as it was written, not all at the end

    trace = stored_trace(stream_store, result["trace_id"])
    assert trace.info.state.value == "OK"
    assert json.loads(trace.info.tags["flywheel.outputs"]) == result["result"]
    assert trace.info.trace_metadata["flywheel.lm_calls"] == "1"  # the recorder reached the thread
    # a streamed prediction's trace has the same DSPy call tree as a predicted one
    names = {s.name: s for s in trace.data.spans}
    assert set(names) >= {"CapitalQA.forward", "ChainOfThought.forward", "Predict.forward"}
    assert {"ChatAdapter.format", "ChatAdapter.parse"} <= set(names)
    (lm,) = [s for s in trace.data.spans if s.span_type == "CHAT_MODEL"]
    assert "France" in json.dumps(lm.inputs["messages"]) and lm.parent_id == names["Predict.forward"].span_id
    assert names["CapitalQA.forward"].parent_id is None


@pytest.mark.slow
def test_a_builtin_predict_streams_over_http(server: str, stream_store: Store) -> None:
    _, events = sse(server, {"model": JOKES, "inputs": {"topic": "cat"}, "version": "2"})
    result = assert_streamed(events, "joke")
    assert result["result"] == {
        "joke": "My cat sits on my keyboard because it wants to keep an eye on the mouse."
    }
    assert result["model_version"] == "2" and result["latency_ms"] > 0
    trace = stored_trace(stream_store, result["trace_id"])
    assert trace.info.state.value == "OK"
    assert json.loads(trace.info.tags["flywheel.inputs"]) == {"topic": "cat"}
    feedback = httpx.post(f"{server}/feedback", json={"trace_id": result["trace_id"], "rating": "thumbs_up"})
    assert feedback.status_code == 200, feedback.text  # the result event means: committed on this host


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "inputs"), [(JOKES, {"topic": "unreachable"}), (CAPITAL, {"country": "unreachable"})]
)
def test_a_failing_lm_ends_the_stream_with_a_502_error_event_and_an_error_trace(
    server: str, stream_store: Store, model: str, inputs: dict[str, str]
) -> None:
    _, events = sse(server, {"model": model, "inputs": inputs})
    assert [name for name, _, _ in events] == ["error"]
    error = events[0][1]
    assert error["status"] == 502 and "connection refused (test)" in error["detail"]
    trace = stored_trace(stream_store, error["trace_id"])
    assert trace.info.state.value == "ERROR"
    assert "the language model call failed" in trace.info.tags["flywheel.error"]


@pytest.mark.slow
def test_a_client_that_leaves_early_still_gets_its_prediction_traced(
    server: str, stream_store: Store
) -> None:
    marker = "Kenya, asked by a client that leaves"
    with httpx.stream(
        "POST", f"{server}/predict/stream", json={"model": CAPITAL, "inputs": {"country": marker}}, timeout=60
    ) as r:
        first = next(line for line in r.iter_lines() if line.startswith("event: "))
        assert first == "event: chunk"  # then the connection is closed mid-stream
    deadline = time.monotonic() + 60
    while True:
        where = [stream_store.experiment_id]
        infos, _ = stream_store.tracking.search_traces(locations=where, max_results=500)
        mine = [i for i in infos if marker in i.tags.get("flywheel.inputs", "")]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(mine) == 1 and mine[0].state.value == "OK"
    assert json.loads(mine[0].tags["flywheel.outputs"]) == {"capital": LONG_CAPITALS["Kenya"]}


@pytest.mark.slow
def test_errors_before_the_stream_are_ordinary_json_errors(server: str) -> None:
    cases = [
        ({"model": "no-such-model", "inputs": {"topic": "x"}}, 404, "Model not found"),
        ({"model": JOKES, "inputs": {"subject": "x"}}, 422, "missing input field 'topic'"),
        ({"model": JOKES, "inputs": {"topic": "x"}, "version": "1", "alias": "champion"}, 422, "at most one"),
        ({"model": JOKES, "inputs": {"topic": "x"}, "version": "99"}, 404, "Model not found"),
        ({"model": JOKES}, 422, "inputs"),
    ]
    for body, status, words in cases:
        r = httpx.post(f"{server}/predict/stream", json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        assert r.headers["content-type"] == "application/json" and words in r.json()["detail"], r.text
    big = {"model": JOKES, "inputs": {"topic": "x" * 5_000_000}}  # over MAX_REQUEST_BYTES (4 MB)
    assert httpx.post(f"{server}/predict/stream", json=big, timeout=60).status_code == 413


@pytest.mark.slow
def test_the_sync_client_streams_and_raises_api_errors(server: str) -> None:
    with Client(server) as client:
        events = list(client.stream(CAPITAL, {"country": "Japan"}))
        assert [e["event"] for e in events[:-1]] == ["chunk"] * (len(events) - 1) and len(events) >= 4
        assert events[-1]["result"] == {"capital": LONG_CAPITALS["Japan"]}
        assert "".join(e["chunk"] for e in events[:-1]) == LONG_CAPITALS["Japan"]
        with pytest.raises(APIError) as before:
            list(client.stream("no-such-model", {"topic": "x"}))
        assert before.value.status_code == 404 and "Model not found" in before.value.detail
        with pytest.raises(APIError) as during:
            list(client.stream(JOKES, {"topic": "unreachable"}))
        assert during.value.status_code == 502 and during.value.trace_id.startswith("tr-")


@pytest.mark.slow
def test_the_async_client_streams_concurrently(server: str) -> None:
    async def run() -> list[list[dict[str, Any]]]:
        async with AsyncClient(server) as client:

            async def one(topic: str) -> list[dict[str, Any]]:
                return [e async for e in client.stream(JOKES, {"topic": topic}, stage="Production")]

            answers = await asyncio.gather(*(one(t) for t in ("cat", "coffee", "mondays", "pizza")))
            with pytest.raises(APIError) as info:
                await one("")
            assert info.value.status_code == 422
            return answers

    for events in asyncio.run(run()):
        *chunks, result = events
        assert result["event"] == "result" and len(chunks) >= 3
        assert "".join(c["chunk"] for c in chunks) == result["result"]["joke"]


# --- in process: streaming.astream -----------------------------------------------------------


def test_listeners_only_for_text_fields_one_predictor_writes() -> None:
    pipeline = zoo.summarize_pipeline()
    (summary,) = streaming.listeners(pipeline, ["summary"])
    assert summary.predict is pipeline.summarize.predict and summary.predict_name == "summarize.predict"
    assert streaming.listeners(zoo.typed_facts(), ["capital", "languages", "continent"]) == []

    class Twice(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.draft, self.final = dspy.Predict("q -> answer"), dspy.Predict("q, draft -> answer")

    assert streaming.listeners(Twice(), ["answer"]) == []  # which one's text would it be?


def collect(model: str, inputs: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        return [e async for e in streaming.astream(get_runtime(), model, inputs, **kwargs)]

    return asyncio.run(run())


def test_astream_streams_a_pipeline_and_commits_the_trace_first(stream_store: Store) -> None:
    assert dspy.settings.lm is None and not dspy.settings.callbacks  # nothing global
    events = collect("pipeline", {"text": "Heavy rain and strong wind in the north tonight"})
    *chunks, result = events
    assert chunks and {c["field"] for c in chunks} == {"summary"}
    assert "".join(c["chunk"] for c in chunks) == result["result"]["summary"] == "Storm coming north."
    runtime = get_runtime()
    trace_id = result["trace_id"]
    assert runtime.outbox.pending_trace(trace_id) or runtime.outbox.delivered_model(trace_id)
    assert dspy.settings.lm is None and not dspy.settings.callbacks


def test_astream_raises_what_is_known_before_the_stream(stream_store: Store) -> None:
    with pytest.raises(errors.ModelNotFound):
        collect("no-such-model", {"topic": "x"})
    with pytest.raises(errors.InputError, match="missing input field 'topic'"):
        collect(JOKES, {"subject": "x"})


def test_astream_timeout_is_a_504_error_event_and_an_error_trace(stream_store: Store) -> None:
    t0 = time.perf_counter()
    events = collect("slow", {"country": "France"}, timeout=0.5)
    assert time.perf_counter() - t0 < 1.9  # answered at the limit, not when the thread returns
    (error,) = events
    assert error["event"] == "error" and error["status"] == 504 and "REQUEST_TIMEOUT" in error["detail"]
    runtime = get_runtime()
    assert runtime.outbox.flush(), runtime.outbox.last_error
    trace = runtime.store.client.get_trace(error["trace_id"])
    assert trace.info.state.value == "ERROR"


def test_sync_stream_raises_the_error_after_the_chunks(stream_store: Store) -> None:
    events = list(streaming.stream(get_runtime(), CAPITAL, {"country": "Kenya"}))
    assert events[-1]["result"] == {"capital": LONG_CAPITALS["Kenya"]} and len(events) >= 4
    with pytest.raises(errors.PredictTimeout):
        list(streaming.stream(get_runtime(), "slow", {"country": "France"}, timeout=0.5))


def test_a_stream_follows_the_traffic_plan_canary_and_shadow(stream_store: Store) -> None:
    from flywheel import canary
    from flywheel.tracing import SHADOW_OF_TAG, shadow_filter

    runtime = get_runtime()
    canary.set_canary(stream_store, JOKES, "1", 1.0, actor="test")  # every unpinned request
    try:
        *_, result = streaming.stream(runtime, JOKES, {"topic": "canary cats"})
    finally:
        canary.set_canary(stream_store, JOKES, None, 0.0, actor="test")
    assert result["model_version"] == "1"

    canary.set_shadow(stream_store, JOKES, "1", actor="test")
    try:
        *_, answered = streaming.stream(runtime, JOKES, {"topic": "shadow cats"})  # ends after the shadow
    finally:
        canary.set_shadow(stream_store, JOKES, None, actor="test")
    assert answered["model_version"] == "2"
    assert runtime.outbox.flush(), runtime.outbox.last_error
    shadows, _ = stream_store.tracking.search_traces(
        locations=[stream_store.experiment_id], filter_string=shadow_filter(JOKES), max_results=100
    )
    (shadow,) = [s for s in shadows if s.tags[SHADOW_OF_TAG] == answered["trace_id"]]
    assert shadow.tags["flywheel.model_version"] == "1" and shadow.tags["flywheel.route"] == "shadow"
