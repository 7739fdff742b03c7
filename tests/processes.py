"""Helpers for tests that start real processes (`flywheel serve`, `mlflow server`).

One copy instead of one per test module: a free port, waiting until a URL answers,
stopping the process group a test started with `start_new_session=True`, and the
command line of `flywheel serve`, and a throw-away `mlflow server` started. tests/pg.py builds on these.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from flywheel.ui.workbench import MLFLOW_UI_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(url: str, timeout: float = 90, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Return once `url` answers 200; TimeoutError after `timeout` seconds, RuntimeError as soon as
    `proc` (the process meant to answer) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal the process group the test started and reap it (SIGKILL after 30 s)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def interrupt_up(proc: subprocess.Popen[str], grace: float = 60) -> None:
    """Ctrl-C (SIGINT), as a user stops `flywheel up`; whatever of its family is left after `grace`
    is killed (its children run in their own sessions, so a killed `up` would leave them behind)."""
    import psutil

    if proc.poll() is not None:
        return
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for p in psutil.wait_procs(family, timeout=10)[1]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def start_mlflow_server(home: Path, port: int) -> subprocess.Popen[bytes]:
    """A one-worker `mlflow server` on 127.0.0.1:`port`, an sqlite file and an artifact folder
    under `home`, in its own session (`stop_group` stops it). It starts as `flywheel up` starts its
    MLflow UI and docs/deploy.md its tracking server: without MLflow's job runner (`MLFLOW_UI_ENV`),
    whose seven processes would each import MLflow beside the test."""
    argv = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{home / 'server.db'}",
        "--artifacts-destination",
        str(home / "artifacts"),
        "--workers",
        "1",
    ]
    env = {**MLFLOW_UI_ENV, **os.environ}  # as in `flywheel up`: a value the environment sets wins
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def serve_command(port: int, workers: int = 2) -> list[str]:
    """`flywheel serve` on 127.0.0.1:`port` with `workers` uvicorn worker processes."""
    return [sys.executable, "-m", "flywheel", "serve", "--host", "127.0.0.1", "--port", str(port)] + [
        "--workers",
        str(workers),
    ]
