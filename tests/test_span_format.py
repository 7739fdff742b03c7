"""Golden: the rows flywheel builds straight from a record (span_rows, trace_sql) are the rows
MLflow's own path stores for it (start_trace + log_spans, which runs translate_span_when_storing),
column by column and `content` field by field, for each shape of call tree. The same for a
tracking server (`mlflow server` on PostgreSQL): the OTLP request flywheel builds straight from a
record (span_rows.otlp_request) is, byte for byte, the one MLflow's `Span.to_otel_proto()` makes
of the record's MLflow Spans, and the server stores the same rows for both. An MLflow release
that changes its format fails here."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import types
from typing import Any

import dspy
import programs_zoo as zoo
import pytest
import sqlalchemy
from dspy.lm15 import Usage
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from flywheel import span_rows, trace_sql
from flywheel.calltree import CallTree
from flywheel.config import get_settings
from flywheel.lm import AsyncRetrievalEngine, RetrievalEngine
from flywheel.runtime import Runtime
from flywheel.store import Store
from flywheel.tracing import TraceRecord, _write_public, new_trace_id, write_traces

PRICED = "openai/gpt-4o-mini"  # a model LiteLLM has a price for: the cost columns are filled


class _CountingEngine(RetrievalEngine):
    """The offline LM's answers (they parse for every program of the zoo) with token usage."""

    def complete(self, request: Any) -> Any:
        answer = super().complete(request)
        words = sum(len((m.text or "").split()) for m in request.messages)
        return dataclasses.replace(
            answer, usage=Usage(input_tokens=words, output_tokens=7, total_tokens=words + 7)
        )


class _AsyncCountingEngine(AsyncRetrievalEngine):
    async def complete(self, request: Any) -> Any:  # type: ignore[override]
        return _CountingEngine().complete(request)


def _priced_lm() -> dspy.BaseLM:
    return dspy.LM(PRICED, engine=_CountingEngine(), async_engine=_AsyncCountingEngine(), cache=False)


def _run(shape: str, tree: CallTree) -> dict[str, Any]:
    with dspy.context(lm=_priced_lm(), callbacks=[tree], usage_tracker=tree, track_usage=False):
        if shape == "capital":
            return dict(zoo.capital_qa()(country="Kenya").toDict())
        if shape == "pipeline":
            return dict(zoo.summarize_pipeline()(text="Rain and wind in the north tomorrow").toDict())
        if shape == "agent":
            answer = zoo.capital_agent()(question="What is the capital of Japan?")
            return {"answer": answer.answer}
        answer = asyncio.run(dspy.Predict("topic -> joke").acall(topic="cats"))  # an async Predict
        return {"joke": answer.joke}


def _record(shape: str, failed: bool = False) -> TraceRecord:
    """A record as serving makes it, then as the deliverer reads it back from the outbox payload."""
    tree = CallTree()
    started = time.time_ns()
    outputs = _run(shape, tree)
    extra: dict[str, Any] = {}
    if failed:
        extra = {"error": "language model call failed: boom", "error_type": "RuntimeError"}
        extra["error_traceback"] = "Traceback (most recent call last):\n  RuntimeError: boom\n"
    record = TraceRecord(
        new_trace_id(),
        shape,
        "2",
        "m-abc",
        {"shape": shape, "note": "naïve ☃"},
        None if failed else outputs,
        started,
        time.time_ns(),
        route="stable",
        spans=tree.spans(),
        **extra,
        **tree.summary(),
    )
    runtime = types.SimpleNamespace(settings=get_settings())
    payload = Runtime._trace_payload(runtime, record)  # type: ignore[arg-type]
    return TraceRecord(**json.loads(payload))  # Item.payload, as the deliverer gets it


def _normalise(text: Any, trace_id: str, n: int) -> Any:
    """A stored value with the trace's own ids (trace id, span ids in hex and base64) as names."""
    if not isinstance(text, str):
        return text
    number = int(trace_id[3:], 16)
    text = text.replace(trace_id, "TRACE").replace(
        base64.b64encode(number.to_bytes(16, "big")).decode(), "TRACE64"
    )
    for i in range(n):
        span = span_rows.span_id(trace_id, i)
        text = text.replace(span_rows.hex_id(span), f"SPAN{i}")
        text = text.replace(base64.b64encode(span.to_bytes(8, "big")).decode(), f"SPAN64_{i}")
    return text


