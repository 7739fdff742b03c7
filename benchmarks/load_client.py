"""A lean closed-loop HTTP/1.1 load generator: uvloop, raw sockets and httptools' parser.

The benchmarks run the load generator on the same two cores as the servers it measures. aiohttp
spends about a millisecond of CPU per request, as much as the floor server half its own: the
generator's cost, not the server's, then set the machine's limit. This one sends pre-encoded
requests on kept-alive connections and parses only the status line, the worker header and the
body, so nearly all of the machine goes to the servers (serve_bench prints what the generator
used per request, beside the servers' figures).

`run(spec)` -> the same figures serve_bench's aiohttp load returned: answered requests, their
latencies and completion times, failures by kind, the answering workers and the trace ids.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import httptools

REQUEST_TIMEOUT = 120.0


class _Failed(Exception):
    """A request that got no complete answer; its message is the kind recorded."""


class _Connection(asyncio.Protocol):
    """One kept-alive connection; one request in flight at a time (closed-loop)."""

    def __init__(self, worker_header: bytes) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.worker_header = worker_header
        self.waiter: asyncio.Future[tuple[int, str | None, bytes, bool]] | None = None
        self.worker: str | None = None
        self.body: list[bytes] = []
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"HttpParserError: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(type(exc).__name__ if exc else "ServerDisconnected")

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == self.worker_header:
            self.worker = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            keep = self.parser.should_keep_alive()
            waiter.set_result((self.parser.get_status_code(), self.worker, b"".join(self.body), keep))

    def _fail(self, kind: str) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Failed(kind))

    def send(self, request: bytes) -> asyncio.Future[tuple[int, str | None, bytes, bool]]:
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.worker, self.body = None, []
        assert self.transport is not None
        self.transport.write(request)
        return self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _requests(url: str, bodies: list[bytes], close: bool) -> list[bytes]:
    parts = urlsplit(url)
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}"
    )
    return [f"{head}Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies]


async def load(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop load: `concurrency` clients, each sending its next request when the last is
    answered, until `duration`; or (a warm-up, `until_workers`) until that many distinct workers
    have answered, each request on a new connection so that a worker that comes up late gets some.
    `bodies` are the JSON bodies sent in turn; `trace_ids` collects each 200's `trace_id` when
    `want_trace_ids`."""
    url, concurrency = spec["url"], spec["concurrency"]
    until_workers = spec.get("until_workers", 0)
    fresh = bool(until_workers)
    worker_header = spec["worker_header"].lower().encode()
    requests = _requests(url, [json.dumps(b).encode() for b in spec["bodies"]], close=fresh)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()

    latencies: list[float] = []
    done_at: list[float] = []
    failures: list[tuple[float, str]] = []
    workers: Counter[str] = Counter()
    answered_by: set[str] = set()
    trace_ids: list[str] = []
    enough = asyncio.Event()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    deadline = began + spec["duration"]

    async def client(n: int) -> None:
        conn: _Connection | None = None
        i = n
        while time.perf_counter() < deadline and not enough.is_set():
            request = requests[i % len(requests)]
            i += 1
            start = time.perf_counter()
            try:
                if conn is None or conn.closed:
                    _, conn = await loop.create_connection(lambda: _Connection(worker_header), host, port)
                status, worker, body, keep = await asyncio.wait_for(conn.send(request), REQUEST_TIMEOUT)
            except (OSError, _Failed, TimeoutError) as exc:
                kind = str(exc) if isinstance(exc, _Failed) else type(exc).__name__
                failures.append((time.perf_counter() - began, kind))
                if conn is not None:
                    conn.close()
                conn = None
                continue
            now = time.perf_counter()
            if not keep or fresh:
                conn.close()
                conn = None
            if worker:
                workers[worker] += 1
            if status != 200:
                failures.append((now - began, str(status)))
                continue
            latencies.append(now - start)
            done_at.append(now - began)
            if spec.get("want_trace_ids"):
                try:
                    trace_ids.append(json.loads(body)["trace_id"])
                except (ValueError, KeyError, TypeError):
                    failures.append((now - began, "no trace_id"))
            if worker and until_workers:
                answered_by.add(worker)
                if len(answered_by) >= until_workers:
                    enough.set()
        if conn is not None:
            conn.close()

    await asyncio.gather(*(client(n) for n in range(concurrency)))
    elapsed = time.perf_counter() - began
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "latencies": latencies,
        "done_at": done_at,
        "failures": failures,
        "workers": dict(workers),
        "answered_by": sorted(answered_by),
        "trace_ids": trace_ids,
        "seconds": elapsed,
        "client_cpu_s": cpu,
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import uvloop

    return uvloop.run(load(spec))
