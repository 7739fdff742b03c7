"""Each `flywheel serve` worker accepts connections on a socket of its own (SO_REUSEPORT).

uvicorn's workers share the one socket their supervisor bound: whichever worker's event loop
wakes first accepts every connection waiting, so a burst of new keep-alive connections lands on
one or two workers and stays there. Measured under serve_bench's 64 clients: 46/32/20/2 % of
the requests on 4 workers, the busiest worker queueing while another idled
(benchmarks/RESULTS.md, 2026-12-08). With a listening socket per worker in one SO_REUSEPORT
group, Linux spreads new connections across them by hash of the connection's addresses.

uvicorn's own supervisor still starts, health-checks and restarts the workers; it hands every
worker it starts the same list of sockets, pickled. The one socket in that list here is an
`_OwnListener`, which unpickles as a new socket bound in the worker's own process: a restarted
worker gets a socket of its own too. The supervisor never listens on the port itself (a socket
it held in the group would take its share of connections and never accept them).

The trade-off: a worker that dies resets the connections already queued on its own socket that it
had not accepted yet (on a shared socket they would wait for another worker); clients see a reset
and retry, and new connections go to the live workers at once. Linux moves them to another
worker instead with `sysctl net.ipv4.tcp_migrate_req=1` (docs/deploy.md).

`API_REUSE_PORT=false`, another OS, a single worker or port 0 keep uvicorn's shared socket.
"""

from __future__ import annotations

import socket
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flywheel.config import Settings

BACKLOG = 2048  # uvicorn's default


def applies(settings: Settings, host: str, port: int, workers: int) -> bool:
    return (
        settings.api_reuse_port
        and workers > 1
        and port != 0
        and sys.platform.startswith("linux")
        and hasattr(socket, "SO_REUSEPORT")
    )


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_free(host: str, port: int) -> None:
    """Fail now, with the OS's reason, when another process holds the port; a second `flywheel serve`
    on it must not join the group and take half of the first one's connections."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen(1)
        except OSError as exc:
            raise SystemExit(f"flywheel serve: cannot listen on {host}:{port}: {exc.strerror}") from None


def listen(family: int, address: tuple[str, int]) -> socket.socket:
    """A listening socket in the port's SO_REUSEPORT group (runs in the worker, when unpickled)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(BACKLOG)
    return sock


class _OwnListener(socket.socket):
    """Never bound here; pickled to a worker, it becomes that worker's own listening socket."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(_family(host), socket.SOCK_STREAM)
        self.address = (host, port)

    def __reduce__(self) -> tuple[Any, ...]:
        return (listen, (int(self.family), self.address))


def run(app: str, **options: Any) -> None:
    """`uvicorn.run(app, **options)` with more than one worker, each on a socket of its own."""
    from uvicorn import Config
    from uvicorn.supervisors import Multiprocess

    config = Config(app, **options)
    placeholder = _OwnListener(config.host, config.port)
    try:
        Multiprocess(config, sockets=[placeholder]).run()
    finally:
        placeholder.close()
