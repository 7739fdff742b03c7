"""Issue 31, findings 6 and 8: pending feedback is bounded, dead letters are pruned, and end users
and reviewers are two name spaces (nobody passes for a reviewer or an adjudicator through the API).

Real parts: the API is `create_app` under Starlette's TestClient over a real embedded MLflow store
and a real outbox file; reviewers answer through `review.ReviewQueue`, the dashboards' path.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from flywheel import agreement, errors, feedback, review
from flywheel.export import RULE, export_rows
from flywheel.http.api import create_app
from flywheel.runtime import Runtime
from flywheel.store import Store
from flywheel.tracing import new_trace_id

JOKES = "jokes"
UP, DOWN = "thumbs_up", "thumbs_down"
MB = 1 << 20


def _jokes(store: Store) -> None:
    import dspy

    from flywheel import registry

    registry.register_program(dspy.Predict("topic -> joke"), JOKES, store=store)
    registry.promote(JOKES, "1", "Production", store)


def _outbox_bytes(runtime: Runtime) -> int:
    path = runtime.outbox.path
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


@pytest.fixture
def api(
    tmp_path: Path, make_store: Callable[..., Store], request: pytest.FixtureRequest
) -> Iterator[TestClient]:
    env = {"API_ALLOWED_HOSTS": "testserver", **getattr(request, "param", {})}
    store = make_store(tmp_path / "home", **env)
    _jokes(store)
    runtime = Runtime(store=store)
    try:
        with TestClient(create_app(runtime)) as client:
            client.runtime = runtime  # type: ignore[attr-defined]
            yield client
    finally:
        runtime.close(timeout=5)


# --- finding 6: pending feedback is capped, per client and in total bytes --------------------------

CAP = 8 * MB


@pytest.mark.parametrize(
    "api", [{"FEEDBACK_PENDING_MAX_BYTES": str(CAP), "FEEDBACK_PENDING_PER_CLIENT": "1000"}], indirect=True
)
def test_a_flood_of_pending_feedback_gets_429_and_the_outbox_stays_bounded(api: TestClient) -> None:
    runtime: Runtime = api.runtime  # type: ignore[attr-defined]
    served = runtime.predict(JOKES, {"topic": "cat"})
    assert runtime.outbox.flush()
    before = _outbox_bytes(runtime)
    big = "x" * MB  # MAX_FIELD_CHARS: kept whole
    codes = []
    for i in range(30):  # made-up young ids, each a new "user": only the total cap holds them
        body = {
            "trace_id": new_trace_id(),
            "rating": DOWN,
            "comment": big,
            "corrected_output": {"joke": big},
            "user_id": f"flood-{i}",
        }
        r = api.post("/feedback", json=body)
        codes.append(r.status_code)
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert "FEEDBACK_PENDING_MAX_BYTES" in r.json()["detail"]
    accepted = codes.count(202)
    assert codes == [202] * accepted + [429] * (30 - accepted), codes
    assert 1 <= accepted <= CAP // (2 * MB)
    assert runtime.outbox.backlog() == accepted  # nothing of a refused one was stored
    grown = _outbox_bytes(runtime) - before
    assert grown < CAP + 8 * MB, f"outbox.db and its WAL grew by {grown / MB:.1f} MB"
    # the known-trace path is not capped
    r = api.post("/feedback", json={"trace_id": served.trace_id, "rating": UP, "user_id": "ann"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("api", [{"FEEDBACK_PENDING_PER_CLIENT": "2"}], indirect=True)
def test_pending_feedback_is_capped_per_user_id_else_per_address(api: TestClient) -> None:
    runtime: Runtime = api.runtime  # type: ignore[attr-defined]

    def pending(**extra: str) -> int:
        body = {"trace_id": new_trace_id(), "rating": UP, **extra}
        return api.post("/feedback", json=body).status_code

    assert [pending(), pending(), pending()] == [202, 202, 429]  # no user id: the caller's address
    assert [pending(user_id="eve"), pending(user_id="eve"), pending(user_id="eve")] == [202, 202, 429]
    assert pending(user_id="fay") == 202  # another client still has room
    assert runtime.outbox.backlog() == 5


# --- finding 6: dead letters are pruned by the delivery thread's pass ---------------------------------


def test_dead_letters_older_than_the_keep_age_are_pruned_by_the_delivery_pass(
    tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    _jokes(make_store(tmp_path / "home", FEEDBACK_WAIT="1"))
    runtime = Runtime()
    try:
        now = time.time()
        with closing(sqlite3.connect(runtime.outbox.path)) as db, db:
            for n, died in enumerate((now - 30 * 86400, now - 2 * 3600, now)):
                db.execute(
                    "INSERT INTO dead(id, kind, trace_id, payload, created, died, reason) "
                    "VALUES (?, 'feedback', ?, '{}', ?, ?, 'not delivered by its deadline')",
                    (1000 + n, new_trace_id(), died, died),
                )
        assert runtime.outbox.dead_letters() == 3
        runtime.start()  # the delivery thread prunes on its first pass, then every PRUNE_EVERY
        deadline = time.monotonic() + 30
        while runtime.outbox.dead_letters() > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert runtime.health()["dead_letters"] == 1  # only the one younger than FEEDBACK_WAIT x 12 (1 h)
    finally:
        runtime.close(timeout=5)


# --- finding 8: end users and reviewers are two name spaces ----------------------------------------


def test_end_users_never_make_a_majority_reviewers_do(api: TestClient) -> None:
    runtime: Runtime = api.runtime  # type: ignore[attr-defined]
    s = runtime.store
    forged, reviewed = (runtime.predict(JOKES, {"topic": t}).trace_id for t in ("forged", "reviewed"))
    assert runtime.outbox.flush()
    forgery = {"rating": DOWN, "corrected_output": {"joke": "BUY NOW"}, "comment": "spam"}
    for user in ("alice", "bob"):
        r = api.post("/feedback", json={"trace_id": forged, "user_id": user, **forgery})
        assert r.status_code == 200, r.text

    queue = review.create_queue(s, JOKES, ["rev-a", "rev-b"], k=2, name="team", backlog=False)
    review.assign(s, queue, [reviewed])
    for who in ("rev-a", "rev-b"):
        q = review.ReviewQueue(runtime, JOKES, reviewer=who, queue="team")
        assert q.next() is not None and q.current is not None and q.current.trace_id == reviewed
        q.rate(DOWN, corrected_output={"joke": f"better, by {who}"}, comment=who)
    # an end user who calls themselves "rev-a" neither votes nor overrides the reviewer rev-a
    r = api.post("/feedback", json={"trace_id": reviewed, "user_id": "rev-a", "rating": UP})
    assert r.status_code == 200, r.text
    assert runtime.outbox.flush()

    rows = {row["trace_id"]: row for row in export_rows(runtime, JOKES)}
    assert rows[forged][RULE] == "latest", rows[forged]  # two end users are no majority
    assert (rows[reviewed][RULE], rows[reviewed]["rating"]) == ("majority", DOWN)
    assert rows[reviewed]["joke"].startswith("better, by rev-") and rows[reviewed]["comment"] in (
        "rev-a",
        "rev-b",
    )

    info = s.tracking.get_trace_info(reviewed)
    roles = {(a.source.source_id, feedback.role_of(a)) for a in info.assessments if a.name == "user_rating"}
    assert roles == {("rev-a", "reviewer"), ("rev-b", "reviewer"), ("rev-a", "end_user")}
    assert all(a.valid is not False for a in info.assessments if a.name == "user_rating")
    report = agreement.report(s, JOKES, labels=["user_rating"])
    assert report["user_rating"].reviewers == ("rev-a", "rev-b")  # no end user among them


LOOKALIKES = [
    "adjudicator\uff1aboss",
    "\u200badjudicator:boss",
    "\uff41djudicator:boss",
    "Adjudicator\u2060:x",
]


@pytest.mark.parametrize(
    "user_id", LOOKALIKES, ids=["fullwidth-colon", "zero-width", "fullwidth-a", "joiner"]
)
def test_lookalike_adjudicator_ids_are_422_and_nothing_is_stored(api: TestClient, user_id: str) -> None:
    runtime: Runtime = api.runtime  # type: ignore[attr-defined]
    trace_id = runtime.predict(JOKES, {"topic": "lookalike"}).trace_id
    assert runtime.outbox.flush()
    r = api.post("/feedback", json={"trace_id": trace_id, "rating": UP, "user_id": user_id})
    assert r.status_code == 422, r.text
    assert "reserved for adjudicators" in r.json()["detail"]
    assert runtime.outbox.backlog() == 0
    with pytest.raises(errors.FeedbackError, match="reserved for adjudicators"):
        review.create_queue(runtime.store, JOKES, ["ann", user_id], name="lookalike")


def test_ids_are_stored_normalised_without_format_characters() -> None:
    assert feedback.clean_name(" \u200bann\u200d ") == "ann"
    assert feedback.clean_name("\uff41nn") == "ann"
    assert not feedback.reserved("adjudicators-fan") and feedback.reserved("adjudicator boss")
    assert review.normalize_reviewer("\u200bRev-A") == "rev-a"
