"""The durable outbox: commit before acknowledging, deliver once, survive failures and restarts."""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from flywheel.outbox import Item, Outbox


def box_for(path: Path, deliver: object, **kwargs: float) -> Outbox:
    """An outbox delivering both of flywheel's kinds to one sink."""
    box = Outbox(path, **kwargs)
    for kind in ("trace", "feedback"):
        box.register(kind, deliver)  # type: ignore[arg-type]
    return box


class Sink:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.down = False
        self.lock = threading.Lock()

    def __call__(self, items: list[Item]) -> list[int]:
        if self.down:
            raise ConnectionError("MLflow is unreachable")
        with self.lock:
            self.seen += [i.payload["n"] for i in items]
        return [i.id for i in items]


def test_put_durable_is_on_disk_before_it_returns(tmp_path: Path) -> None:
    sink = Sink()
    box = box_for(tmp_path / "o.db", sink)
    box.put_durable("feedback", "tr-1", {"n": "a"})
    # a second outbox on the same file (another process, or this one restarted) sees it
    other = box_for(tmp_path / "o.db", sink)
    assert other.backlog() == 1
    assert other.flush() and sink.seen == ["a"] and box.backlog() == 0


def test_delivery_failure_keeps_items_and_replays_them_once(tmp_path: Path) -> None:
    sink = Sink()
    box = box_for(tmp_path / "o.db", sink)
    sink.down = True
    for n in "abc":
        box.put("trace", f"tr-{n}", {"n": n})
    assert box.flush(timeout=2) is False
    assert box.connected is False and "unreachable" in (box.last_error or "")
    assert box.backlog() == 3
    sink.down = False
    assert box.flush() and sink.seen == ["a", "b", "c"]
    assert box.connected and box.backlog() == 0
    assert box.flush() and sink.seen == ["a", "b", "c"]


def test_partial_delivery_retries_only_the_rest(tmp_path: Path) -> None:
    delivered: list[str] = []

    def half(items: list[Item]) -> list[int]:
        done = [i for i in items if i.payload["n"] != "later" or delivered.count("later-tried")]
        delivered.extend(i.payload["n"] for i in done)
        if len(done) < len(items):
            delivered.append("later-tried")
        return [i.id for i in done]

    box = box_for(tmp_path / "o.db", half)
    box.put("feedback", "tr-1", {"n": "now"})
    box.put("feedback", "tr-2", {"n": "later"})
    assert box.flush()
    assert delivered == ["now", "later-tried", "later"]


