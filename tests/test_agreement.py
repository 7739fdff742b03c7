"""Agreement, adjudication and the export policy (issue 15).

The statistics are checked on textbook examples against their published values and against the
libraries themselves; then on a real store: three reviewers answer a k = 3 queue with fixed
answers, the report read back from MLflow equals the hand-computed figures, the disagreeing items
reach the adjudication queue, and export names the rule behind every row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import krippendorff
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import fleiss_kappa

import flywheel
from flywheel import agreement, review, store
from flywheel.config import load_settings
from flywheel.errors import ConfigError, FeedbackError
from flywheel.export import RULE, export_rows, to_examples
from flywheel.runtime import Runtime, get_runtime, reset_runtime

ROUTER = "support-router"
UP, DOWN = "thumbs_up", "thumbs_down"

# --- textbook examples ---------------------------------------------------------------------------

# Cohen's kappa, the worked example of Wikipedia's "Cohen's kappa" article: 50 grant proposals read
# by two readers; both yes 20, A yes / B no 5, A no / B yes 10, both no 15. p_o = 0.7, p_e = 0.5,
# kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
COHEN_A = ["yes"] * 25 + ["no"] * 25
COHEN_B = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15

# Fleiss' kappa, the worked example of Wikipedia's "Fleiss' kappa" article: 10 subjects, 14 raters,
# 5 categories; the counts per subject and category. Published: kappa = 0.210.
FLEISS = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]

# Krippendorff's alpha, Krippendorff (2011) "Computing Krippendorff's alpha-reliability", the example
# of 4 observers, 12 units and missing values. Published: nominal 0.743, interval 0.849.
N = None
KRIPP = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
    [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N],
]


def test_cohen_kappa_textbook_example() -> None:
    items = {f"p{i}": {"a": x, "b": y} for i, (x, y) in enumerate(zip(COHEN_A, COHEN_B, strict=True))}
    lab = agreement.label_agreement("q", items)
    pair = lab.pair("a", "b")
    assert pair is not None and pair.items == 50
    assert pair.percent == pytest.approx(0.7)  # (20 + 15) / 50
    assert pair.kappa == pytest.approx(0.4)  # the published value
    assert pair.kappa == pytest.approx(cohen_kappa_score(COHEN_A, COHEN_B))  # scikit-learn agrees
    assert lab.percent == pytest.approx(0.7)
    # with two raters the other's answer is the consensus: the same figures
    assert lab.reviewer("a") == agreement.ConsensusAgreement(
        "a", 50, 50, pytest.approx(0.7), pytest.approx(0.4)
    )


def test_fleiss_kappa_textbook_example() -> None:
    items: dict[str, dict[str, Any]] = {}
    for i, counts in enumerate(FLEISS):
        answers = [cat + 1 for cat, n in enumerate(counts) for _ in range(n)]
        items[f"s{i}"] = {f"rater{j}": str(v) for j, v in enumerate(answers)}  # raters' identities are moot
    lab = agreement.label_agreement("q", items, level=agreement.NOMINAL)
    assert lab.fleiss_items == 10 and len(lab.reviewers) == 14
    assert round(lab.fleiss_kappa, 3) == 0.210  # the published value
    assert lab.fleiss_kappa == pytest.approx(fleiss_kappa(np.array(FLEISS)))  # statsmodels on the table
    assert lab.percent == pytest.approx(0.1)  # only subject 1 is unanimous


def test_krippendorff_alpha_textbook_example() -> None:
    items = {f"u{j}": {f"o{i}": KRIPP[i][j] for i in range(4) if KRIPP[i][j] is not None} for j in range(12)}
    data = [[math.nan if v is None else v for v in row] for row in KRIPP]
    nominal = agreement.label_agreement("q", items, level=agreement.NOMINAL)
    interval = agreement.label_agreement("q", items)  # numeric answers: interval
    assert interval.level == agreement.INTERVAL
    assert round(nominal.krippendorff_alpha, 3) == 0.743  # the published values
    assert round(interval.krippendorff_alpha, 3) == 0.849
    assert nominal.krippendorff_alpha == pytest.approx(
        krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
    )
    assert interval.krippendorff_alpha == pytest.approx(
        krippendorff.alpha(reliability_data=data, level_of_measurement="interval")
    )
    assert nominal.items == 11  # unit 12 has one answer: not pairable


def test_undefined_statistics_are_none_not_numbers() -> None:
    lab = agreement.label_agreement("q", {"t1": {"a": UP, "b": UP}, "t2": {"a": UP, "b": UP}})
    assert lab.percent == 1.0 and lab.pair("a", "b").kappa is None  # one category: 0/0
    assert lab.krippendorff_alpha is None and lab.fleiss_kappa is None
    empty = agreement.label_agreement("q", {"t1": {"a": UP}})
    assert empty.items == 0 and empty.percent is None


def test_export_policy_setting_is_checked() -> None:
    assert load_settings({}, env_file=None).export_rules == ("adjudicated", "majority", "single", "latest")
    s = load_settings({"EXPORT_POLICY": " Adjudicated, majority "}, env_file=None)
    assert s.export_rules == ("adjudicated", "majority")
    for bad in ("", "majority,majority", "vote"):
        with pytest.raises(ConfigError, match="EXPORT_POLICY"):
            load_settings({"EXPORT_POLICY": bad}, env_file=None)


# --- on a real store -------------------------------------------------------------------------------

# fixed answers (ann, ben, cid) per trace: hand-computed figures below
RATINGS = [
    (UP, UP, UP),
    (UP, DOWN, UP),
    (DOWN, DOWN, DOWN),
    (DOWN, UP, UP),
]
FUNNY = [(4, 4, 5), (2, 3, 2), (1, 1, 1), (3, 5, 4)]


@pytest.fixture(scope="module")
def rt(demo_store_rw: store.Store) -> Iterator[Runtime]:
    reset_runtime()
    yield get_runtime()
    reset_runtime()


@pytest.fixture(scope="module")
def answered(rt: Runtime) -> dict[str, Any]:
    """Three reviewers answer a k = 3 queue of four fresh traces with the fixed answers."""
    s = rt.store
    review.define_label(s, ROUTER, "severity", "numeric", minimum=1, maximum=5)
    ids = [flywheel.predict(ROUTER, {"ticket": f"agree {i}"}, runtime=rt).trace_id for i in range(4)]
    rt.outbox.flush(timeout=10)
    queue = review.create_queue(s, ROUTER, ["ann", "ben", "cid"], k=3, name="agree", backlog=False)
    review.assign(s, queue, ids)
    who = ("ann", "ben", "cid")
    for r, name in enumerate(who):
        q = review.ReviewQueue(rt, ROUTER, reviewer=name, queue="agree")
        item = q.next()
        while item is not None:
            i = ids.index(item.trace_id)
            fix = {"ticket": f"fixed by {name}"} if RATINGS[i][r] == DOWN else None
            q.rate(
                RATINGS[i][r],
                corrected_output={"category": f"by-{name}"} if fix else None,
                comment=f"{name} on {i}",
                answers={"severity": FUNNY[i][r]},
            )
            item = q.current
    rt.outbox.flush(timeout=10)
    return {"ids": ids, "queue": queue}


def test_agreement_from_mlflow_equals_hand_computed_values(rt: Runtime, answered: dict[str, Any]) -> None:
    rep = flywheel.agreement_report(ROUTER, queue="agree", runtime=rt)
    lab = rep["user_rating"]
    assert lab.items == 4 and lab.reviewers == ("ann", "ben", "cid")
    assert lab.percent == pytest.approx(0.5)  # traces 0 and 2 are unanimous
    # ann/ben: 2 of 4 agree, each says up twice: p_e = 0.5, kappa 0
    # ann/cid and ben/cid: 3 of 4 agree, p_e = 0.5*0.75 + 0.5*0.25 = 0.5, kappa 0.5
    assert (lab.pair("ann", "ben").percent, lab.pair("ann", "ben").kappa) == (0.5, pytest.approx(0.0))
    assert lab.pair("ann", "cid").kappa == pytest.approx(0.5)
    assert lab.pair("ben", "cid").kappa == pytest.approx(0.5)
    # Fleiss: P̄ = (1 + 1/3 + 1 + 1/3) / 4 = 2/3, P_e = (7/12)² + (5/12)² = 37/72 -> 11/35
    assert lab.fleiss_kappa == pytest.approx(11 / 35) and lab.fleiss_items == 4
    ups = [[1.0 if r == UP else 0.0 for r in row] for row in RATINGS]
    assert lab.krippendorff_alpha == pytest.approx(
        krippendorff.alpha(reliability_data=np.array(ups).T, level_of_measurement="nominal")
    )
    # ann vs the others' majority: trace 0 up=up, trace 1 tie (skipped), 2 down=down, 3 down!=up
    ann = lab.reviewer("ann")
    assert (ann.answered, ann.items, ann.percent) == (4, 3, pytest.approx(2 / 3))
    assert ann.kappa == pytest.approx(cohen_kappa_score([UP, DOWN, DOWN], [UP, DOWN, UP]))

    sev = rep[f"{ROUTER}:severity"]
    assert sev.level == "interval"
    assert sev.krippendorff_alpha == pytest.approx(
        krippendorff.alpha(reliability_data=np.array(FUNNY, dtype=float).T, level_of_measurement="interval")
    )
    assert sev.pair("ann", "cid").percent == pytest.approx(0.5)  # traces 1 and 2
    frame = rep.to_frame()
    assert {"user_rating", f"{ROUTER}:severity"} == set(frame["label"])


def test_disagreements_reach_the_adjudication_queue_and_export_names_the_rule(
    rt: Runtime, answered: dict[str, Any]
) -> None:
    s, ids = rt.store, answered["ids"]
    adj = review.Adjudication(rt, ROUTER, "agree", adjudicator="Judy")
    flagged = {ids[0], ids[1], ids[3]}  # 0: severity 4/4/5; 1 and 3: the rating; 2 is unanimous
    assert set(adj.pending()) == flagged
    import mlflow.genai.review_queues as rq

    with s.fluent():
        mq = rq.get_review_queue(name=f"{ROUTER}/agree/adjudication", experiment_id=s.experiment_id)
        in_mlflow = {i.item_id for i in rq.list_review_queue_items(mq.queue_id, max_results=100)}
    assert flagged == in_mlflow

    # the adjudicator sees every answer of trace 1 (ann up, ben down, cid up) and decides down
    first = adj.next()
    assert first is not None and first.item.trace_id == ids[0]  # oldest first
    assert adj.open(ids[1]) is not None
    answers = {a.source: a.values for a in adj.current.answers}
    assert {"ann", "ben", "cid"} <= set(answers)
    assert answers["ben"]["user_rating"] == DOWN and answers["ben"]["corrected_output"] == {
        "category": "by-ben"
    }
    assert "user_rating" in adj.current.disagree_on
    adj.decide(DOWN, corrected_output={"category": "billing"}, comment="judged", answers={"severity": 2})
    assert ids[1] not in adj.pending()
    info = s.tracking.get_trace_info(ids[1])
    decided = [
        a for a in info.assessments if a.source.source_id == "adjudicator:judy" and a.valid is not False
    ]
    assert {a.name for a in decided} == {"user_rating", "corrected_output", "comment", f"{ROUTER}:severity"}

    rows = {r["trace_id"]: r for r in export_rows(rt, ROUTER, with_corrected=True)}
    assert (rows[ids[1]][RULE], rows[ids[1]]["rating"]) == ("adjudicated", DOWN)
    assert (rows[ids[1]]["category"], rows[ids[1]]["comment"]) == ("billing", "judged")  # one decision
    assert (rows[ids[0]][RULE], rows[ids[0]]["rating"]) == ("majority", UP)
    assert (rows[ids[3]][RULE], rows[ids[3]]["rating"]) == ("majority", UP)  # ben and cid
    assert rows[ids[3]]["comment"] in ("ben on 3", "cid on 3") and not rows[ids[3]]["corrected"]
    down = rows[ids[2]]  # all three down, each with a correction: one of them, whole
    assert down[RULE] == "majority" and down["category"] == f"by-{down['comment'].split()[0]}"

    # a single rating, and a tie nobody adjudicated
    single, tie = (flywheel.predict(ROUTER, {"ticket": t}, runtime=rt).trace_id for t in ("one", "two"))
    rt.submit_feedback(single, UP, user_id="end-user")
    rt.submit_feedback(tie, UP, user_id="x")
    rt.submit_feedback(tie, DOWN, user_id="y", corrected_output={"category": "y's"})
    rt.outbox.flush(timeout=10)
    rows = {r["trace_id"]: r for r in export_rows(rt, ROUTER)}
    assert rows[single][RULE] == "single"
    assert rows[tie][RULE] == "latest" and rows[tie]["category"] == "y's"
    assert list(rows[single])[-5:] == ["trace_id", "model_version", "rating", "comment", RULE]
    (example,) = to_examples([rows[single]], ["ticket"])
    assert RULE not in example.toDict()

    strict = replace(rt.settings, export_policy="adjudicated,majority,single")
    rt.settings, saved = strict, rt.settings
    try:
        held = {r["trace_id"] for r in export_rows(rt, ROUTER)}
    finally:
        rt.settings = saved
    assert tie not in held and {single, *ids} <= held  # held back until adjudicated

    # agreement after the decision: the adjudicated trace's consensus is the decision
    ann = flywheel.agreement_report(ROUTER, queue="agree", runtime=rt)["user_rating"].reviewer("ann")
    assert (ann.items, ann.percent) == (4, pytest.approx(2 / 4))  # trace 1: ann said up, decided down


def test_nobody_passes_for_an_adjudicator_through_feedback(rt: Runtime, answered: dict[str, Any]) -> None:
    with pytest.raises(FeedbackError, match="reserved"):
        rt.submit_feedback(answered["ids"][0], UP, user_id="Adjudicator:eve")
