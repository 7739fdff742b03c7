"""Scale out (docs/deploy.md): two API hosts with their own FLYWHEEL_HOME share one tracking server
on PostgreSQL. Every process here is started with the command docs/deploy.md gives."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pg import BIN, TrackingServer, deploy_command, free_port, spawn, stop, wait_healthy

from flywheel.store import Store

JOKES, ROUTER = "joke-generator", "support-router"
TTL = 1.0
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install-test-deps"


@dataclass
class Hosts:
    a: httpx.Client
    b: httpx.Client
    procs: dict[str, subprocess.Popen[bytes]]
    server: TrackingServer
    store: Store  # this process's view of the shared store
    home: Path

    def promote_with_cli(self, model: str, version: str) -> None:
        env, argv = deploy_command(
            "promote",
            mlflow_host="127.0.0.1",
            mlflow_port=self.server.url.rsplit(":", 1)[1],
            flywheel_home=str(self.home / "cli"),
            model=model,
            version=version,
        )
        env = {**os.environ, **env, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

    def delivered(self, trace_id: str) -> bool:
        try:
            self.store.tracking.get_trace_info(trace_id)
        except Exception:
            return False
        return True

    def ratings(self, trace_id: str) -> int:
        info = self.store.tracking.get_trace_info(trace_id)
        return sum(1 for a in info.assessments or [] if a.name == "user_rating")


def until(check: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def drained(client: httpx.Client) -> bool:
    return client.get("/health").json()["outbox_backlog"] == 0


@pytest.fixture(scope="module")
def hosts(
    mlflow_on_postgres: TrackingServer,
    tmp_path_factory: pytest.TempPathFactory,
    make_module_store: Callable[..., Store],
) -> Iterator[Hosts]:
    from flywheel.demo.seed import seed_demo

    server = mlflow_on_postgres
    home = tmp_path_factory.mktemp("scale")
    server.reset(owner="tests/test_scale.py")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    clients: list[httpx.Client] = []
    try:
        store = make_module_store(home / "seed", MLFLOW_TRACKING_URI=server.url)
        seed_demo(store, progress=lambda line: None)
        for name in ("a", "b"):
            port = free_port()
            env, argv = deploy_command(
                "api-host",
                mlflow_host="127.0.0.1",
                mlflow_port=server.url.rsplit(":", 1)[1],
                flywheel_home=str(home / name),
                resolve_ttl=f"{TTL:g}",
                api_bind="127.0.0.1",
                api_port=str(port),
                api_workers="2",
            )
            procs[name] = spawn(argv, env, home / f"{name}.log")
            clients.append(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60))
        for name, client in zip(procs, clients, strict=True):
            wait_healthy(str(client.base_url.join("/health")), timeout=180, proc=procs[name])
        yield Hosts(clients[0], clients[1], procs, server, store, home)
    finally:
        for client in clients:
            client.close()
        for proc in procs.values():
            stop(proc)
        server.release()


def _predict(client: httpx.Client, model: str, inputs: dict[str, str]) -> dict[str, str]:
    r = client.post("/predict", json={"model": model, "inputs": inputs})
    assert r.status_code == 200, r.text
    return r.json()


def _served_versions(client: httpx.Client, n: int = 6) -> set[str]:
    return {_predict(client, JOKES, {"topic": f"t{i}"})["model_version"] for i in range(n)}


@pytest.mark.slow
def test_a_promotion_is_served_by_every_host_within_the_ttl_plus_one_request(hosts: Hosts) -> None:
    assert _served_versions(hosts.a) == _served_versions(hosts.b) == {"2"}  # both workers resolved
    hosts.promote_with_cli(JOKES, "1")  # from a third machine: docs/deploy.md's promote command
    time.sleep(TTL)
    assert _served_versions(hosts.a) == _served_versions(hosts.b) == {"1"}
    # and a promotion made through one host's API reaches the other the same way
    r = hosts.a.post(f"/models/{JOKES}/stage", json={"version": "2", "stage": "Production"})
    assert r.status_code == 200, r.text
    time.sleep(TTL)
    assert _served_versions(hosts.b) == _served_versions(hosts.a) == {"2"}


@pytest.mark.slow
def test_feedback_sent_to_the_other_host_lands_exactly_once(hosts: Hosts) -> None:
    trace_id = _predict(hosts.a, ROUTER, {"ticket": "I was charged twice"})["trace_id"]
    until(lambda: hosts.delivered(trace_id), what="host A delivering its trace")
    r = hosts.b.post("/feedback", json={"trace_id": trace_id, "rating": "thumbs_down", "user_id": "rev"})
    assert r.status_code == 200, r.text
    until(lambda: drained(hosts.b), what="host B delivering the feedback")
    assert hosts.ratings(trace_id) == 1
    assert drained(hosts.a) and hosts.ratings(trace_id) == 1  # nothing else delivers it again


@pytest.mark.slow
def test_export_through_either_host_returns_every_rated_row(hosts: Hosts) -> None:
    served = [(hosts.a, hosts.b), (hosts.b, hosts.a)] * 4  # (serves, gets the feedback)
    rated = []
    for i, (serves, rates) in enumerate(served):
        trace_id = _predict(serves, ROUTER, {"ticket": f"Parcel {i} is late"})["trace_id"]
        until(lambda t=trace_id: hosts.delivered(t), what="the serving host delivering its trace")
        r = rates.post("/feedback", json={"trace_id": trace_id, "rating": "thumbs_up", "user_id": f"u{i}"})
        assert r.status_code == 200, r.text
        rated.append(trace_id)
    until(lambda: drained(hosts.a) and drained(hosts.b), what="both outboxes draining")
    for client in (hosts.b, hosts.a):
        r = client.get("/export", params={"model": ROUTER})
        assert r.status_code == 200, r.text
        exported = {row["trace_id"] for row in r.json()["rows"]}
        assert set(rated) <= exported
    assert all(hosts.ratings(t) == 1 for t in rated)


@pytest.mark.slow
def test_feedback_for_a_trace_not_yet_delivered_is_pending_then_lands_once(hosts: Hosts) -> None:
    trace_id = _predict(hosts.a, ROUTER, {"ticket": "Where is my refund"})["trace_id"]
    os.killpg(hosts.procs["a"].pid, signal.SIGSTOP)  # host A cannot deliver its trace for now
    try:
        assert not hosts.delivered(trace_id)
        r = hosts.b.post("/feedback", json={"trace_id": trace_id, "rating": "thumbs_up", "user_id": "r"})
        assert r.status_code == 202, r.text
    finally:
        os.killpg(hosts.procs["a"].pid, signal.SIGCONT)
    until(lambda: hosts.delivered(trace_id), what="host A delivering its trace")
    until(lambda: hosts.ratings(trace_id) == 1, what="host B delivering the pending feedback")
    time.sleep(2)
    assert hosts.ratings(trace_id) == 1


def test_install_test_deps_fails_when_it_cannot_install_postgresql(tmp_path: Path) -> None:
    env = {
        "FLYWHEEL_TEST_PG_BIN": str(tmp_path / "no-postgres"),
        "PATH": str(tmp_path),  # no apt-get
    }
    done = subprocess.run(["/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "postgresql" in done.stderr and "initdb" in done.stderr, done


def test_postgres_tests_fail_not_skip_without_postgresql(tmp_path: Path) -> None:
    import sys

    tests = Path(__file__).resolve().parent
    (tmp_path / "test_needs_postgres.py").write_text("def test_uses(postgres):\n    pass\n")
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["pg"]\n')
    env = {
        **os.environ,
        "FLYWHEEL_TEST_PG_BIN": str(tmp_path / "no-postgres"),
        "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "PostgreSQL is not installed" in done.stdout, done.stdout
    assert "skipped" not in done.stdout.lower(), done.stdout
