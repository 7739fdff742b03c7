"""Who a dashboard page writes as (issue 31, findings 2 and 9).

Behind authentication (FLYWHEEL_REVIEWER_HEADER) every page (rating, predict, pairwise, models)
takes the user from the kernel's environment, as Voila hands the request's header over, once when
the page opens; nothing the page sends (a name box it un-disables, a message, `?reviewer=`,
`?user=`) changes it, and with the header missing the page writes nothing. The panels are driven
in process here, as the browser drives them (it sets a widget's value); the rating page's
tampering is also done in Chromium, through Voila. And a `$` in a user id, queue or question name
is plain text on the models dashboard: `$\\frac{$` once made matplotlib's mathtext raise and
left the promote list, progress and adjudication sections empty.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from test_dashboards import (  # the browser and page helpers of the dashboard tests
    CARD,
    LOAD,
    STEP,
    browser,  # noqa: F401 (a fixture)
    ratings,
    shown,
    wait_moved_on,
)

import flywheel
from flywheel import canary, review
from flywheel.demo.seed import seed_demo
from flywheel.runtime import Runtime, get_runtime, reset_runtime
from flywheel.ui.dashboards import Launched, free_port, launch
from flywheel.ui.models import ModelsPanel, models_panel
from flywheel.ui.pairwise import PairwisePanel, pairwise_panel
from flywheel.ui.predict import PredictPanel, predict_panel
from flywheel.ui.review import RatingPanel, rating_panel

pytestmark = pytest.mark.slow  # the module seeds the demo store

JOKES, ROUTER = "joke-generator", "support-router"
HEADER, VARIABLE = "X-Forwarded-User", "HTTP_X_FORWARDED_USER"  # what Voila sets in the kernel
UP, DOWN = "thumbs_up", "thumbs_down"
FRAC = "$\\frac{$"  # a user id matplotlib's mathtext cannot parse


@pytest.fixture(scope="module")
def rt(make_module_store: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """The demo on a store whose dashboards sit behind a proxy that sets X-Forwarded-User."""
    s = make_module_store(tmp_path_factory.mktemp("identity") / "home", FLYWHEEL_REVIEWER_HEADER=HEADER)
    seed_demo(s, progress=lambda line: None)
    reset_runtime()
    runtime = get_runtime()
    assert runtime.settings.flywheel_reviewer_header == HEADER
    yield runtime
    reset_runtime()


@pytest.fixture
def visitor(monkeypatch: pytest.MonkeyPatch) -> Any:
    """`visitor(name)`: the header Voila hands the kernel for this request (None: no header came)."""

    def arrive(name: str | None) -> None:
        if name is None:
            monkeypatch.delenv(VARIABLE, raising=False)
        else:
            monkeypatch.setenv(VARIABLE, name)

    return arrive


_names = iter(range(1, 10_000))


def fresh_queue(
    rt: Runtime, model: str, reviewers: tuple[str, ...], n: int, name: str | None = None
) -> tuple[list[str], str]:
    """A new queue of `model` where each of `reviewers` answers each of `n` new predictions."""
    name = name or f"id{next(_names)}"
    k = len(reviewers)
    queue = review.create_queue(rt.store, model, reviewers, k=k, name=name, backlog=False)
    ids = []
    for i in range(n):
        inputs = {"topic": f"identity {name} {i}"} if model == JOKES else {"ticket": f"invoice {name} {i}"}
        ids.append(flywheel.predict(model, inputs, runtime=rt).trace_id)
        time.sleep(0.002)  # distinct milliseconds: the queue's order is the trace ids'
    assert rt.outbox.flush(timeout=30)
    review.assign(rt.store, queue, ids)
    return ids, name


def sources(rt: Runtime, trace_id: str, name: str = "user_rating") -> list[str]:
    """The source ids of the trace's valid assessments called `name`."""
    rt.outbox.flush(timeout=30)
    info = rt.store.tracking.get_trace_info(trace_id)
    return [a.source.source_id for a in info.assessments or [] if a.name == name and a.valid is not False]


