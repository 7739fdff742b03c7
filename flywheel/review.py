"""The review queue behind the rating dashboard: unrated traces, one at a time per reviewer.

Each Voila tab is its own kernel process, so reviewers coordinate through a
small sqlite file under FLYWHEEL_HOME (`review.db`): a short lease on the item
a tab shows (others skip it until the lease ends) and a mark on items rated
here but maybe not in MLflow yet. Only coordination lives there; ratings go
to MLflow through `feedback.submit`. When a lease lapses and two reviewers
rate the same trace, both ratings are kept (nothing is lost).
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel import feedback
from flywheel.calltree import Step
from flywheel.calltree import steps as calltree_steps
from flywheel.errors import ReviewError
from flywheel.feedback import FEEDBACK_ID, RATING
from flywheel.tracing import complete_calls, model_filter, served_call

if TYPE_CHECKING:
    from flywheel.runtime import Runtime

LEASE_SECONDS = 180.0
DONE_KEEP_SECONDS = 86400.0
PAGE = 100
UNDO_WAIT = 5.0
COUNT_CAP = 5000  # progress counts stop here ("5000+"): each count reads trace infos
_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (trace_id TEXT PRIMARY KEY, session TEXT NOT NULL,
    reviewer TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS done (trace_id TEXT PRIMARY KEY, session TEXT NOT NULL,
    reviewer TEXT NOT NULL, at REAL NOT NULL);
"""


@dataclass(frozen=True)
class QueueItem:
    trace_id: str
    model: str
    version: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    request_time: int


@dataclass(frozen=True)
class Progress:
    rated: int
    remaining: int
    mine: int
    capped: bool = False  # the counts stopped at COUNT_CAP


