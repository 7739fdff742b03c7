"""The runtime is owned by whoever creates it: nothing else stops it, and it delivers at exit."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import dspy
import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from flywheel import registry
from flywheel.http.api import create_app
from flywheel.http.server import start_background, stop_background
from flywheel.runtime import Runtime, get_runtime
from flywheel.store import Store


def _register(store: Store) -> None:
    registry.register_program(dspy.Predict("topic -> joke"), "jokes", store=store)
    registry.promote("jokes", "1", "Production", store)


def _child_env(store: Store) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "MLFLOW_"))}
    env["FLYWHEEL_HOME"] = str(store.settings.flywheel_home)
    return env


def test_stopping_the_background_server_leaves_its_runtime_delivering(fresh_store: Store) -> None:
    _register(fresh_store)
    runtime = get_runtime()
    start_background(port=0)
    assert stop_background()
    assert not runtime.closed and runtime is get_runtime()
    answer = runtime.predict("jokes", {"topic": "owls"})
    assert runtime.outbox.flush(timeout=30), runtime.outbox.last_error
    assert fresh_store.tracking.get_trace_info(answer.trace_id).trace_id == answer.trace_id


def test_an_app_never_closes_a_runtime_it_was_given(fresh_store: Store) -> None:
    _register(fresh_store)
    with Runtime(store=fresh_store) as runtime:
        with TestClient(create_app(runtime)) as client:
            assert (
                client.post("/predict", json={"model": "jokes", "inputs": {"topic": "x"}}).status_code == 200
            )
        assert not runtime.closed  # the app stopped; its caller still owns the runtime
        assert runtime.predict("jokes", {"topic": "y"}).model_version == "1"
    assert runtime.closed and runtime.outbox.backlog() == 0


def test_an_app_closes_the_runtime_it_built(fresh_store: Store) -> None:
    _register(fresh_store)
    app = create_app()
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        own = app.state.runtime
        assert not own.closed
    assert own.closed


def test_a_notebook_that_predicts_after_stop_background_gets_its_trace_into_mlflow(
    fresh_store: Store,
) -> None:
    """A kernel: start and stop the background server, predict, exit. The trace reaches MLflow."""
    _register(fresh_store)
    script = textwrap.dedent(
        """
        import flywheel
        flywheel.start_background(port=0)
        flywheel.stop_background()
        print(flywheel.predict("jokes", {"topic": "after stop"}).trace_id)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_child_env(fresh_store),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    trace_id = done.stdout.strip().splitlines()[-1]
    client = MlflowClient(tracking_uri=fresh_store.tracking_uri)
    assert client.get_trace(trace_id).info.trace_id == trace_id
    with sqlite3.connect(fresh_store.settings.flywheel_home / "outbox.db") as db:
        assert db.execute("SELECT COUNT(*) FROM items").fetchone() == (0,)


def test_what_cannot_be_delivered_at_exit_stays_durable_with_one_log_line(fresh_store: Store) -> None:
    _register(fresh_store)
    script = textwrap.dedent(
        """
        import flywheel
        from flywheel import runtime as rt

        rt.EXIT_DELIVERY_SECONDS = 1.0
        fw = flywheel.get_runtime()

        def unreachable(items):
            raise ConnectionError("MLflow does not answer")

        fw.outbox.register("trace", unreachable)
        print(fw.predict("jokes", {"topic": "kept"}).trace_id)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_child_env(fresh_store),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    trace_id = done.stdout.strip().splitlines()[-1]
    waiting = [line for line in done.stderr.splitlines() if "wait in" in line]
    assert len(waiting) == 1 and "1 item(s) wait" in waiting[0], done.stderr
    with sqlite3.connect(fresh_store.settings.flywheel_home / "outbox.db") as db:
        assert db.execute("SELECT trace_id FROM items").fetchall() == [(trace_id,)]
    # the next runtime on this home delivers it
    with Runtime(store=fresh_store) as later:
        assert later.outbox.flush(timeout=30)
    assert fresh_store.tracking.get_trace_info(trace_id).trace_id == trace_id


def test_a_closed_runtime_cannot_be_restarted(tmp_path: Path, fresh_store: Store) -> None:
    runtime = Runtime(store=fresh_store).start()
    assert runtime.close() == 0
    with pytest.raises(RuntimeError, match="closed"):
        runtime.start()
