"""The schema guard: MLflow's tables, as the installed MLflow creates them, are the tables flywheel's
direct SQL writes and reads expect.

Each module that goes to MLflow's tables itself declares what it touches as `COLUMNS` (table ->
columns): `flywheel.trace_copy` (the bulk writer; also `MAY_BE_NULL`, the columns it leaves
empty, and `WRITTEN`, the tables it inserts into) and `flywheel.export_sql` when it exists (the
export query). On a fresh MLflow database, PostgreSQL and sqlite, every declared column must
exist with the kind of value flywheel puts in or reads out of it; a table flywheel inserts into
may have no NOT NULL column without a default that flywheel does not write; the columns it
leaves empty must be nullable; and the schema's alembic revision must be one the bulk writer was
tested with. An `mlflow` pin bump that moves any of it fails here, naming the table and column.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pg import PostgresCluster

DECLARING = ("flywheel.trace_copy", "flywheel.export_sql")  # modules that may declare COLUMNS

INTEGER = {
    "experiment_id",
    "timestamp_ms",
    "execution_time_ms",
    "db_payload_generation",
    "start_time_unix_nano",
    "end_time_unix_nano",
    "created_timestamp",
    "last_updated_timestamp",
    "trace_timestamp_ms",
}
BOOLEAN = {"valid", "is_numeric_value"}
FLOAT = {"aggregate_value"}


def expected_kind(column: str) -> str:
    """The kind of value flywheel's SQL writes into or reads from a column of this name."""
    if column in INTEGER or "_tokens" in column:
        return "integer"
    if column in FLOAT or column.endswith("_cost"):
        return "float"
    if column in BOOLEAN:
        return "boolean"
    return "text"


def kind_of(sql_type: Any) -> str:
    from sqlalchemy import types

    for kind, classes in (
        ("boolean", (types.Boolean,)),
        ("integer", (types.Integer,)),
        ("float", (types.Float, types.Numeric)),
        ("text", (types.String, types.Text)),
    ):
        if isinstance(sql_type, classes):
            return kind
    return type(sql_type).__name__


def declaring_modules() -> list[ModuleType]:
    """The modules of DECLARING that exist (export_sql is being written), imported."""
    return [importlib.import_module(name) for name in DECLARING if importlib.util.find_spec(name) is not None]


def problems(uri: str, module: ModuleType) -> list[str]:
    """What in the database at `uri` differs from what `module` declares, one line per column."""
    import sqlalchemy

    columns: dict[str, tuple[str, ...]] = module.COLUMNS
    written: tuple[str, ...] = getattr(module, "WRITTEN", ())
    may_be_null: dict[str, tuple[str, ...]] = getattr(module, "MAY_BE_NULL", {})
    name = module.__name__
    found: list[str] = []
    engine = sqlalchemy.create_engine(uri)
    try:
        inspector = sqlalchemy.inspect(engine)
        tables = set(inspector.get_table_names())
        for table, expected in columns.items():
            if table not in tables:
                found.append(f"{table}: the table is missing ({name} uses it)")
                continue
            actual = {c["name"]: c for c in inspector.get_columns(table)}
            for column in expected:
                where = f"{table}.{column}"
                if column not in actual:
                    found.append(f"{where}: missing ({name} expects it)")
                    continue
                kind, wanted = kind_of(actual[column]["type"]), expected_kind(column)
                if kind != wanted:
                    found.append(f"{where}: is {actual[column]['type']} ({kind}); {name} expects {wanted}")
            for column in may_be_null.get(table, ()):
                if column in actual and not actual[column]["nullable"]:
                    found.append(
                        f"{table}.{column}: is NOT NULL; {name} leaves it NULL when a trace has no value"
                    )
            if table in written:
                for column, info in actual.items():
                    generated = info.get("computed") is not None or info.get("autoincrement") is True
                    required = not info["nullable"] and info.get("default") is None and not generated
                    if required and column not in expected:
                        found.append(
                            f"{table}.{column}: NOT NULL without a default, and {name} does not write it"
                        )
    finally:
        engine.dispose()
    return found


def revision(uri: str) -> str:
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as db:
            return str(db.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar_one())
    finally:
        engine.dispose()