def every_source(rt: Runtime, trace_ids: list[str]) -> set[str]:
    rt.outbox.flush(timeout=30)
    found = set()
    for trace_id in trace_ids:
        info = rt.store.tracking.get_trace_info(trace_id)
        found |= {a.source.source_id for a in info.assessments or [] if a.valid is not False}
    return found


# --- rating page ------------------------------------------------------------------------------


def test_the_rating_page_rates_as_the_signed_in_user_whatever_the_page_sends(
    rt: Runtime, visitor: Any
) -> None:
    ids, name = fresh_queue(rt, JOKES, ("mallory", "bob"), 3)
    visitor("Mallory")
    panel = rating_panel(f"reviewer=bob&model={JOKES}&queue={name}", runtime=rt)
    assert isinstance(panel, RatingPanel)
    # the page removes `disabled` from the Reviewer box and types bob: the kernel gets the value
    panel.reviewer.disabled = False
    panel.reviewer.value = "bob"
    panel.version.value = "2"  # a new worklist (the old code built it for the box's name)
    panel.version.value = "all"
    first = panel.queue.current.trace_id if panel.queue and panel.queue.current else None
    assert first == ids[0]
    # the key listener's message carries the (tampered) box's name too
    panel.channel.value = json.dumps(
        {"events": [{"seq": 1, "action": UP, "trace": first, "reviewer": "bob", "comment": "ok"}]}
    )
    panel.skip.click()  # ids[1] skipped, ids[2] shown
    panel.undo.click()  # ids[1] again
    panel.down.click()
    panel.reviewer.value = "Bob"  # a held-back sync of the box, later
    panel.up.click()  # ids[2]
    assert {t: sources(rt, t) for t in ids} == {t: ["mallory"] for t in ids}
    assert "bob" not in every_source(rt, ids)
    assert panel.queue is not None and panel.queue.reviewer == "mallory"
    assert panel.reviewer.value == "mallory"  # shown back; the worklist never followed it
    assert "Signed in as <b>mallory</b>" in panel.identity.value
    assert "Saved thumbs up as mallory" in panel.status.value


def test_a_rating_page_without_the_header_writes_nothing(rt: Runtime, visitor: Any) -> None:
    ids, name = fresh_queue(rt, JOKES, ("mallory", "bob"), 1)
    visitor(None)
    panel = rating_panel(f"reviewer=bob&model={JOKES}&queue={name}", runtime=rt)
    assert isinstance(panel, RatingPanel)
    panel.reviewer.disabled = False
    panel.reviewer.value = "bob"
    panel.version.value = "2"
    panel.channel.value = json.dumps(
        {"events": [{"seq": 1, "action": UP, "trace": ids[0], "reviewer": "bob"}]}
    )
    panel.up.click()
    assert every_source(rt, ids) == set()
    assert panel.queue is not None and panel.queue.current is None
    assert "Sign-in required" in panel.identity.value


