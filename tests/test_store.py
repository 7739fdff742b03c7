"""store.py is the one door to MLflow: its internals are checked here, and two stores share a process.

When an MLflow release moves an internal flywheel relies on, a test here fails with a message naming it
(docs/dependencies.md, "Moving a pin").
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

import dspy
import mlflow
import pytest
from sqlalchemy import text

from flywheel import registry
from flywheel import store as store_module
from flywheel.compile import compile_program
from flywheel.config import apply_mlflow_client_settings, load_settings
from flywheel.demo.data import JOKES
from flywheel.gate import EVAL_EXPERIMENT, gate
from flywheel.loader import load_program
from flywheel.runtime import Runtime
from flywheel.store import (
    INSTANCE_ATTRIBUTES,
    MLFLOW_INTERNALS,
    MlflowInternalMoved,
    Store,
    connect,
    mlflow_internal,
    sql_session,
    sql_trace_schema,
    supports_sql_traces,
)

_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _reached(what: str, get: object) -> object:
    """Call `get`; an MLflow internal gone missing fails the test with the message naming it."""
    try:
        return get() if callable(get) else get
    except MlflowInternalMoved as exc:
        pytest.fail(f"{what}: {exc}")


# --- the internals, one by one -----------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(set(MLFLOW_INTERNALS) - INSTANCE_ATTRIBUTES))
def test_mlflow_internal_is_where_flywheel_reaches_for_it(path: str) -> None:
    _reached(path, lambda: mlflow_internal(path))


def test_a_moved_internal_is_named_in_the_error() -> None:
    with pytest.raises(MlflowInternalMoved, match=r"mlflow\.tracking\.fluent\._NO_SUCH_THING"):
        mlflow_internal("mlflow.tracking.fluent._NO_SUCH_THING")
    with pytest.raises(MlflowInternalMoved, match=r"mlflow_gone\.nowhere"):
        mlflow_internal("mlflow_gone.nowhere")


def test_store_tracking_is_mlflows_tracking_store(fresh_store: Store) -> None:
    """MlflowClient._tracking_client.store: trace and assessment calls the client does not expose."""
    tracking = _reached("Store.tracking (MlflowClient._tracking_client.store)", lambda: fresh_store.tracking)
    for method in ("get_trace_info", "start_trace", "log_spans", "create_assessment", "search_traces"):
        assert callable(getattr(tracking, method, None)), f"MLflow's tracking store has no {method}"


def test_sql_trace_tables_import_and_open_a_session(fresh_store: Store) -> None:
    """trace_sql writes MLflow's trace tables directly: the names it needs import, the session opens."""
    schema = _reached("sql_trace_schema", sql_trace_schema)
    names = [p.rsplit(".", 1)[1] for p, user in MLFLOW_INTERNALS.items() if user == "sql_trace_schema"]
    assert all(getattr(schema, name) is not None for name in names)
    assert schema.SqlTraceInfo.__table__.name == "trace_info"
    assert {c.name for c in schema.SqlSpan.__table__.columns} >= {"trace_id", "span_id", "content"}
    tracking = fresh_store.tracking
    assert supports_sql_traces(tracking), "SqlAlchemyStore.ManagedSessionMaker is gone"
    with _reached("SqlAlchemyStore.ManagedSessionMaker", lambda: sql_session(tracking)) as session:
        assert session.execute(text("select count(*) from trace_info")).scalar() == 0


def test_active_model_preserved_puts_the_callers_active_model_back(fresh_store: Store) -> None:
    """fluent._ACTIVE_MODEL_CONTEXT: pyfunc loading sets the active model; flywheel restores it."""
    with fresh_store.fluent():
        before = mlflow.get_active_model_id()
        with _reached("Store.active_model_preserved", fresh_store.active_model_preserved):
            mlflow.set_active_model(name="loaded-by-someone")
            assert mlflow.get_active_model_id() not in (None, before)
        assert mlflow.get_active_model_id() == before


def test_unwrap_pyfunc_finds_the_dspy_program(fresh_store: Store) -> None:
    """PyFuncModel._model_impl and DspyModelWrapper.model: the program inside a logged dspy model."""
    info = registry.register_program(dspy.Predict("topic -> joke"), "jokes", store=fresh_store)
    program = _reached("Store.unwrap_pyfunc", lambda: load_program(fresh_store, info))
    assert isinstance(program, dspy.Predict)
    assert Store.unwrap_pyfunc(type("NotDspy", (), {"_model_impl": object()})()) is None


# --- fluent(): MLflow's process-wide URI, for one block, under one lock ------------------------------


def _settings(home: Path):  # noqa: ANN202
    return load_settings({"FLYWHEEL_HOME": str(home)}, env_file=None)