def _stored(uri: str, trace_id: str, n: int) -> dict[str, Any]:
    """What the database at `uri` holds for a trace: trace_info, tags, metadata, span rows (each
    `content` parsed), with the trace's ids normalised."""
    engine = sqlalchemy.create_engine(uri)
    out: dict[str, Any] = {}
    with engine.connect() as db:
        for table, column in [("trace_info", "request_id"), ("trace_tags", "request_id")]:
            rows = db.execute(sqlalchemy.text(f"SELECT * FROM {table} WHERE {column} = :t"), {"t": trace_id})
            out[table] = [{k: _normalise(v, trace_id, n) for k, v in row._mapping.items()} for row in rows]
        rows = db.execute(
            sqlalchemy.text("SELECT * FROM trace_request_metadata WHERE request_id = :t"), {"t": trace_id}
        )
        out["metadata"] = {r.key: _normalise(r.value, trace_id, n) for r in rows}
        rows = db.execute(sqlalchemy.text("SELECT * FROM spans WHERE trace_id = :t"), {"t": trace_id})
        spans = {}
        for row in rows:
            values = {k: _normalise(v, trace_id, n) for k, v in row._mapping.items()}
            values["content"] = json.loads(values["content"])
            spans[values["span_id"]] = values
        out["spans"] = spans
    engine.dispose()
    out["tags"] = {r["key"]: r["value"] for r in out.pop("trace_tags")}
    (out["trace_info"],) = out["trace_info"]
    return out


SHAPES = ["capital", "pipeline", "agent", "async_predict"]


@pytest.mark.parametrize("failed", [False, True], ids=["ok", "error"])
@pytest.mark.parametrize("shape", SHAPES)
def test_flywheels_rows_are_the_rows_mlflows_own_path_stores(
    fresh_store: Store, shape: str, failed: bool
) -> None:
    tracking = fresh_store.tracking
    assert trace_sql.supports(tracking)
    ours = _record(shape, failed)
    theirs = TraceRecord(**{**ours.to_dict(), "trace_id": new_trace_id()})
    assert write_traces(tracking, fresh_store.experiment_id, [ours]) == [ours.trace_id]  # the direct rows
    _write_public(tracking, fresh_store.experiment_id, [theirs])  # MLflow's start_trace + log_spans
    n = len(ours.spans or [])
    assert n >= 4
    uri = fresh_store.tracking_uri
    mine, reference = _stored(uri, ours.trace_id, n), _stored(uri, theirs.trace_id, n)
    _assert_same_rows(mine, reference)


def _assert_same_rows(mine: dict[str, Any], reference: dict[str, Any]) -> None:
    for column, value in reference["trace_info"].items():  # every trace_info column
        assert mine["trace_info"][column] == value, column
    assert mine["tags"] == reference["tags"]
    assert mine["metadata"] == reference["metadata"]
    assert mine["spans"].keys() == reference["spans"].keys()
    for span_id, row in reference["spans"].items():
        for column, value in row.items():
            if column != "content":
                assert mine["spans"][span_id][column] == value, (row["name"], column)
        content = mine["spans"][span_id]["content"]
        assert list(content) == list(row["content"]), row["name"]  # the same fields, in MLflow's order
        for field, value in row["content"].items():
            if field == "attributes":
                assert content[field].keys() == value.keys(), row["name"]
                for key, attribute in value.items():
                    assert content[field][key] == attribute, (row["name"], key)
            else:
                assert content[field] == value, (row["name"], field)

    lm_rows = [r for r in reference["spans"].values() if r["type"] == "CHAT_MODEL"]
    assert lm_rows and all(r["total_cost"] for r in lm_rows)  # the cost path was exercised
    assert reference["trace_info"]["total_cost"] and reference["trace_info"]["total_tokens"]


def _reference_request(records: list[TraceRecord]) -> bytes:
    """The request MLflow's own objects make (what `_post_spans` sent before span_rows built it):
    the MLflow Spans of `to_mlflow(tags_on_root=True)`, each through `Span.to_otel_proto()`."""
    request = ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for record in records:
        scope.spans.extend(s.to_otel_proto() for s in record.to_mlflow("0", tags_on_root=True)[1])
    return request.SerializeToString()


def _assert_same_request(body: bytes, reference: bytes) -> None:
    """Span by span first (a readable difference), then the bytes."""
    mine, theirs = ExportTraceServiceRequest.FromString(body), ExportTraceServiceRequest.FromString(reference)
    assert len(mine.resource_spans) == len(theirs.resource_spans) == 1
    spans, expected = (
        mine.resource_spans[0].scope_spans[0].spans,
        theirs.resource_spans[0].scope_spans[0].spans,
    )
    assert len(spans) == len(expected)
    for span, want in zip(spans, expected, strict=True):
        got, wanted = MessageToDict(span), MessageToDict(want)
        assert got.keys() == wanted.keys(), want.name
        for key, value in wanted.items():
            if key == "attributes":
                assert [a["key"] for a in got[key]] == [a["key"] for a in value], want.name
                for attribute, reference_attribute in zip(got[key], value, strict=True):
                    assert attribute == reference_attribute, (want.name, attribute["key"])
            else:
                assert got[key] == value, (want.name, key)
    assert body == reference


