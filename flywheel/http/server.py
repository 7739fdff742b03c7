"""Running the API: in the foreground with worker processes, or in a background thread of a kernel.

The background server pre-binds its socket (so the port is known and taken
before the call returns), runs uvicorn in a daemon thread, waits until it
answers, and keeps uvicorn's logging out of notebook cells. One per process.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import uvicorn

from flywheel.config import Settings, get_settings
from flywheel.http import balance

if TYPE_CHECKING:
    from flywheel.runtime import Runtime

_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
_lock = threading.Lock()
_background: BackgroundServer | None = None


@dataclass
class BackgroundServer:
    server: uvicorn.Server
    thread: threading.Thread
    sock: socket.socket
    url: str

    @property
    def running(self) -> bool:
        return self.thread.is_alive() and self.server.started and not self.server.should_exit

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()


def _quiet_uvicorn_logging() -> dict[str, object]:
    """Route uvicorn's loggers to the log file handlers only, never to cell output."""
    config: dict[str, object] = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"null": {"class": "logging.NullHandler"}},
        "loggers": {name: {"handlers": ["null"], "propagate": False} for name in _UVICORN_LOGGERS},
    }
    return config


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def start_background(
    port: int | None = None,
    host: str = "127.0.0.1",
    settings: Settings | None = None,
    timeout: float = 60.0,
    *,
    runtime: Runtime | None = None,
) -> str:
    """Start the API in a daemon thread of this process (once) and return its URL.

    It serves `runtime` (default: the notebook's `get_runtime()`), which it never
    closes: stopping the server leaves delivery running for the runtime's owner.
    `port=None` takes API_PORT when it is free, else any free port; calling
    again returns the same server's URL.
    """
    global _background
    with _lock:
        if _background is not None and _background.running:
            return _background.url
        if runtime is None:
            from flywheel.runtime import get_runtime

            runtime = get_runtime()
        settings = settings or runtime.settings
        wanted = settings.api_port if port is None else port
        try:
            sock = _bind(host, wanted)
        except OSError:
            if port is not None:
                raise
            sock = _bind(host, 0)
        actual = sock.getsockname()[1]
        from flywheel.http.api import create_app

        warn_if_exposed(host, settings)
        config = uvicorn.Config(
            create_app(runtime),
            log_config=_quiet_uvicorn_logging(),
            access_log=False,
            lifespan="on",
            **connection_limits(settings),
        )
        server = uvicorn.Server(config)
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not the main thread
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="flywheel-api", daemon=True
        )
        thread.start()
        url = f"http://{host}:{actual}"
        _wait_until_up(url, thread, timeout)
        _background = BackgroundServer(server, thread, sock, url)
        return url


def _wait_until_up(url: str, thread: threading.Thread, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError(f"the flywheel API failed to start at {url}; see {_log_hint()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"the flywheel API did not answer at {url} within {timeout:.0f}s")


def _log_hint() -> str:
    return "the flywheel.http.server logger"


def stop_background() -> bool:
    """Stop the background server if one runs; True when one was stopped. Its runtime keeps running."""
    global _background
    with _lock:
        if _background is None:
            return False
        _background.stop()
        _background = None
        return True


def background_url() -> str | None:
    with _lock:
        return _background.url if _background is not None and _background.running else None


_LOOPBACK = ("127.", "::1", "localhost")


def warn_if_exposed(host: str, settings: Settings) -> str | None:
    """Print (to stderr) and return a warning when `host` is reachable from elsewhere and no key is set."""
    keys = (settings.flywheel_predict_key, settings.flywheel_feedback_key, settings.flywheel_admin_key)
    if host.startswith(_LOOPBACK) or all(keys):
        return None
    names = ("FLYWHEEL_PREDICT_KEY", "FLYWHEEL_FEEDBACK_KEY", "FLYWHEEL_ADMIN_KEY")
    missing = [name for name, key in zip(names, keys, strict=True) if not key]
    warning = (
        f"flywheel: WARNING: the API binds {host}, reachable from other machines, and "
        f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} unset: anyone who can reach "
        "it may use those endpoints. Set the keys, or bind API_HOST=127.0.0.1."
    )
    print(warning, file=sys.stderr, flush=True)
    return warning


def connection_limits(settings: Settings) -> dict[str, int]:
    """uvicorn's connection limits from settings (API_MAX_CONNECTIONS, API_TIMEOUT_KEEP_ALIVE).

    uvicorn's `limit_concurrency` counts open connections (and tasks): past it, it answers 503 to
    every request, `/health` too. So it is only a high cap on connections (API_MAX_CONNECTIONS);
    the API bounds the requests it works on itself (API_LIMIT_CONCURRENCY, after their body has
    arrived: `flywheel.http.api.Concurrency`), and a slow body is cut at BODY_READ_TIMEOUT.
    uvicorn cannot time out a client that sends its headers slowly: put a proxy in front
    (nginx `client_header_timeout`), see docs/configuration.md.
    """
    return {
        "limit_concurrency": settings.api_max_connections,
        "timeout_keep_alive": settings.api_timeout_keep_alive,
    }


def raise_open_files_limit(settings: Settings) -> int:
    """Raise this process's soft limit of open files (inherited by the workers) so that
    API_MAX_CONNECTIONS connections fit, as far as the hard limit allows; the new soft limit."""
    try:
        import resource
    except ImportError:  # not on this platform
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = settings.api_max_connections + 256  # the connections, plus files, sockets, MLflow's
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new if new > soft else soft


def serve_foreground(host: str | None = None, port: int | None = None, workers: int | None = None) -> None:
    """`flywheel serve`: uvicorn with real worker processes, and the host's deliverer processes.

    The workers only commit to the outbox (FLYWHEEL_DELIVERY=process in their environment); one
    deliverer (`flywheel deliver`, supervised here: restarted when it dies) is its only consumer,
    and a warm standby takes over the instant it dies (`deliverer.DeliveryLock`). SIGTERM or
    Ctrl-C stops the workers first, then both deliverers: the delivering one drains what it can.
    """
    from flywheel.config import export_environment
    from flywheel.deliverer import PROCESS, Supervisor

    settings = get_settings()
    logging.basicConfig(level=logging.INFO)
    warn_if_exposed(host or settings.api_host, settings)
    raise_open_files_limit(settings)
    export_environment({"FLYWHEEL_DELIVERY": PROCESS})  # for the workers (and a worker in this process)
    get_settings.cache_clear()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # one worker runs here: uvicorn re-raises it
    options = {
        "host": host or settings.api_host,
        "port": settings.api_port if port is None else port,
        "workers": workers or settings.api_workers,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
        # a worker importing MLflow and DSPy on a busy machine takes longer than uvicorn's 5 s default
        "timeout_worker_healthcheck": settings.worker_healthcheck_timeout,
        **connection_limits(settings),
    }
    balanced = balance.applies(settings, options["host"], options["port"], options["workers"])
    if balanced:
        balance.check_free(options["host"], options["port"])  # before the deliverers start
    deliverer = Supervisor().start()
    try:
        if balanced:
            balance.run("flywheel.http.api:app", **options)
        else:
            uvicorn.run("flywheel.http.api:app", **options)
    except KeyboardInterrupt:
        pass
    finally:
        deliverer.stop()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(sig: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: the supervisor's `finally` stops the deliverer (the default would end
    the process there and then, leaving it behind)."""
    raise KeyboardInterrupt
