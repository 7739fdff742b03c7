"""feedback.submit validates before anything is stored; deliver writes assessments once."""

from __future__ import annotations

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
