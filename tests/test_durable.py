"""Acknowledged means durable (issue #9), against real `flywheel serve` worker processes.

Each test starts its own server on its own FLYWHEEL_HOME: immediate feedback on any
worker, kill -9 of the workers under load, promotion under concurrent traffic with
FLYWHEEL_RESOLVE_TTL=0, and a real `mlflow server` outage with a worker restarted
during it. docs/reliability.md maps each promise to its test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from processes import free_port as _port
from processes import serve_command, start_mlflow_server
from processes import stop_group as _kill
from processes import wait_until_up as _wait
from test_server import _spawn

from flywheel import registry
from flywheel.store import Store

pytestmark = pytest.mark.slow
JOKES = "joke-generator"
WORKER = "x-flywheel-worker"


def _workers(supervisor: int) -> list[int]:
    """The uvicorn worker processes of a `flywheel serve` (its children, not the resource tracker
    nor the host's deliverer, `flywheel deliver`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == supervisor and b"resource_tracker" not in cmdline and b"flywheel deliver" not in cmdline:
            found.append(int(entry.name))
    return found


def _serve(workers: int, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    proc = _spawn(serve_command(port, workers), **env)
    return proc, f"http://127.0.0.1:{port}"


def _wait_for_workers(url: str, count: int, timeout: float = 180) -> set[str]:
    """Until `count` distinct workers answered /health (each on a new connection)."""
    _wait(f"{url}/health", timeout=timeout)
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < count and time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        if WORKER not in r.headers:
            break  # a server that does not name its workers: nothing to wait for
        seen.add(r.headers[WORKER])
        time.sleep(0.05)
    return seen


@pytest.fixture
def seeded(fresh_store: Store) -> Store:
    from flywheel.demo.seed import seed_demo

    seed_demo(fresh_store, progress=lambda line: None)
    return fresh_store


def test_feedback_right_after_predict_is_accepted_by_any_of_four_workers(seeded: Store) -> None:
    proc, url = _serve(4)
    try:
        _wait_for_workers(url, 4)
        statuses: list[int] = []
        pairs: list[tuple[str | None, str | None]] = []
        for i in range(40):
            # httpx.post opens a new connection per call: the kernel hands each to any worker
            p = httpx.post(f"{url}/predict", json={"model": JOKES, "inputs": {"topic": f"t{i}"}}, timeout=60)
            assert p.status_code == 200, p.text
            f = httpx.post(
                f"{url}/feedback",
                json={"trace_id": p.json()["trace_id"], "rating": "thumbs_up", "user_id": "quick"},
                timeout=60,
            )
            statuses.append(f.status_code)
            pairs.append((p.headers.get(WORKER), f.headers.get(WORKER)))
    finally:
        _kill(proc)
    assert statuses.count(200) == 40, (
        f"{40 - statuses.count(200)} of 40 immediate feedbacks failed: {statuses}"
    )
    crossed = sum(1 for a, b in pairs if a and b and a != b)
    assert crossed > 0, f"no prediction/feedback pair crossed workers: {pairs}"


def test_kill_9_of_the_workers_under_load_loses_nothing_acknowledged(seeded: Store) -> None:
    from flywheel.runtime import get_runtime

    proc, url = _serve(2)
    traces: set[str] = set()
    feedbacks: set[tuple[str, str]] = set()
    stop = threading.Event()

    async def load() -> None:
        limits = httpx.Limits(max_keepalive_connections=0)  # a killed worker takes no pooled connection along

        async def one(client: httpx.AsyncClient, k: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    p = await client.post("/predict", json={"model": JOKES, "inputs": {"topic": f"c{k}-{n}"}})
                    if p.status_code != 200:
                        continue
                    trace_id = p.json()["trace_id"]
                    traces.add(trace_id)
                    f = await client.post(
                        "/feedback", json={"trace_id": trace_id, "rating": "thumbs_up", "user_id": f"u{k}"}
                    )
                    if f.status_code in (200, 202):
                        feedbacks.add((trace_id, f.json()["feedback_id"]))
                except httpx.HTTPError:
                    await asyncio.sleep(0.05)  # the worker died mid-request: not acknowledged

        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            await asyncio.gather(*(one(client, k) for k in range(8)))

    try:
        _wait_for_workers(url, 2)
        loader = threading.Thread(target=asyncio.run, args=(load(),))
        loader.start()
        try:
            for _ in range(3):
                target = len(traces) + 40
                deadline = time.monotonic() + 120
                while len(traces) < target and time.monotonic() < deadline:
                    time.sleep(0.1)
                killed = _workers(proc.pid)
                assert killed, "no worker process found"
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
                _wait(f"{url}/health", timeout=180)  # uvicorn's supervisor restarted them
            time.sleep(2)
        finally:
            stop.set()
            loader.join(120)
    finally:
        _kill(proc)
    assert len(traces) >= 120 and feedbacks
    runtime = get_runtime()  # a new process-level runtime replays what the killed workers committed
    flushed = runtime.outbox.flush(timeout=90)
    tracking = runtime.store.tracking
    lost_traces, lost_feedback = [], []
    for trace_id in sorted(traces):
        try:
            tracking.get_trace_info(trace_id)
        except Exception:
            lost_traces.append(trace_id)
    for trace_id, feedback_id in sorted(feedbacks):
        try:
            info = tracking.get_trace_info(trace_id)
        except Exception:
            lost_feedback.append(feedback_id)
            continue
        if not any((a.metadata or {}).get("flywheel.feedback_id") == feedback_id for a in info.assessments):
            lost_feedback.append(feedback_id)
    assert not lost_traces, f"{len(lost_traces)} of {len(traces)} acknowledged traces lost"
    assert not lost_feedback, f"{len(lost_feedback)} of {len(feedbacks)} acknowledged feedbacks lost"
    assert flushed, runtime.outbox.last_error
    # every replayed trace has its whole DSPy call tree, not only the root
    spans = {t: runtime.store.client.get_trace(t).data.spans for t in sorted(traces)}
    shapes = {t: sorted((s.name, str(s.span_type)) for s in found) for t, found in spans.items()}
    expected = shapes[min(shapes)]
    assert len(expected) >= 4 and ("ChatAdapter.format", "PARSER") in expected
    assert [t for t, shape in shapes.items() if shape != expected] == []


def test_promotion_under_concurrent_traffic_with_ttl_0_never_fails_a_request(seeded: Store) -> None:
    proc, url = _serve(2, FLYWHEEL_RESOLVE_TTL="0")
    statuses: list[int] = []
    errors: list[str] = []
    versions: set[str] = set()
    stop = threading.Event()

    async def traffic() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def one(k: int) -> None:
                while not stop.is_set():
                    try:
                        r = await client.post("/predict", json={"model": JOKES, "inputs": {"topic": f"p{k}"}})
                    except httpx.HTTPError as exc:  # no answer at all (a reset connection) is a failure too
                        statuses.append(-1)
                        errors.append(repr(exc))
                        continue
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        versions.add(r.json()["model_version"])

            await asyncio.gather(*(one(k) for k in range(16)))

    try:
        _wait_for_workers(url, 2)
        runner = threading.Thread(target=asyncio.run, args=(traffic(),))
        runner.start()
        try:
            time.sleep(1.0)
            for i in range(8):  # promoted by another process (this one) while the workers resolve per request
                registry.promote(JOKES, "1" if i % 2 == 0 else "2", "Production", seeded)
                time.sleep(0.6)
            time.sleep(0.5)
        finally:
            stop.set()
            runner.join(120)
    finally:
        _kill(proc)
    bad = [s for s in statuses if s != 200]
    failed = f"{len(bad)} of {len(statuses)} predictions failed: {sorted(set(bad))} {errors[:3]}"
    assert statuses and not bad, failed
    assert versions == {"1", "2"}


def test_outage_is_answered_from_last_known_good_even_by_a_restarted_worker(
    tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    """A real `mlflow server` goes away (about 30-60 s here, not a full minute on purpose: the
    worker restart inside it is what takes time); every prediction is answered, feedback with a
    correction is checked locally, what cannot be answered is 503 with Retry-After."""
    from flywheel.demo.seed import seed_demo
    from flywheel.feedback import assessment_value
    from flywheel.runtime import get_runtime

    port = _port()
    mlflow_server = start_mlflow_server(tmp_path, port)
    proc = None
    try:
        _wait(f"http://127.0.0.1:{port}/health", timeout=120)
        store = make_store(tmp_path / "home", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
        seed_demo(store, progress=lambda line: None)
        proc, url = _serve(2)  # two: uvicorn runs one worker without a supervisor to restart it
        _wait_for_workers(url, 2)
        # a new connection per request: no pooled connection to a worker about to be killed
        client = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0))
        before = client.post("/predict", json={"model": JOKES, "inputs": {"topic": "warm"}})
        assert before.status_code == 200, before.text

        _kill(mlflow_server)
        statuses: list[int] = []
        served: list[str] = []

        def predict(topic: str) -> None:
            r = client.post("/predict", json={"model": JOKES, "inputs": {"topic": topic}})
            statuses.append(r.status_code)
            if r.status_code == 200:
                served.append(r.json()["trace_id"])

        for i in range(5):
            predict(f"during-{i}")
        killed = _workers(proc.pid)
        assert len(killed) == 2, killed
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        restarted = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # the supervisor starts cold workers while MLflow is down
            try:
                r = httpx.get(f"{url}/health", timeout=5)
                if r.status_code == 200 and r.headers.get(WORKER) not in {str(p) for p in killed}:
                    restarted = r
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert restarted is not None, "no worker came back during the outage"
        health = restarted.json()
        assert health["status"] == "degraded" and health["mlflow_connected"] is False
        assert health["serving_from"] == "last-known-good"
        for i in range(5):
            predict(f"restarted-{i}")
        assert statuses == [200] * 10, f"{statuses.count(200)} of {len(statuses)} predictions answered"

        corrected = client.post(
            "/feedback",
            json={"trace_id": served[-1], "rating": "thumbs_down", "corrected_output": {"joke": "Better."}},
        )
        assert corrected.status_code == 200, corrected.text
        wrong_field = client.post(
            "/feedback",
            json={"trace_id": served[-1], "rating": "thumbs_down", "corrected_output": {"pun": "x"}},
        )
        assert wrong_field.status_code == 422 and "(outputs: joke)" in wrong_field.json()["detail"]
        earlier = client.post(
            "/feedback", json={"trace_id": before.json()["trace_id"], "rating": "thumbs_up"}
        )
        assert earlier.status_code == 200, earlier.text
        unknown = client.post("/feedback", json={"trace_id": "tr-" + uuid.uuid4().hex, "rating": "thumbs_up"})
        assert unknown.status_code == 503 and int(unknown.headers["retry-after"]) > 0, unknown.text
        never_served = client.post("/predict", json={"model": "support-router", "inputs": {"ticket": "x"}})
        assert never_served.status_code == 503 and "retry-after" in never_served.headers, never_served.text

        mlflow_server = start_mlflow_server(tmp_path, port)
        _wait(f"http://127.0.0.1:{port}/health", timeout=120)
        runtime = get_runtime()
        assert runtime.outbox.flush(timeout=120), runtime.outbox.last_error
        tracking = runtime.store.tracking
        for trace_id in served:
            assert tracking.get_trace_info(trace_id).tags["flywheel.model"] == JOKES
        fixes = [a for a in tracking.get_trace_info(served[-1]).assessments if a.name == "corrected_output"]
        assert [assessment_value(a) for a in fixes] == [{"joke": "Better."}]
        client.close()
    finally:
        if proc is not None:
            _kill(proc)
        _kill(mlflow_server)
