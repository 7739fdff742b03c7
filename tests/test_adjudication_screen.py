"""The models dashboard's adjudication screen (issue 15), driven at the widget level (no kernel).

Two reviewers disagree on a real store; the adjudicator sees both answers, decides behind the admin
key, and the decision lands as the `adjudicator:<name>` assessment that export then returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

import flywheel
from flywheel import review, store
from flywheel.export import RULE, export_rows
from flywheel.runtime import Runtime, get_runtime, reset_runtime
from flywheel.ui.models import ModelsPanel, models_panel

pytestmark = pytest.mark.slow  # each module seeds the demo store (about 45 s)

ROUTER = "support-router"
UP, DOWN = "thumbs_up", "thumbs_down"


@pytest.fixture(scope="module")
def rt(demo_store_rw: store.Store) -> Iterator[Runtime]:
    reset_runtime()
    runtime = get_runtime()
    runtime.settings = replace(runtime.settings, flywheel_admin_key="s3cret")
    yield runtime
    reset_runtime()


def test_adjudicator_sees_every_answer_and_decides_behind_the_admin_key(rt: Runtime) -> None:
    s = rt.store
    ids = [flywheel.predict(ROUTER, {"ticket": f"adjudicate {i}"}, runtime=rt).trace_id for i in range(2)]
    rt.outbox.flush(timeout=10)
    queue = review.create_queue(s, ROUTER, ["ann", "ben"], k=2, name="screen", backlog=False)
    review.assign(s, queue, ids)
    for name, ratings in (("ann", (UP, UP)), ("ben", (DOWN, UP))):  # they disagree on ids[0] only
        q = review.ReviewQueue(rt, ROUTER, reviewer=name, queue="screen")
        while q.next() is not None:
            assert q.current is not None
            rating = ratings[ids.index(q.current.trace_id)]
            q.rate(rating, comment=f"{name} says {rating}")
    rt.outbox.flush(timeout=10)

    panel = models_panel(model=ROUTER, runtime=rt)
    assert isinstance(panel, ModelsPanel)
    assert panel.adj_queue.value == "screen"
    assert ("screen (1 waiting)", "screen") in panel.adj_queue.options

    panel.adj_next.click()  # no key typed: nothing shown
    assert "admin key" in panel.adj_status.value and panel.adj_item.value == ""

    panel.admin_key.value = "s3cret"
    panel.adj_name.value = "Judy"
    panel.adj_next.click()
    shown = panel.adj_item.value
    assert ids[0] in shown and ids[1] not in shown
    assert "ann says thumbs_up" in shown and "ben says thumbs_down" in shown  # every answer
    assert "user_rating (disagree)" in shown
    assert panel.adj_editor.layout.display == "flex"

    panel.admin_key.value = "wrong"
    panel.adj_down.click()
    assert "admin key" in panel.adj_status.value
    assert ids[0] in review.Adjudication(rt, ROUTER, "screen").pending()

    panel.admin_key.value = "s3cret"
    panel.adj_correction.value = '{"category": "billing"}'
    panel.adj_comment.value = "ben is right"
    panel.adj_down.click()
    assert "adjudicator:judy" in panel.adj_status.value, panel.adj_status.value
    assert "Nothing waits" in panel.adj_item.value
    info = s.tracking.get_trace_info(ids[0])
    decided = {
        a.name: a.value
        for a in info.assessments
        if a.source.source_id == "adjudicator:judy" and a.valid is not False
    }
    assert decided["user_rating"] == DOWN and decided["comment"] == "ben is right"

    rows = {r["trace_id"]: r for r in export_rows(rt, ROUTER, with_corrected=True)}
    row = rows[ids[0]]
    assert (row[RULE], row["rating"], row["category"], row["comment"]) == (
        "adjudicated",
        DOWN,
        "billing",
        "ben is right",
    )
    assert rows[ids[1]][RULE] == "majority"  # both said up


def test_questions_and_queues_are_set_up_from_the_dashboard_behind_the_admin_key(rt: Runtime) -> None:
    panel = models_panel(model=ROUTER, runtime=rt)
    assert isinstance(panel, ModelsPanel)
    panel.admin_key.value = ""
    panel.label_name.value, panel.label_kind.value, panel.label_options.value = "tone", "categorical", "a, b"
    panel.label_add.click()  # no key typed: refused, nothing defined
    assert "admin key" in panel.setup_status.value
    assert f"{ROUTER}:tone" not in {lab.name for lab in review.labels(rt.store, ROUTER)}

    panel.admin_key.value = "s3cret"
    panel.label_options.value = "formal, casual"
    panel.label_add.click()
    assert "error" not in panel.setup_status.value, panel.setup_status.value
    (tone,) = [lab for lab in review.labels(rt.store, ROUTER) if lab.name == f"{ROUTER}:tone"]
    assert tone.kind == "categorical" and tone.options == ("formal", "casual")
    assert (tone.title, tone.name) in panel.queue_labels.options

    panel.queue_name.value, panel.queue_reviewers.value, panel.queue_k.value = "setup", "ann, bo", 2
    panel.queue_labels.value = (tone.name,)
    panel.queue_add.click()
    assert "error" not in panel.setup_status.value, panel.setup_status.value
    queue = review.get_queue(rt.store, ROUTER, "setup")
    assert queue is not None and queue.k == 2 and queue.reviewers == ("ann", "bo") and queue.blind
    assert tone.schema_id in queue.schema_ids
    # MLflow's own API sees the queue, its reviewers and its questions
    import mlflow.genai.label_schemas as ls
    import mlflow.genai.review_queues as rq

    with rt.store.fluent():
        mq = rq.get_review_queue(name=f"{ROUTER}/setup", experiment_id=rt.store.experiment_id)
        questions = {ls.get_label_schema(schema_id=x).name for x in mq.schema_ids}
    assert sorted(mq.users) == ["ann", "bo"]
    assert {f"{ROUTER}:tone", "user_rating", "corrected_output", "comment"} <= questions
