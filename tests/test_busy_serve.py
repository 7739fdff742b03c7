"""`flywheel serve` with several workers on a machine whose cores are already busy.

A worker imports MLflow and DSPy before it answers uvicorn's health check; with
uvicorn's 5 s default the supervisor killed and restarted slow workers in a loop
("Child process [pid] died"). WORKER_HEALTHCHECK_TIMEOUT (60 s) gives them time.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from processes import free_port as _port
from processes import serve_command
from processes import stop_group as _stop

from flywheel.store import Store

pytestmark = pytest.mark.slow
JOKES = "joke-generator"
WORKERS = 4
BUSY_LOOPS = 2


def _wait_for(what: str, check: object, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} within {timeout:.0f}s; server log:\n{log.read_text()[-4000:]}")


def test_workers_start_and_serve_while_the_cores_are_busy(fresh_store: Store, tmp_path: Path) -> None:
    from flywheel.demo.seed import seed_demo

    seed_demo(fresh_store, progress=lambda line: None)
    log = tmp_path / "serve.log"
    port = _port()
    url = f"http://127.0.0.1:{port}"
    busy = [
        subprocess.Popen([sys.executable, "-c", "while 1: pass"], start_new_session=True)
        for _ in range(BUSY_LOOPS)
    ]
    try:
        with log.open("wb") as out:
            server = subprocess.Popen(
                serve_command(port, WORKERS),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:

            def healthy() -> bool:
                assert server.poll() is None, f"the server exited:\n{log.read_text()[-4000:]}"
                try:
                    return httpx.get(f"{url}/health", timeout=5).status_code == 200
                except httpx.HTTPError:
                    return False

            _wait_for("/health did not answer", healthy, log, timeout=400)
            for i in range(20):
                r = httpx.post(
                    f"{url}/predict", json={"model": JOKES, "inputs": {"topic": f"topic {i}"}}, timeout=120
                )
                assert r.status_code == 200, r.text
            _wait_for(
                f"not all {WORKERS} workers started",
                lambda: log.read_text().count("Application startup complete") >= WORKERS,
                log,
                timeout=300,
            )
            running = log.read_text()  # before the shutdown, which logs its own lines
        finally:
            _stop(server)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert "Started parent process" in running  # the supervisor's log was captured
    assert not re.search(r"Child process \[\d+\] died", running), running[-4000:]
    assert "not ready in time" not in running and "failed to start" not in running, running[-4000:]
