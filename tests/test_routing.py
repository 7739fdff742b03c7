"""Routing (issue 15): the order a reviewer's items come in follows REVIEW_ROUTING.

Constructed traffic on a real store: predictions of two versions through flywheel's serving path,
end users' ratings through `feedback.submit`, a judge's scores as MLflow assessments of source
LLM_JUDGE (what an mlflow.genai judge writes), then a reviewer works the queue.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

import flywheel
from flywheel import feedback, review, store
from flywheel.config import load_settings
from flywheel.errors import ConfigError
from flywheel.runtime import Runtime, get_runtime, reset_runtime

pytestmark = pytest.mark.slow  # each module seeds the demo store (about 45 s)

JOKES = "joke-generator"
DOWN, UP = "thumbs_down", "thumbs_up"


@pytest.fixture(scope="module")
def rt(demo_store_rw: store.Store) -> Iterator[Runtime]:
    reset_runtime()
    runtime = get_runtime()
    runtime.settings = replace(runtime.settings, review_routing="thumbs_down,low_judge,stratified")
    yield runtime
    reset_runtime()


def judge(rt: Runtime, trace_id: str, name: str, value: Any) -> None:
    from mlflow.entities import AssessmentSource, Feedback

    a = Feedback(
        name=name, value=value, source=AssessmentSource(source_type="LLM_JUDGE", source_id="judge-lm")
    )
    a.trace_id = trace_id
    rt.store.tracking.create_assessment(a)


@pytest.fixture(scope="module")
def traffic(rt: Runtime) -> dict[str, Any]:
    """Six predictions of v1 and six of v2, then end users', a reviewer's and a judge's verdicts."""
    v1 = [flywheel.predict(JOKES, {"topic": f"route v1 {i}"}, 1, runtime=rt).trace_id for i in range(6)]
    v2 = [flywheel.predict(JOKES, {"topic": f"route v2 {i}"}, 2, runtime=rt).trace_id for i in range(6)]
    rt.outbox.flush(timeout=10)
    queue = review.create_queue(rt.store, JOKES, ["rita", "sam"], k=2, name="routed", backlog=False)
    review.assign(rt.store, queue, v1 + v2)
    feedback.submit(rt, v2[1], DOWN, user_id="carol")  # end users
    feedback.submit(rt, v1[2], DOWN, comment="not funny")  # anonymous, as through /feedback
    feedback.submit(rt, v1[0], UP, user_id="dave")
    feedback.submit(rt, v1[1], DOWN, user_id="sam")  # a reviewer of the queue: not an end user
    rt.outbox.flush(timeout=10)
    judge(rt, v2[3], "safe", "no")  # mlflow.genai judges answer yes / no
    judge(rt, v1[4], "relevance", 0.2)
    judge(rt, v2[4], "relevance", 0.9)  # not low
    judge(rt, v2[1], "relevance", 0.1)  # already picked by thumbs_down
    return {"v1": v1, "v2": v2, "queue": queue}


def test_routing_setting_is_checked() -> None:
    s = load_settings({"REVIEW_ROUTING": " Low_Judge , stratified"}, env_file=None)
    assert s.routing_rules == ("low_judge", "stratified")
    assert load_settings({}, env_file=None).routing_rules == ("thumbs_down", "low_judge")
    for bad in ("", "thumbs_down,thumbs_down", "newest"):
        with pytest.raises(ConfigError, match="REVIEW_ROUTING"):
            load_settings({"REVIEW_ROUTING": bad}, env_file=None)


def work(rt: Runtime, reviewer: str) -> list[tuple[str, str]]:
    """The items `reviewer` is shown, in order, with the reason each was picked (each rated up)."""
    q = review.ReviewQueue(rt, JOKES, reviewer=reviewer, queue="routed")
    seen = []
    item = q.next()
    while item is not None:
        seen.append((item.trace_id, item.reason))
        q.rate(UP)
        item = q.current
    return seen


def test_reviewer_sees_thumbs_down_then_low_judge_then_a_stratified_sample(
    rt: Runtime, traffic: dict[str, Any]
) -> None:
    v1, v2 = traffic["v1"], traffic["v2"]
    seen = work(rt, "rita")
    order = [t for t, _ in seen]
    assert sorted(order) == sorted(v1 + v2)  # every item, once
    assert order[:2] == [v1[2], v2[1]]  # end users' thumbs down, oldest first (not sam's)
    assert order[2:4] == [v2[3], v1[4]]  # judge's "no", then 0.2
    rest = order[4:]
    assert set(rest) == {v1[0], v1[1], v1[3], v1[5], v2[0], v2[2], v2[4], v2[5]}
    version = {t: "1" for t in v1} | {t: "2" for t in v2}
    assert [version[t] for t in rest] == ["1", "2"] * 4  # the versions take turns

    reasons = dict(seen)
    assert reasons[v1[2]] == reasons[v2[1]] == "an end user gave thumbs down"
    assert reasons[v2[3]] == "a judge scored it low (safe = no)"
    assert reasons[v1[4]] == "a judge scored it low (relevance = 0.2)"
    assert reasons[v2[4]] == "random sample of v2, stratified by version"

    # reproducible: the second reviewer, on another session, gets the same order and reasons
    assert work(rt, "sam") == seen


def test_rules_in_another_order_and_another_seed(rt: Runtime, traffic: dict[str, Any]) -> None:
    v1, v2, queue = traffic["v1"], traffic["v2"], traffic["queue"]
    ids = v1 + v2
    first = review.route(rt.store, queue, ids, ("low_judge", "thumbs_down"))
    # "no" (lowest), then 0.1 (a judge's pick now, before the thumbs down), 0.2
    assert [r.trace_id for r in first[:4]] == [v2[3], v2[1], v1[4], v1[2]]
    assert [r.rule for r in first[:4]] == ["low_judge"] * 3 + ["thumbs_down"]
    rest = first[4:]  # no rule picked these: oldest first
    assert [r.trace_id for r in rest] == [t for t in ids if t not in {v2[1], v2[3], v1[4], v1[2]}]
    assert {r.reason for r in rest} == {"oldest first (no routing rule picked it)"}

    a = [r.trace_id for r in review.route(rt.store, queue, ids, ("stratified",), seed=1)]
    b = [r.trace_id for r in review.route(rt.store, queue, ids, ("stratified",), seed=1)]
    c = [r.trace_id for r in review.route(rt.store, queue, ids, ("stratified",), seed=2)]
    assert a == b and sorted(a) == sorted(c) and a != c  # seeded: same seed, same order

    # through the setting: with only `stratified`, the thumbs-down items lose their place
    saved = rt.settings
    rt.settings = replace(saved, review_routing="stratified", review_seed=1)
    try:
        q = review.ReviewQueue(rt, JOKES, reviewer="rita", queue="routed")
        assert q.routed(ids) == {
            t: f"random sample of v{1 if t in v1 else 2}, stratified by version" for t in a
        }
        assert list(q.routed(ids)) == a
    finally:
        rt.settings = saved
