"""A durable local queue between the server and MLflow: nothing acknowledged is lost.

Every trace and every piece of feedback is first committed to a sqlite file
under FLYWHEEL_HOME (WAL: a commit survives the process being killed), then a
background thread delivers it to MLflow in batches and deletes it. Commits are
grouped: one thread commits whatever is queued, at once when someone waits for it
(`put(urgent=True)`, a /predict or /feedback about to answer) and every 20 ms
otherwise, so concurrent requests share one transaction. When MLflow is
unreachable items wait and are replayed when it is back. Delivery is idempotent
(traces are upserted by id, feedback carries its own id), so a replay after a
crash between "written" and "deleted" adds nothing twice.

Several worker processes share the file: a delivering process claims a batch
first; a claim older than CLAIM_SECONDS (its process died) is taken over.

An item a deliverer does not store (feedback whose trace is not in MLflow yet) is
retried with a growing delay; one with a deadline is moved to the `dead` table
(a dead letter, counted by `dead_letters()`) once the deadline has passed while
MLflow answered, unless an item of an earlier kind for the same trace still waits
here. Rows of `delivered` (what feedback checks without MLflow) are pruned after
DELIVERED_KEEP_SECONDS. A failed commit is logged; its waiters get the error.

Held items and their cap. A producer may put an item `held` by a client under a `Cap`
(feedback for a trace not known yet: it may wait up to FEEDBACK_WAIT). The cap is checked in
the commit's own transaction, so concurrent requests of every process on the file never pass
it together: beyond the client's count or everyone's total bytes, the item is not written and
its waiter gets `OverCap`. The counts are kept by triggers in the `held` table (one row per
client, '' for the total), so the check is two primary-key reads, never a scan of payloads.

Dead letters are pruned by the delivery thread's periodic pass (and after a pass that made
some): those older than `keep_dead` seconds go, then the oldest beyond `dead_max_bytes` of
payload. `dead_letters()` counts what is kept.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("flywheel.outbox")

CLAIM_SECONDS = 30.0
BATCH = 500
COMMIT_EVERY = 0.02  # an item nobody waits for is on disk within 20 ms; urgent ones at once
RETRY_FIRST, RETRY_MAX = 0.25, 5.0  # delay before an undelivered item is tried again, doubling
DELIVERED_KEEP_SECONDS = 7 * 86400  # how long `delivered` remembers a trace's model for feedback
DEAD_KEEP_WAITS = 12  # the runtime keeps a dead letter FEEDBACK_WAIT x this for inspection,
DEAD_KEEP_SECONDS = 3600.0  # and at least this long (also the default of a bare Outbox)
PRUNE_EVERY = 600.0
WAL_KEEP_BYTES = 4 << 20  # a checkpointed WAL longer than this is truncated to it
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
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    created REAL NOT NULL,
    died REAL NOT NULL,
    reason TEXT NOT NULL
);
"""
_COLUMNS = {  # added after the first release: files written before get them on open
    ("delivered", "version"): "TEXT NOT NULL DEFAULT ''",
    ("items", "deadline"): "REAL",
    ("items", "tries"): "INTEGER NOT NULL DEFAULT 0",
    ("items", "next_try"): "REAL NOT NULL DEFAULT 0",
    ("items", "held_by"): "TEXT",  # the client a capped item counts against (`Cap`)
    ("items", "size"): "INTEGER NOT NULL DEFAULT 0",  # its payload's bytes, for the cap
    ("dead", "size"): "INTEGER",  # payload bytes, for `dead_max_bytes` (older rows: filled on upgrade)
}
# After the columns exist. `held`: per client ('' = all) the capped items waiting and their bytes,
# kept exact by triggers in the same transaction as every insert and delete of `items`.
_HELD = """
CREATE TABLE IF NOT EXISTS held (
    client TEXT PRIMARY KEY,
    items INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS items_held_in AFTER INSERT ON items WHEN NEW.held_by IS NOT NULL BEGIN
    INSERT INTO held(client, items, bytes) VALUES (NEW.held_by, 1, NEW.size), ('', 1, NEW.size)
    ON CONFLICT(client) DO UPDATE SET items = items + excluded.items, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER IF NOT EXISTS items_held_out AFTER DELETE ON items WHEN OLD.held_by IS NOT NULL BEGIN
    UPDATE held SET items = items - 1, bytes = bytes - OLD.size WHERE client IN (OLD.held_by, '');
    DELETE FROM held WHERE client = OLD.held_by AND items <= 0;
END;
CREATE INDEX IF NOT EXISTS items_held ON items(held_by, deadline) WHERE held_by IS NOT NULL;
CREATE INDEX IF NOT EXISTS dead_died ON dead(died, size);
"""


