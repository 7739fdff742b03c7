"""Rated traces of one model read by one SQL query, for export (sqlite or PostgreSQL).

`export.rated_trace_infos` pages MLflow's `search_traces`: 100,000 rated traces took 276 s through
a tracking server's REST API and about 58 s through MLflow's store in process (issue 27). This
reads the same traces with one query on MLflow's tables, streamed (a server-side cursor on
PostgreSQL): the traces of the experiment that carry a valid `user_rating` feedback (the
assessments table first, as MLflow's own filter does), of the model (its `flywheel.model_key`
tag, as `tracing.model_filter` selects), within the dates, newest first with MLflow's tie-break
(`timestamp_ms DESC, request_id`). Each row carries the tags export reads and, as one JSON
array, the trace's valid ratings, corrections and comments. Nothing is decided here: export's
rules (the agreement policy, corrections, the rating filter, the limit, the root span for
truncated tags) run on these rows in Python exactly as on MLflow's TraceInfos
(tests/test_export_sql.py compares the two row for row).

Where it reads: the tracking store's own database when MLflow's SQL store runs in this process
(`store.sql_session`), or FLYWHEEL_EXPORT_DATABASE_URI when set (a read replica of the tracking
server's database; MLflow 3.17's `--read-replica-backend-store-uri` is the same idea). Every
table and column the query uses is in COLUMNS, which tests/test_trace_schema.py checks against
MLflow's schema.

Differences from `search_traces` that flywheel's traces never meet: a session-scoped rating
(MLflow's `mlflow.trace.session` assessments, which cover every trace of a session) is not
followed, and two assessments of one trace created in the same millisecond keep the order the
database returns them in (MLflow's read sets no order either).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flywheel.errors import Unavailable
from flywheel.feedback import COMMENT, CORRECTION, RATING
from flywheel.store import sql_session, supports_sql_traces
from flywheel.tracing import (
    INPUTS_TAG,
    MODEL_KEY_TAG,
    MODEL_TAG,
    OUTPUTS_TAG,
    TRUNCATED_TAG,
    VERSION_TAG,
    model_key,
)

if TYPE_CHECKING:
    from flywheel.runtime import Runtime

COLUMNS: dict[str, tuple[str, ...]] = {
    "assessments": (
        "trace_id",
        "name",
        "assessment_type",
        "valid",
        "experiment_id",
        "value",
        "source_type",
        "source_id",
        "created_timestamp",
        "assessment_metadata",
    ),
    "trace_info": ("request_id", "experiment_id", "timestamp_ms"),
    "trace_tags": ("request_id", "key", "value"),
}
"""MLflow's tables and columns the query reads (tests/test_trace_schema.py checks them)."""

TAGS = (MODEL_TAG, VERSION_TAG, INPUTS_TAG, OUTPUTS_TAG, TRUNCATED_TAG)  # what tracing.served_call reads
NAMES = (RATING, CORRECTION, COMMENT)  # the assessments export's rules read
DIALECTS = ("sqlite", "postgresql")
CHUNK = 2000  # rows fetched at a time from the cursor


@dataclass(frozen=True, slots=True)
class Judgement:
    """An assessment as export reads it (the attributes of MLflow's Feedback it uses)."""

    name: str
    value: Any
    source: Any  # mlflow.entities.AssessmentSource
    create_time_ms: int
    metadata: dict[str, Any] | None
    valid: bool = True


@dataclass(frozen=True, slots=True)
class RatedTrace:
    """What export reads of a TraceInfo: its id, time, flywheel's tags, its valid assessments."""

    trace_id: str
    request_time: int
    tags: dict[str, str]
    assessments: list[Judgement]


def configured(runtime: Runtime) -> bool:
    """Whether export can read by one query: a database URI for export is set, or the tracking
    store is MLflow's SQL store in this process on sqlite or PostgreSQL."""
    if runtime.settings.flywheel_export_database_uri:
        return True
    in_process = runtime.store.tracking_uri.startswith(("sqlite:", "postgresql", "postgres:"))
    return in_process and supports_sql_traces(runtime.store.tracking)


_engines: dict[str, Any] = {}
_engines_lock = threading.Lock()


def _url(uri: str) -> str:
    """MLflow's URI spelling -> SQLAlchemy's: psycopg (3) is the PostgreSQL driver installed."""
    for plain in ("postgresql://", "postgres://"):
        if uri.startswith(plain):
            return "postgresql+psycopg://" + uri[len(plain) :]
    return uri


def _engine(uri: str) -> Any:
    """One engine per export database URI, kept for the process (a small pool); concurrent exports
    build it once (an engine built twice would leak its pool)."""
    with _engines_lock:
        engine = _engines.get(uri)
        if engine is None:
            from sqlalchemy import create_engine

            url = _url(uri)
            # no automatic prepared statements: PostgreSQL then switched this query to a generic plan
            # and took 321 s instead of 4 (issue 27)
            args = {"prepare_threshold": None} if url.startswith("postgresql+psycopg") else {}
            engine = create_engine(url, connect_args=args, pool_size=2, max_overflow=2, pool_pre_ping=True)
            _engines[uri] = engine
        return engine


