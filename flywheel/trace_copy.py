"""The bulk trace writer: a host's deliverer COPYs its batches into MLflow's PostgreSQL tables.

Through a tracking server a trace costs the server 20-26 ms of CPU (mostly `log_spans`' tags
merged row by row); MLflow's public path in process, 25 traces/s. Given the database itself
(FLYWHEEL_TRACE_DATABASE_URI), the deliverer writes a whole batch in one transaction: each of
MLflow's four trace tables (`trace_info`, `trace_tags`, `trace_request_metadata`, `spans`) is
COPYed into a temporary table of the same columns, then moved with `INSERT ... SELECT ... ON
CONFLICT DO NOTHING`. The rows are the ones the sqlite path writes (`trace_sql.rows`: token
usage and cost columns, `mlflow.modelId` in the metadata, the artifact location tag), so
MLflow's server reads them back as its own (`get_trace`, `search_traces`, the UI).

- Idempotent: a trace already in `trace_info` is left as it is, and so are its tags, metadata
  and spans (only traces whose `trace_info` row this transaction inserted get the others). A
  replay after a crash, or a second writer racing on the same batch, writes each trace once:
  PostgreSQL makes the second wait on the first's uncommitted rows, then skip them.
- Tested schemas only: the writer refuses to open (`SchemaNotTested`, naming the revision found
  and the ones expected) on a database whose `alembic_version` is not in TESTED_REVISIONS. The
  deliverer then keeps every item in its outbox and reports the error (its log, /health).
- COLUMNS is what the writer reads and writes; tests/test_trace_schema.py compares it with the
  tables a fresh MLflow creates (PostgreSQL and sqlite), so an `mlflow` pin bump that moves a
  column fails there, naming it.
- psycopg 3 with `prepare_threshold=None`: no automatic prepared statements, whose generic plans
  PostgreSQL may switch to (issue 27: a keyset query went from seconds to minutes).

Everything else (the registry, assessments, review queues, the UI) still goes through the
tracking server: this module only ever inserts into the four trace tables and reads
`alembic_version` and `experiments`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from flywheel.errors import ConfigError, SchemaNotTested

if TYPE_CHECKING:
    from flywheel.tracing import TraceRecord

TESTED_REVISIONS: tuple[str, ...] = ("dc11669786a5",)
"""MLflow's alembic revisions this writer was tested with (mlflow 3.17.2's head)."""

COLUMNS: dict[str, tuple[str, ...]] = {
    "trace_info": (
        "request_id",
        "experiment_id",
        "timestamp_ms",
        "execution_time_ms",
        "status",
        "client_request_id",
        "request_preview",
        "response_preview",
        "db_payload_generation",
        "trace_name",
        "session_id",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "cache_creation_input_tokens_above_1hr",
        "input_cost",
        "output_cost",
        "total_cost",
    ),
    "trace_tags": ("request_id", "key", "value"),
    "trace_request_metadata": ("request_id", "key", "value"),
    "spans": (
        "trace_id",
        "experiment_id",
        "span_id",
        "parent_span_id",
        "name",
        "type",
        "status",
        "start_time_unix_nano",
        "end_time_unix_nano",
        "content",
        "input_cost",
        "output_cost",
        "total_cost",
        "model_name",
        "model_provider",
    ),
    "experiments": ("experiment_id", "name", "artifact_location"),  # read only
    "alembic_version": ("version_num",),  # read only
}
"""Table -> the columns the writer writes (the four trace tables) or reads (the last two)."""

MAY_BE_NULL: dict[str, tuple[str, ...]] = {
    "trace_info": (
        "client_request_id",
        "trace_name",
        "session_id",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "cache_creation_input_tokens_above_1hr",
        "input_cost",
        "output_cost",
        "total_cost",
    ),
    "spans": ("parent_span_id", "input_cost", "output_cost", "total_cost", "model_name", "model_provider"),
}
"""Table -> the columns the writer leaves NULL when a trace has no value for them."""

WRITTEN = ("trace_info", "trace_tags", "trace_request_metadata", "spans")  # in this order (foreign keys)
KEYS = {  # each table's trace id column, then the rest of its primary key (the order rows go in)
    "trace_info": ("request_id",),
    "trace_tags": ("request_id", "key"),
    "trace_request_metadata": ("request_id", "key"),
    "spans": ("trace_id", "span_id"),
}
CONNECT_TIMEOUT = 10  # seconds


def dsn(uri: str) -> str:
    """A SQLAlchemy database URI (`postgresql+psycopg://...`, as MLflow takes it) as libpq's."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.split("+", 1)[0] not in ("postgresql", "postgres"):
        from flywheel.limits import redact_uri

        raise ConfigError(
            f"FLYWHEEL_TRACE_DATABASE_URI={redact_uri(uri)!r} is not a PostgreSQL URI "
            "(postgresql://user@host:port/database or postgresql+psycopg://...)"
        )
    return f"postgresql://{rest}"