def test_background_thread_delivers_and_concurrent_drains_never_double(tmp_path: Path) -> None:
    sink = Sink()
    box = box_for(tmp_path / "o.db", sink, interval=0.01)
    box.start()
    try:
        threads = [
            threading.Thread(
                target=lambda k=k: [
                    box.put_durable("trace", f"t{k}-{n}", {"n": f"{k}-{n}"}) for n in range(50)
                ]
            )
            for k in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        flushers = [threading.Thread(target=box.flush) for _ in range(3)]
        for t in flushers:
            t.start()
        for t in flushers:
            t.join()
        assert box.flush()
    finally:
        box.stop()
    assert sorted(sink.seen) == sorted(f"{k}-{n}" for k in range(4) for n in range(50))


def test_queries_see_pending_and_delivered_traces(tmp_path: Path) -> None:
    box = box_for(tmp_path / "o.db", Sink())
    box.put("trace", "tr-x", {"n": "x", "model": "m", "version": "2"})
    assert box.pending_trace("tr-x") == {"n": "x", "model": "m", "version": "2"}
    assert box.flush()
    assert box.pending_trace("tr-x") is None
    assert box.delivered_model("tr-x") == ("m", "2")
    assert box.delivered_model("tr-y") is None


_CLAIM_AND_HANG = """
import sys, time
from pathlib import Path
from flywheel.outbox import Outbox

def hang(items):
    print("claimed", flush=True)  # the batch is claimed (committed) before delivery starts
    time.sleep(600)

path, kind = Path(sys.argv[1]), sys.argv[2]
box = Outbox(path)
box.register(kind, hang)
box.put(kind, "tr-1", {"n": "orphan"})
box.drain_once()
"""


@pytest.mark.parametrize("kind", ["trace", "feedback"])
def test_a_claim_of_a_dead_process_is_taken_over(tmp_path: Path, kind: str) -> None:
    """Another process claims a batch and is killed mid-delivery: its claim is respected while it
    lives and taken over as soon as its pid is dead, long before CLAIM_SECONDS would expire it."""
    import subprocess
    import sys

    import flywheel.outbox as outbox_module

    assert outbox_module.CLAIM_SECONDS >= 30  # the real value: no expiry within this test
    sink = Sink()
    owner = subprocess.Popen(
        [sys.executable, "-c", _CLAIM_AND_HANG, str(tmp_path / "o.db"), kind],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "claimed"
        alive = box_for(tmp_path / "o.db", sink)
        assert alive.backlog() == 1
        assert alive.drain_once() == 0  # a fresh claim of a live process is respected
    finally:
        owner.kill()
        owner.wait(timeout=30)  # reaped: its pid is dead, not a zombie
    with closing(sqlite3.connect(tmp_path / "o.db")) as db:
        (claimed_by,) = db.execute("SELECT owner FROM claims").fetchone()
    assert claimed_by.split("-", 1)[0] == str(owner.pid)  # still claimed by the dead process
    started = time.monotonic()
    assert alive.flush(timeout=10) and sink.seen == ["orphan"]
    assert time.monotonic() - started < outbox_module.CLAIM_SECONDS
    assert alive.backlog() == 0


class Missing(Sink):
    """A destination where feedback's trace never appears: nothing of kind feedback is stored."""

    def __call__(self, items: list[Item]) -> list[int]:
        return super().__call__([i for i in items if i.kind != "feedback"])


def test_an_item_past_its_deadline_is_dead_lettered_and_counted(tmp_path: Path) -> None:
    import time

    box = box_for(tmp_path / "o.db", Missing())
    box.put("feedback", "tr-never", {"n": "lost"}, deadline=time.time() + 0.3)
    box.put("feedback", "tr-later", {"n": "waits"}, deadline=time.time() + 0.3)
    box.put("trace", "tr-later", {"n": "trace"})  # its trace is still queued here
    box._deliverers["trace"] = lambda items: []  # ... and cannot be written yet
    assert box.flush(timeout=0.2) is False and box.dead_letters() == 0
    time.sleep(0.4)
    box.deliver_available()
    time.sleep(0.6)  # past the per-item retry delay
    box.deliver_available()
    assert box.dead_letters() == 1  # only the one whose trace is nowhere
    assert box.backlog() == 2


def test_delivered_rows_are_pruned(tmp_path: Path) -> None:
    box = box_for(tmp_path / "o.db", Sink())
    box.put("trace", "tr-x", {"n": "x", "model": "m", "version": "2"})
    assert box.flush() and box.delivered_model("tr-x") == ("m", "2")
    assert box.prune(keep_seconds=3600) == 0
    assert box.prune(keep_seconds=0) == 1
    assert box.delivered_model("tr-x") is None


def test_a_failed_commit_is_logged_and_fails_its_waiters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    box = box_for(tmp_path / "o.db", Sink())
    with sqlite3.connect(tmp_path / "o.db") as db:
        db.execute("DROP TABLE items")  # every insert now fails
    with caplog.at_level("ERROR", logger="flywheel.outbox"):
        future = box.put("trace", "tr-1", {"n": "a"})
    with pytest.raises(sqlite3.OperationalError):
        future.result(5)
    assert any("commit" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_held_items_are_refused_beyond_their_cap_by_every_process_on_the_file(tmp_path: Path) -> None:
    """Issue 31: the cap is checked in the commit's transaction, from counts kept by triggers."""
    from flywheel.outbox import Cap, OverCap

    sink = Sink()
    box, other = (box_for(tmp_path / "o.db", sink) for _ in range(2))  # two worker processes, say
    cap = Cap("user:eve", per_client=2, total_bytes=4000)
    box.put_durable("feedback", "tr-1", {"n": "a"}, cap=cap)
    other.put_durable("feedback", "tr-2", {"n": "b"}, cap=cap)
    with pytest.raises(OverCap, match="at most 2") as refused:
        box.put_durable("feedback", "tr-3", {"n": "c"}, cap=cap)
    assert refused.value.retry_after >= 1
    other.put_durable("feedback", "tr-4", {"n": "d"}, cap=Cap("user:fay", 2, 4000))  # another client
    with pytest.raises(OverCap, match="would pass 4000"):
        other.put_durable("feedback", "tr-5", {"n": "e" * 4000}, cap=Cap("user:gus", 2, 4000))
    box.put_durable("feedback", "tr-6", {"n": "f"})  # an item without a cap is never refused
    assert box.backlog() == 4  # nothing of a refused item was written
    assert box.flush() and sorted(sink.seen) == ["a", "b", "d", "f"]
    box.put_durable("feedback", "tr-7", {"n": "g"}, cap=cap)  # delivered items free their room
    with closing(sqlite3.connect(tmp_path / "o.db")) as db:
        assert db.execute("SELECT client, items FROM held ORDER BY client").fetchall() == [
            ("", 1),
            ("user:eve", 1),
        ]


def test_dead_letters_beyond_their_bytes_are_pruned_oldest_first(tmp_path: Path) -> None:
    from flywheel.outbox import Outcome

    def refuse(items: list[Item]) -> Outcome:
        return Outcome([], {i.id: "never storable" for i in items})

    box = Outbox(tmp_path / "o.db", dead_max_bytes=2500)
    box.register("feedback", refuse)
    for n in range(5):
        box.put_durable("feedback", f"tr-{n}", {"n": str(n) * 1000})
    assert box.flush()
    with closing(sqlite3.connect(tmp_path / "o.db")) as db:
        kept = [row[0] for row in db.execute("SELECT trace_id FROM dead ORDER BY id")]
    assert kept == ["tr-3", "tr-4"] and box.dead_letters() == 2


def test_a_payload_given_as_json_text_is_stored_as_it_is_and_delivered_as_a_dict(tmp_path: Path) -> None:
    sink = Sink()
    box = box_for(tmp_path / "o.db", sink)
    text = '{"n": "x", "model": "m", "version": "3"}'
    box.put("trace", "tr-x", text)
    assert box.pending_trace("tr-x") == {"n": "x", "model": "m", "version": "3"}
    with closing(sqlite3.connect(tmp_path / "o.db")) as db:
        assert db.execute("SELECT payload, size FROM items").fetchone() == (text, len(text))
    with pytest.raises(ValueError, match="JSON object"):
        box.put("trace", "tr-y", '["not", "an", "object"]')
    assert box.flush() and sink.seen == ["x"] and box.delivered_model("tr-x") == ("m", "3")


def test_claims_and_retries_never_rewrite_a_payload_row(tmp_path: Path) -> None:
    """A claim is a row of `claims` and a retry a row of `retry`: with every UPDATE of `items`
    refused, items are still claimed, retried with a growing delay, dead-lettered and delivered."""
    from flywheel.outbox import Outcome

    tries: dict[str, list[int]] = {}

    def picky(items: list[Item]) -> Outcome:
        for i in items:
            tries.setdefault(i.payload["n"], []).append(i.tries)
        stored = [i.id for i in items if i.payload["n"] == "now" or i.tries >= 2]
        return Outcome(stored, {i.id: "never" for i in items if i.payload["n"] == "never"})

    box = box_for(tmp_path / "o.db", picky)
    with closing(sqlite3.connect(tmp_path / "o.db")) as db:
        db.execute(
            "CREATE TRIGGER no_rewrite BEFORE UPDATE ON items "
            "BEGIN SELECT RAISE(ABORT, 'a payload row was rewritten'); END"
        )
    for n in ("now", "later", "never"):
        box.put("feedback", f"tr-{n}", {"n": n})
    box.drain_once()
    with closing(sqlite3.connect(tmp_path / "o.db")) as db:
        ((tried, due),) = db.execute("SELECT tries, next_try FROM retry").fetchall()
    assert tried == 1 and due > time.time()  # "later" waits; nothing else is scheduled
    assert box.flush(timeout=10)
    assert tries == {"now": [0], "later": [0, 1, 2], "never": [0]}
    assert box.dead_letters() == 1 and box.backlog() == 0


# The schema before version 1 (PRAGMA user_version 0), as a file written then has it.
_VERSION_0 = """
CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, trace_id TEXT NOT NULL,
    payload TEXT NOT NULL, created REAL NOT NULL, claimed_by TEXT, claimed_at REAL);
CREATE INDEX items_trace ON items(trace_id);
CREATE TABLE delivered (trace_id TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL);
CREATE TABLE dead (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, trace_id TEXT NOT NULL, payload TEXT NOT NULL,
    created REAL NOT NULL, died REAL NOT NULL, reason TEXT NOT NULL);
"""
_VERSION_0_LATER = """
ALTER TABLE items ADD COLUMN deadline REAL;
ALTER TABLE items ADD COLUMN tries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE items ADD COLUMN next_try REAL NOT NULL DEFAULT 0;
ALTER TABLE items ADD COLUMN held_by TEXT;
ALTER TABLE items ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dead ADD COLUMN size INTEGER;
CREATE TABLE held (client TEXT PRIMARY KEY, items INTEGER NOT NULL, bytes INTEGER NOT NULL);
CREATE TRIGGER items_held_in AFTER INSERT ON items WHEN NEW.held_by IS NOT NULL BEGIN
    INSERT INTO held(client, items, bytes) VALUES (NEW.held_by, 1, NEW.size), ('', 1, NEW.size)
    ON CONFLICT(client) DO UPDATE SET items = items + excluded.items, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER items_held_out AFTER DELETE ON items WHEN OLD.held_by IS NOT NULL BEGIN
    UPDATE held SET items = items - 1, bytes = bytes - OLD.size WHERE client IN (OLD.held_by, '');
    DELETE FROM held WHERE client = OLD.held_by AND items <= 0;
END;
CREATE INDEX items_held ON items(held_by, deadline) WHERE held_by IS NOT NULL;
CREATE INDEX dead_died ON dead(died, size);
"""


def test_a_file_of_the_previous_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    """Items waiting in a version-0 file keep their tries and their held counts; a claim of a
    process that is gone (its claimed_by on the row) does not hold them."""
    from flywheel.outbox import SCHEMA_VERSION

    path = tmp_path / "o.db"
    with closing(sqlite3.connect(path)) as db:
        db.executescript(_VERSION_0 + _VERSION_0_LATER)
        db.execute(
            "INSERT INTO items(kind, trace_id, payload, created, claimed_by, claimed_at, tries, held_by, "
            "size) VALUES ('feedback', 'tr-1', ?, 1, '999999999-x', ?, 2, 'user:eve', 13)",
            ('{"n": "held"}', time.time()),
        )
        db.execute(
            "INSERT INTO items(kind, trace_id, payload, created) VALUES ('trace', 'tr-2', ?, 1)",
            ('{"n": "t"}',),
        )
        db.commit()
        assert db.execute("SELECT client, items, bytes FROM held ORDER BY client").fetchall() == [
            ("", 1, 13),
            ("user:eve", 1, 13),
        ]
    seen: list[tuple[str, int]] = []

    def sink(items: list[Item]) -> list[int]:
        seen.extend((i.payload["n"], i.tries) for i in items)
        return [i.id for i in items]

    box = box_for(path, sink)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert box.flush(timeout=10) and sorted(seen) == [("held", 2), ("t", 0)]
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT COUNT(*) FROM held WHERE items > 0").fetchone() == (0,)
    assert Outbox(path).backlog() == 0  # a second open finds the version and changes nothing


def test_dead_letters_of_items_queued_before_the_size_column_are_pruned_by_their_bytes(
    tmp_path: Path,
) -> None:
    """Items of a first-release file have `size` 0 once upgraded: their dead letters count the
    payload's bytes, so `dead_max_bytes` prunes them (it kept them all before)."""
    from flywheel.outbox import Outcome

    path = tmp_path / "o.db"
    with closing(sqlite3.connect(path)) as db:
        db.executescript(_VERSION_0)
        db.executemany(
            "INSERT INTO items(kind, trace_id, payload, created) VALUES ('feedback', ?, ?, ?)",
            [(f"tr-{n}", '{"n": "%s"}' % (str(n) * 1000), n) for n in range(5)],
        )
        db.commit()
    box = Outbox(path, dead_max_bytes=2500)
    box.register("feedback", lambda items: Outcome([], {i.id: "never storable" for i in items}))
    assert box.flush()
    with closing(sqlite3.connect(path)) as db:
        kept = [row[0] for row in db.execute("SELECT trace_id FROM dead ORDER BY id")]
    assert kept == ["tr-3", "tr-4"] and box.dead_letters() == 2


def test_a_producer_commits_only_and_the_consumer_records_its_passes(tmp_path: Path) -> None:
    """`start(deliver=False)`: a serving worker commits, the host's deliverer (another outbox on
    the file) delivers and records each pass; `delivery_state()` reads it from any process."""
    sink = Sink()
    producer = box_for(tmp_path / "o.db", sink, interval=0.01)
    producer.start(deliver=False)
    try:
        assert producer.delivery_state() is None  # no consumer ever ran
        producer.put_durable("trace", "tr-1", {"n": "a"})
        time.sleep(0.1)  # several of a delivering outbox's passes
        assert producer.backlog() == 1 and sink.seen == []
        consumer = box_for(tmp_path / "o.db", sink, interval=0.01)
        consumer.start()
        try:
            assert producer.put("trace", "tr-2", {"n": "b"}).result(5)
            deadline = time.monotonic() + 10
            while producer.backlog() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sorted(sink.seen) == ["a", "b"]
            state = producer.delivery_state()
            assert state is not None and state.owner == consumer.owner and state.connected
            assert state.alive() and not state.alive(now=state.heartbeat + 3600)
            sink.down = True
            producer.put_durable("trace", "tr-3", {"n": "c"})
            deadline = time.monotonic() + 10
            while (state := producer.delivery_state()) and state.connected and time.monotonic() < deadline:
                time.sleep(0.01)
            assert state is not None and not state.connected and "unreachable" in (state.last_error or "")
        finally:
            consumer.stop()
    finally:
        producer.stop()
    assert producer.backlog() == 1  # stopping a producer delivers nothing
