"""Trace records -> complete MLflow traces; the batched SQL path writes what MLflow's public path writes."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from typing import Any

import pytest
from pg import PostgresCluster

from flywheel import trace_sql
from flywheel.store import Store
from flywheel.tracing import (
    INPUTS_TAG,
    TAG_CHARS,
    TRUNCATED_TAG,
    TraceRecord,
    _write_public,
    complete_calls,
    model_key,
    new_trace_id,
    write_traces,
)


def _record(i: int, model: str = 'it\'s "quoted"') -> TraceRecord:
    now = time.time_ns()
    return TraceRecord(
        new_trace_id(), model, "3", "m-abc", {"topic": f"t{i}"}, {"joke": f"j{i}"}, now, now + 2_000_000
    )


def _rows(db: str, trace_id: str) -> dict[str, list[tuple]]:
    con = sqlite3.connect(db)
    out = {}
    for table, column in [
        ("trace_info", "request_id"),
        ("trace_tags", "request_id"),
        ("trace_request_metadata", "request_id"),
        ("spans", "trace_id"),
    ]:
        rows = con.execute(f"SELECT * FROM {table} WHERE {column}=?", (trace_id,)).fetchall()
        out[table] = sorted(tuple(str(v).replace(trace_id, "ID") for v in row) for row in rows)
    con.close()
    return out


def test_batched_and_public_paths_write_the_same_rows(fresh_store: Store) -> None:
    tracking = fresh_store.tracking
    assert trace_sql.supports(tracking)
    fast, slow = _record(1), _record(1)
    slow = TraceRecord(**{**fast.__dict__, "trace_id": slow.trace_id})
    assert write_traces(tracking, fresh_store.experiment_id, [fast]) == [fast.trace_id]
    _write_public(tracking, fresh_store.experiment_id, [slow])
    db = fresh_store.tracking_uri.removeprefix("sqlite:///")
    fast_rows, slow_rows = _rows(db, fast.trace_id), _rows(db, slow.trace_id)
    assert fast_rows.keys() == slow_rows.keys()
    for table in fast_rows:
        assert len(fast_rows[table]) == len(slow_rows[table]) > 0, table
    assert fast_rows["trace_tags"] == slow_rows["trace_tags"]
    assert fast_rows["trace_request_metadata"] == slow_rows["trace_request_metadata"]


def test_a_written_trace_reads_back_complete(fresh_store: Store) -> None:
    record = _record(7)
    write_traces(fresh_store.tracking, fresh_store.experiment_id, [record])
    trace = fresh_store.client.get_trace(record.trace_id)
    assert trace.info.state.value == "OK"
    assert trace.info.tags["flywheel.model"] == record.model
    assert trace.info.tags["flywheel.model_key"] == model_key(record.model)
    assert trace.info.tags["flywheel.model_version"] == "3"
    assert trace.info.trace_metadata["mlflow.modelId"] == "m-abc"
    assert trace.info.experiment_id == fresh_store.experiment_id
    (span,) = trace.data.spans
    assert span.inputs == {"topic": "t7"} and span.outputs == {"joke": "j7"}


def test_replay_is_idempotent(fresh_store: Store) -> None:
    tracking = fresh_store.tracking
    records = [_record(i) for i in range(20)]
    assert len(write_traces(tracking, fresh_store.experiment_id, records[:10])) == 10
    written = write_traces(tracking, fresh_store.experiment_id, records)  # a replay overlapping the first
    assert sorted(written) == sorted(r.trace_id for r in records[10:])
    infos, _ = tracking.search_traces(locations=[fresh_store.experiment_id], max_results=100)
    assert len(infos) == 20


def test_failed_predictions_are_error_traces(fresh_store: Store) -> None:
    now = time.time_ns()
    record = TraceRecord(new_trace_id(), "m", "1", None, {"topic": "x"}, None, now, now, "LM exploded")
    write_traces(fresh_store.tracking, fresh_store.experiment_id, [record])
    trace = fresh_store.client.get_trace(record.trace_id)
    assert trace.info.state.value == "ERROR"
    assert "flywheel.outputs" not in trace.info.tags


def test_record_json_round_trip() -> None:
    record = _record(3)
    payload = json.loads(json.dumps(record.to_dict()))  # as the outbox stores it
    assert TraceRecord(**payload) == record


def test_trace_ids_are_time_ordered_uuid7_that_carry_their_creation_time() -> None:
    import re
    import uuid

    from flywheel.tracing import trace_time

    before = time.time()
    ids = [new_trace_id() for _ in range(50)]
    after = time.time()
    for trace_id in ids:
        assert re.fullmatch(r"tr-[0-9a-f]{32}", trace_id)
        assert uuid.UUID(trace_id[3:]).version == 7
        assert before - 0.002 <= trace_time(trace_id) <= after + 0.002
    assert [trace_time(i) for i in ids] == sorted(trace_time(i) for i in ids)
    old = new_trace_id(at=before - 3600)
    assert abs(trace_time(old) - (before - 3600)) < 0.002
    assert trace_time("tr-" + uuid.uuid4().hex) is None  # a random id carries no time
    assert trace_time("tr-0000") is None and trace_time("nope") is None


# --- the batched path on PostgreSQL (MLflow's SQL store on a database of the session's cluster) ----


@pytest.fixture(scope="module")
def pg_store(postgres: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Store:
    from mlflow import MlflowClient

    from flywheel.config import get_settings

    database = f"direct_{uuid.uuid4().hex[:10]}"
    with postgres.connect() as db:  # type: ignore[attr-defined]
        db.execute(f'CREATE DATABASE "{database}"')
    uri = postgres.uri(database)
    artifacts = tmp_path_factory.mktemp("pg-artifacts").as_uri()
    experiment_id = MlflowClient(tracking_uri=uri).create_experiment("direct", artifact_location=artifacts)
    return Store(uri, experiment_id, get_settings())


def _pg_rows(postgres: PostgresCluster, store: Store, trace_id: str) -> dict[str, list[tuple]]:
    out = {}
    with postgres.connect(store.tracking_uri.rsplit("/", 1)[1]) as db:  # type: ignore[attr-defined]
        for table, column in [
            ("trace_info", "request_id"),
            ("trace_tags", "request_id"),
            ("trace_request_metadata", "request_id"),
            ("spans", "trace_id"),
        ]:
            rows = db.execute(f"SELECT * FROM {table} WHERE {column} = %s", (trace_id,)).fetchall()
            out[table] = sorted(tuple(str(v).replace(trace_id, "ID") for v in row) for row in rows)
    return out


def test_batched_path_on_postgresql_writes_what_the_public_path_writes(
    pg_store: Store, postgres: PostgresCluster
) -> None:
    tracking = pg_store.tracking
    assert trace_sql.supports(tracking)
    long_topic = "x" * 9000  # longer than PostgreSQL's 8,000-character tag column
    fast = TraceRecord(**{**_record(1).__dict__, "inputs": {"topic": long_topic}})
    slow = TraceRecord(**{**fast.__dict__, "trace_id": new_trace_id()})
    trace_sql.write_records(tracking, pg_store.experiment_id, [fast])  # no silent fallback
    assert write_traces(tracking, pg_store.experiment_id, [fast]) == []  # already there: idempotent
    _write_public(tracking, pg_store.experiment_id, [slow])
    fast_rows = _pg_rows(postgres, pg_store, fast.trace_id)
    slow_rows = _pg_rows(postgres, pg_store, slow.trace_id)
    for table in fast_rows:
        assert len(fast_rows[table]) == len(slow_rows[table]) > 0, table
    assert fast_rows["trace_tags"] == slow_rows["trace_tags"]
    assert fast_rows["trace_request_metadata"] == slow_rows["trace_request_metadata"]
    info = tracking.get_trace_info(fast.trace_id)
    assert info.tags[TRUNCATED_TAG] == "inputs" and len(info.tags[INPUTS_TAG]) <= TAG_CHARS
    call = complete_calls(tracking, [info])[fast.trace_id]  # the complete fields, from the root span
    assert call.inputs == {"topic": long_topic} and call.outputs == {"joke": "j1"}


# --- a tracking server (MLflow's REST store on the session's PostgreSQL-backed server) -----------


def _tree_record(topic: str) -> TraceRecord:
    """A trace as serving records it: the demo program under a CallTree, on an LM that reports
    token usage (the benchmarks' stand-in, with no wait)."""
    import dspy

    from benchmarks.sleep_lm import SleepLM
    from flywheel.calltree import CallTree
    from flywheel.demo.seed import joke_program

    tree = CallTree()
    started = time.time_ns()
    with dspy.context(lm=SleepLM(latency=0), callbacks=[tree], usage_tracker=tree, track_usage=False):
        answer = joke_program(2)(topic=topic)
    return TraceRecord(
        new_trace_id(),
        "jokes",
        "2",
        "m-abc",
        {"topic": topic},
        {"joke": answer.joke},
        started,
        time.time_ns(),
        route="stable",
        spans=tree.spans(),
        **tree.summary(),
    )


def test_tracking_server_bulk_path_stores_what_start_trace_stores(mlflow_on_postgres: Any) -> None:
    """Over REST, traces go as `log_spans` requests only (no `start_trace` per trace); the server
    must build the same trace: tags, state, times, previews, name, token usage, spans. Only the
    metadata is missing, and the root span carries flywheel's part of it."""
    from mlflow import MlflowClient

    from flywheel import tracing

    mlflow_on_postgres.reset()
    client = MlflowClient(tracking_uri=mlflow_on_postgres.url)
    experiment_id = client.create_experiment("rest")
    tracking = client._tracking_client.store
    assert tracing._is_rest(tracking)
    bulk = [_tree_record(f"topic {i}") for i in range(120)]  # three requests, in flight at once
    public = TraceRecord(**{**bulk[0].to_dict(), "trace_id": new_trace_id()})
    assert bulk[0].usage
    assert write_traces(tracking, experiment_id, bulk) == [r.trace_id for r in bulk]
    _write_public(tracking, experiment_id, [public])
    assert write_traces(tracking, experiment_id, bulk[:10]) == [r.trace_id for r in bulk[:10]]  # a replay
    infos = client.search_traces(locations=[experiment_id], max_results=500, include_spans=False)
    assert sorted(i.trace_id for i in infos) == sorted([public.trace_id] + [r.trace_id for r in bulk])

    fast, slow = client.get_trace(bulk[0].trace_id), client.get_trace(public.trace_id)

    def tags(info: Any) -> dict[str, str]:
        return {k: v.replace(info.trace_id, "ID") for k, v in info.tags.items()}

    assert tags(fast.info) == tags(slow.info)  # every tag, through the root's mlflow.traceTag.* attributes
    assert fast.info.tags["flywheel.model"] == "jokes" and fast.info.tags["flywheel.route"] == "stable"
    for field in ("state", "request_time", "request_preview", "response_preview"):
        assert getattr(fast.info, field) == getattr(slow.info, field), field
    # the server takes the span times in whole ms (end ms - start ms), start_trace the exact length
    assert abs(fast.info.execution_duration - slow.info.execution_duration) <= 1
    assert fast.info.token_usage == slow.info.token_usage and fast.info.token_usage["total_tokens"] > 0
    assert [(s.name, s.span_type, s.parent_id is None) for s in fast.data.spans] == [
        (s.name, s.span_type, s.parent_id is None) for s in slow.data.spans
    ]
    assert len(fast.data.spans) >= 4  # the call tree: forward, adapter format/parse, the LM call
    assert "mlflow.modelId" in slow.info.trace_metadata and "mlflow.modelId" not in fast.info.trace_metadata
    root = next(s for s in fast.data.spans if s.parent_id is None)
    assert root.attributes["flywheel.model_id"] == "m-abc" and root.attributes["flywheel.lm_calls"] == 1
    assert root.inputs == {"topic": "topic 0"} and root.outputs == {"joke": bulk[0].outputs["joke"]}


def test_a_delivery_whose_requests_partly_fail_reports_the_stored_traces_only(
    mlflow_on_postgres: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One failed `log_spans` request (the server timed out, say) must not fail the requests that
    stored their traces: the outbox is told which items are done and retries only the others."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from flywheel import tracing
    from flywheel.config import get_settings
    from flywheel.outbox import Item

    mlflow_on_postgres.reset()
    experiment_id = MlflowClient(tracking_uri=mlflow_on_postgres.url).create_experiment("partial")
    store = Store(mlflow_on_postgres.url, experiment_id, get_settings())
    records = [_record(i) for i in range(3 * tracing.PUBLIC_CHUNK)]
    doomed = records[tracing.PUBLIC_CHUNK].trace_id  # the second request's first trace
    post = tracing._post_spans

    def flaky(tracking: Any, experiment: str, body: bytes) -> None:
        if bytes.fromhex(doomed[3:]) in body:  # the request holds the doomed trace's spans
            raise MlflowException("Read timed out")
        post(tracking, experiment, body)

    monkeypatch.setattr(tracing, "_post_spans", flaky)
    items = [Item(i, "trace", r.trace_id, r.to_dict(), None, 0) for i, r in enumerate(records)]
    done = tracing.deliver(store, items)
    second = set(range(tracing.PUBLIC_CHUNK, 2 * tracing.PUBLIC_CHUNK))
    assert sorted(done) == [i for i in range(len(records)) if i not in second]
    stored = {i.trace_id for i in store.client.search_traces(locations=[experiment_id], max_results=500)}
    assert stored == {r.trace_id for i, r in enumerate(records) if i not in second}

    monkeypatch.setattr(tracing, "_post_spans", post)  # the server answers again: the retry stores the rest
    assert tracing.deliver(store, [items[i] for i in sorted(second)]) == sorted(second)
    stored = {i.trace_id for i in store.client.search_traces(locations=[experiment_id], max_results=500)}
    assert stored == {r.trace_id for r in records}


def test_a_failed_call_of_a_users_own_module_reaches_a_tracking_server_as_start_trace_writes_it(
    mlflow_on_postgres: Any,
) -> None:
    """The bulk path with what goes wrong in use: a Module written as the DSPy docs teach (only
    `forward`) whose LM is down (LiteLLM's real client, to a port nothing listens on). The trace is
    ERROR with the failure in its tags and the exception on its root span, as through
    `start_trace`; the failed steps of the call tree are ERROR spans."""
    import traceback

    import dspy
    from mlflow import MlflowClient
    from programs_zoo import capital_qa

    from flywheel.calltree import CallTree

    tree = CallTree()
    started = time.time_ns()
    dead = dspy.LM(
        "openai/down", api_base="http://127.0.0.1:9/v1", api_key="unused", num_retries=0, cache=False
    )
    with dspy.context(lm=dead, callbacks=[tree], usage_tracker=tree, track_usage=False):
        with pytest.raises(Exception) as failure:
            capital_qa()(country="Peru")
    record = TraceRecord(
        new_trace_id(),
        "capitals",
        "1",
        "m-cap",
        {"country": "Peru"},
        None,
        started,
        time.time_ns(),
        error=f"language model call failed: {failure.value}"[:500],
        error_type=type(failure.value).__name__,
        error_traceback="".join(traceback.format_exception(failure.value)),
        route="stable",
        spans=tree.spans(),
        **tree.summary(),
    )
    twin = TraceRecord(**{**record.to_dict(), "trace_id": new_trace_id()})

    mlflow_on_postgres.reset()
    client = MlflowClient(tracking_uri=mlflow_on_postgres.url)
    experiment_id = client.create_experiment("rest-errors")
    tracking = client._tracking_client.store
    assert write_traces(tracking, experiment_id, [record]) == [record.trace_id]  # the bulk path
    _write_public(tracking, experiment_id, [twin])
    bulk, public = client.get_trace(record.trace_id), client.get_trace(twin.trace_id)

    def tags(info: Any) -> dict[str, str]:
        return {k: v.replace(info.trace_id, "ID") for k, v in info.tags.items()}

    assert bulk.info.state.value == public.info.state.value == "ERROR"
    assert (
        tags(bulk.info) == tags(public.info)
        and "language model call failed" in bulk.info.tags["flywheel.error"]
    )
    assert "flywheel.outputs" not in bulk.info.tags
    root = next(s for s in bulk.data.spans if s.parent_id is None)
    assert root.name == "CapitalQA.forward" and root.status.status_code.value == "ERROR"
    assert [e.name for e in root.events] == ["exception"]
    assert root.events[0].attributes["exception.type"] == type(failure.value).__name__
    failed = sorted(s.name for s in bulk.data.spans if s.status.status_code.value == "ERROR")
    assert failed == sorted(s.name for s in public.data.spans if s.status.status_code.value == "ERROR")
    assert any(name.endswith(".__call__") for name in failed)  # the LM call itself failed
