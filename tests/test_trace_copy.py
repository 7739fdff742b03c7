"""The bulk trace writer (flywheel.trace_copy) on a real PostgreSQL: the rows trace_sql writes,
each trace once whatever is replayed or raced, a refusal that loses nothing on an untested
schema, and a `flywheel serve` whose deliverer writes through it into an `mlflow server`'s
database, read back through MLflow's own API."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from pg import (
    PostgresCluster,
    TrackingServer,
    deploy_command,
    deploy_file,
    free_port,
    spawn,
    stop,
    wait_healthy,
)
from test_span_format import SHAPES
from test_span_format import _record as shaped_record

from flywheel import trace_copy, trace_sql
from flywheel.config import get_settings
from flywheel.store import Store
from flywheel.tracing import TraceRecord, new_trace_id

TABLES = {  # table -> its primary key (the order rows are compared in)
    "trace_info": "request_id",
    "trace_tags": "request_id, key",
    "trace_request_metadata": "request_id, key",
    "spans": "trace_id, span_id",
}


@dataclass
class Databases:
    cluster: PostgresCluster
    reference: str  # written by trace_sql (executemany through MLflow's SQL store)
    bulk: str  # written by trace_copy
    experiment_id: str

    def name(self, uri: str) -> str:
        return uri.rsplit("/", 1)[1].split("?", 1)[0]

    def store(self, uri: str, **settings: Any) -> Store:
        return Store(uri, self.experiment_id, replace(get_settings(), **settings))

    def rows(self, uri: str, ids: list[str] | None = None) -> dict[str, list[tuple[Any, ...]]]:
        out = {}
        with self.cluster.connect(self.name(uri)) as db:  # type: ignore[attr-defined]
            for table, key in TABLES.items():
                column = key.split(",")[0]
                where = f"WHERE {column} = ANY(%s)" if ids is not None else ""
                out[table] = db.execute(
                    f"SELECT * FROM {table} {where} ORDER BY {key}", (ids,) if ids is not None else None
                ).fetchall()
        return out


def _mlflow_database(cluster: PostgresCluster, prefix: str, artifacts: str) -> tuple[str, str]:
    """A new database with MLflow's schema and one experiment named `flywheel`: (uri, its id)."""
    from mlflow import MlflowClient

    database = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with cluster.connect() as db:  # type: ignore[attr-defined]
        db.execute(f'CREATE DATABASE "{database}"')
    uri = cluster.uri(database)
    experiment_id = MlflowClient(tracking_uri=uri).create_experiment("flywheel", artifact_location=artifacts)
    return uri, experiment_id


