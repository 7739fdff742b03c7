"""feedback.submit validates before anything is stored; deliver writes assessments once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from flywheel import errors, feedback
from flywheel.runtime import get_runtime, predict, submit_feedback
from flywheel.store import Store

pytestmark = pytest.mark.backends("sqlite", "postgres")


def test_submit_validates(demo_store_rw: Store) -> None:
    trace_id = predict("support-router", {"ticket": "Parcel lost"}).trace_id
    with pytest.raises(errors.FeedbackError, match="rating must be one of"):
        submit_feedback(trace_id, "five stars")
    with pytest.raises(errors.FeedbackError, match="'team', which the program does not output"):
        submit_feedback(trace_id, "thumbs_down", corrected_output={"team": "x"})
    with pytest.raises(errors.TraceNotFound, match="Trace not found"):
        submit_feedback("tr-unknown", "thumbs_up")
    receipt = submit_feedback(trace_id, "thumbs_down", corrected_output="shipping", comment="  ", user_id=" ")
    assert receipt.corrected_output == {"category": "shipping"}
    assert receipt.comment is None and receipt.user_id == "anonymous"


def test_delivered_assessments_are_human_and_replay_safe(demo_store_rw: Store) -> None:
    runtime = get_runtime()
    trace_id = predict("support-router", {"ticket": "Refund my card"}).trace_id
    submit_feedback(trace_id, "thumbs_up", comment="right team", user_id="rev-1")
    assert runtime.outbox.flush()
    tracking = runtime.store.tracking
    info = tracking.get_trace_info(trace_id)
    by_name = {a.name: a for a in info.assessments}
    assert by_name["user_rating"].value == "thumbs_up" and by_name["comment"].value == "right team"
    assert by_name["user_rating"].source.source_id == "rev-1"
    # replaying the same outbox item (a crash after writing, before deleting) adds nothing
    from flywheel.outbox import Item

    feedback_id = by_name["user_rating"].metadata[feedback.FEEDBACK_ID]
    item = Item(
        1,
        "feedback",
        trace_id,
        {
            "feedback_id": feedback_id,
            "trace_id": trace_id,
            "user_id": "rev-1",
            "rating": "thumbs_up",
            "corrected_output": None,
            "comment": "right team",
        },
    )
    assert feedback.deliver(runtime.store, [item]) == [1]
    assert len(tracking.get_trace_info(trace_id).assessments) == 2


def _jokes(store: Store) -> None:
    import dspy

    from flywheel import registry

    registry.register_program(dspy.Predict("topic -> joke"), "jokes", store=store)
    registry.promote("jokes", "1", "Production", store)


@pytest.mark.backends("sqlite")  # the outbox's logic; across hosts on PostgreSQL: tests/test_scale.py
def test_a_fresh_unknown_trace_id_is_pending_then_lands(fresh_store: Store) -> None:
    import time

    from flywheel import registry
    from flywheel.tracing import TraceRecord, new_trace_id

    _jokes(fresh_store)
    runtime = get_runtime()
    early = new_trace_id()  # served by another host, say, whose trace is not in MLflow yet
    receipt = submit_feedback(early, "thumbs_down", corrected_output={"joke": "Later."}, user_id="ed")
    assert receipt.pending and receipt.queued
    with pytest.raises(errors.TraceNotFound):
        submit_feedback(new_trace_id(at=time.time() - 2 * 86400), "thumbs_up")  # too old to still come
    with pytest.raises(errors.TraceNotFound):
        submit_feedback("tr-not-an-id", "thumbs_up")
    assert runtime.outbox.dead_letters() == 0
    now = time.time_ns()
    info = registry.get_version("jokes", "1", fresh_store)
    runtime.record_trace(TraceRecord.ok(early, info, {"topic": "t"}, {"joke": "j"}, now, now))
    assert runtime.outbox.flush(timeout=30), runtime.outbox.last_error
    assessments = runtime.store.tracking.get_trace_info(early).assessments
    values = {a.name: feedback.assessment_value(a) for a in assessments}
    assert values == {"user_rating": "thumbs_down", "corrected_output": {"joke": "Later."}}


def test_feedback_whose_trace_never_appears_is_dead_lettered_and_counted(
    tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    import time

    from flywheel.counters import prometheus
    from flywheel.tracing import new_trace_id

    _jokes(make_store(tmp_path / "home", FEEDBACK_WAIT="1"))
    runtime = get_runtime()
    assert submit_feedback(new_trace_id(), "thumbs_up").pending
    time.sleep(1.2)
    assert runtime.outbox.flush(timeout=30), "the dead letter still counts as backlog"
    assert runtime.outbox.dead_letters() == 1
    assert runtime.health()["dead_letters"] == 1
    assert "flywheel_outbox_dead_letters 1" in prometheus(runtime.counters.report(), runtime.metrics_extra())


@pytest.mark.backends("sqlite")  # MLflow is patched down: the backend plays no part
def test_an_outage_is_answered_from_local_state(fresh_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow down: a cold runtime serves from disk, checks corrections against the fields it
    knows, and answers what it cannot know with Unavailable (503), never 404 or 422."""
    import uuid

    import mlflow
    from mlflow.exceptions import MlflowException

    from flywheel import registry
    from flywheel.runtime import Runtime
    from flywheel.tracing import new_trace_id

    _jokes(fresh_store)
    with Runtime(store=fresh_store) as warm:
        served = warm.predict("jokes", {"topic": "cat"})
        assert warm.outbox.flush()

    def down(*args: object, **kwargs: object) -> None:
        raise MlflowException("Connection refused", error_code="INTERNAL_ERROR")

    for name in ("resolve", "get_version", "list_versions"):
        monkeypatch.setattr(registry, name, down)
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", down)
    monkeypatch.setattr(fresh_store.tracking, "get_trace_info", down)
    cold = Runtime(store=fresh_store).start()  # a restarted worker: nothing in memory
    try:
        assert cold.predict("jokes", {"topic": "dog"}).model_version == "1"
        receipt = cold.submit_feedback(served.trace_id, "thumbs_down", corrected_output={"joke": "Better."})
        assert not receipt.pending and receipt.corrected_output == {"joke": "Better."}
        with pytest.raises(errors.FeedbackError, match=r"\(outputs: joke\)"):
            cold.submit_feedback(served.trace_id, "thumbs_down", corrected_output={"pun": "x"})
        with pytest.raises(errors.Unavailable):
            cold.submit_feedback("tr-" + uuid.uuid4().hex, "thumbs_up")  # cannot tell: 503, not 404
        assert cold.submit_feedback(new_trace_id(), "thumbs_up").pending  # young: kept durably
        with pytest.raises(errors.Unavailable):
            cold.predict("never-served-here", {"topic": "x"})
        assert cold.outbox.deliver_available() is False  # the new trace is written, feedback waits
        assert cold.outbox.backlog() == 2
    finally:
        cold.close(timeout=0)
    assert errors.Unavailable.status == 503