@contextmanager
def _connection(runtime: Runtime) -> Iterator[Any]:
    """A SQLAlchemy connection in a transaction on the export database or the tracking store's."""
    uri = runtime.settings.flywheel_export_database_uri
    if uri:
        with _engine(uri).connect() as conn, conn.begin():
            yield conn
        return
    with sql_session(runtime.store.tracking) as session:
        conn = session.connection()
        raw = getattr(conn.connection, "driver_connection", None)
        saved = getattr(raw, "prepare_threshold", None)
        if raw is not None and hasattr(raw, "prepare_threshold"):  # psycopg: see _engine
            raw.prepare_threshold = None
        try:
            yield conn
        finally:
            if raw is not None and hasattr(raw, "prepare_threshold"):
                raw.prepare_threshold = saved


def _query(dialect: str, experiment_id: int, model: str, lo: int | None, hi: int | None) -> Any:
    from sqlalchemy import Text, and_, cast, column, func, or_, select, table, true

    def tbl(name: str, alias: str) -> Any:
        return table(name, *(column(c) for c in COLUMNS[name])).alias(alias)

    info = tbl("trace_info", "t")
    key = tbl("trace_tags", "k")
    rated = tbl("assessments", "r")
    given = tbl("assessments", "a")
    rated_ids = select(rated.c.trace_id).where(
        rated.c.name == RATING,
        rated.c.assessment_type == "feedback",  # what MLflow's `feedback.user_rating` filter reads
        rated.c.valid == true(),
        or_(rated.c.experiment_id == experiment_id, rated.c.experiment_id.is_(None)),
    )
    parts = (
        given.c.name,
        given.c.value,
        given.c.source_type,
        given.c.source_id,
        given.c.created_timestamp,
        given.c.assessment_metadata,
    )
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import aggregate_order_by

        agg = func.json_agg(aggregate_order_by(func.json_build_array(*parts), given.c.created_timestamp))
    else:
        agg = func.json_group_array(func.json_array(*parts))
    judged = (
        select(cast(agg, Text))
        .where(given.c.trace_id == info.c.request_id, given.c.name.in_(NAMES), given.c.valid == true())
        .scalar_subquery()
    )
    tags = [tbl("trace_tags", f"g{i}") for i in range(len(TAGS))]
    stmt = select(info.c.request_id, info.c.timestamp_ms, judged, *(g.c.value for g in tags)).select_from(
        info.join(
            key,
            and_(
                key.c.request_id == info.c.request_id,
                key.c.key == MODEL_KEY_TAG,
                key.c.value == model_key(model),
            ),
        )
    )
    for name, g in zip(TAGS, tags, strict=True):
        stmt = stmt.outerjoin(g, and_(g.c.request_id == info.c.request_id, g.c.key == name))
    stmt = stmt.where(info.c.experiment_id == experiment_id, info.c.request_id.in_(rated_ids))
    if lo is not None:
        stmt = stmt.where(info.c.timestamp_ms >= lo)
    if hi is not None:
        stmt = stmt.where(info.c.timestamp_ms < hi)
    return stmt.order_by(info.c.timestamp_ms.desc(), info.c.request_id)


def rated_traces(runtime: Runtime, model: str, lo: int | None, hi: int | None) -> Iterator[RatedTrace]:
    """The traces `export.rated_trace_infos` yields, in its order, as RatedTraces (`lo`, `hi`:
    its millisecond bounds, `export._bounds`). Close the iterator when stopping early."""
    from mlflow.entities import AssessmentSource
    from sqlalchemy.exc import DBAPIError

    from flywheel.limits import redact, redact_uri, uri_secrets

    sources: dict[tuple[str, str | None], Any] = {}
    uri = runtime.settings.flywheel_export_database_uri
    where = redact_uri(uri) if uri else "the tracking store's database"
    try:
        with _connection(runtime) as conn:
            dialect = conn.dialect.name
            if dialect not in DIALECTS:
                raise Unavailable(f"export by one query reads sqlite or PostgreSQL, not {dialect} ({where})")
            if dialect == "postgresql":  # a cursor plans for its first 10% by default: read it all
                conn.exec_driver_sql("SET LOCAL cursor_tuple_fraction = 1.0")
            stmt = _query(dialect, int(runtime.store.experiment_id), model, lo, hi)
            result = conn.execute(stmt.execution_options(yield_per=CHUNK))
            for trace_id, request_time, judged, *values in result:
                tags = {k: v for k, v in zip(TAGS, values, strict=True) if v is not None}
                assessments = []
                for name, value, source_type, source_id, created, meta in json.loads(judged or "[]"):
                    source = sources.get((source_type, source_id))
                    if source is None:
                        source = sources[(source_type, source_id)] = AssessmentSource(source_type, source_id)
                    assessments.append(
                        Judgement(
                            name,
                            json.loads(value),
                            source,
                            created,
                            json.loads(meta) if meta is not None else None,
                        )
                    )
                assessments.sort(key=lambda a: a.create_time_ms)  # sqlite's aggregate sets no order
                yield RatedTrace(trace_id, request_time, tags, assessments)
    except DBAPIError as exc:  # the database is down or refuses: never an empty export
        detail = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
        raise Unavailable(f"export could not read {where}: {redact(detail, uri_secrets(uri))}") from None
