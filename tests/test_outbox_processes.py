"""The outbox shared by real processes: a fresh file opened by many at once, and several consumers
draining one file, each item delivered by one of them only."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from flywheel.outbox import SCHEMA_VERSION, Item, Outbox

_FORK = multiprocessing.get_context("fork")  # real processes, started without re-importing pytest


FILES = 40  # fresh files each opener opens, all openers at once (a race shows in some only)


def _open_at_once(folder: Path, ready: Any, errors: Any) -> None:
    """Open FILES fresh outboxes, each at the same moment as the other openers (threads or
    processes); each failure goes to `errors` (a list, or a multiprocessing queue)."""
    report = errors.append if isinstance(errors, list) else errors.put
    for n in range(FILES):
        ready.wait(30)
        try:
            box = Outbox(folder / f"o{n}.db")
            box.put_durable("trace", f"tr-{box.owner}", {"n": box.owner})
        except Exception as exc:
            report(f"o{n}.db: {type(exc).__name__}: {exc}")


def _check_opened(folder: Path, openers: int) -> None:
    for n in range(FILES):
        with closing(sqlite3.connect(folder / f"o{n}.db")) as db:
            assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            assert db.execute("SELECT COUNT(*) FROM items").fetchone() == (openers,)


def test_eight_processes_opening_one_fresh_file_at_once_all_succeed(tmp_path: Path) -> None:
    """The schema is created under the write lock, its version checked and bumped in the same
    transaction, and the switch to WAL waits for the others: before, concurrent first opens of a
    file could fail (`database is locked` from `PRAGMA journal_mode=WAL`, a duplicate column)."""
    ready, errors = _FORK.Barrier(8), _FORK.Queue()
    procs = [_FORK.Process(target=_open_at_once, args=(tmp_path, ready, errors)) for _ in range(8)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0] * 8
    failed = []
    while not errors.empty():
        failed.append(errors.get(timeout=5))
    assert failed == []
    _check_opened(tmp_path, 8)


def test_eight_threads_opening_one_fresh_file_at_once_all_succeed(tmp_path: Path) -> None:
    ready, errors = threading.Barrier(8), []
    threads = [threading.Thread(target=_open_at_once, args=(tmp_path, ready, errors)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    _check_opened(tmp_path, 8)


def _consume(path: str, log_path: str, ready: Any) -> None:
    """A consumer process: delivers until the file is empty, appending each delivery to its log
    before and after (a delivery of an item overlapping another consumer's would interleave)."""
    box = Outbox(Path(path))

    def deliver(items: list[Item]) -> list[int]:
        with open(log_path, "a") as out:
            for item in items:
                out.write(json.dumps(item.payload["n"]) + "\n")
        return [i.id for i in items if not (i.payload["n"] % 7 == 0 and i.tries == 0)]  # some retried

    box.register("trace", deliver)
    ready.wait(30)
    while box.backlog():
        box.deliver_available()
        time.sleep(0.01)  # what is left is another's claim, or due again later


def test_consumers_in_several_processes_never_deliver_an_item_twice(tmp_path: Path) -> None:
    """Three processes drain one file: each item is stored once; the ones refused once are retried
    (by whichever consumer) and stored then; nothing waits and no claim is left."""
    path = tmp_path / "o.db"
    box = Outbox(path)
    count = 1500
    for n in range(count):
        box.put("trace", f"tr-{n}", {"n": n})  # no committer thread: each is committed at once
    ready = _FORK.Barrier(3)
    logs = [tmp_path / f"c{k}.log" for k in range(3)]
    procs = [_FORK.Process(target=_consume, args=(str(path), str(log), ready)) for log in logs]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    seen = [json.loads(line) for log in logs if log.exists() for line in log.read_text().splitlines()]
    retried = [n for n in range(count) if n % 7 == 0]
    assert sorted(seen) == sorted(list(range(count)) + retried)  # each once, the refused ones twice
    assert box.backlog() == 0
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT COUNT(*) FROM claims").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM retry").fetchone() == (0,)