def _fresh_mlflow(uri: str) -> str:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments()  # creates and migrates the schema
    return uri


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def fresh_database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database MLflow has just created its schema in: on the session's PostgreSQL, and sqlite."""
    if request.param == "sqlite":
        yield _fresh_mlflow(f"sqlite:///{tmp_path_factory.mktemp('schema') / 'mlflow.db'}")
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    database = f"schema_{uuid.uuid4().hex[:8]}"
    with cluster.connect() as db:  # type: ignore[attr-defined]
        db.execute(f'CREATE DATABASE "{database}"')
    yield _fresh_mlflow(cluster.uri(database))


def test_the_declaring_modules_are_found() -> None:
    modules = declaring_modules()
    assert modules and modules[0].__name__ == "flywheel.trace_copy"
    for module in modules:
        assert module.COLUMNS and all(isinstance(v, tuple) and v for v in module.COLUMNS.values())


@pytest.mark.parametrize("name", DECLARING)
def test_mlflows_tables_are_what_flywheels_sql_expects(fresh_database: str, name: str) -> None:
    if importlib.util.find_spec(name) is None:
        return  # not written yet: nothing of it to check
    module = importlib.import_module(name)
    found = problems(fresh_database, module)
    assert not found, "MLflow's tables differ from what flywheel expects:\n" + "\n".join(found)


def test_the_schema_revision_is_one_the_bulk_writer_was_tested_with(fresh_database: str) -> None:
    from flywheel.trace_copy import TESTED_REVISIONS

    found = revision(fresh_database)
    assert found in TESTED_REVISIONS, (
        f"the installed MLflow creates schema revision {found}; flywheel.trace_copy was tested with "
        f"{', '.join(TESTED_REVISIONS)}: run tests/test_trace_copy.py and test_span_format.py on it, "
        "then add it to TESTED_REVISIONS"
    )


def test_the_guard_names_a_moved_column(tmp_path: Path) -> None:
    """The check itself fails, naming table and column, on a schema that moved: a renamed column,
    a new NOT NULL column the writer does not fill, a column the writer leaves empty made NOT
    NULL, and a column of another kind."""
    import sqlite3

    from flywheel import trace_copy

    uri = _fresh_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert problems(uri, trace_copy) == []
    db = sqlite3.connect(tmp_path / "mlflow.db")
    db.execute("ALTER TABLE trace_tags RENAME COLUMN value TO tag_value")
    db.execute(
        "ALTER TABLE spans ADD COLUMN workspace VARCHAR(64) NOT NULL DEFAULT 'x'"
    )  # has a default: fine
    db.execute("ALTER TABLE trace_info ADD COLUMN tenant VARCHAR(64) NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE trace_request_metadata ADD COLUMN shard INTEGER")
    db.commit()
    db.close()
    # sqlite cannot drop a default or add NOT NULL in place: rebuild trace_info without the default
    # and with session_id NOT NULL, and experiments with artifact_location as an integer
    db = sqlite3.connect(tmp_path / "mlflow.db")
    db.execute("PRAGMA foreign_keys = OFF")
    create = db.execute("SELECT sql FROM sqlite_master WHERE name = 'trace_info'").fetchone()[0]
    create = create.replace("tenant VARCHAR(64) NOT NULL DEFAULT ''", "tenant VARCHAR(64) NOT NULL")
    create = create.replace("session_id VARCHAR(250)", "session_id VARCHAR(250) NOT NULL")
    create = re.sub(r'^CREATE TABLE "?trace_info"?', "CREATE TABLE trace_info_new", create)
    assert "trace_info_new" in create and "tenant VARCHAR(64) NOT NULL" in create, create
    db.execute(create)
    db.execute("DROP TABLE trace_info")
    db.execute("ALTER TABLE trace_info_new RENAME TO trace_info")
    db.execute("ALTER TABLE experiments RENAME COLUMN artifact_location TO old_location")
    db.execute("ALTER TABLE experiments ADD COLUMN artifact_location INTEGER")
    db.commit()
    db.close()
    found = "\n".join(problems(uri, trace_copy))
    assert "trace_tags.value: missing" in found, found
    assert "trace_info.tenant: NOT NULL without a default" in found, found
    assert "trace_info.session_id: is NOT NULL" in found, found
    assert "experiments.artifact_location: is INTEGER (integer)" in found, found
    assert "spans.workspace" not in found and "shard" not in found, found
