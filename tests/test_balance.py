"""`flywheel serve`'s workers each listen on a socket of their own (flywheel.http.balance): real
processes, raw connections."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import free_port, serve_command, stop_group, wait_until_up

from flywheel.store import Store

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
HEADER = b"x-flywheel-worker:"


def _spawn(cmd: list[str], **env: str) -> subprocess.Popen[bytes]:
    full = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", **env)
    return subprocess.Popen(
        cmd, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def _worker_of(sock: socket.socket) -> str:
    """One GET /health on a kept-alive connection -> the worker that answered it."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection without an answer"
        data += chunk
    for line in data.split(b"\r\n"):
        if line.lower().startswith(HEADER):
            return line[len(HEADER) :].strip().decode()
    raise AssertionError(f"no worker header in {data[:300]!r}")


def _burst(port: int, n: int) -> Counter[str]:
    """`n` connections opened at once (all queued before any is accepted), then one request on
    each: which worker accepted each connection."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            socks.append(sock)
        return Counter(_worker_of(sock) for sock in socks)
    finally:
        for sock in socks:
            sock.close()


def _wait_for_workers(port: int, workers: int, gone: str | None = None, timeout: float = 180) -> set[str]:
    """Until `workers` distinct workers (not `gone`) answer new connections: a worker that is
    still importing accepts none."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        try:
            seen |= set(_burst(port, 8)) - {gone}
        except ConnectionResetError:  # queued on a killed worker's socket as it closed (balance's docs)
            continue
        if len(seen) >= workers:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"only {len(seen)} of {workers} workers answered in {timeout:.0f} s")


@pytest.fixture
def four_workers(demo_store_rw: Store) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = _spawn(serve_command(port, workers=4))
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", proc=proc)
        _wait_for_workers(port, 4)
        yield port, proc
    finally:
        stop_group(proc)


def test_a_burst_of_new_connections_spreads_over_every_worker(
    four_workers: tuple[int, subprocess.Popen[bytes]],
) -> None:
    # uvicorn's shared socket gave the first worker to wake all (or nearly all) of such a burst
    port, _ = four_workers
    for _ in range(3):
        shares = _burst(port, 48)
        assert len(shares) == 4, shares
        assert max(shares.values()) <= 24, shares  # at most half on one worker (a fair share is 12)


def test_a_restarted_worker_listens_again_and_no_connection_hangs(
    four_workers: tuple[int, subprocess.Popen[bytes]],
) -> None:
    port, _ = four_workers
    before = set(_burst(port, 48))
    victim = sorted(before)[0]
    os.kill(int(victim), signal.SIGKILL)
    after = _wait_for_workers(port, 4, gone=victim)  # its replacement listens on a socket of its own
    assert len(after - before) == 1
    shares = _burst(port, 48)  # every connection is answered (30 s timeout each): none waits on a dead socket
    assert sum(shares.values()) == 48 and victim not in shares and len(shares) == 4, shares


def test_a_port_another_process_holds_is_refused_with_the_reason(demo_store_rw: Store) -> None:
    holder = socket.socket()  # as another `flywheel serve`'s worker listens: workers could join its group
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    proc = _spawn(serve_command(port, workers=2))
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        stop_group(proc)
        holder.close()
    assert proc.returncode not in (0, None)
    assert f"cannot listen on 127.0.0.1:{port}" in err.decode(), err.decode()[-2000:]


def test_api_reuse_port_false_keeps_uvicorns_shared_socket(demo_store_rw: Store) -> None:
    port = free_port()
    proc = _spawn(serve_command(port, workers=2), API_REUSE_PORT="false")
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", proc=proc)
        assert _wait_for_workers(port, 2)
    finally:
        stop_group(proc)
