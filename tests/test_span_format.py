"""Golden: the rows flywheel builds straight from a record (span_rows, trace_sql) are the rows
MLflow's own path stores for it (start_trace + log_spans, which runs translate_span_when_storing),
column by column and `content` field by field, for each shape of call tree. An MLflow release
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


def _stored(store: Store, trace_id: str, n: int) -> dict[str, Any]:
    engine = sqlalchemy.create_engine(store.tracking_uri)
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
    mine, reference = _stored(fresh_store, ours.trace_id, n), _stored(fresh_store, theirs.trace_id, n)

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


def test_prepare_delivery_is_idempotent() -> None:
    from flywheel import tracing

    tracing.prepare_delivery()
    started = time.perf_counter_ns()
    tracing.prepare_delivery()
    assert span_rows._prepared and time.perf_counter_ns() >= started
