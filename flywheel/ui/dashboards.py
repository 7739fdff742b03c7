"""`flywheel dashboards`: serve the reviewer dashboards with Voila, and the API beside them.

Voila starts each dashboard's kernel in the dashboards/ directory, so a
relative FLYWHEEL_HOME (the default `./.flywheel`) would point the kernels at
another store; the kernels get the resolved home and tracking URI instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from flywheel.config import Settings, child_environment, get_settings

DASHBOARDS = ("rating.ipynb", "models.ipynb", "pairwise.ipynb", "predict.ipynb")
DEFAULT_PORT = 8866


def _shipped(name: str) -> Path:
    """The top-level `name`/ folder (dashboards/ or notebooks/): flywheel/_data/`name` in an installed
    wheel (pyproject.toml maps it there), else the source checkout's (an editable install)."""
    package = Path(__file__).resolve().parents[1]
    installed, checkout = package / "_data" / name, package.parent / name
    if installed.is_dir():
        return installed
    if checkout.is_dir() and (package.parent / "pyproject.toml").is_file():
        return checkout
    raise FileNotFoundError(
        f"flywheel's {name}/ is missing: neither {package / '_data' / name} (installed) "
        f"nor {package.parent / name} (source checkout) exists"
    )


def dashboards_dir() -> Path:
    """The Voila dashboards: the source tree's dashboards/, or the installed wheel's copy."""
    return _shipped("dashboards")


def notebooks_dir() -> Path:
    """The example notebooks: the source tree's notebooks/, or the installed wheel's copy."""
    return _shipped("notebooks")


def free_port(preferred: int, host: str = "127.0.0.1") -> int:
    """`preferred` when it is free, else any free port (0 always means any)."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port")


TEMPLATE = "flywheel"


def voila_data_dir() -> Path:
    """The Jupyter data folder holding flywheel's Voila template (voila/templates/flywheel/): Voila
    finds templates only in Jupyter's data folders, so `voila_env` puts this one in JUPYTER_PATH."""
    return Path(__file__).resolve().parent / "jupyter"


def voila_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with flywheel's Voila template findable, for the process `voila_command` starts."""
    paths = [str(voila_data_dir()), *filter(None, env.get("JUPYTER_PATH", "").split(os.pathsep))]
    return {**env, "JUPYTER_PATH": os.pathsep.join(paths)}


def voila_command(
    directory: Path,
    port: int,
    host: str = "127.0.0.1",
    preheat: int = 0,
    settings: Settings | None = None,
) -> list[str]:
    """Voila on `directory`, configured from `settings` (the process's by default). With
    FLYWHEEL_REVIEWER_HEADER Voila hands that request header to each kernel
    (`http_header_envs`), where it is the signed-in reviewer.

    The pages use flywheel's template (`voila_data_dir`; start the command with `voila_env`):
    Voila's "lab" template with its scripts loaded before the cells instead of after them.

    With `preheat` > 0 Voila keeps that many kernels per dashboard running ahead of the requests
    (`preheat_kernel`): each has imported flywheel and opened the store, and waits in
    `voila.utils.wait_for_request()` (the dashboards' second cell) for the request's query string
    and headers, so the rating page is interactive in 1.6 to 1.9 s (medians) instead of 11 to 15 s
    (`benchmarks/page_bench.py` on 2 cores).

    A page's kernel is shut down FLYWHEEL_KERNEL_IDLE_TIMEOUT seconds after its last tab closed
    and it went idle (Jupyter's kernel culling). Voila's own shutdown on
    `beforeunload` is refused (403, "_xsrf argument missing": voila-dashboards/voila#1458, its
    render page sets no `_xsrf` cookie), so without culling every visit left a kernel running
    until Voila stopped. Kernels with a page open, and preheated ones waiting in
    `wait_for_request()` (busy), are never culled.
    """
    settings = settings or get_settings()
    reviewer_header = settings.flywheel_reviewer_header
    idle_timeout = int(settings.flywheel_kernel_idle_timeout)
    headers = [f"--VoilaConfiguration.http_header_envs={[reviewer_header]!r}"] if reviewer_header else []
    if preheat > 0:
        headers += [
            "--preheat_kernel=True",
            f"--pool_size={int(preheat)}",
            # a used kernel's replacement starts after the page settled, not while it draws
            "--VoilaKernelManager.fill_delay=5",
        ]
    return [
        sys.executable,
        "-m",
        "voila",
        str(directory),
        "--no-browser",
        f"--port={port}",
        f"--Voila.ip={host}",
        "--VoilaConfiguration.show_tracebacks=False",
        "--theme=light",
        f"--template={TEMPLATE}",
        "--Voila.port_retries=0",
        # kernels talk to Voila over unix sockets, not TCP ports: kernels started together (a
        # preheated pool) picked the same free port now and then, and one died at birth
        # ("ZMQError: Address already in use"), leaving its page without a warm kernel
        "--KernelManager.transport=ipc",
        f"--MappingKernelManager.cull_idle_timeout={idle_timeout}",
        f"--MappingKernelManager.cull_interval={max(1, min(60, idle_timeout // 4))}",
        "--MappingKernelManager.cull_connected=False",
        "--MappingKernelManager.cull_busy=False",
        *headers,
    ]


