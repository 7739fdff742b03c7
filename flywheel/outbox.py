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

Several processes share the file. Producers only insert rows; a consumer claims a batch
first, as one row of `claims` (its owner and the id range it took), so a claim never rewrites the
payload rows, and neither does a retry: how often an item was tried and when it is due again live
in the small `retry` table, which only items that were tried and not stored have a row in. A claim
whose process died (its pid, on this host) or older than CLAIM_SECONDS is taken over. A process
may be a producer only (`start(deliver=False)`: a serving worker whose host runs one deliverer
process); the delivering one records each pass in the one row of `consumer` (`delivery_state()`),
which any process reads with one primary-key lookup.

The schema is created and upgraded in one `BEGIN IMMEDIATE` transaction that checks and bumps
`PRAGMA user_version`, so processes opening a fresh or an older file at once never race each other.

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
HEARTBEAT_EVERY = 1.0  # a delivering outbox rewrites its `consumer` row at most this often, unless it changed
HEARTBEAT_STALE = CLAIM_SECONDS  # a consumer silent this long is gone (its claims are taken over too)
SCHEMA_VERSION = 1  # PRAGMA user_version of a file this module created or upgraded
# Each statement alone: executescript() would commit the migration's transaction half way.
# Small columns before `payload`, so reading them never walks a payload's overflow pages
# (files created before version 1 have them after it, added by ALTER TABLE).
_TABLES = (
    """CREATE TABLE IF NOT EXISTS items (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        trace_id TEXT NOT NULL,
        created REAL NOT NULL,
        deadline REAL,
        held_by TEXT,
        size INTEGER NOT NULL DEFAULT 0,
        payload TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS items_trace ON items(trace_id)",
    """CREATE TABLE IF NOT EXISTS delivered (
        trace_id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        version TEXT NOT NULL DEFAULT '',
        at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS dead (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        trace_id TEXT NOT NULL,
        payload TEXT NOT NULL,
        created REAL NOT NULL,
        died REAL NOT NULL,
        reason TEXT NOT NULL
    )""",
)
_COLUMNS = {  # added after the first release: files written before get them on upgrade
    ("delivered", "version"): "TEXT NOT NULL DEFAULT ''",
    ("items", "deadline"): "REAL",
    ("items", "held_by"): "TEXT",  # the client a capped item counts against (`Cap`)
    ("items", "size"): "INTEGER NOT NULL DEFAULT 0",  # its payload's bytes, for the cap
    ("dead", "size"): "INTEGER",  # payload bytes, for `dead_max_bytes`
}
# After the columns exist. `held`: per client ('' = all) the capped items waiting and their bytes,
# kept exact by triggers in the same transaction as every insert and delete of `items`.
# `claims`: one row per consumer, the id range it is delivering. `retry`: items tried and not
# stored, with their count of tries and when they are due again (deleted with their item).
# `consumer`: the one row the delivering outbox rewrites each pass (`delivery_state()`).
_DERIVED = (
    """CREATE TABLE IF NOT EXISTS held (
        client TEXT PRIMARY KEY,
        items INTEGER NOT NULL,
        bytes INTEGER NOT NULL
    )""",
    """CREATE TRIGGER IF NOT EXISTS items_held_in AFTER INSERT ON items WHEN NEW.held_by IS NOT NULL BEGIN
        INSERT INTO held(client, items, bytes) VALUES (NEW.held_by, 1, NEW.size), ('', 1, NEW.size)
        ON CONFLICT(client) DO UPDATE SET items = items + excluded.items, bytes = bytes + excluded.bytes;
    END""",
    """CREATE TRIGGER IF NOT EXISTS items_held_out AFTER DELETE ON items WHEN OLD.held_by IS NOT NULL BEGIN
        UPDATE held SET items = items - 1, bytes = bytes - OLD.size WHERE client IN (OLD.held_by, '');
        DELETE FROM held WHERE client = OLD.held_by AND items <= 0;
    END""",
    "CREATE INDEX IF NOT EXISTS items_held ON items(held_by, deadline) WHERE held_by IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS dead_died ON dead(died, size)",
    """CREATE TABLE IF NOT EXISTS claims (
        owner TEXT PRIMARY KEY,
        first_id INTEGER NOT NULL,
        last_id INTEGER NOT NULL,
        at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS retry (
        id INTEGER PRIMARY KEY,
        tries INTEGER NOT NULL,
        next_try REAL NOT NULL
    )""",
    """CREATE TRIGGER IF NOT EXISTS items_retry_out AFTER DELETE ON items BEGIN
        DELETE FROM retry WHERE id = OLD.id;
    END""",
    """CREATE TABLE IF NOT EXISTS consumer (
        slot INTEGER PRIMARY KEY CHECK (slot = 0),
        pid INTEGER NOT NULL,
        owner TEXT NOT NULL,
        heartbeat REAL NOT NULL,
        connected INTEGER NOT NULL,
        last_error TEXT
    )""",
)
_DEAD_SIZE = "length(CAST(payload AS BLOB))"  # what a dead letter's `size` is, whatever `items.size` said


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


def _json_text(payload: dict[str, Any] | str) -> str:
    if isinstance(payload, str):
        if not payload.startswith("{"):
            raise ValueError("an outbox payload given as text must be a serialised JSON object")
        return payload
    return json.dumps(payload, default=str)


def _pid_of(owner: str) -> int:
    head = owner.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


@dataclass(frozen=True)
class DeliveryState:
    """The consumer's last delivery pass as recorded in the file (`Outbox.delivery_state`):
    its process, when it last passed (`heartbeat`, Unix time), and whether MLflow answered."""

    pid: int
    owner: str
    heartbeat: float
    connected: bool
    last_error: str | None

    def age(self, now: float | None = None) -> float:
        """Seconds since its last pass."""
        return (time.time() if now is None else now) - self.heartbeat

    def alive(self, now: float | None = None, within: float = HEARTBEAT_STALE) -> bool:
        """Whether it passed within `within` seconds and its process still runs (on this host)."""
        return self.age(now) <= within and _alive(self.pid)


def _gaps(claimed: list[tuple[int, int]]) -> Iterable[tuple[int, int]]:
    """The id ranges between the sorted `claimed` ones, in order, up to the largest id."""
    low = 0
    for first, last in claimed:
        if first > low:
            yield low, first - 1
        low = max(low, last + 1)
    yield low, 2**63 - 1


def _use_wal(db: sqlite3.Connection, timeout: float = 30.0) -> None:
    """Switch the file to WAL. The switch takes the file exclusively and answers `database is
    locked` at once, without the busy timeout, while another process opens it: wait for it here."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


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
        self._migrate(self._db())
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
        self._beat: tuple[float, bool, str | None] | None = None  # the consumer row last written

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Create or upgrade the schema to SCHEMA_VERSION, all or nothing: the version is read and
        bumped under the write lock, so one process upgrades and the others see it done."""
        if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                Outbox._upgrade(db)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def _upgrade(db: sqlite3.Connection) -> None:
        for statement in _TABLES:
            db.execute(statement)
        for (table, column), kind in _COLUMNS.items():
            if column not in _columns(db, table):
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        # rows dead-lettered before: `size` NULL, or 0 when copied from an item queued before `size`
        db.execute(f"UPDATE dead SET size = {_DEAD_SIZE} WHERE size IS NULL OR size <= 0")
        for statement in _DERIVED:
            db.execute(statement)
        if {"tries", "next_try"} <= _columns(db, "items"):  # version 0 kept them on the payload rows
            db.execute(
                "INSERT OR IGNORE INTO retry(id, tries, next_try) "
                "SELECT id, tries, next_try FROM items WHERE tries > 0 OR next_try > 0"
            )

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            _use_wal(db)
            db.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process
            db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")  # the WAL shrinks back after a burst
            # Some builds (Debian's) zero every deleted payload's pages, doubling what a delivery
            # writes; FAST still clears what stays in the tree, the rest is in MLflow anyway.
            db.execute("PRAGMA secure_delete=FAST")
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
        payload: dict[str, Any] | str,
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
        `payload`: a dict, or its JSON text already serialised (an object), stored as it is;
        a deliverer gets the dict either way.
        """
        future: Future[int] = Future()
        item = (kind, trace_id, _json_text(payload), deadline, future, cap)
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
        payload: dict[str, Any] | str,
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
            # a row without its true size (a process of an older version wrote it) gets it first
            db.execute(f"UPDATE dead SET size = {_DEAD_SIZE} WHERE size IS NULL OR size <= 0")
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

    def _claim(self) -> list[Item]:
        """Claim the next batch that is due and no live consumer holds: one row of `claims`, the
        range [first, last] of ids taken from the first gap between the live claims that has any."""
        db = self._db()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            live = self._live_claims(db, now)
            ids: list[int] = []
            for low, high in _gaps(live):
                ids = [
                    row[0]
                    for row in db.execute(
                        "SELECT i.id FROM items i LEFT JOIN retry r ON r.id = i.id "
                        "WHERE i.id BETWEEN ? AND ? AND (r.next_try IS NULL OR r.next_try <= ?) "
                        "ORDER BY i.id LIMIT ?",
                        (low, high, now, BATCH),
                    )
                ]
                if ids:
                    break
            if ids:
                db.execute(
                    "INSERT OR REPLACE INTO claims(owner, first_id, last_id, at) VALUES (?, ?, ?, ?)",
                    (self.owner, ids[0], ids[-1], now),
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if not ids:
            return []
        # read after the commit: no other consumer touches the rows of a live claim
        rows = db.execute(
            "SELECT i.id, i.kind, i.trace_id, i.payload, i.deadline, COALESCE(r.tries, 0) "
            "FROM items i LEFT JOIN retry r ON r.id = i.id "
            f"WHERE i.id IN ({','.join('?' * len(ids))}) ORDER BY i.id",
            ids,
        ).fetchall()
        return [Item(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows]

    def _live_claims(self, db: sqlite3.Connection, now: float) -> list[tuple[int, int]]:
        """The id ranges other consumers hold, after dropping the claims that are not live: this
        consumer's own (not delivering: it is under `_drain_lock`), those older than CLAIM_SECONDS,
        and those of a process that no longer runs (the file is local, so its pid is ours to check)."""
        live, gone = [], []
        for owner, first, last, at in db.execute("SELECT owner, first_id, last_id, at FROM claims"):
            pid = _pid_of(owner)
            if (
                owner == self.owner
                or at < now - CLAIM_SECONDS
                or (pid and pid != os.getpid() and not _alive(pid))
            ):
                gone.append((owner,))
            else:
                live.append((int(first), int(last)))
        db.executemany("DELETE FROM claims WHERE owner=?", gone)
        return sorted(live)

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
                f"SELECT id, kind, trace_id, payload, created, ?, ?, {_DEAD_SIZE} FROM items WHERE id=?",
                [(now, dead[i.id], i.id) for i in gone],
            )
            db.executemany("DELETE FROM items WHERE id=?", [(i.id,) for i in gone])
            # tried and not stored: due again after a growing delay (untried ones are due at once)
            db.executemany(
                "INSERT OR REPLACE INTO retry(id, tries, next_try) VALUES (?, ?, ?)",
                [
                    (i.id, i.tries + 1, now + min(RETRY_FIRST * 2**i.tries, RETRY_MAX))
                    for i in items
                    if i.id in tried and i.id not in done and i.id not in dead
                ],
            )
            db.execute("DELETE FROM claims WHERE owner=?", (self.owner,))
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

    def start(self, deliver: bool = True) -> None:
        """Start the committer thread and, unless `deliver` is False, the delivery thread. Without
        it this process only commits: another process on the file (the host's deliverer) consumes."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._commit_loop, name="flywheel-outbox-commit", daemon=True)
        self._thread.start()
        if deliver:
            self._delivery = threading.Thread(target=self._deliver_loop, name="flywheel-outbox", daemon=True)
            self._delivery.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads and commit what is queued; a delivering outbox delivers one more batch."""
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
        if delivery is None:
            return
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
        self._heartbeat()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now >= next_prune:
                next_prune = now + PRUNE_EVERY
                try:
                    self.prune()
                except sqlite3.Error as exc:
                    log.warning("outbox: pruning delivered rows and dead letters failed: %s", exc)
            if now < self._backoff:
                self._heartbeat()
                continue
            try:
                while self.drain_once() and not self._stop.is_set():
                    self._heartbeat()
                self._backoff = 0.0
            except Exception:
                self._backoff = time.monotonic() + 1.0  # MLflow down: retry every second
            self._heartbeat()

    # --- the consumer's state, for every process on the file ----------------------------

    def _heartbeat(self) -> None:
        """Record this consumer's pass in `consumer`: when its state changed, or HEARTBEAT_EVERY."""
        now = time.time()
        state = (self.connected, self.last_error)
        if self._beat is not None and self._beat[1:] == state and now - self._beat[0] < HEARTBEAT_EVERY:
            return
        try:
            self._db().execute(
                "INSERT OR REPLACE INTO consumer(slot, pid, owner, heartbeat, connected, last_error) "
                "VALUES (0, ?, ?, ?, ?, ?)",
                (os.getpid(), self.owner, now, int(self.connected), self.last_error),
            )
        except sqlite3.Error as exc:  # the file is busy: the next pass writes it
            log.debug("outbox: recording the delivery heartbeat failed: %s", exc)
            return
        self._beat = (now, *state)

    def delivery_state(self) -> DeliveryState | None:
        """The last pass of the outbox's delivering consumer (any process on this file); None when
        none ever ran. `DeliveryState.alive()` says whether it still does."""
        row = (
            self._db()
            .execute("SELECT pid, owner, heartbeat, connected, last_error FROM consumer WHERE slot=0")
            .fetchone()
        )
        return DeliveryState(int(row[0]), row[1], float(row[2]), bool(row[3]), row[4]) if row else None
