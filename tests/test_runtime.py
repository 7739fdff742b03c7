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


OPEN_AT_ONCE = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import flywheel
    gate = Path(sys.argv[1])
    (gate / str(os.getpid())).touch()
    while len(list(gate.iterdir())) < 8:  # imports done: every process opens the home at once
        time.sleep(0.001)
    with flywheel.open() as fw:
        health = fw.health()
        fw.outbox.put_durable("probe", "tr-" + "0" * 32, {"n": 1})
    print(health["status"], health["serving_from"])
    """
)


@pytest.mark.slow
def test_eight_processes_opening_one_fresh_home_at_once_all_start(tmp_path: Path) -> None:
    """A fresh FLYWHEEL_HOME opened by 8 processes at once (uvicorn workers, a deliverer, a kernel
    and the CLI starting together): every one builds its runtime (the embedded MLflow store, the
    outbox, the counters) and commits to the outbox. Before: a concurrent first open of outbox.db
    could fail ('database is locked' switching to WAL, 'duplicate column name')."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "MLFLOW_"))}
    env.update(FLYWHEEL_HOME=str(home), LITELLM_LOCAL_MODEL_COST_MAP="True", FLYWHEEL_LM="offline")
    gate = tmp_path / "ready"
    gate.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT_ONCE, str(gate)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    failed = [err[-2000:] for code, _, err in results if code != 0]
    assert failed == [], failed[0] if failed else ""
    assert [out.split() for _, out, _ in results] == [["healthy", "mlflow"]] * 8
    with sqlite3.connect(home / "outbox.db") as db:
        (count,) = db.execute("SELECT COUNT(*) FROM items WHERE kind = 'probe'").fetchone()
    assert count == 8  # nobody delivers kind 'probe': each process's commit is there