@pytest.fixture(scope="module")
def voila(rt: Runtime) -> Iterator[Launched]:
    """Voila over the module's store, passing X-Forwarded-User to its kernels (http_header_envs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(VARIABLE, raising=False)  # the kernels get the header from the request only
        launched = launch(port=free_port(0), open_api=False, block=False, echo=lambda line: None)
    try:
        yield launched
    finally:
        launched.stop()


@pytest.mark.browser
def test_in_chromium_a_tampered_reviewer_box_still_rates_as_the_signed_in_user(
    rt: Runtime,
    voila: Launched,
    browser: Any,  # noqa: F811
) -> None:
    """The proxy signed mallory in. In the page she removes `disabled` from the Reviewer box,
    types bob (a colleague in the same queue), opens another worklist and rates: MLflow holds
    mallory's rating and nothing of bob's."""
    ids, name = fresh_queue(rt, JOKES, ("mallory", "bob"), 2)
    context = browser.new_context(
        viewport={"width": 1100, "height": 900}, extra_http_headers={HEADER: "mallory"}
    )
    page = context.new_page()
    page.set_default_timeout(LOAD)
    try:
        url = f"{voila.urls['rating.ipynb']}?reviewer=bob&model={JOKES}&queue={name}"
        page.goto(url, wait_until="domcontentloaded", timeout=LOAD)
        page.wait_for_selector(CARD)
        page.wait_for_selector(".fw-signed-in:has-text('Signed in as mallory')")
        assert page.input_value(".fw-reviewer input") == "mallory"
        assert page.is_disabled(".fw-reviewer input")
        first = shown(page)
        assert first == ids[0]
        page.evaluate("document.querySelector('.fw-reviewer input').removeAttribute('disabled')")
        page.fill(".fw-reviewer input", "bob")
        page.press(".fw-reviewer input", "Enter")  # the box sends its value (continuous_update off)
        # another worklist, then back: the old panel built it for the name in the box
        page.select_option(".fw-version select", label="v2 · Production")
        page.wait_for_selector(CARD)
        page.select_option(".fw-version select", label="all versions")
        page.wait_for_function(
            "t => document.querySelector('.fw-item .fw-card')?.dataset.traceId === t", arg=first
        )
        page.set_default_timeout(STEP)
        page.click("button.fw-rate-up")  # the listener sends the box's name (no longer disabled)
        wait_moved_on(page, first)
        stored = ratings(rt, first, by="mallory")
        assert [a.source.source_id for a in stored.get("user_rating", [])] == ["mallory"]
        assert "bob" not in every_source(rt, ids)
        page.wait_for_selector(".fw-status:has-text('Saved thumbs up as mallory')")
        assert page.input_value(".fw-reviewer input") == "mallory"  # the kernel put it back
    finally:
        context.close()


# --- predict page -----------------------------------------------------------------------------


def test_the_predict_page_saves_feedback_as_the_signed_in_user(rt: Runtime, visitor: Any) -> None:
    visitor("mallory")
    panel = predict_panel(query_string=f"model={JOKES}&user=alice", runtime=rt)
    assert isinstance(panel, PredictPanel)
    panel.user.disabled = False
    panel.user.value = "alice"  # what a tampered box sends
    panel.inputs["topic"].value = "ladders"
    prediction = panel.do_predict()
    assert prediction is not None
    panel.choose(UP)
    receipt = panel.do_submit()
    assert receipt is not None
    assert every_source(rt, [prediction.trace_id]) == {"mallory"}
    assert receipt.user_id == "mallory" and "Feedback saved as mallory" in panel.status.value
    assert panel.user.value == "mallory"
    assert "Signed in as <b>mallory</b>" in panel.identity.value


def test_a_predict_page_without_the_header_writes_nothing(rt: Runtime, visitor: Any) -> None:
    visitor(None)
    panel = predict_panel(query_string=f"model={JOKES}&user=alice", runtime=rt)
    assert isinstance(panel, PredictPanel)
    before = len(flywheel_traces(rt))
    panel.user.value = "alice"
    panel.inputs["topic"].value = "ladders"
    predicted = panel.do_predict()
    panel.choose(UP)
    panel.do_submit()
    assert len(flywheel_traces(rt)) == before and predicted is None
    assert "Sign-in required" in panel.status.value and "Sign-in required" in panel.identity.value


def flywheel_traces(rt: Runtime) -> list[Any]:
    rt.outbox.flush(timeout=30)
    infos, _ = rt.store.tracking.search_traces(locations=[rt.store.experiment_id], max_results=1000)
    return list(infos)


# --- pairwise page ----------------------------------------------------------------------------


def shadow_answers(rt: Runtime, n: int) -> list[str]:
    canary.set_shadow(rt.store, JOKES, "1", actor="test")
    try:
        served = [
            flywheel.predict(JOKES, {"topic": f"pairs {time.time_ns()} {i}"}, runtime=rt).trace_id
            for i in range(n)
        ]
    finally:
        canary.set_shadow(rt.store, JOKES, None, actor="test")
    deadline = time.monotonic() + 60
    while True:  # the shadow answers are traced beside the served ones
        assert rt.outbox.flush(timeout=30)
        waiting = {p.a_trace for p in canary.shadow_pairs(rt, JOKES, None, limit=100)}
        if set(served) <= waiting or time.monotonic() > deadline:
            return served
        time.sleep(0.5)


def test_the_pairwise_page_prefers_as_the_signed_in_user(rt: Runtime, visitor: Any) -> None:
    shadow_answers(rt, 1)
    visitor(None)
    nobody = pairwise_panel(f"model={JOKES}&reviewer=alice", runtime=rt)
    assert isinstance(nobody, PairwisePanel) and nobody.current is None
    assert "Sign-in required" in nobody.card.value and nobody.choose("A") is None

    visitor("mallory")
    panel = pairwise_panel(f"model={JOKES}&reviewer=alice", runtime=rt)
    assert isinstance(panel, PairwisePanel) and panel.current is not None
    assert panel.reviewer.value == "mallory" and "Signed in as <b>mallory</b>" in panel.identity.value
    panel.reviewer.disabled = False
    panel.reviewer.value = "alice"
    a, b = panel.current.a_trace, panel.current.b_trace
    assert panel.choose("A")
    assert sources(rt, a, "pairwise_preference") == ["mallory"]
    assert sources(rt, b, "pairwise_preference") == ["mallory"]
    assert not any(p.a_trace == a for p in canary.shadow_pairs(rt, JOKES, "mallory", limit=100))


# --- models page ------------------------------------------------------------------------------


def disagreeing_queue(
    rt: Runtime,
    reviewers: tuple[str, str],
    model: str = ROUTER,
    name: str | None = None,
    question: str | None = None,
) -> tuple[list[str], str]:
    """Three items both reviewers answer; they disagree on the last (it waits for adjudication)."""
    ids, queue = fresh_queue(rt, model, reviewers, 3, name)
    answers = {reviewers[0]: (UP, DOWN, UP), reviewers[1]: (UP, DOWN, DOWN)}
    for who, said in answers.items():
        q = review.ReviewQueue(rt, model, reviewer=who, queue=queue)
        while q.next() is not None:
            assert q.current is not None
            rating = said[ids.index(q.current.trace_id)]
            q.rate(rating, answers={question: "good" if rating == UP else "$bad$"} if question else None)
    assert rt.outbox.flush(timeout=30)
    return ids, queue


def test_the_models_page_adjudicates_as_the_signed_in_user(rt: Runtime, visitor: Any) -> None:
    ids, name = disagreeing_queue(rt, ("ann", "ben"))
    visitor(None)
    nobody = models_panel(f"model={ROUTER}", runtime=rt)
    assert isinstance(nobody, ModelsPanel)
    nobody.adj_queue.value = name
    nobody.adj_next.click()
    assert nobody.adj_item.value == "" and "Sign-in required" in nobody.adj_status.value

    visitor("mallory")
    panel = models_panel(f"model={ROUTER}", runtime=rt)
    assert isinstance(panel, ModelsPanel) and panel.adj_name.value == "mallory"
    panel.adj_queue.value = name
    panel.adj_name.disabled = False
    panel.adj_name.value = "judy"  # a tampered Adjudicator box
    panel.adj_next.click()
    assert ids[2] in panel.adj_item.value, panel.adj_status.value
    panel.adj_name.value = "judy"
    panel.adj_down.click()
    assert "adjudicator:mallory" in sources(rt, ids[2]), panel.adj_status.value
    assert not any("judy" in s for s in every_source(rt, ids))
    assert "adjudicator:mallory" in panel.adj_status.value and panel.adj_name.value == "mallory"
    assert "Sign-in required" in nobody.identity.value


def test_without_authentication_the_pages_take_the_typed_name(rt: Runtime, visitor: Any) -> None:
    visitor("mallory")  # a header that nobody configured Voila to pass is not an identity
    behind = rt.settings
    rt.settings = replace(behind, flywheel_reviewer_header=None)
    try:
        open_pages(rt)
    finally:
        rt.settings = behind


def open_pages(open_rt: Runtime) -> None:
    panel = predict_panel(query_string=f"model={JOKES}&user=alice", runtime=open_rt)
    assert isinstance(panel, PredictPanel) and panel.user.value == "alice" and not panel.user.disabled
    assert "No authentication is configured" in panel.identity.value
    panel.inputs["topic"].value = "kettles"
    prediction = panel.do_predict()
    assert prediction is not None
    panel.choose(DOWN)
    panel.user.value = "carol"
    receipt = panel.do_submit()
    assert receipt is not None and receipt.user_id == "carol"
    pairs = pairwise_panel(f"model={JOKES}&reviewer=alice", runtime=open_rt)
    assert isinstance(pairs, PairwisePanel) and pairs.reviewer.value == "alice"
    assert "No authentication is configured" in pairs.identity.value
    models = models_panel(f"model={ROUTER}", runtime=open_rt)
    assert isinstance(models, ModelsPanel) and not models.adj_name.disabled and models.identity.value == ""


# --- finding 9: labels are plain text ---------------------------------------------------------


def test_a_dollar_in_names_is_plain_text_and_no_section_blanks_another(rt: Runtime, visitor: Any) -> None:
    visitor("mallory")
    question = "$x_{$ score"
    review.define_label(rt.store, JOKES, question, "categorical", options=["good", "$bad$"])
    ids, _ = disagreeing_queue(rt, (FRAC, "ann"), model=JOKES, name="$q^{$", question=question)
    panel = models_panel(f"model={JOKES}", runtime=rt)
    assert isinstance(panel, ModelsPanel)
    every = "".join(
        w.value for w in (panel.versions, panel.agreement, panel.review_progress, panel.live, panel.timeline)
    )
    assert "fw-section-error" not in every and "could not be drawn" not in every, every
    assert panel.status.value == "" or "error" not in panel.status.value, panel.status.value
    assert sorted(v for _, v in panel.promote_version.options) == ["1", "2"]  # the promote list
    assert FRAC in panel.review_progress.value and "$q^{$" in panel.review_progress.value  # progress
    assert ("$q^{$ (1 waiting)", "$q^{$") in panel.adj_queue.options  # adjudication
    panel.agree_queue.value = "$q^{$"
    assert f"{FRAC} / ann" in panel.agreement.value or f"ann / {FRAC}" in panel.agreement.value
    assert 'class="fw-agreement-plot"' in panel.agreement.value  # the kappa plot was drawn
    panel.agree_queue.value = ""  # everyone who rated the model: FRAC too
    assert FRAC in panel.agreement.value and 'class="fw-agreement-plot"' in panel.agreement.value
    panel.adj_queue.value = "$q^{$"
    panel.adj_next.click()
    assert ids[2] in panel.adj_item.value and FRAC in panel.adj_item.value, panel.adj_status.value


def test_a_section_that_fails_blanks_no_other(
    rt: Runtime, visitor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plot that cannot be drawn, or one query MLflow refuses, costs its own section only."""
    from flywheel.ui import models

    visitor("mallory")
    disagreeing_queue(rt, ("cid", "dee"))

    def broken(*args: Any) -> Any:
        raise RuntimeError("cannot draw this (test)")

    monkeypatch.setattr(models, "agreement_png", broken)
    monkeypatch.setattr(models.canary, "live_report", broken)
    panel = models_panel(f"model={ROUTER}", runtime=rt)
    assert isinstance(panel, ModelsPanel)
    assert "The plot could not be drawn: RuntimeError: cannot draw this (test)" in panel.agreement.value
    assert "Cohen&#x27;s kappa" in panel.agreement.value or "fw-agreement-table" in panel.agreement.value
    assert "could not be drawn" in panel.live.value and "fw-section-error" in panel.live.value
    assert panel.promote_version.options and "fw-progress-table" in panel.review_progress.value
    assert panel.adj_queue.options and "fw-timeline-list" in panel.timeline.value
    assert "fw-versions-table" in panel.versions.value and panel.status.value == ""
