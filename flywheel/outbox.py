"""A durable local queue between the server and MLflow: nothing acknowledged is lost.

Every trace and every piece of feedback is first committed to a sqlite file
under FLYWHEEL_HOME (WAL: a commit survives the process being killed), then a
background thread delivers it to MLflow in batches and deletes it. When MLflow
is unreachable items wait and are replayed when it is back. Delivery is
idempotent (traces are upserted by id, feedback carries its own id), so a
replay after a crash between "written" and "deleted" adds nothing twice.

Several worker processes share the file: a delivering process claims a batch
first; a claim older than CLAIM_SECONDS (its process died) is taken over.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLAIM_SECONDS = 30.0
BATCH = 500
COMMIT_EVERY = 0.02  # a trace is on disk within 20 ms of its answer; feedback before its 200
_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    created REAL NOT NULL,
    claimed_by TEXT,
    claimed_at REAL
);
CREATE INDEX IF NOT EXISTS items_trace ON items(trace_id);
CREATE TABLE IF NOT EXISTS delivered (
    trace_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Item:
    id: int
    kind: str
    trace_id: str
    payload: dict[str, Any]


Deliver = Callable[[list[Item]], list[int]]
"""Writes a batch of one kind to its destination; returns the ids now stored (idempotently)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Outbox:
    """Group-committed durable queue; each kind's registered deliverer is called off-thread."""

    def __init__(self, path: Path, interval: float = 0.25) -> None:
        self.path = path
        self._deliverers: dict[str, Deliver] = {}
        self.interval = interval
        self.owner = f"{os.getpid()}-{id(self):x}"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._db()
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(delivered)")}
        if "version" not in columns:  # files written before `version` was recorded
            db.execute("ALTER TABLE delivered ADD COLUMN version TEXT NOT NULL DEFAULT ''")
        self._pending: list[tuple[str, str, str, Future[int]]] = []
        self._cond = threading.Condition()
        self._drain_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = True
        self.last_error: str | None = None
        self._backoff = 0.0

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process
            self._local.db = db
        return db

    def register(self, kind: str, deliver: Deliver) -> None:
        """Deliver items of `kind` with `deliver`. Kinds are delivered in the order registered
        (traces before the feedback that needs them)."""
        self._deliverers[kind] = deliver

    def deliver(self, items: list[Item]) -> list[int]:
        done: list[int] = []
        for kind, deliver in self._deliverers.items():
            batch = [i for i in items if i.kind == kind]
            if batch:
                done += deliver(batch)
        return done

    # --- producers ---------------------------------------------------------------------

    def put(self, kind: str, trace_id: str, payload: dict[str, Any], urgent: bool = False) -> Future[int]:
        """Queue an item; the future resolves once it is committed to disk.

        Items are group-committed every COMMIT_EVERY seconds; `urgent` wakes the
        writer at once (someone is waiting for the commit).
        """
        future: Future[int] = Future()
        with self._cond:
            self._pending.append((kind, trace_id, json.dumps(payload, default=str), future))
            if urgent:
                self._cond.notify()
        if self._thread is None:  # no background thread (tests, scripts): commit now
            self._commit_pending()
        return future

    def put_durable(self, kind: str, trace_id: str, payload: dict[str, Any], timeout: float = 30) -> int:
        """Queue an item and return only once it is on disk (what a 200 for feedback promises)."""
        return self.put(kind, trace_id, payload, urgent=True).result(timeout)

    def _commit_pending(self) -> None:
        # Items stay in _pending until committed, so pending_trace() never misses one in flight.
        with self._commit_lock:
            with self._cond:
                batch = list(self._pending)
            if batch:
                self._commit(batch)
                with self._cond:
                    del self._pending[: len(batch)]

    def _commit(self, batch: list[tuple[str, str, str, Future[int]]]) -> None:
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            ids = []
            now = time.time()
            for kind, trace_id, payload, _ in batch:
                cur = db.execute(
                    "INSERT INTO items(kind, trace_id, payload, created) VALUES (?, ?, ?, ?)",
                    (kind, trace_id, payload, now),
                )
                ids.append(cur.lastrowid)
            db.execute("COMMIT")
        except BaseException as exc:
            db.execute("ROLLBACK") if db.in_transaction else None
            for *_, future in batch:
                future.set_exception(exc)
            return
        for (*_, future), row_id in zip(batch, ids, strict=True):
            future.set_result(int(row_id or 0))

    # --- queries -----------------------------------------------------------------------

    def backlog(self) -> int:
        (count,) = self._db().execute("SELECT COUNT(*) FROM items").fetchone()
        with self._cond:
            return int(count) + len(self._pending)

    def pending_trace(self, trace_id: str) -> dict[str, Any] | None:
        """The queued trace record with this id, if it is still waiting for MLflow."""
        with self._cond:
            for kind, tid, payload, _ in self._pending:
                if kind == "trace" and tid == trace_id:
                    return dict(json.loads(payload))
        row = (
            self._db()
            .execute("SELECT payload FROM items WHERE kind='trace' AND trace_id=? LIMIT 1", (trace_id,))
            .fetchone()
        )
        return json.loads(row[0]) if row else None

    def delivered_model(self, trace_id: str) -> tuple[str, str] | None:
        """(model, version) of a trace this store's outbox delivered: feedback is checked without MLflow."""
        row = (
            self._db()
            .execute("SELECT model, version FROM delivered WHERE trace_id=?", (trace_id,))
            .fetchone()
        )
        return (row[0], row[1]) if row else None

    # --- delivery ----------------------------------------------------------------------

    def _release_dead_owners(self) -> None:
        """Claims of a process that no longer runs (the file is local, so its pid is ours to check)."""
        db = self._db()
        for (owner,) in db.execute("SELECT DISTINCT claimed_by FROM items WHERE claimed_by IS NOT NULL"):
            pid = int(owner.split("-", 1)[0]) if owner.split("-", 1)[0].isdigit() else 0
            if pid and pid != os.getpid() and not _alive(pid):
                db.execute("UPDATE items SET claimed_by=NULL WHERE claimed_by=?", (owner,))

    def _claim(self) -> list[Item]:
        self._release_dead_owners()
        db = self._db()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "UPDATE items SET claimed_by=?, claimed_at=? WHERE id IN (SELECT id FROM items "
                "WHERE claimed_by IS NULL OR claimed_at < ? ORDER BY id LIMIT ?)",
                (self.owner, now, now - CLAIM_SECONDS, BATCH),
            )
            rows = db.execute(
                "SELECT id, kind, trace_id, payload FROM items WHERE claimed_by=? ORDER BY id", (self.owner,)
            ).fetchall()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return [Item(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    def drain_once(self) -> int:
        """Deliver one claimed batch; returns how many items reached MLflow."""
        with self._drain_lock:  # one delivery at a time per process: never the same item twice
            return self._drain_once()

    def _drain_once(self) -> int:
        self._commit_pending()
        items = self._claim()
        if not items:
            return 0
        try:
            done = set(self.deliver(items))
        except Exception as exc:
            self.connected = False
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._release(items)
            raise
        self.connected, self.last_error = True, None
        db = self._db()
        now = time.time()
        delivered = [i for i in items if i.id in done]
        db.execute("BEGIN IMMEDIATE")
        db.executemany("DELETE FROM items WHERE id=?", [(i.id,) for i in delivered])
        db.executemany(
            "INSERT OR REPLACE INTO delivered(trace_id, model, version, at) VALUES (?, ?, ?, ?)",
            [
                (i.trace_id, i.payload.get("model", ""), i.payload.get("version", ""), now)
                for i in delivered
                if i.kind == "trace"
            ],
        )
        db.execute("COMMIT")
        self._release([i for i in items if i.id not in done])
        return len(done)

    def _release(self, items: list[Item]) -> None:
        if items:
            self._db().executemany("UPDATE items SET claimed_by=NULL WHERE id=?", [(i.id,) for i in items])

    def deliver_available(self, max_batches: int | None = None) -> bool:
        """Deliver the batches this process can claim now, without waiting for ones another
        process holds (a click or an export never stalls on a busy server's backlog).
        False when a delivery failed (MLflow does not answer, the file was locked)."""
        try:
            batches = 0
            while self.drain_once() and (max_batches is None or (batches := batches + 1) < max_batches):
                pass
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        return True

    def flush(self, timeout: float = 60.0) -> bool:
        """Deliver until the whole backlog (every process's) is empty; False after `timeout`
        (MLflow down, or items another process holds). Retries through brief errors."""
        deadline = time.monotonic() + timeout
        while True:
            if self.deliver_available() and self.backlog() == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    # --- background thread -------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="flywheel-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        with self._cond:
            self._cond.notify()
        thread.join(timeout)
        self._commit_pending()
        try:
            self.drain_once()
        except Exception:
            pass  # stays on disk for the next start

    def _run(self) -> None:
        # Commit often (cheap, local) and deliver in bigger batches (each MLflow write has a fixed cost).
        next_drain = 0.0
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait(COMMIT_EVERY)
            self._commit_pending()
            now = time.monotonic()
            if now < max(next_drain, self._backoff):
                continue
            next_drain = now + self.interval
            try:
                while self.drain_once() and not self._stop.is_set():
                    self._commit_pending()
                self._backoff = 0.0
            except Exception:
                self._backoff = time.monotonic() + 1.0  # MLflow down: retry every second