class Leases:
    """Cross-process leases and done marks in one sqlite file (WAL, short transactions)."""

    def __init__(self, path: Path, seconds: float = LEASE_SECONDS) -> None:
        self.path, self.seconds = path, seconds
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def claim(self, session: str, reviewer: str, candidates: list[str], force: bool = False) -> str | None:
        """Lease the first candidate nobody else holds and nobody rated here; None if none is free."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM leases WHERE session=? OR expires<?", (session, now))
                self._db.execute("DELETE FROM done WHERE at<?", (now - DONE_KEEP_SECONDS,))
                for trace_id in candidates:
                    if (
                        not force
                        and self._db.execute(
                            "SELECT 1 FROM leases WHERE trace_id=? UNION SELECT 1 FROM done WHERE trace_id=?",
                            (trace_id, trace_id),
                        ).fetchone()
                    ):
                        continue
                    self._db.execute(
                        "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)",
                        (trace_id, session, reviewer, now + self.seconds),
                    )
                    self._db.execute("COMMIT")
                    return trace_id
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None

    def renew(self, session: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE leases SET expires=? WHERE session=?", (time.time() + self.seconds, session)
            )

    def release(self, session: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM leases WHERE session=?", (session,))

    def mark_done(self, session: str, reviewer: str, trace_id: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO done VALUES (?, ?, ?, ?)", (trace_id, session, reviewer, time.time())
            )

    def unmark_done(self, trace_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM done WHERE trace_id=?", (trace_id,))

    def done_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT trace_id FROM done")}

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ReviewQueue:
    """Unrated OK traces of one model (optionally one version), oldest first, leased per session."""

    def __init__(
        self,
        runtime: Runtime,
        model: str,
        version: str | None = None,
        reviewer: str = "",
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        if version is not None and not str(version).isdigit():
            raise ReviewError(f"version must be a number, not {version!r}")
        self.runtime, self.model, self.version, self.reviewer = runtime, model, version, reviewer
        self.session = uuid.uuid4().hex
        self.leases = Leases(runtime.settings.flywheel_home / "review.db", lease_seconds)
        self.current: QueueItem | None = None
        self.skipped: list[str] = []
        self.history: list[tuple[str, QueueItem, feedback.Receipt | None]] = []
        self.mine = 0
        self._renewed_at = 0.0

    # --- reading MLflow --------------------------------------------------------------------

    def _filter(self, rated: bool) -> str:
        flt = f"{model_filter(self.model, self.version)} AND trace.status = 'OK'"
        return flt + f" AND feedback.`{RATING}` IS {'NOT ' if rated else ''}NULL"

    def _pages(self, rated: bool, cap: int) -> Any:
        tracking = self.runtime.store.tracking
        token, seen = None, 0
        while seen < cap:
            infos, token = tracking.search_traces(
                locations=[self.runtime.store.experiment_id],
                filter_string=self._filter(rated),
                max_results=PAGE,
                order_by=["timestamp_ms ASC"],
                page_token=token,
            )
            seen += len(infos)
            yield infos
            if not token or not infos:
                return

    def _count(self, rated: bool) -> tuple[int, set[str]]:
        ids = [i.trace_id for page in self._pages(rated, COUNT_CAP) for i in page][:COUNT_CAP]
        return len(ids), set(ids)

    # --- actions ---------------------------------------------------------------------------

    def next(self) -> QueueItem | None:
        """Release the item shown and lease the next free one (skipped ones come last)."""
        self.runtime.outbox.deliver_available(max_batches=20)  # what was rated in any process, into MLflow
        self.current = None
        for allow_skipped in (False, True):
            for page in self._pages(rated=False, cap=COUNT_CAP):
                by_id = {i.trace_id: i for i in page}
                order = [t for t in by_id if allow_skipped or t not in self.skipped]
                if allow_skipped:
                    order.sort(key=lambda t: self.skipped.index(t) if t in self.skipped else -1)
                claimed = self.leases.claim(self.session, self.reviewer, order)
                if claimed is not None:
                    if allow_skipped and claimed in self.skipped:
                        self.skipped.remove(claimed)
                    self.current = _item(by_id[claimed], self.runtime.store.tracking)
                    return self.current
        self.leases.release(self.session)
        return None

    def rate(
        self, rating: str, corrected_output: dict[str, Any] | None = None, comment: str | None = None
    ) -> feedback.Receipt:
        """Submit feedback on the item shown (durable before it returns), then move on."""
        item = self._shown()
        receipt = feedback.submit(
            self.runtime,
            item.trace_id,
            rating,
            corrected_output=corrected_output,
            comment=comment,
            user_id=self.reviewer,
        )
        self.leases.mark_done(self.session, self.reviewer, item.trace_id)
        self.history.append(("rate", item, receipt))
        self.mine += 1
        self.next()
        return receipt

    def skip(self) -> QueueItem | None:
        item = self._shown()
        self.skipped.append(item.trace_id)
        self.history.append(("skip", item, None))
        return self.next()

    def undo(self) -> tuple[QueueItem, feedback.Receipt | None]:
        """Take back the last rating (its assessments leave MLflow) or skip, and show that item again."""
        if not self.history:
            raise ReviewError("nothing to undo")
        action, item, receipt = self.history[-1]
        if action == "rate" and receipt is not None:
            deadline = time.monotonic() + UNDO_WAIT
            while not retract(self.runtime, item.trace_id, receipt):
                if not self.runtime.outbox.deliver_available(max_batches=20):
                    raise ReviewError("MLflow is unreachable, so the rating cannot be taken back now")
                if time.monotonic() > deadline:  # another process holds it on its way to MLflow
                    raise ReviewError("the rating is still on its way to MLflow; try undo again shortly")
                time.sleep(0.2)
            self.leases.unmark_done(item.trace_id)
            self.mine -= 1
        elif item.trace_id in self.skipped:
            self.skipped.remove(item.trace_id)
        self.history.pop()
        self.leases.claim(self.session, self.reviewer, [item.trace_id], force=True)
        self.current = item
        return item, receipt

    def renew(self) -> None:
        """Keep the item shown while the reviewer works on it (called as they type; at most every 10 s)."""
        now = time.monotonic()
        if self.current is not None and now - self._renewed_at > 10:
            self._renewed_at = now
            self.leases.renew(self.session)

    def progress(self) -> Progress:
        done = self.leases.done_ids()
        rated, _ = self._count(rated=True)
        unrated, ids = self._count(rated=False)
        pending = len(ids & done)  # rated here, not in MLflow yet
        capped = COUNT_CAP in (rated, unrated)
        return Progress(rated + pending, unrated - pending, self.mine, capped)

    def close(self) -> None:
        self.leases.release(self.session)
        self.current = None

    def _shown(self) -> QueueItem:
        if self.current is None:
            raise ReviewError("no item is shown; the queue is empty")
        return self.current


def _item(info: Any, tracking: Any = None) -> QueueItem:
    """The card for one trace: complete fields, read from the root span only where a tag was cut."""
    call = served_call(info)
    assert call is not None  # the search filtered on flywheel's own tags
    if call.truncated and tracking is not None:
        call = complete_calls(tracking, [info]).get(info.trace_id, call)
    return QueueItem(info.trace_id, call.model, call.version, call.inputs, call.outputs, info.request_time)


def steps(runtime: Runtime, trace_id: str) -> list[Step]:
    """A trace's call tree as people read it (the card's "what the LM saw"): spans only, so
    nothing another reviewer answered (assessments) is in it."""
    return calltree_steps(runtime.store.client.get_trace(trace_id).data.spans)


def retract(runtime: Runtime, trace_id: str, receipt: feedback.Receipt) -> int:
    """Delete the assessments one submission wrote (MLflow restores what they overrode); 0 if none yet."""
    tracking = runtime.store.tracking
    info = tracking.get_trace_info(trace_id)
    ours = [a for a in info.assessments or [] if (a.metadata or {}).get(FEEDBACK_ID) == receipt.feedback_id]
    for a in ours:
        tracking.delete_assessment(trace_id, a.assessment_id)
    return len(ours)