@pytest.fixture(scope="module")
def dbs(postgres: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Databases:
    artifacts = tmp_path_factory.mktemp("copy-artifacts").as_uri()
    reference, ref_id = _mlflow_database(postgres, "copy_ref", artifacts)
    bulk, bulk_id = _mlflow_database(postgres, "copy_bulk", artifacts)
    assert ref_id == bulk_id
    return Databases(postgres, reference, bulk, bulk_id)


def _plain(i: int, **extra: Any) -> TraceRecord:
    """A record without a call tree (the root span only)."""
    now = time.time_ns()
    record = TraceRecord(
        new_trace_id(), "plain", "1", "m-plain", {"topic": f"t{i}"}, {"joke": f"j{i}"}, now, now + 3_000_000
    )
    return TraceRecord(**{**record.to_dict(), **extra})


def _copies(record: TraceRecord, n: int) -> list[TraceRecord]:
    return [TraceRecord(**{**record.to_dict(), "trace_id": new_trace_id()}) for _ in range(n)]


def test_copy_writes_the_rows_trace_sql_writes(dbs: Databases) -> None:
    """Every shape of call tree, failed and not, priced LM calls (cost and token columns), a field
    too long for its tag, a record without spans: table for table, row for row, the same."""
    records = [shaped_record(shape, failed) for shape in SHAPES for failed in (False, True)]
    records += [_plain(1, inputs={"topic": "x" * 9000}), _plain(2, error="boom", outputs=None)]
    ids = [r.trace_id for r in records]
    trace_sql.write_records(dbs.store(dbs.reference).tracking, dbs.experiment_id, records)
    assert sorted(trace_copy.write(dbs.bulk, dbs.experiment_id, records, "flywheel")) == sorted(ids)
    reference, bulk = dbs.rows(dbs.reference, ids), dbs.rows(dbs.bulk, ids)
    for table in TABLES:
        assert bulk[table] == reference[table], table
    assert sum(r.spans is not None for r in records) and len(bulk["spans"]) > len(records)
    info = {row[0]: row for row in bulk["trace_info"]}
    priced = [r.trace_id for r in records if r.spans and not r.error]
    with dbs.cluster.connect(dbs.name(dbs.bulk)) as db:  # type: ignore[attr-defined]
        filled = db.execute(
            "SELECT count(*) FROM trace_info WHERE request_id = ANY(%s) "
            "AND total_tokens > 0 AND total_cost > 0",
            (priced,),
        ).fetchone()[0]
        models = db.execute(
            "SELECT count(*) FROM trace_request_metadata "
            "WHERE key = 'mlflow.modelId' AND request_id = ANY(%s)",
            (ids,),
        ).fetchone()[0]
    assert filled == len(priced) > 0 and models == len(ids) == len(info)


def test_copied_traces_read_back_through_mlflows_api(dbs: Databases) -> None:
    from mlflow import MlflowClient

    records = [shaped_record("pipeline"), _plain(3)]
    trace_copy.write(dbs.bulk, dbs.experiment_id, records, "flywheel")
    client = MlflowClient(tracking_uri=dbs.bulk)
    for record in records:
        trace = client.get_trace(record.trace_id)
        assert len(trace.data.spans) == max(1, len(record.spans or []))
        assert trace.info.trace_metadata["mlflow.modelId"] == record.model_id
        assert trace.info.tags["flywheel.model"] == record.model
    found = client.search_traces(locations=[dbs.experiment_id], model_id="m-plain", max_results=500)
    assert records[1].trace_id in {t.info.trace_id for t in found}


def test_a_replayed_batch_writes_nothing_twice(dbs: Databases) -> None:
    first = [_plain(i) for i in range(5)]
    assert sorted(trace_copy.write(dbs.bulk, dbs.experiment_id, first)) == sorted(r.trace_id for r in first)
    before = dbs.rows(dbs.bulk, [r.trace_id for r in first])
    assert trace_copy.write(dbs.bulk, dbs.experiment_id, first) == []  # the whole batch again
    new = _plain(9)
    assert trace_copy.write(dbs.bulk, dbs.experiment_id, [*first[:2], new]) == [new.trace_id]
    assert dbs.rows(dbs.bulk, [r.trace_id for r in first]) == before
    assert len(dbs.rows(dbs.bulk, [new.trace_id])["trace_info"]) == 1


def test_two_writers_racing_on_one_batch_write_it_once(dbs: Databases) -> None:
    """Two deliverers (two connections) COPY the same batch at the same moment: each trace is
    written by exactly one of them, neither fails, and every row is there once."""
    for _ in range(3):
        batch = _copies(shaped_record("capital"), 150)
        writers = [trace_copy.Writer(dbs.bulk), trace_copy.Writer(dbs.bulk)]
        start = threading.Barrier(len(writers))
        results: list[list[str]] = [[], []]
        errors: list[BaseException] = []

        def run(
            i: int,
            writer: trace_copy.Writer,
            batch: list[TraceRecord] = batch,
            start: threading.Barrier = start,
            results: list[list[str]] = results,
            errors: list[BaseException] = errors,
        ) -> None:
            try:
                start.wait()
                results[i] = writer.write(dbs.experiment_id, batch)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i, w)) for i, w in enumerate(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for writer in writers:
            writer.close()
        assert not errors, errors
        ids = [r.trace_id for r in batch]
        assert not set(results[0]) & set(results[1])
        assert sorted(results[0] + results[1]) == sorted(ids)
        rows = dbs.rows(dbs.bulk, ids)
        assert len(rows["trace_info"]) == len(ids)
        assert len(rows["spans"]) == len(ids) * len(batch[0].spans or [])
        per_trace = Counter(row[2] for row in rows["trace_tags"])  # (key, value, request_id)
        assert set(per_trace) == set(ids) and len(set(per_trace.values())) == 1


@pytest.fixture
def untested_schema(dbs: Databases) -> Iterator[str]:
    """The bulk database with an alembic revision the writer was not tested with, under a URI of
    its own (this process's cached writer for `dbs.bulk` was opened before the change)."""
    with dbs.cluster.connect(dbs.name(dbs.bulk)) as db:  # type: ignore[attr-defined]
        (tested,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
        db.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    try:
        yield f"{dbs.bulk}?application_name=untested"
    finally:
        with dbs.cluster.connect(dbs.name(dbs.bulk)) as db:  # type: ignore[attr-defined]
            db.execute("UPDATE alembic_version SET version_num = %s", (tested,))


def test_an_untested_schema_is_refused_and_the_outbox_keeps_every_item(
    dbs: Databases, untested_schema: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from functools import partial

    from flywheel import deliverer, tracing
    from flywheel.outbox import Outbox

    with pytest.raises(trace_copy.SchemaNotTested) as refused:
        trace_copy.Writer(untested_schema)
    message = str(refused.value)
    assert "ffffffffffff" in message and trace_copy.TESTED_REVISIONS[0] in message, message

    store = dbs.store(dbs.bulk, flywheel_trace_database_uri=untested_schema)
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.register("trace", partial(tracing.deliver, store))
    records = [_plain(i) for i in range(4)]
    for record in records:
        outbox.put("trace", record.trace_id, record.to_dict())
    with caplog.at_level(logging.ERROR, logger="flywheel.deliverer"):
        deliverer._check_trace_database(store.settings)  # what `flywheel deliver` does at start
    assert any("ffffffffffff" in r.getMessage() for r in caplog.records), caplog.text
    assert outbox.deliver_available() is False
    assert outbox.backlog() == len(records)
    assert "SchemaNotTested" in (outbox.last_error or "") and "ffffffffffff" in (outbox.last_error or "")
    assert dbs.rows(dbs.bulk, [r.trace_id for r in records])["trace_info"] == []

    with dbs.cluster.connect(dbs.name(dbs.bulk)) as db:  # type: ignore[attr-defined]
        db.execute("UPDATE alembic_version SET version_num = %s", (trace_copy.TESTED_REVISIONS[0],))
    assert outbox.deliver_available() is True  # a tested schema again: the next pass writes them all
    assert outbox.backlog() == 0
    assert len(dbs.rows(dbs.bulk, [r.trace_id for r in records])["trace_info"]) == len(records)


# --- end to end: `flywheel serve` on an `mlflow server` on PostgreSQL -------------------------


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


WRITER_ROLE = "flywheel_traces"


def _grant_trace_writer(cluster: PostgresCluster, database: str) -> None:
    """Run docs/deploy.md's grants for the bulk writer's role on `database` (the role is the
    cluster's: created once per session)."""
    import psycopg

    assert database == "mlflow", "docs/deploy.md's grants name the database mlflow"
    grants = deploy_file("trace-writer-grants", trace_writer_password="unused-with-trust-auth")
    with cluster.connect(database) as db:  # type: ignore[attr-defined]
        for statement in filter(None, (line.strip() for line in grants.split(";"))):
            try:
                db.execute(statement)
            except psycopg.errors.DuplicateObject:  # CREATE ROLE, the second time in a session
                pass


@pytest.mark.slow
def test_serve_delivers_through_the_bulk_writer_into_the_tracking_servers_database(
    mlflow_on_postgres: TrackingServer,
    tmp_path: Path,
    make_store: Callable[..., Store],
) -> None:
    """`flywheel serve --workers 2` with FLYWHEEL_TRACE_DATABASE_URI, as the role docs/deploy.md
    grants (insert into the four trace tables only): every trace served is in MLflow exactly
    once, with its metadata (`mlflow.modelId`, which the REST path cannot write), and MLflow's
    server reads each back whole (`search_traces`, `get_trace`)."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient

    from flywheel.demo.seed import seed_demo

    server = mlflow_on_postgres
    server.reset(owner="tests/test_trace_copy.py")
    proc = None
    try:
        store = make_store(tmp_path / "seed", MLFLOW_TRACKING_URI=server.url)
        seed_demo(store, progress=lambda line: None)
        port = free_port()
        env, argv = deploy_command(
            "api-host",
            mlflow_host="127.0.0.1",
            mlflow_port=server.url.rsplit(":", 1)[1],
            flywheel_home=str(tmp_path / "host"),
            resolve_ttl="2",
            api_bind="127.0.0.1",
            api_port=str(port),
            api_workers="2",
        )
        cluster = server.cluster
        _grant_trace_writer(cluster, server.database)  # docs/deploy.md's role: the four tables only
        env["FLYWHEEL_TRACE_DATABASE_URI"] = (
            f"postgresql://{WRITER_ROLE}@{cluster.host}:{cluster.port}/mlflow"
        )
        proc = spawn(argv, env, tmp_path / "host.log")
        url = f"http://127.0.0.1:{port}"
        wait_healthy(f"{url}/health", timeout=180, proc=proc)

        def predict(i: int) -> str:
            with httpx.Client(base_url=url, timeout=60) as client:
                r = client.post("/predict", json={"model": "joke-generator", "inputs": {"topic": f"t{i}"}})
                assert r.status_code == 200, r.text
                return str(r.json()["trace_id"])

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(predict, range(60)))
        health = httpx.Client(base_url=url, timeout=10)
        _until(lambda: health.get("/health").json()["outbox_backlog"] == 0, 120, "the outbox draining")
        assert health.get("/health").json()["status"] == "healthy"
        health.close()

        with server.cluster.connect(server.database) as db:  # type: ignore[attr-defined]
            counts = dict(
                db.execute(
                    "SELECT request_id, count(*) FROM trace_info "
                    "WHERE request_id = ANY(%s) GROUP BY request_id",
                    (ids,),
                ).fetchall()
            )
            spans = dict(
                db.execute(
                    "SELECT trace_id, count(*) FROM spans WHERE trace_id = ANY(%s) GROUP BY trace_id", (ids,)
                ).fetchall()
            )
            models = db.execute(
                "SELECT count(*) FROM trace_request_metadata "
                "WHERE key = 'mlflow.modelId' AND request_id = ANY(%s)",
                (ids,),
            ).fetchone()[0]
        assert counts == {trace_id: 1 for trace_id in ids}  # every trace, exactly once
        assert models == len(ids)  # written by the bulk writer: the REST path carries no metadata

        client = MlflowClient(tracking_uri=server.url)
        found = client.search_traces(locations=[store.experiment_id], max_results=500, include_spans=False)
        assert set(ids) <= {t.info.trace_id for t in found}
        for trace_id in ids[:10]:
            trace = client.get_trace(trace_id)
            assert len(trace.data.spans) == spans[trace_id] >= 2
            assert trace.info.tags["flywheel.model"] == "joke-generator"
        log = (tmp_path / "host.log").read_text(errors="replace")
        assert "bulk trace writer cannot write" not in log
    finally:
        if proc is not None:
            stop(proc)
        server.release()


def test_the_database_uri_is_a_secret_and_must_be_postgresql() -> None:
    from flywheel.config import load_settings, secret_values
    from flywheel.errors import ConfigError

    password = "trace-writer-S3cret-value"
    uri = f"postgresql://flywheel_traces:{password}@db.example:5432/mlflow"
    settings = load_settings({"FLYWHEEL_TRACE_DATABASE_URI": uri}, env_file=None)
    assert settings.flywheel_trace_database_uri == uri
    assert password not in repr(settings) and "flywheel_traces:***@db.example" in repr(settings)
    assert password in secret_values(settings, environ={})
    with pytest.raises(ConfigError) as refused:
        load_settings({"FLYWHEEL_TRACE_DATABASE_URI": f"mysql://u:{password}@h/db"}, env_file=None)
    assert "FLYWHEEL_TRACE_DATABASE_URI" in str(refused.value) and password not in str(refused.value)
    assert load_settings({}, env_file=None).flywheel_trace_database_uri is None  # unset: the REST path
