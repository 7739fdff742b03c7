"""/health never waits for MLflow: a tracking server that accepts connections and never answers
(a real listening socket nobody reads) makes it `degraded` at once, for every concurrent caller.

Whether MLflow answers is checked by the runtime's background probe, MLFLOW_PROBE_TIMEOUT per
check; /health reads its last answer. Before, /health ran that check itself, on the event loop.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from flywheel.http.api import create_app
from flywheel.lm import make_lm
from flywheel.runtime import MLFLOW_PROBE_TIMEOUT, Runtime
from flywheel.store import Store


@pytest.fixture
def hanging_uri() -> Iterator[str]:
    """A tracking URI whose server takes connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def _timed_health(client: TestClient, n: int) -> list[tuple[float, dict[str, object]]]:
    """`n` concurrent GET /health: each one's seconds and body."""

    def one(_: int) -> tuple[float, dict[str, object]]:
        t0 = time.monotonic()
        reply = client.get("/health")
        assert reply.status_code == 200, reply.text
        return time.monotonic() - t0, reply.json()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_health_answers_degraded_without_waiting_for_a_tracking_server_that_hangs(
    fresh_store: Store, hanging_uri: str
) -> None:
    settings = dataclasses.replace(fresh_store.settings, mlflow_tracking_uri=hanging_uri)
    runtime = Runtime(settings, store=Store(hanging_uri, fresh_store.experiment_id, settings), lm=make_lm())
    try:
        with TestClient(create_app(runtime)) as client:
            # the probe's first check is waiting for its timeout now: nobody waits with it
            early = _timed_health(client, 16)
            deadline = time.monotonic() + 60  # a safety net: the probe's first answer is its timeout
            while time.monotonic() < deadline and "cannot reach" not in str(client.get("/health").json()):
                time.sleep(0.05)
            later = _timed_health(client, 16)  # and the next check is under way again
    finally:
        runtime.close(timeout=5)
    for seconds, body in early + later:
        assert body["status"] == "degraded" and body["mlflow_connected"] is False
        assert body["serving_from"] == "last-known-good"
        assert seconds < MLFLOW_PROBE_TIMEOUT, f"a /health waited {seconds:.2f} s (the check's timeout)"
    first = ("has not answered the first check yet", "cannot reach the MLflow tracking server")
    assert all(any(why in str(b["detail"]) for why in first) for _, b in early)
    assert all("cannot reach the MLflow tracking server" in str(b["detail"]) for _, b in later)