def kernel_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Voila and its kernels: they run in dashboards/, so they get every
    resolved setting (FLYWHEEL_HOME, keys from `.env`) passed on explicitly."""
    return child_environment(get_settings(), extra)


@dataclass
class Launched:
    process: subprocess.Popen[bytes]
    base_url: str
    api_url: str | None
    started_api: bool = False
    urls: dict[str, str] = field(default_factory=dict)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (Voila then shuts its kernels down); past `timeout`, kill its whole process group.

        Also stops the background API when this launch started it.
        """
        if self.started_api:
            from flywheel.http import server

            server.stop_background()
            self.started_api = False
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own session: Voila and its kernels
                self.process.wait(timeout)


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Voila exited with code {process.returncode} before serving {url}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"Voila did not answer at {url} within {timeout:.0f}s")


def _api_running(port: int) -> str | None:
    url = f"http://127.0.0.1:{port}"
    try:
        return url if httpx.get(f"{url}/health", timeout=2).status_code == 200 else None
    except httpx.HTTPError:
        return None


def launch(
    port: int = DEFAULT_PORT,
    open_api: bool = True,
    *,
    host: str = "127.0.0.1",
    api_port: int | None = None,
    directory: Path | None = None,
    block: bool = True,
    echo: Callable[[str], None] = print,
    preheat: int = 0,
) -> Launched:
    """Start Voila on dashboards/ (and the API in the background unless one answers); print the URLs.

    With `block` (the CLI) it serves until Ctrl-C, then stops Voila and the API it started.
    """
    from flywheel.http import server

    directory = directory or dashboards_dir()
    api_url = None
    started_api = False
    if open_api:
        wanted = get_settings().api_port if api_port is None else api_port
        api_url = _api_running(wanted) if wanted else None
        if api_url is None:
            api_url, started_api = server.start_background(port=None if api_port is None else api_port), True
    port = free_port(port, host)
    base = f"http://{host}:{port}"
    process = subprocess.Popen(
        voila_command(directory, port, host, preheat),
        env=voila_env(kernel_env()),
        cwd=directory,
        start_new_session=True,
    )
    launched = Launched(process, base, api_url, started_api)
    launched.urls = {name: f"{base}/voila/render/{name}" for name in DASHBOARDS}
    try:
        wait_until_up(f"{base}/voila/tree", process)
    except BaseException:
        launched.stop()
        raise
    echo(f"Dashboards (Voila) at {base}/")
    echo(f"  rating: {launched.urls['rating.ipynb']}?reviewer=YOUR_NAME")
    echo(f"  models: {launched.urls['models.ipynb']}")
    echo(f"  pairwise (shadow A/B): {launched.urls['pairwise.ipynb']}?model=MODEL&reviewer=YOUR_NAME")
    echo(f"  predict (streamed answers): {launched.urls['predict.ipynb']}?model=MODEL&user=YOUR_NAME")
    if api_url:
        echo(f"API at {api_url} (OpenAPI docs at {api_url}/docs)")
    if not block:
        return launched
    _interrupt_on_term()
    try:
        process.wait()
    except KeyboardInterrupt:
        echo("Stopping the dashboards")
    finally:
        launched.stop()
    return launched


def _interrupt_on_term() -> None:
    """`kill` (SIGTERM/SIGHUP) stops the dashboards like Ctrl-C: Voila runs in its own session."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
