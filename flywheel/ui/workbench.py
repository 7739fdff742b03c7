"""`flywheel up`: the workbench a newcomer opens, in one command.

Three children, each in its own process group (session), with their output in
FLYWHEEL_HOME/logs/: the API (`flywheel serve`), the dashboards (Voila, with
preheated kernels) and the MLflow UI (`mlflow server` on the same store; for a
store that is already an MLflow tracking server, that server is the UI and
nothing is started). The dashboards' trace links point at that MLflow UI
(MLFLOW_UI_URL for the kernels). The API and the dashboards get the resolved
settings and LiteLLM's local model-cost map, so nothing waits on the network.

The MLflow UI is locked (flywheel/ui/mlflow_ui.py): MLflow's basic-auth app, a
login for every request but /health, on 127.0.0.1 only whatever `--host` says,
and an environment without flywheel's keys or the LM provider's credentials. Its
admin password is printed at the first start; later starts say where it is kept.
It starts without MLflow's job runner (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`,
as docs/deploy.md runs the tracking server), unless the environment sets it.

Ctrl-C, SIGTERM or SIGHUP stops all of them: SIGTERM to each process group
(Voila then shuts its kernels down, uvicorn its workers), SIGKILL to a group
still there after a grace period; nothing is left behind.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from flywheel.config import child_environment, get_settings
from flywheel.ui.dashboards import (
    DASHBOARDS,
    dashboards_dir,
    dashboards_token,
    free_port,
    voila_command,
    voila_env,
    with_token,
)
from flywheel.ui.mlflow_ui import HOST as MLFLOW_UI_HOST
from flywheel.ui.mlflow_ui import (
    MLFLOW_UI_ENV,  # noqa: F401  # tests start their mlflow servers with it
    MlflowLogin,
    mlflow_ui_command,
    mlflow_ui_environment,
    prepare_login,
    store_environment,
)

DEMO_REVIEWER = "alice"  # flywheel.demo.traffic.DEMO_REVIEWERS[0]: the demo's queues name her
STOP_GRACE = 20.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    ready_path: str = "/"

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class Workbench:
    children: list[Child] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    mlflow_url: str = ""
    mlflow_login: MlflowLogin | None = None  # None: the tracking server is the MLflow UI
    preheat: int = 0

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM every child's process group, then SIGKILL what is still there after `grace`."""
        for c in self.children:
            _signal_group(c.process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in self.children:
            try:
                c.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for c in self.children:  # the leader may be gone while a kernel or a worker lingers
            _signal_group(c.process, signal.SIGKILL)
            c.process.wait()
        self.children.clear()


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # start_new_session: the group id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass


def api_command(host: str, port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "flywheel", "serve", "--host", host, "--port", str(port)] + [
        "--workers",
        str(workers),
    ]


def _start(
    name: str, cmd: list[str], env: dict[str, str], logs: Path, url: str, ready: str, cwd: Path | None = None
) -> Child:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    out: IO[bytes] = log.open("ab")
    try:
        process = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        out.close()
    return Child(name, process, url, log, ready)


def _wait_ready(children: list[Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(children)
    while waiting:
        for c in list(waiting):
            if not c.alive():
                tail = c.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{c.name} exited with {c.process.returncode}; its log {c.log}:\n{tail}")
            try:
                if httpx.get(c.url.rstrip("/") + c.ready_path, timeout=2).status_code < 500:
                    waiting.remove(c)
            except httpx.HTTPError:
                pass
        if waiting and time.monotonic() > deadline:
            names = ", ".join(c.name for c in waiting)
            raise TimeoutError(
                f"{names} did not answer within {timeout:.0f}s (logs in {waiting[0].log.parent})"
            )
        if waiting:
            time.sleep(0.3)


def warm_pools(child: Child, kernels: int, timeout: float) -> bool:
    """Wait until `kernels` dashboard kernels are warm: each writes `READY_LINE` to Voila's log once
    its first cell (`warm_up`) is done (Voila's own "pool is filled" comes when a kernel started)."""
    from flywheel.ui.widgets import READY_LINE

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.alive():
        if child.log.read_text(errors="replace").count(READY_LINE) >= kernels:
            return True
        time.sleep(0.3)
    return False


def start_workbench(
    *,
    host: str = "127.0.0.1",
    api_port: int | None = None,
    dashboards_port: int = 8866,
    mlflow_port: int = 5000,
    preheat: int | None = None,
    api_workers: int = 1,
    timeout: float = 180.0,
    echo: Callable[[str], None] | None = None,
) -> Workbench:
    """Start the three servers and wait until each answers; the caller stops them (`Workbench.stop`)."""
    echo = echo or functools.partial(print, flush=True)
    settings = get_settings()
    preheat = settings.flywheel_preheat_kernels if preheat is None else preheat
    logs = settings.flywheel_home / "logs"
    bench = Workbench(preheat=preheat)
    base_env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1"}
    try:
        uri = settings.mlflow_tracking_uri
        if uri.startswith(("http://", "https://")):
            bench.mlflow_url = uri.rstrip("/")  # the tracking server is the MLflow UI
        else:
            # 127.0.0.1 whatever `host` is: the admin door to the registry stays on this machine
            port = free_port(mlflow_port, MLFLOW_UI_HOST)
            bench.mlflow_url = f"http://{MLFLOW_UI_HOST}:{port}"
            bench.mlflow_login = prepare_login(settings)
            bench.children.append(
                _start(
                    "mlflow",
                    mlflow_ui_command(settings.artifact_root, port),
                    mlflow_ui_environment(bench.mlflow_login, {**base_env, **store_environment(uri)}),
                    logs,
                    bench.mlflow_url,
                    "/health",
                )
            )
        env = child_environment(settings, {**base_env, "MLFLOW_UI_URL": bench.mlflow_url})
        port = free_port(settings.api_port if api_port is None else api_port, host)
        api_url = f"http://{host}:{port}"
        bench.children.append(
            _start("api", api_command(host, port, api_workers), env, logs, api_url, "/health")
        )
        port = free_port(dashboards_port, host)
        voila_url = f"http://{host}:{port}"
        directory = dashboards_dir()
        token = dashboards_token(settings)  # every dashboard URL printed below carries it
        bench.children.append(
            _start(
                "dashboards",
                voila_command(directory, port, host, preheat, settings),
                voila_env(env, token),
                logs,
                voila_url,
                "/voila/tree",
                cwd=directory,
            )
        )
        _wait_ready(bench.children, timeout)
    except BaseException:
        bench.stop()
        raise
    render = f"{voila_url}/voila/render"
    bench.urls = {
        "api": api_url,
        "api docs": f"{api_url}/docs",
        "rating": with_token(f"{render}/rating.ipynb?reviewer={DEMO_REVIEWER}", token),
        "models": with_token(f"{render}/models.ipynb", token),
        "predict": with_token(f"{render}/predict.ipynb?user={DEMO_REVIEWER}", token),
        "pairwise": with_token(f"{render}/pairwise.ipynb?reviewer={DEMO_REVIEWER}", token),
        "mlflow": bench.mlflow_url,
    }
    echo("flywheel workbench")
    echo(f"  API docs:   {bench.urls['api docs']}")
    echo(f"  rating:     {bench.urls['rating']}")
    echo(f"  models:     {bench.urls['models']}")
    echo(f"  predict:    {bench.urls['predict']}")
    echo(f"  pairwise:   {bench.urls['pairwise']}")
    echo(f"  MLflow UI:  {bench.urls['mlflow']}")
    for line in login_lines(bench.mlflow_login, host):
        echo(line)
    echo(f"Logs in {logs}. Ctrl-C stops all of it.")
    return bench


def login_lines(login: MlflowLogin | None, host: str) -> list[str]:
    """What `up` says about the MLflow UI's login: the generated password once, at the start that
    made it; where it is kept at the others; that the UI stays on 127.0.0.1 under `--host`."""
    if login is None:
        return []
    if login.new and not login.given:
        lines = [
            f"  MLflow UI login: {login.username} / {login.password}  (shown once; kept in {login.config})"
        ]
    else:
        lines = [f"  MLflow UI login: {login.username}, password in {login.config}"]
    if not _is_loopback(host):
        lines.append(
            f"  The MLflow UI listens on {MLFLOW_UI_HOST} only (not {host}); "
            "a shared one is a tracking server (docs/deploy.md)."
        )
    return lines


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_workbench(
    *,
    host: str = "127.0.0.1",
    api_port: int | None = None,
    dashboards_port: int = 8866,
    mlflow_port: int = 5000,
    preheat: int | None = None,
) -> int:
    """`flywheel up`: start, print the URLs, serve until Ctrl-C / SIGTERM / SIGHUP, stop everything."""
    stop = threading.Event()

    def interrupt(signum: int, frame: object) -> None:
        stop.set()
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    bench: Workbench | None = None
    try:
        bench = start_workbench(
            host=host,
            api_port=api_port,
            dashboards_port=dashboards_port,
            mlflow_port=mlflow_port,
            preheat=preheat,
        )
        if bench.preheat > 0:
            kernels = len(DASHBOARDS) * bench.preheat
            if warm_pools(bench.child("dashboards"), kernels, 300.0):
                print(f"Dashboards warm: {bench.preheat} preheated kernel(s) per page.", flush=True)
            else:
                print("Dashboards: kernels still starting; a page opened now starts its own.", flush=True)
        while not stop.is_set():
            for c in bench.children:
                if not c.alive():
                    print(
                        f"flywheel: {c.name} exited with {c.process.returncode}; see {c.log}", file=sys.stderr
                    )
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        # the stop itself must not be cut short by a second Ctrl-C
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if bench is not None:
            print("Stopping the workbench", flush=True)
            bench.stop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
    return 0