@dataclass(frozen=True)
class Item:
    id: int
    kind: str
    trace_id: str
    payload: dict[str, Any]
    deadline: float | None = None
    tries: int = 0


class Outcome(list[int]):
    """What a deliverer may return instead of a plain list of the ids stored: the same list,
    plus `dead`, the ids that can never be stored, each with the reason (dead letters at once)."""

    def __init__(self, done: Iterable[int] = (), dead: dict[int, str] | None = None) -> None:
        super().__init__(done)
        self.dead = dict(dead or {})


@dataclass(frozen=True)
class Cap:
    """What a held item may add to: at most `per_client` items of `client` and `total_bytes` of
    payload of every client's held items waiting in the file (its own included)."""

    client: str
    per_client: int
    total_bytes: int


class OverCap(Exception):
    """A held item was refused by its `Cap`; nothing of it was written. `retry_after`: seconds
    until the oldest held item's deadline, when room is likely to free up."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


Deliver = Callable[[list[Item]], list[int]]
"""Writes a batch of one kind to its destination; returns the ids now stored (idempotently).
Raising means the destination is unreachable: the batch waits, nothing is dead-lettered."""

_Pending = tuple[str, str, str, "float | None", "Future[int]", "Cap | None"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Outbox:
    """Group-committed durable queue; each kind's registered deliverer is called off-thread.

    `grace`: seconds MLflow must have answered (since this process started or since an
    outage ended) before anything is dead-lettered, so other hosts can replay their backlog
    first. `keep_dead`: seconds a dead letter is kept; `dead_max_bytes`: at most this much
    payload of dead letters is kept, the oldest pruned first (None: no bound but the age).
    """

    def __init__(
        self,
        path: Path,
        interval: float = 0.25,
        grace: float = 0.0,
        keep_dead: float = DEAD_KEEP_SECONDS,
        dead_max_bytes: int | None = None,
    ) -> None:
        self.path = path
        self._deliverers: dict[str, Deliver] = {}
        self.interval = interval
        self.grace = grace
        self.keep_dead = keep_dead
        self.dead_max_bytes = dead_max_bytes
        self.owner = f"{os.getpid()}-{id(self):x}"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._db()
        db.executescript(_SCHEMA)
        for (table, column), kind in _COLUMNS.items():
            if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                try:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as exc:  # another process added it first
                    if "duplicate column" not in str(exc):
                        raise
                if (table, column) == ("dead", "size"):
                    db.execute("UPDATE dead SET size = length(CAST(payload AS BLOB)) WHERE size IS NULL")
        db.executescript(_HELD)
        self._pending: list[_Pending] = []
        self._cond = threading.Condition()
        self._urgent = False
        self._drain_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None  # the committer; None: commit inline
        self._delivery: threading.Thread | None = None
        self.connected = True
        self.last_error: str | None = None
        self._backoff = 0.0
        self._reachable_since: float | None = None

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process
            db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")  # the WAL shrinks back after a burst
            self._local.db = db
        return db

    def register(self, kind: str, deliver: Deliver) -> None:
        """Deliver items of `kind` with `deliver`. Kinds are delivered in the order registered
        (traces before the feedback that needs them)."""
        self._deliverers[kind] = deliver

    # --- producers ---------------------------------------------------------------------

    def put(
        self,
        kind: str,
        trace_id: str,
        payload: dict[str, Any],
        urgent: bool = False,
        deadline: float | None = None,
        cap: Cap | None = None,
    ) -> Future[int]:
        """Queue an item; the future resolves once it is committed to disk (or fails with the
        commit's error, which is logged, or with `OverCap`).

        Items are group-committed every COMMIT_EVERY seconds; `urgent` wakes the
        committer at once (someone is waiting for the commit). `deadline` (Unix time):
        after it an item its deliverer does not store becomes a dead letter. `cap`: the item is
        held by `cap.client` and written only within the cap (see the module's docstring).
        """
        future: Future[int] = Future()
        item = (kind, trace_id, json.dumps(payload, default=str), deadline, future, cap)
        with self._cond:
            self._pending.append(item)
            if urgent:
                self._urgent = True
                self._cond.notify_all()
        if self._thread is None:  # no background thread (tests, scripts): commit now
            self._commit_pending()
        return future

    def put_durable(
        self,
        kind: str,
        trace_id: str,
        payload: dict[str, Any],
        timeout: float = 30,
        deadline: float | None = None,
        cap: Cap | None = None,
    ) -> int:
        """Queue an item and return only once it is on disk (what a 200 for feedback promises);
        `OverCap` when its `cap` refused it."""
        return self.put(kind, trace_id, payload, urgent=True, deadline=deadline, cap=cap).result(timeout)

    def _commit_pending(self) -> None:
        # Items stay in _pending until committed, so pending_trace() never misses one in flight.
        with self._commit_lock:
            with self._cond:
                batch = list(self._pending)
            if batch:
                try:
                    self._commit(batch)
                finally:
                    with self._cond:
                        del self._pending[: len(batch)]

    def _commit(self, batch: list[_Pending]) -> None:
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            ids: list[int | OverCap] = []
            now = time.time()
            for kind, trace_id, payload, deadline, _, cap in batch:
                size = len(payload.encode())
                refused = self._over(db, cap, size, now) if cap is not None else None
                if refused is not None:
                    ids.append(refused)  # not written: only this item's waiter hears of it
                    continue
                cur = db.execute(
                    "INSERT INTO items(kind, trace_id, payload, created, deadline, held_by, size) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (kind, trace_id, payload, now, deadline, cap.client if cap else None, size),
                )
                ids.append(int(cur.lastrowid or 0))
            db.execute("COMMIT")
        except BaseException as exc:
            log.error(
                "outbox: commit of %d item(s) to %s failed: %s: %s",
                len(batch),
                self.path,
                type(exc).__name__,
                exc,
            )
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for *_, future, _cap in batch:
                future.set_exception(exc)
            return
        for (*_, future, _cap), row_id in zip(batch, ids, strict=True):
            if isinstance(row_id, OverCap):
                future.set_exception(row_id)
            else:
                future.set_result(row_id)

    def _over(self, db: sqlite3.Connection, cap: Cap, size: int, now: float) -> OverCap | None:
        """Why `cap` refuses one more item of `size` bytes now (inside the commit's transaction)."""
        held = {
            client: (items, total)
            for client, items, total in db.execute(
                "SELECT client, items, bytes FROM held WHERE client IN (?, '')", (cap.client,)
            )
        }
        mine, total = held.get(cap.client, (0, 0))[0], held.get("", (0, 0))[1]
        if mine < cap.per_client and total + size <= cap.total_bytes:
            return None
        if mine >= cap.per_client:
            why = f"{mine} items of this client are already waiting (at most {cap.per_client})"
            where, args = "held_by = ?", (cap.client,)
        else:
            why = f"{total} bytes are already waiting; {size} more would pass {cap.total_bytes}"
            where, args = "held_by IS NOT NULL", ()
        (soonest,) = db.execute(f"SELECT MIN(deadline) FROM items WHERE {where}", args).fetchone()
        return OverCap(why, max(1, math.ceil((soonest or now + 60) - now)))

    # --- queries -----------------------------------------------------------------------

    def backlog(self) -> int:
        """Items waiting for delivery (dead letters are not counted)."""
        (count,) = self._db().execute("SELECT COUNT(*) FROM items").fetchone()
        with self._cond:
            return int(count) + len(self._pending)

    def dead_letters(self) -> int:
        """Items given up on and still kept in the `dead` table for inspection: those of the last
        `keep_dead` seconds, within `dead_max_bytes` (see the module's docstring)."""
        (count,) = self._db().execute("SELECT COUNT(*) FROM dead").fetchone()
        return int(count)

    def pending_trace(self, trace_id: str) -> dict[str, Any] | None:
        """The queued trace record with this id, if it is still waiting for MLflow."""
        with self._cond:
            for kind, tid, payload, *_ in self._pending:
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

    def prune(self, keep_seconds: float = DELIVERED_KEEP_SECONDS) -> int:
        """Forget delivered traces older than `keep_seconds`, and dead letters (`prune_dead`);
        returns how many rows went."""
        cur = self._db().execute("DELETE FROM delivered WHERE at < ?", (time.time() - keep_seconds,))
        return int(cur.rowcount or 0) + self.prune_dead()

    def prune_dead(self) -> int:
        """Drop dead letters older than `keep_dead`, then the oldest beyond `dead_max_bytes`."""
        db = self._db()
        gone = int(
            db.execute("DELETE FROM dead WHERE died < ?", (time.time() - self.keep_dead,)).rowcount or 0
        )
        if self.dead_max_bytes is not None:
            gone += int(
                db.execute(
                    "DELETE FROM dead WHERE id IN (SELECT id FROM (SELECT id, SUM(size) OVER "
                    "(ORDER BY died DESC, id DESC) AS kept FROM dead) WHERE kept > ?)",
                    (self.dead_max_bytes,),
                ).rowcount
                or 0
            )
        if gone:
            log.info("outbox: pruned %d dead letter(s)", gone)
        return gone

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
                "WHERE (claimed_by IS NULL OR claimed_at < ?) AND next_try <= ? ORDER BY id LIMIT ?)",
                (self.owner, now, now - CLAIM_SECONDS, now, BATCH),
            )
            rows = db.execute(
                "SELECT id, kind, trace_id, payload, deadline, tries FROM items WHERE claimed_by=? "
                "ORDER BY id",
                (self.owner,),
            ).fetchall()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return [Item(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows]

    def drain_once(self) -> int:
        """Deliver one claimed batch; returns how many items reached MLflow."""
        with self._drain_lock:  # one delivery at a time per process: never the same item twice
            return self._drain_once()

    def _drain_once(self) -> int:
        self._commit_pending()
        items = self._claim()
        if not items:
            return 0
        done: set[int] = set()
        dead: dict[int, str] = {}
        tried: set[int] = set()
        error: Exception | None = None
        for kind, deliver in self._deliverers.items():
            batch = [i for i in items if i.kind == kind]
            if not batch:
                continue
            try:
                result = deliver(batch)
            except Exception as exc:  # unreachable: this batch and the kinds after it wait
                error = exc
                break
            tried.update(i.id for i in batch)
            done.update(result)
            dead.update(getattr(result, "dead", {}))
        if error is None:
            self.connected, self.last_error = True, None
            if self._reachable_since is None:
                self._reachable_since = time.monotonic()
        else:
            if self.connected:
                log.warning(
                    "outbox: delivery to MLflow failed (%s: %s); queued items are kept in %s",
                    type(error).__name__,
                    error,
                    self.path,
                )
            self.connected = False
            self.last_error = f"{type(error).__name__}: {error}"
            self._reachable_since = None
        self._settle(items, done, dead, tried, may_expire=error is None and self._past_grace())
        if error is not None:
            raise error
        return len(done)

    def _past_grace(self) -> bool:
        since = self._reachable_since
        return since is not None and time.monotonic() - since >= self.grace

    def _settle(
        self, items: list[Item], done: set[int], dead: dict[int, str], tried: set[int], may_expire: bool
    ) -> None:
        """Delete what was stored, dead-letter what never will be, schedule the rest's retry."""
        db = self._db()
        now = time.time()
        kinds = list(self._deliverers)
        by_id = {i.id: i for i in items}
        db.execute("BEGIN IMMEDIATE")
        try:
            delivered = [by_id[i] for i in done if i in by_id]
            db.executemany("DELETE FROM items WHERE id=?", [(i.id,) for i in delivered])
            db.executemany(
                "INSERT OR REPLACE INTO delivered(trace_id, model, version, at) VALUES (?, ?, ?, ?)",
                [
                    (i.trace_id, i.payload.get("model", ""), i.payload.get("version", ""), now)
                    for i in delivered
                    if i.kind == "trace"
                ],
            )
            waiting = [i for i in items if i.id not in done and i.id not in dead]
            for item in waiting:
                expired = item.deadline is not None and item.deadline < now
                if not (may_expire and expired and item.id in tried):
                    continue
                earlier = kinds[: kinds.index(item.kind)] if item.kind in kinds else []
                if (
                    earlier
                    and db.execute(
                        f"SELECT 1 FROM items WHERE trace_id=? AND kind IN ({','.join('?' * len(earlier))}) "
                        "LIMIT 1",
                        (item.trace_id, *earlier),
                    ).fetchone()
                ):
                    continue  # what it needs is still queued here: it may yet arrive
                dead[item.id] = "not delivered by its deadline: its trace never reached MLflow"
            gone = [by_id[i] for i in dead if i in by_id]
            db.executemany(
                "INSERT OR REPLACE INTO dead(id, kind, trace_id, payload, created, died, reason, size) "
                "SELECT id, kind, trace_id, payload, created, ?, ?, size FROM items WHERE id=?",
                [(now, dead[i.id], i.id) for i in gone],
            )
            db.executemany("DELETE FROM items WHERE id=?", [(i.id,) for i in gone])
            retry = [i for i in items if i.id not in done and i.id not in dead]
            db.executemany(
                "UPDATE items SET claimed_by=NULL, tries=tries+?, next_try=? WHERE id=?",
                [
                    (1, now + min(RETRY_FIRST * 2**i.tries, RETRY_MAX), i.id)
                    if i.id in tried
                    else (0, 0, i.id)
                    for i in retry
                ],
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        for item in gone:
            log.warning("outbox: dead letter %s %s (%s)", item.kind, item.trace_id, dead[item.id])
        if gone and self.dead_max_bytes is not None:
            self.prune_dead()  # a burst of dead letters stays within its bytes at once

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

    # --- background threads ------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._commit_loop, name="flywheel-outbox-commit", daemon=True)
        self._delivery = threading.Thread(target=self._deliver_loop, name="flywheel-outbox", daemon=True)
        self._thread.start()
        self._delivery.start()

    def stop(self, timeout: float = 10.0) -> None:
        thread, delivery, self._thread, self._delivery = self._thread, self._delivery, None, None
        if thread is None:
            return
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        thread.join(timeout)
        if delivery is not None:
            delivery.join(timeout)
        self._commit_pending()
        try:
            self.drain_once()
        except Exception:
            pass  # stays on disk for the next start

    def _commit_loop(self) -> None:
        # Commit at once when someone waits (one transaction for all who do), else every 20 ms.
        while not self._stop.is_set():
            with self._cond:
                if not self._urgent:
                    self._cond.wait(COMMIT_EVERY)
                self._urgent = False
            try:
                self._commit_pending()
            except Exception:  # _commit logs and fails its waiters; never let the committer die
                log.exception("outbox: committer error")

    def _deliver_loop(self) -> None:
        # Deliver in bigger batches than commits (each MLflow write has a fixed cost).
        next_prune = 0.0
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now >= next_prune:
                next_prune = now + PRUNE_EVERY
                try:
                    self.prune()
                except sqlite3.Error as exc:
                    log.warning("outbox: pruning delivered rows and dead letters failed: %s", exc)
            if now < self._backoff:
                continue
            try:
                while self.drain_once() and not self._stop.is_set():
                    pass
                self._backoff = 0.0
            except Exception:
                self._backoff = time.monotonic() + 1.0  # MLflow down: retry every second
