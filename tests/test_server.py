"""The server as real processes: worker processes, hot-swap, a killed server, an MLflow outage."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from processes import free_port as _port
from processes import serve_command, start_mlflow_server
from processes import stop_group as _kill
from processes import wait_until_up as _wait

from flywheel import registry
from flywheel.http.client import AsyncClient
from flywheel.http.server import background_url, start_background, stop_background
from flywheel.store import Store

pytestmark = pytest.mark.slow
JOKES = "joke-generator"
BIN = Path(sys.executable).parent


def _spawn(cmd: list[str], **env: str) -> subprocess.Popen[bytes]:
    full = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", **env)
    return subprocess.Popen(
        cmd, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


@pytest.fixture
def served(demo_store_rw: Store) -> Iterator[tuple[str, Store]]:
    port = _port()
    proc = _spawn(serve_command(port), FLYWHEEL_RESOLVE_TTL="1")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/health")
        yield url, demo_store_rw
    finally:
        _kill(proc)


def test_workers_hot_swap_without_a_failed_request(served: tuple[str, Store]) -> None:
    url, store = served
    statuses: list[int] = []
    versions: list[tuple[float, str]] = []

    async def traffic(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one() -> None:
                while not stop.is_set():
                    r = await client.post("/predict", json={"model": JOKES, "inputs": {"topic": "cat"}})
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        versions.append((time.monotonic(), r.json()["model_version"]))

            await asyncio.gather(*(one() for _ in range(8)))

    async def scenario() -> tuple[float, float]:
        stop = asyncio.Event()
        task = asyncio.create_task(traffic(stop))
        await asyncio.sleep(1.5)
        # a busy machine may take longer for the first answers: promote only once version 2
        # has been seen answering (up to 60 s), so "before" is never empty by accident
        deadline = time.monotonic() + 60
        while not versions and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        asked_at = time.monotonic()
        # promote from another process (the CLI), not through this server
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "flywheel", "promote", JOKES, "1", "Production"],
            check=True,
            capture_output=True,
        )
        promoted_at = time.monotonic()
        await asyncio.sleep(6)
        stop.set()
        await task
        return asked_at, promoted_at

    try:
        asked_at, promoted_at = asyncio.run(scenario())
    finally:
        registry.promote(JOKES, "2", "Production", store)
    assert statuses and set(statuses) == {200}, "a request failed during the switch"
    before = {v for t, v in versions if t < asked_at}
    after = {v for t, v in versions if t > promoted_at + 4}  # FLYWHEEL_RESOLVE_TTL=1 plus slack for a busy CI
    assert before == {"2"} and after == {"1"}


def test_metrics_are_summed_over_worker_processes(served: tuple[str, Store]) -> None:
    url, _ = served
    start = httpx.get(f"{url}/metrics").json()["request_count"]

    async def burst() -> set[str]:
        async with AsyncClient(url) as client:
            answers = await asyncio.gather(*(client.predict(JOKES, {"topic": f"t{i}"}) for i in range(120)))
        return {a["trace_id"] for a in answers}

    assert len(asyncio.run(burst())) == 120
    time.sleep(0.7)  # every worker flushes its counters at least every 0.5 s
    for _ in range(4):  # ask several times: any worker must report the same total
        assert httpx.get(f"{url}/metrics").json()["request_count"] - start == 120


def test_uvicorn_with_workers_serves_the_app(demo_store_rw: Store) -> None:
    port = _port()
    proc = _spawn([str(BIN / "uvicorn"), "flywheel.http.api:app", "--port", str(port), "--workers", "2"])
    try:
        _wait(f"http://127.0.0.1:{port}/health")
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"model": JOKES, "inputs": {"topic": "dog"}})
        assert r.status_code == 200 and r.json()["model_version"] == "2"
    finally:
        _kill(proc)


def test_acknowledged_feedback_survives_a_killed_server(fresh_store: Store) -> None:
    from flywheel.demo.seed import seed_demo
    from flywheel.runtime import get_runtime

    seed_demo(fresh_store, progress=lambda line: None)
    port = _port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(serve_command(port, workers=1))
    _wait(f"{url}/health")
    trace_id = httpx.post(f"{url}/predict", json={"model": JOKES, "inputs": {"topic": "cat"}}).json()[
        "trace_id"
    ]
    r = httpx.post(f"{url}/feedback", json={"trace_id": trace_id, "rating": "thumbs_down", "comment": "kill"})
    assert r.status_code == 200
    _kill(proc, signal.SIGKILL)  # no chance to flush anything
    runtime = get_runtime()  # a new process-level runtime replays the outbox
    assert runtime.outbox.flush(), runtime.outbox.last_error
    info = runtime.store.tracking.get_trace_info(trace_id)
    names = sorted(a.name for a in info.assessments)
    assert names == ["comment", "user_rating"]


def test_background_server_in_a_kernel_is_one_per_process(demo_store_rw: Store) -> None:
    url = start_background(port=0)
    try:
        assert start_background() == url == background_url()
        assert httpx.get(f"{url}/health").json()["status"] == "healthy"
    finally:
        assert stop_background() is True
    assert background_url() is None
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)


def test_outage_degrades_then_replays_everything_exactly_once(
    tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    """A real `mlflow server` goes away mid-run and comes back; nothing is lost or doubled."""
    from flywheel.demo.seed import seed_demo
    from flywheel.runtime import get_runtime

    port = _port()
    mlflow_server = start_mlflow_server(tmp_path, port)
    try:
        _wait(f"http://127.0.0.1:{port}/health", timeout=120)
        store = make_store(tmp_path / "home", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
        seed_demo(store, progress=lambda line: None)
        url = start_background(port=0)
        client = httpx.Client(base_url=url, timeout=60)

        def predict_and_rate(n: int) -> list[str]:
            ids = []
            for i in range(n):
                r = client.post("/predict", json={"model": JOKES, "inputs": {"topic": f"t{i}"}})
                assert r.status_code == 200, r.text
                trace_id = r.json()["trace_id"]
                f = client.post(
                    "/feedback", json={"trace_id": trace_id, "rating": "thumbs_up", "user_id": "u"}
                )
                assert f.status_code == 200, f.text
                ids.append(trace_id)
            return ids

        before = predict_and_rate(3)
        _kill(mlflow_server)
        during = predict_and_rate(5)
        health = client.get("/health").json()
        assert health["status"] == "degraded" and health["mlflow_connected"] is False
        assert health["outbox_backlog"] >= 10
        mlflow_server = start_mlflow_server(tmp_path, port)
        _wait(f"http://127.0.0.1:{port}/health", timeout=120)
        runtime = get_runtime()
        assert runtime.outbox.flush(timeout=120), runtime.outbox.last_error
        assert client.get("/health").json() | {"uptime_seconds": 0} == {
            "status": "healthy",
            "mlflow_connected": True,
            "loaded_models_count": 1,
            "uptime_seconds": 0,
            "outbox_backlog": 0,
            "dead_letters": 0,
            "serving_from": "mlflow",
            "detail": None,
        }
        tracking = runtime.store.tracking
        for trace_id in before + during:
            info = tracking.get_trace_info(trace_id)
            ratings = [a for a in info.assessments if a.name == "user_rating"]
            assert len(ratings) == 1, f"{trace_id}: {len(ratings)} ratings"
        exported = client.get("/export", params={"model": JOKES}).json()
        assert "rows" in exported, exported
        rows = exported["rows"]
        assert sorted(r["trace_id"] for r in rows) == sorted(before + during)
        client.close()
    finally:
        stop_background()
        _kill(mlflow_server)