def _global_state() -> tuple[object, ...]:
    return (
        mlflow.get_tracking_uri(),
        mlflow.get_registry_uri(),
        store_module._fluent_uris(),
        {name: os.environ.get(name) for name in _URI_VARIABLES},
    )


@pytest.mark.parametrize("environ", [None, "sqlite:////nowhere/else.db"])
def test_fluent_points_mlflow_at_the_store_and_puts_everything_back(
    empty_home: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, environ: str | None
) -> None:
    for name in _URI_VARIABLES:
        if environ is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, environ)
    one, two = connect(_settings(empty_home("one"))), connect(_settings(empty_home("two")))
    before = _global_state()
    assert before[3] == {name: environ for name in _URI_VARIABLES}  # connect() repointed nothing
    with one.fluent():
        assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == one.tracking_uri
        with two.fluent():  # nested (another store's, or the same store's): re-entrant
            assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == two.tracking_uri
        assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == one.tracking_uri
    assert _global_state() == before
    with pytest.raises(RuntimeError, match="boom"), two.fluent():
        raise RuntimeError("boom")
    assert _global_state() == before


def test_fluent_holds_one_lock_for_every_store(empty_home: Callable[[str], Path]) -> None:
    one, two = connect(_settings(empty_home("one"))), connect(_settings(empty_home("two")))
    inside, seen = threading.Event(), []

    def other() -> None:
        with two.fluent():
            seen.append(mlflow.get_tracking_uri())
            inside.set()

    with one.fluent():
        thread = threading.Thread(target=other)
        thread.start()
        assert not inside.wait(0.3), "another store's fluent block ran while this one held MLflow"
        assert mlflow.get_tracking_uri() == one.tracking_uri
    assert inside.wait(10)
    thread.join(10)
    assert seen == [two.tracking_uri]


# --- two stores in one process, one after the other --------------------------------------------------


def _rows() -> list[dict[str, str]]:
    return [
        {"topic": t, "joke": j, "trace_id": f"tr-{i}", "rating": "thumbs_up"}
        for i, (t, j) in enumerate(JOKES)
    ]


def _local(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def test_two_stores_in_one_process_keep_their_runs_models_and_artifacts(
    tmp_path: Path, empty_home: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a fluent call that escaped its store would land here (./mlruns, ./mlflow.db)
    apply_mlflow_client_settings()  # connect() sets these defaults once per process
    homes = [empty_home("a"), empty_home("b")]
    environ, before = dict(os.environ), _global_state()

    runtimes = [Runtime(_settings(home)) for home in homes]  # both connected before either works
    try:
        results = []
        for runtime in runtimes:
            compiled = compile_program(
                _rows(), "topic -> joke", "jokes", progress=False, store=runtime.store, lm=runtime.lm
            )
            verdict = gate("jokes", compiled.version.version, _rows(), store=runtime.store, lm=runtime.lm)
            assert verdict.passed and verdict.promoted_to == "Production"
            assert isinstance(runtime.load("jokes", "Production").program, dspy.Predict)
            results.append((compiled, verdict))
    finally:
        for runtime in runtimes:
            runtime.close()

    run_ids, trace_ids = [], []
    for home, runtime, (compiled, verdict) in zip(homes, runtimes, results, strict=True):
        client, artifacts = runtime.store.client, (home / "artifacts").resolve()
        assert compiled.version.version == "1"  # each registry saw one registration: its own
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments)
        ids = {r.info.run_id for r in runs}
        assert {compiled.run_id, verdict.run_id} <= ids
        assert len(runs) >= 3  # the compile run, the gate run and its evaluation
        for run in runs:
            assert _local(run.info.artifact_uri).resolve().is_relative_to(artifacts), run.info.artifact_uri
        lineage = _local(client.get_run(compiled.run_id).info.artifact_uri) / "lineage" / "trace_ids.json"
        assert lineage.is_file()
        models = client.search_logged_models(experiment_ids=experiments)
        assert compiled.version.model_id in {m.model_id for m in models}
        for model in models:
            location = _local(model.artifact_location).resolve()
            assert location.is_relative_to(artifacts), model.artifact_location
        model_dir = _local(client.get_logged_model(compiled.version.model_id).artifact_location)
        assert (model_dir / "MLmodel").is_file()
        evaluation = client.get_experiment_by_name(EVAL_EXPERIMENT)
        traces = client.search_traces(locations=[evaluation.experiment_id])
        assert traces  # the evaluation's predictions, traced into this store
        run_ids.append(ids)
        trace_ids.append({t.info.trace_id for t in traces})
    assert not run_ids[0] & run_ids[1] and not trace_ids[0] & trace_ids[1]

    assert dict(os.environ) == environ
    assert _global_state() == before
    assert not (cwd / "mlruns").exists() and not (cwd / "mlflow.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "cwd"]
