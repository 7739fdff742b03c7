"""Registry reads shared by the processes of one host: one process asks, the others take its answer.

Every `flywheel serve` worker renews what it serves (the alias resolution, the traffic plan) in
the background, before its FLYWHEEL_RESOLVE_TTL runs out. Each renewal is a few queries through
MLflow's client; with 4 workers that was 13 % of each worker's CPU under serve_bench's load
(benchmarks/RESULTS.md, 2026-12-08): four processes asking the registry the same question.

`HostReads.read(key, within, ask)` returns the answer one of the host's processes got less than
`within` seconds ago (a file under FLYWHEEL_HOME), or asks now under an exclusive lock on that
file (`flock`), so that one process asks while the others wait for its answer and take it. The
answer comes with the wall-clock time it was read: a caller dates it then, not when it took it,
so an answer is never served for longer than the TTL since the registry gave it.

Only renewals go through here: a first read, a read past the TTL and a read after this process
changed the model ask the registry themselves. A failed read is not shared (each process falls
back on its own), and nothing here ever fails a request: an unusable directory means asking.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flywheel.store import Store


class HostReads:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    @staticmethod
    def _recent(path: Path, within: float) -> tuple[Any, float] | None:
        try:
            data = read_json(path)
            at = float(data["at"])
        except (ValueError, KeyError, TypeError):
            return None
        return (data["value"], at) if 0 <= time.time() - at < within else None

    def read(self, key: str, within: float, ask: Callable[[], Any]) -> tuple[Any, float]:
        """(answer, wall-clock time it was read): this host's answer to `key` if one is less than
        `within` seconds old, else `ask()`'s (JSON-able), shared with the host. `ask`'s errors
        propagate, unshared."""
        path = self._path(key)
        if (recent := self._recent(path, within)) is not None:
            return recent
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(path.with_suffix(".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        except OSError:
            return ask(), time.time()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process asks; the others wait for its answer
            if (recent := self._recent(path, within)) is not None:
                return recent
            value, at = ask(), time.time()
            write_json(path, {"key": key, "at": at, "value": value})  # unwritten: the next one asks
            return value, at
        finally:
            os.close(lock)  # releases the flock


def write_json(path: Path, data: Any) -> bool:
    """Replace `path` with `data` as JSON atomically (write, then rename), so the processes of a
    host read it whole without locks; False when the disk or the data would not have it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except (OSError, TypeError, ValueError):
        return False
    return True


def read_json(path: Path) -> Any | None:
    """What `write_json` wrote there; None when there is nothing readable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def for_store(store: Store) -> HostReads:
    """The host's shared reads of one tracking store, under FLYWHEEL_HOME."""
    digest = hashlib.sha256(store.tracking_uri.encode()).hexdigest()[:16]
    return HostReads(store.settings.flywheel_home / "host-reads" / digest)


def monotonic_at(wall: float) -> float:
    """A wall-clock moment on the monotonic clock (how long ago it was, taken from now)."""
    return time.monotonic() - max(0.0, time.time() - wall)
