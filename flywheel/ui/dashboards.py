"""`flywheel dashboards`: serve the reviewer dashboards with Voila, and the API beside them.

Voila starts each dashboard's kernel in the dashboards/ directory, so a
relative FLYWHEEL_HOME (the default `./.flywheel`) would point the kernels at
another store; the kernels get the resolved home and tracking URI instead.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
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
from flywheel.errors import ConfigError

TOKEN_VARIABLE = "FLYWHEEL_DASHBOARDS_TOKEN"  # how the launchers hand Voila its token (not argv)
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


def proxy_networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """FLYWHEEL_TRUSTED_PROXIES (comma-separated addresses or networks) as networks; ValueError
    names the entry that is neither."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"{part!r} is not an IP address or network") from None
    return networks


def is_ip_literal(host: str) -> bool:
    """`host` (as in a Host header: IPv6 in brackets) is an IP address, not a name."""
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        return False
    return True


def voila_data_dir() -> Path:
    """The Jupyter data folder holding flywheel's Voila template (voila/templates/flywheel/): Voila
    finds templates only in Jupyter's data folders, so `voila_env` puts this one in JUPYTER_PATH."""
    return Path(__file__).resolve().parent / "jupyter"


def voila_env(env: dict[str, str], token: str | None = None) -> dict[str, str]:
    """`env` for the process `voila_command` starts: flywheel's Voila template findable, the
    dashboards' `token` in FLYWHEEL_DASHBOARDS_TOKEN (Voila takes it out of its environment before
    a kernel starts; without `token`, the one `env` holds, else Voila makes one), and none of
    `NOT_FOR_KERNELS`, which the kernels would inherit."""
    paths = [str(voila_data_dir()), *filter(None, env.get("JUPYTER_PATH", "").split(os.pathsep))]
    env = {k: v for k, v in env.items() if k not in NOT_FOR_KERNELS}
    return {**env, "JUPYTER_PATH": os.pathsep.join(paths), **({TOKEN_VARIABLE: token} if token else {})}


def voila_command(
    directory: Path,
    port: int,
    host: str = "127.0.0.1",
    preheat: int = 0,
    settings: Settings | None = None,
) -> list[str]:
    """flywheel's Voila server (`flywheel.ui.voila_app`, Voila with its checks) on `directory`,
    configured from `settings` (the process's by default). Start it with `voila_env` and the token in
    FLYWHEEL_DASHBOARDS_TOKEN (never on the command line, which every local user can read).

    Every page needs the token (`?token=` once, then a cookie; or `Authorization: token ...`), or,
    with FLYWHEEL_REVIEWER_HEADER, that header from a peer in FLYWHEEL_TRUSTED_PROXIES; Voila then
    hands the header to each kernel (`http_header_envs`), where it is the signed-in reviewer. Hosts
    other than IP addresses, localhost, `host` and FLYWHEEL_DASHBOARDS_HOSTS get 403. A visitor holds
    at most FLYWHEEL_KERNELS_PER_USER kernels (see `flywheel.ui.voila_app`).

    The pages use flywheel's template (`voila_data_dir`; start the command with `voila_env`):
    Voila's "lab" template with its scripts loaded before the cells instead of after them.

    With `preheat` > 0 Voila keeps that many kernels per dashboard running ahead of the requests
    (`preheat_kernel`): each has imported flywheel and opened the store, and waits in
    `voila.utils.wait_for_request()` (the dashboards' second cell) for the request's query string
    and headers, so the rating page is interactive in 1.6 to 1.9 s (medians) instead of 11 to 15 s
    (`benchmarks/page_bench.py` on 2 cores).

    A page's kernel is shut down FLYWHEEL_KERNEL_IDLE_TIMEOUT seconds after its last tab closed
    and it went idle (Jupyter's kernel culling), or FLYWHEEL_KERNEL_CONNECT_TIMEOUT seconds after
    its cells ran when the page never connected to it. Voila's own shutdown on
    `beforeunload` is refused (403, "_xsrf argument missing": voila-dashboards/voila#1458, its
    render page sets no `_xsrf` cookie), so without culling every visit left a kernel running
    until Voila stopped. Kernels with a page open, and preheated ones waiting in
    `wait_for_request()` (busy), are never culled.
    """
    settings = settings or get_settings()
    reviewer_header = settings.flywheel_reviewer_header
    idle_timeout = int(settings.flywheel_kernel_idle_timeout)
    connect_timeout = int(settings.flywheel_kernel_connect_timeout)
    try:
        proxies = [str(n) for n in proxy_networks(settings.flywheel_trusted_proxies)]
    except ValueError as e:
        raise ConfigError(f"FLYWHEEL_TRUSTED_PROXIES={settings.flywheel_trusted_proxies!r}: {e}") from None
    hosts = [h.strip() for h in settings.flywheel_dashboards_hosts.split(",") if h.strip()]
    headers = [f"--VoilaConfiguration.http_header_envs={[reviewer_header]!r}"] if reviewer_header else []
    headers += [
        f"--FlywheelIdentityProvider.reviewer_header={reviewer_header or ''}",
        f"--FlywheelIdentityProvider.trusted_proxies={','.join(proxies)}",
        f"--FlywheelVoila.allowed_hosts={','.join(hosts)}",
        f"--FlywheelVoila.kernels_per_user={int(settings.flywheel_kernels_per_user)}",
        f"--FlywheelKernelManager.connect_timeout={connect_timeout}",
    ]
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
        "flywheel.ui.voila_app",
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
        f"--MappingKernelManager.cull_interval={max(1, min(60, idle_timeout // 4, connect_timeout // 4))}",
        "--MappingKernelManager.cull_connected=False",
        "--MappingKernelManager.cull_busy=False",
        *headers,
    ]