@pytest.mark.parametrize("failed", [False, True], ids=["ok", "error"])
@pytest.mark.parametrize("shape", SHAPES)
def test_flywheels_otlp_request_is_the_one_mlflows_spans_make(shape: str, failed: bool) -> None:
    record = _record(shape, failed)
    assert len(record.spans or []) >= 4
    _assert_same_request(span_rows.otlp_request([record]), _reference_request([record]))


def test_otlp_request_of_several_traces_and_awkward_values() -> None:
    """Several traces in one request, a record without a call tree, and the values JSON and
    protobuf disagree on: empty and nested objects and lists, booleans, null, floats, big and
    negative ints, a lone surrogate (which MLflow replaces), a non-JSON-able object."""
    shaped = _record("capital")
    odd: dict[str, Any] = {
        "empty": {},
        "none": [],
        "nested": {"a": [1, {"b": None}], "c": {"d": []}},
        "flags": [True, False],
        "null": None,
        "floats": [1.5, -0.0, 1e300],
        "ints": [2**62, -(2**40), 0],
        "broken": "x\ud800y",
        "set": {3},
        "text": 'a "quoted" {"json": "inside"}',
    }
    tree = [
        {**shaped.spans[0], "attributes": {**shaped.spans[0]["attributes"], "odd": odd}},
        {**shaped.spans[1], "inputs": odd, "outputs": ["x\ud800", {}, []]},
        *shaped.spans[2:],
    ]
    awkward = TraceRecord(**{**shaped.to_dict(), "trace_id": new_trace_id(), "spans": tree})
    bare = TraceRecord(new_trace_id(), "bare", "1", None, {"q": 1}, {"a": [1, 2]}, 1, 2, route="stable")
    failed = TraceRecord(**{**bare.to_dict(), "trace_id": new_trace_id(), "outputs": None, "error": "boom"})
    records = [shaped, awkward, bare, failed]
    _assert_same_request(span_rows.otlp_request(records), _reference_request(records))


@pytest.mark.slow
@pytest.mark.parametrize("failed", [False, True], ids=["ok", "error"])
@pytest.mark.parametrize("shape", SHAPES)
def test_a_tracking_server_stores_for_flywheels_request_what_it_stores_for_mlflows(
    mlflow_on_postgres: Any, shape: str, failed: bool
) -> None:
    """The same record through flywheel's REST path (`write_traces`, its own protobuf) and through
    MLflow's (`RestStore.log_spans` of the record's MLflow Spans): the server on PostgreSQL stores
    the same trace_info, tags, metadata and span rows, and answers get_trace and search_traces
    the same."""
    from mlflow import MlflowClient

    from flywheel import tracing

    mlflow_on_postgres.reset()
    client = MlflowClient(tracking_uri=mlflow_on_postgres.url)
    experiment_id = client.create_experiment(f"golden-{shape}-{failed}")
    tracking = client._tracking_client.store
    assert tracing._is_rest(tracking)
    ours = _record(shape, failed)
    theirs = TraceRecord(**{**ours.to_dict(), "trace_id": new_trace_id()})
    assert write_traces(tracking, experiment_id, [ours]) == [ours.trace_id]  # flywheel's request
    tracking.log_spans(experiment_id, theirs.to_mlflow(experiment_id, tags_on_root=True)[1])  # MLflow's
    n = len(ours.spans or [])
    uri = mlflow_on_postgres.cluster.uri(mlflow_on_postgres.database)
    mine, reference = _stored(uri, ours.trace_id, n), _stored(uri, theirs.trace_id, n)
    _assert_same_rows(mine, reference)
    assert len(reference["spans"]) == n and reference["tags"]["flywheel.model"] == shape

    def read(trace: Any) -> Any:
        return json.loads(_normalise(json.dumps(trace.to_dict()), trace.info.trace_id, n))

    assert read(client.get_trace(ours.trace_id)) == read(client.get_trace(theirs.trace_id))
    found = {i.trace_id: i for i in client.search_traces(locations=[experiment_id], include_spans=False)}
    assert found.keys() == {ours.trace_id, theirs.trace_id}
    infos = [
        json.loads(_normalise(json.dumps(found[t].to_dict()), t, n)) for t in (ours.trace_id, theirs.trace_id)
    ]
    assert infos[0] == infos[1]


def test_prepare_delivery_is_idempotent() -> None:
    from flywheel import tracing

    tracing.prepare_delivery()
    started = time.perf_counter_ns()
    tracing.prepare_delivery()
    assert span_rows._prepared and time.perf_counter_ns() >= started
