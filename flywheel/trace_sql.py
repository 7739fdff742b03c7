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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flywheel import span_rows
from flywheel.store import sql_session, sql_trace_schema, supports_sql_traces

if TYPE_CHECKING:
    from flywheel.tracing import TraceRecord

DB_PAYLOAD_GENERATION = 1  # what start_trace + log_spans leave (tests/test_span_format.py)


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


@dataclass
class TraceRows:
    """MLflow's rows of a batch of traces, one dict per row, keyed by column name."""

    trace_info: list[dict[str, Any]] = field(default_factory=list)
    trace_tags: list[dict[str, Any]] = field(default_factory=list)
    trace_request_metadata: list[dict[str, Any]] = field(default_factory=list)
    spans: list[dict[str, Any]] = field(default_factory=list)


def rows(artifact_root: str, experiment_id: str, records: list[TraceRecord]) -> TraceRows:
    """The rows `start_trace` + `log_spans` store for `records`, built straight from them
    (span_rows), without their span objects. `artifact_root`: the experiment's artifact location.
    Every trace_info row has the same columns (the analytics ones set to None where absent)."""
    m = sql_trace_schema()  # MLflow's tables and the helpers its SQL store fills them with
    exp_id = int(experiment_id)
    location = f"{artifact_root.rstrip('/')}/traces"
    out = TraceRows()
    infos, tags, metadata, spans = out.trace_info, out.trace_tags, out.trace_request_metadata, out.spans
    for record in records:
        tid = record.trace_id
        data = span_rows.spans(record)
        meta = record.metadata()
        analytics = dict(meta)
        if m.TraceMetadataKey.TOKEN_USAGE not in analytics and (usage := span_rows.topmost(data, "usage")):
            analytics[m.TraceMetadataKey.TOKEN_USAGE] = json.dumps(usage)  # what log_spans aggregates
        if cost := span_rows.topmost(data, "cost"):
            analytics[m.TraceMetadataKey.COST] = json.dumps(cost)
        for key in m.PROMOTED_TRACE_METADATA_KEYS:
            meta.pop(key, None)
        meta[m.TraceMetadataKey.TRACE_INFO_FINALIZED] = "true"
        record_tags = record.tags()
        request, response = record.previews()
        infos.append(
            {
                "request_id": tid,
                "experiment_id": exp_id,
                "timestamp_ms": record.start_ns // 1_000_000,
                "execution_time_ms": max(0, (record.end_ns - record.start_ns) // 1_000_000),
                "status": "ERROR" if record.error else "OK",
                "client_request_id": None,
                "request_preview": request,
                "response_preview": response,
                "db_payload_generation": DB_PAYLOAD_GENERATION,
                "trace_name": m.validate_trace_name(record_tags.pop(m.TraceTagKey.TRACE_NAME, None)),
                "session_id": None,
                **m.analytics_columns_from_metadata(analytics),  # token usage and cost columns
            }
        )
        record_tags[m.MLFLOW_ARTIFACT_LOCATION] = f"{location}/{tid}/artifacts"
        record_tags[m.TraceTagKey.SPANS_LOCATION] = m.SpansLocation.TRACKING_STORE.value
        tags += [{"request_id": tid, "key": k, "value": v} for k, v in record_tags.items()]
        metadata += [{"request_id": tid, "key": k, "value": v} for k, v in meta.items()]
        number = int(tid[3:], 16)
        for span in data:
            cost = span.cost or {}
            spans.append(
                {
                    "trace_id": tid,
                    "experiment_id": exp_id,
                    "span_id": span_rows.hex_id(span.span_id),
                    "parent_span_id": None if span.parent_id is None else span_rows.hex_id(span.parent_id),
                    "name": span.name,
                    "type": span.span_type,
                    "status": "ERROR" if span.error is not None else "OK",
                    "start_time_unix_nano": span.start_ns,
                    "end_time_unix_nano": span.end_ns,
                    "content": span_rows.content(number, span),
                    "input_cost": m.finite_float_or_none(cost.get("input_cost")),
                    "output_cost": m.finite_float_or_none(cost.get("output_cost")),
                    "total_cost": m.finite_float_or_none(cost.get("total_cost")),
                    "model_name": m.bounded_model_dimension(span.model),
                    "model_provider": m.bounded_model_dimension(span.provider),
                }
            )
    keys = {k for row in infos for k in row}  # one executemany needs the same columns in every row
    out.trace_info = [{k: row.get(k) for k in keys} for row in infos]
    return out


def write_records(store: Any, experiment_id: str, records: list[TraceRecord]) -> None:
    """Records none of which is stored yet -> one transaction of MLflow's rows (`rows`): what
    `start_trace` + `log_spans` store."""
    from sqlalchemy import insert

    m = sql_trace_schema()
    built = rows(_artifact_root(store, experiment_id), experiment_id, records)
    with sql_session(store) as session:
        session.execute(insert(m.SqlTraceInfo.__table__), built.trace_info)
        session.execute(insert(m.SqlTraceTag.__table__), built.trace_tags)
        session.execute(insert(m.SqlTraceMetadata.__table__), built.trace_request_metadata)
        if built.spans:
            session.execute(insert(m.SqlSpan.__table__), built.spans)
