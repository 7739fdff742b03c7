"""A batched trace writer for SQL tracking stores (sqlite, PostgreSQL).

MLflow's public path (`start_trace` + `log_spans`) costs one transaction per
trace, about 100 traces/s on sqlite here: less than the server produces. This
writes a whole batch in one transaction with `executemany` on MLflow's own
tables, the same rows the public path writes (tests/test_tracing.py compares
the two). It leans on MLflow internals, reached only through flywheel.store
(`sql_trace_schema`, `sql_session`; tests/test_store.py checks them), so any
error makes the caller fall back to the public path; nothing is lost, only speed.
"""

from __future__ import annotations

import json
from typing import Any

from flywheel.store import sql_session, sql_trace_schema, supports_sql_traces


def supports(store: Any) -> bool:
    return supports_sql_traces(store)


def existing_ids(store: Any, trace_ids: list[str]) -> set[str]:
    from sqlalchemy import select

    info = sql_trace_schema().SqlTraceInfo  # MLflow's trace table
    found: set[str] = set()
    with sql_session(store) as session:
        for start in range(0, len(trace_ids), 500):
            chunk = trace_ids[start : start + 500]
            query = select(info.request_id).where(info.request_id.in_(chunk))
            found.update(row[0] for row in session.execute(query))
    return found


_roots: dict[tuple[int, str], str] = {}


def _artifact_root(store: Any, experiment_id: str) -> str:
    # an experiment's artifact location never changes; looking it up costs a query per batch
    key = (id(store), experiment_id)
    if key not in _roots:
        _roots[key] = store.get_experiment(experiment_id).artifact_location.rstrip("/")
    return _roots[key]


def write_batch(store: Any, items: list[tuple[Any, list[Any]]]) -> None:
    """items: (TraceInfo, [Span]) pairs, none already stored -> one transaction."""
    from sqlalchemy import insert

    m = sql_trace_schema()  # MLflow's tables and the helpers its SQL store fills them with

    infos: list[dict[str, Any]] = []
    tags: list[dict[str, Any]] = []
    metadata: list[dict[str, Any]] = []
    spans: list[dict[str, Any]] = []
    for info, trace_spans in items:
        exp_id = info.experiment_id
        root = _artifact_root(store, exp_id)
        tid = info.trace_id
        meta = dict(info.trace_metadata)
        columns = m.analytics_columns_from_metadata(meta)
        for key in m.PROMOTED_TRACE_METADATA_KEYS:
            meta.pop(key, None)
        meta[m.TraceMetadataKey.TRACE_INFO_FINALIZED] = "true"
        infos.append(
            {
                "request_id": tid,
                "experiment_id": int(exp_id),
                "timestamp_ms": info.request_time,
                "execution_time_ms": info.execution_duration,
                "status": info.state.value,
                "client_request_id": info.client_request_id,
                "request_preview": info.request_preview,
                "response_preview": info.response_preview,
                "db_payload_generation": 1,
                "trace_name": m.validate_trace_name(info.tags.get(m.TraceTagKey.TRACE_NAME)),
                "session_id": None,
                **columns,  # token usage, cost, session: columns of their own, as in MLflow
            }
        )
        trace_tags = {k: v for k, v in info.tags.items() if k != m.TraceTagKey.TRACE_NAME}
        trace_tags[m.MLFLOW_ARTIFACT_LOCATION] = f"{root}/traces/{tid}/artifacts"
        trace_tags[m.TraceTagKey.SPANS_LOCATION] = m.SpansLocation.TRACKING_STORE.value
        tags += [{"request_id": tid, "key": k, "value": v} for k, v in trace_tags.items()]
        metadata += [{"request_id": tid, "key": k, "value": v} for k, v in meta.items()]
        for span in trace_spans:
            content = json.dumps(
                m.translate_span_when_storing(span), cls=m.TraceJSONEncoder, ensure_ascii=False
            )
            spans.append(
                {
                    "trace_id": tid,
                    "experiment_id": int(exp_id),
                    "span_id": span.span_id,
                    "parent_span_id": span.parent_id,
                    "name": span.name,
                    "type": span.span_type,
                    "status": span.status.status_code,
                    "start_time_unix_nano": span.start_time_ns,
                    "end_time_unix_nano": span.end_time_ns,
                    "content": content,
                }
            )
    keys = {k for row in infos for k in row}  # one executemany needs the same columns in every row
    infos = [{k: row.get(k) for k in keys} for row in infos]
    with sql_session(store) as session:
        session.execute(insert(m.SqlTraceInfo.__table__), infos)
        session.execute(insert(m.SqlTraceTag.__table__), tags)
        session.execute(insert(m.SqlTraceMetadata.__table__), metadata)
        if spans:
            session.execute(insert(m.SqlSpan.__table__), spans)