class Writer:
    """One connection to the trace database, its schema checked, with its temporary tables."""

    def __init__(self, uri: str) -> None:
        import psycopg

        self.uri = uri
        self._lock = threading.Lock()
        self._experiments: dict[str, str] = {}  # experiment id -> artifact location
        self.conn = psycopg.connect(
            dsn(uri), prepare_threshold=None, connect_timeout=CONNECT_TIMEOUT, autocommit=True
        )  # a transaction is explicit: `with conn.transaction()`
        try:
            self.revision = check_revision(self.conn)
            with self.conn.transaction():
                for table in WRITTEN:  # kept for the connection's life, emptied by every commit
                    self.conn.execute(
                        f"CREATE TEMPORARY TABLE fw_{table} ON COMMIT DELETE ROWS AS "
                        f"SELECT {', '.join(COLUMNS[table])} FROM {table} WITH NO DATA"
                    )
        except BaseException:
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def artifact_root(self, experiment_id: str, name: str | None = None) -> str:
        """The experiment's artifact location (and, given `name`, a check that the id is that
        experiment's in this database: a URI pointing at another MLflow database fails here)."""
        if experiment_id not in self._experiments:
            found = self.conn.execute(
                "SELECT name, artifact_location FROM experiments WHERE experiment_id = %s",
                (int(experiment_id),),
            ).fetchone()
            if found is None or (name is not None and found[0] != name):
                what = "no experiment" if found is None else f"experiment {found[0]!r}"
                raise ConfigError(
                    f"the trace database has {what} with id {experiment_id}"
                    + (f", not {name!r}" if name is not None else "")
                    + ": does FLYWHEEL_TRACE_DATABASE_URI name the tracking server's database?"
                )
            self._experiments[experiment_id] = found[1]
        return self._experiments[experiment_id]

    def write(
        self, experiment_id: str, records: list[TraceRecord], experiment_name: str | None = None
    ) -> list[str]:
        """Write `records` in one transaction; the trace ids it wrote (those not stored before)."""
        from flywheel import trace_sql

        with self._lock:
            built = trace_sql.rows(self.artifact_root(experiment_id, experiment_name), experiment_id, records)
            for table in WRITTEN:
                extra = {k for row in getattr(built, table)[:1] for k in row} - set(COLUMNS[table])
                if extra:  # never drop a column MLflow's own path would fill
                    raise SchemaNotTested(f"the bulk writer does not know {table} column(s) {sorted(extra)}")
            with self.conn.transaction(), self.conn.cursor() as cur:
                for table in WRITTEN:
                    columns = COLUMNS[table]
                    with cur.copy(f"COPY fw_{table} ({', '.join(columns)}) FROM STDIN") as copy:
                        for row in getattr(built, table):
                            copy.write_row([row.get(c) for c in columns])
                names = ", ".join(COLUMNS["trace_info"])
                cur.execute(
                    f"INSERT INTO trace_info ({names}) SELECT {names} FROM fw_trace_info "
                    "ORDER BY request_id ON CONFLICT DO NOTHING RETURNING request_id"
                )
                written = [row[0] for row in cur.fetchall()]
                if written:
                    for table in WRITTEN[1:]:
                        names = ", ".join(COLUMNS[table])
                        cur.execute(
                            f"INSERT INTO {table} ({names}) SELECT {names} FROM fw_{table} "
                            f"WHERE {KEYS[table][0]} = ANY(%s) ORDER BY {', '.join(KEYS[table])} "
                            "ON CONFLICT DO NOTHING",
                            (written,),
                        )
        return written


def check_revision(conn: Any) -> str:
    """The database's MLflow schema revision; SchemaNotTested when it is not a tested one."""
    import psycopg

    try:
        found = [row[0] for row in conn.execute("SELECT version_num FROM alembic_version").fetchall()]
    except psycopg.errors.UndefinedTable:
        found = []
    if len(found) != 1 or found[0] not in TESTED_REVISIONS:
        shown = ", ".join(found) or "none (no alembic_version row: not an MLflow database?)"
        raise SchemaNotTested(
            f"the trace database's MLflow schema revision is {shown}; the bulk trace writer was "
            f"tested with {', '.join(TESTED_REVISIONS)} only, so it refuses to write (traces wait in "
            "the outbox). Run the MLflow version flywheel pins, or unset FLYWHEEL_TRACE_DATABASE_URI "
            "to deliver through the tracking server"
        )
    return found[0]


_writers: dict[str, Writer] = {}
_writers_lock = threading.Lock()


def writer(uri: str) -> Writer:
    """This process's writer for `uri`, opened (and its schema checked) on first use."""
    with _writers_lock:
        found = _writers.get(uri)
        if found is None or found.conn.closed:
            found = _writers[uri] = Writer(uri)
        return found


def write(
    uri: str, experiment_id: str, records: list[TraceRecord], experiment_name: str | None = None
) -> list[str]:
    """Write `records` to the trace database at `uri`; the trace ids newly written. On any error
    the connection is dropped (the next call opens and checks a new one) and the error raised:
    the caller's items stay where they are."""
    try:
        current = writer(uri)
    except Exception as exc:
        raise _redacted(exc, uri) from None
    try:
        return current.write(experiment_id, records, experiment_name)
    except BaseException as exc:
        with _writers_lock:
            if _writers.get(uri) is current:
                del _writers[uri]
        current.close()
        if isinstance(exc, Exception):
            raise _redacted(exc, uri) from None
        raise


def _redacted(exc: Exception, uri: str) -> Exception:
    """`exc` as it is, or, when its message quotes the URI's password, a ConfigError with the
    message redacted (the outbox records the last error in its file and /health shows it)."""
    from flywheel.limits import redact, uri_secrets

    text = str(exc)
    clean = redact(text, uri_secrets(uri))
    return exc if clean == text else ConfigError(f"{type(exc).__name__}: {clean}")
