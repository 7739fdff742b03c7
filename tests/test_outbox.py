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