# Not for the dashboards' kernels: the API's keys (the in-process panels run behind Voila's own
# sign-in instead). FLYWHEEL_ADMIN_KEY stays: the models page checks a typed key against it before
# a promotion, and without it would promote for anyone. The LM provider's credentials stay: the
# predict page predicts in its kernel.
NOT_FOR_KERNELS = ("FLYWHEEL_PREDICT_KEY", "FLYWHEEL_FEEDBACK_KEY")


def dashboards_token(settings: Settings | None = None) -> str:
    """FLYWHEEL_DASHBOARDS_TOKEN, or a new random one (for this start) when it is unset."""
    settings = settings or get_settings()
    return settings.flywheel_dashboards_token or secrets.token_urlsafe(24)


def kernel_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Voila and its kernels: they run in dashboards/, so they get every
    resolved setting (FLYWHEEL_HOME, keys from `.env`) passed on explicitly; `voila_env` then takes
    out what the kernels must not have."""
    return child_environment(get_settings(), extra)


def with_token(url: str, token: str) -> str:
    """`url` with `token=` added to its query: the address a person clicks (the page then drops it)."""
    return f"{url}{'&' if '?' in url else '?'}token={token}"


@dataclass
class Launched:
    process: subprocess.Popen[bytes]
    base_url: str
    api_url: str | None
    started_api: bool = False
    urls: dict[str, str] = field(default_factory=dict)
    token: str = ""  # what every page needs (`with_token`), unless a trusted proxy signs users in

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
    settings: Settings | None = None,
) -> Launched:
    """Start Voila on dashboards/ (and the API in the background unless one answers); print the URLs,
    each with the token (FLYWHEEL_DASHBOARDS_TOKEN, or one made for this start: `Launched.token`).

    With `block` (the CLI) it serves until Ctrl-C, then stops Voila and the API it started.
    """
    from flywheel.http import server

    settings = settings or get_settings()
    token = dashboards_token(settings)
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
        voila_command(directory, port, host, preheat, settings),
        env=voila_env(child_environment(settings), token),
        cwd=directory,
        start_new_session=True,
    )
    launched = Launched(process, base, api_url, started_api, token=token)
    launched.urls = {name: f"{base}/voila/render/{name}" for name in DASHBOARDS}
    try:
        wait_until_up(f"{base}/voila/tree", process)
    except BaseException:
        launched.stop()
        raise
    pages = {
        "rating": "rating.ipynb?reviewer=YOUR_NAME",
        "models": "models.ipynb",
        "pairwise (shadow A/B)": "pairwise.ipynb?model=MODEL&reviewer=YOUR_NAME",
        "predict (streamed answers)": "predict.ipynb?model=MODEL&user=YOUR_NAME",
    }
    echo(f"Dashboards (Voila) at {base}/ (token {token})")
    if settings.flywheel_reviewer_header:
        echo(
            f"  signed in by the {settings.flywheel_reviewer_header} header from "
            f"{settings.flywheel_trusted_proxies} (your proxy); the token alone opens pages as nobody"
        )
    for label, page in pages.items():
        echo(f"  {label}: {with_token(f'{base}/voila/render/{page}', token)}")
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
