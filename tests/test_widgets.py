"""Widget panels without a kernel: click buttons, set values, check what reached MLflow."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import pytest

import flywheel
from flywheel import export, feedback, registry, review, store
from flywheel.config import get_settings
from flywheel.outbox import Outbox
from flywheel.review import ReviewQueue
from flywheel.runtime import Runtime, get_runtime, reset_runtime
from flywheel.tracing import model_key
from flywheel.ui.base import esc, fields_html
from flywheel.ui.review import HELP, KEYS, LEGEND, key_listener_html
from flywheel.ui.widgets import (
    ExportPanel,
    ModelsPanel,
    PredictPanel,
    RatingPanel,
    export_panel,
    find,
    models_panel,
    parse_query,
    predict_panel,
    prediction_card,
    rating_panel,
    rating_panel_ahead,
    rating_stats,
    trend_png,
)

JOKES, ROUTER = "joke-generator", "support-router"


@pytest.fixture(scope="module")
def rt(demo_store_rw: store.Store) -> Iterator[Runtime]:
    reset_runtime()
    yield get_runtime()
    reset_runtime()


def valid_assessments(runtime: Runtime, trace_id: str) -> dict[str, list[Any]]:
    runtime.outbox.flush(timeout=10)
    info = runtime.store.tracking.get_trace_info(trace_id)
    found: dict[str, list[Any]] = {}
    for a in info.assessments or []:
        if a.valid is not False:
            found.setdefault(a.name, []).append(a)
    return found


def unrated(runtime: Runtime, model: str) -> list[str]:
    runtime.outbox.flush(timeout=10)
    infos, _ = runtime.store.tracking.search_traces(
        locations=[runtime.store.experiment_id],
        filter_string=f"tags.`flywheel.model_key` = '{model_key(model)}' AND feedback.`user_rating` IS NULL",
        max_results=1000,
    )
    return [i.trace_id for i in infos]


_queues = iter(range(1, 10_000))


def fresh_queue(
    runtime: Runtime, model: str, n: int, reviewers: tuple[str, ...] = (), k: int = 1
) -> tuple[list[str], str]:
    """A new review queue of `model` for `reviewers` (from now on: no backlog), then `n` predictions
    to review (oldest first); returns (trace ids, queue name)."""
    name = f"t{next(_queues)}"
    review.create_queue(runtime.store, model, reviewers or ("alice",), k=k, name=name, backlog=False)
    ids = []
    for i in range(n):
        inputs = {"topic": f"topic {i}"} if model == JOKES else {"ticket": f"my invoice {i} is wrong"}
        ids.append(flywheel.predict(model, inputs, runtime=runtime).trace_id)
        time.sleep(0.002)  # distinct milliseconds: trace ids (UUIDv7) order the queue, oldest first
    runtime.outbox.flush(timeout=10)
    return ids, name


def shown(panel: RatingPanel) -> str | None:
    assert panel.queue is not None
    return panel.queue.current.trace_id if panel.queue.current else None


def card_trace(panel: RatingPanel) -> str | None:
    """The trace id of the card the page draws (none: no card)."""
    m = re.search(r'data-trace-id="([^"]*)"', panel.item.value)
    return m.group(1) if m else None


def status_of(panel: Any) -> str:
    return re.sub(r"<[^>]+>", "", panel.status.value)


# --- predict and rate -------------------------------------------------------------------------


def test_predict_panel_predicts_and_stores_rating_correction_comment(rt: Runtime) -> None:
    panel = predict_panel(JOKES, user_id="bob")
    assert isinstance(panel, PredictPanel)
    assert ("Production (v2)", "Production") in panel.ref.options
    assert ("@champion (v2)", "champion") in panel.ref.options
    assert panel.ref.value == "Production" and list(panel.inputs) == ["topic"]
    assert find(panel, "fw-input-topic") is panel.inputs["topic"]

    panel.inputs["topic"].value = "coffee"
    panel.predict_button.click()
    assert panel.prediction is not None and panel.prediction.model_version == "2"
    assert panel.prediction.trace_id in panel.result.value
    assert "selectedEvaluationId=" + panel.prediction.trace_id in panel.result.value
    assert panel.corrections["joke"].value == panel.prediction.result["joke"]  # pre-filled

    panel.corrections["joke"].value = "Decaf: coffee that gave up."
    panel.comment.value = "punchier"
    panel.down.click()
    panel.submit_button.click()
    assert "error" not in panel.status.value, panel.status.value

    got = valid_assessments(rt, panel.prediction.trace_id)
    assert [a.value for a in got["user_rating"]] == ["thumbs_down"]
    assert got["corrected_output"][0].value == {"joke": "Decaf: coffee that gave up."}
    assert got["comment"][0].value == "punchier"
    source = got["user_rating"][0].source
    assert (str(source.source_type).rsplit(".", 1)[-1], source.source_id) == ("HUMAN", "bob")
    assert "user_rating" in panel.stored.value and "thumbs_down" in panel.stored.value


def test_predict_panel_version_choice_and_other_model_inputs(rt: Runtime) -> None:
    panel = predict_panel(JOKES, ref="1")
    assert panel.ref.value == "1"
    panel.inputs["topic"].value = "tea"
    panel.predict_button.click()
    assert panel.prediction is not None and panel.prediction.model_version == "1"

    panel.model.value = ROUTER
    assert list(panel.inputs) == ["ticket"] and panel.ref.value == "Production"


def test_predict_panel_unchanged_output_is_not_a_correction(rt: Runtime) -> None:
    panel = predict_panel(JOKES)
    panel.inputs["topic"].value = "mondays"
    panel.predict_button.click()
    panel.up.click()
    assert panel.up.button_style == "success" and panel.down.button_style == ""
    panel.submit_button.click()
    assert panel.prediction is not None
    got = valid_assessments(rt, panel.prediction.trace_id)
    assert [a.value for a in got["user_rating"]] == ["thumbs_up"]
    assert "corrected_output" not in got and "comment" not in got
    assert got["user_rating"][0].source.source_id == feedback.ANONYMOUS


def test_predict_panel_shows_errors_instead_of_raising(rt: Runtime) -> None:
    panel = predict_panel(JOKES)
    panel.submit_button.click()
    assert "Predict something first" in status_of(panel)
    panel.predict_button.click()  # empty topic
    assert "fw-msg-error" in panel.status.value and "topic" in status_of(panel)
    panel.inputs["topic"].value = "x"
    panel.predict_button.click()
    panel.submit_button.click()
    assert "thumbs up or thumbs down" in status_of(panel)


def test_what_the_lm_saw_is_shown_collapsed_and_escaped_in_the_panel_and_the_card(rt: Runtime) -> None:
    panel = predict_panel(ROUTER, user_id="bob")
    panel.inputs["ticket"].value = "<script>alert(1)</script> my invoice is wrong"
    panel.predict_button.click()
    assert panel.prediction is not None
    shown = panel.result.value
    assert '<details class="fw-lm-saw">' in shown and "What the LM saw · 1 LM call" in shown
    assert "<script>" not in shown and "&lt;script&gt;alert(1)&lt;/script&gt;" in shown  # the prompt, escaped
    for step in ("ChatAdapter.format", "ChatAdapter.parse", "__call__"):
        assert step in shown
    assert "fw-lm-message" in shown and "system" in shown and "fw-lm-response" in shown
    answer = panel.prediction.result["category"]
    assert esc(answer) in shown.split('class="fw-lm-response"')[1]  # the LM's raw response

    flywheel.submit_feedback(
        panel.prediction.trace_id, "thumbs_down", user_id="dave", comment="dave-thinks-so", runtime=rt
    )
    rt.outbox.flush(timeout=10)  # the review card reads the stored trace
    card = RatingPanel._card(rating_panel(f"reviewer=carol&model={ROUTER}"), _item_for(rt, panel))
    assert '<details class="fw-lm-saw">' in card and "&lt;script&gt;" in card and "<script>" not in card
    assert "dave-thinks-so" not in card and "thumbs_down" not in card  # no other reviewer's answer


def _item_for(runtime: Runtime, panel: PredictPanel) -> Any:
    from flywheel.review import QueueItem

    p = panel.prediction
    assert p is not None
    return QueueItem(p.trace_id, p.model, p.model_version, {}, p.result, 0)


def test_prediction_card_links_the_trace(rt: Runtime) -> None:
    card = prediction_card({"result": {"joke": "<b>hi</b>"}, "trace_id": "tr-1", "model_version": "2"})
    assert "&lt;b&gt;hi&lt;/b&gt;" in card.value  # user text is escaped
    assert f"/#/experiments/{rt.store.experiment_id}/traces?selectedEvaluationId=tr-1" in card.value


# --- the review queue -------------------------------------------------------------------------


def test_rating_panel_rates_oldest_first_as_the_reviewer_from_the_query_string(rt: Runtime) -> None:
    ids, name = fresh_queue(rt, ROUTER, 3, ("alice",))
    panel = rating_panel(f"reviewer=alice&model={ROUTER}&queue={name}")
    assert isinstance(panel, RatingPanel)
    assert (
        panel.reviewer.value == "alice" and panel.model.value == ROUTER and panel.queue_choice.value == name
    )
    assert "No authentication is configured" in panel.identity.value  # a typed name, and it says so
    assert shown(panel) == ids[0]
    assert ids[0] in panel.item.value and "my invoice 0" in panel.item.value
    assert panel.queue is not None and panel.queue.progress().remaining == 3
    assert "fw-trace-link" not in panel.item.value  # blind review: no link to MLflow's trace page

    panel.up.click()
    assert shown(panel) == ids[1]
    panel.corrections["category"].value = "billing" if "billing" not in panel.item.value else "technical"
    fixed = panel.corrections["category"].value
    panel.comment.value = "wrong team"
    panel.down.click()
    assert shown(panel) == ids[2]
    assert "<b>1</b> remaining" in panel.progress.value and "2 by you" in panel.progress.value

    first, second = valid_assessments(rt, ids[0]), valid_assessments(rt, ids[1])
    assert (
        first["user_rating"][0].value == "thumbs_up" and first["user_rating"][0].source.source_id == "alice"
    )
    assert second["user_rating"][0].value == "thumbs_down"
    assert second["corrected_output"][0].value == {"category": fixed}
    assert second["comment"][0].value == "wrong team"

    panel.up.click()
    assert shown(panel) is None and "fw-empty" in panel.item.value and panel.up.disabled
    assert "<b>0</b> remaining" in panel.progress.value


def test_the_queues_own_questions_are_answered_as_assessments(rt: Runtime) -> None:
    review.define_label(rt.store, ROUTER, "urgency", "categorical", options=["low", "high"])
    review.define_label(rt.store, ROUTER, "effort", "numeric", minimum=0, maximum=10)
    ids, name = fresh_queue(rt, ROUTER, 2, ("olga",))
    panel = rating_panel(model=ROUTER, reviewer="olga", queue=name)
    assert [lab.title for lab in panel.labels] == ["effort", "urgency"]
    panel.answers[1].value = "high"
    panel.answers[0].value = "7"
    panel.up.click()
    got = valid_assessments(rt, ids[0])
    assert got["support-router:urgency"][0].value == "high"
    assert got["support-router:effort"][0].value == 7.0
    assert got["support-router:effort"][0].source.source_id == "olga"
    panel.answers[0].value = "eleven"
    panel.up.click()
    assert "not a number" in status_of(panel) and shown(panel) == ids[1]  # nothing saved, still shown
    assert valid_assessments(rt, ids[1]) == {}


def test_each_question_has_its_own_control_and_keys_number_the_answers(rt: Runtime) -> None:
    review.define_label(rt.store, ROUTER, "tone", "categorical", options=["calm", "angry"])
    review.define_label(rt.store, ROUTER, "valid", "pass_fail")
    review.define_label(rt.store, ROUTER, "zeal", "categorical", options=["low", "mid", "high"])
    ids, name = fresh_queue(rt, ROUTER, 1, ("cora",))
    panel = rating_panel(model=ROUTER, reviewer="cora", queue=name)
    by_title = dict(zip([lab.title for lab in panel.labels], panel.answers, strict=True))
    tone, valid, zeal = by_title["tone"], by_title["valid"], by_title["zeal"]
    # keys 1-9 count over the categorical questions in order; P and F answer pass/fail
    digits = [o[0].split()[0] for w in panel.answers if "fw-categorical" in w._dom_classes for o in w.options]
    assert digits == [str(n) for n in range(1, len(digits) + 1)] and len(digits) >= 5
    assert [o[0].split()[0] for o in tone.options] == ["1", "2"]  # "tone" sorts first
    assert "fw-categorical" in zeal._dom_classes and "fw-passfail" in valid._dom_classes
    assert tone.tooltips == ("calm", "angry") and valid.value is None
    # what the page sends with the rating (the active buttons' titles) wins over the kernel's value
    chosen = {"tone": "angry", "valid": "fail", "zeal": "high"}
    sent = {str(i): chosen[lab.title] for i, lab in enumerate(panel.labels) if lab.title in chosen}
    panel.act({"action": "thumbs_up", "trace": ids[0], "answers": sent})
    got = valid_assessments(rt, ids[0])
    assert got["support-router:tone"][0].value == "angry"
    assert got["support-router:valid"][0].value is False
    assert got["support-router:zeal"][0].value == "high"


def test_the_legend_lists_every_key() -> None:
    keys = {k for k, _ in LEGEND}
    assert {"1-9", "P / F", "U", "D", "S", "Z", "Ctrl+Enter", "Esc"} <= keys
    for key in ("1-9", "P", "F", "U", "D", "S", "Z", "Ctrl+Enter", "Esc"):
        assert f"<kbd>{key}</kbd>" in HELP
    js = key_listener_html()
    assert "fw-categorical" in js and "fw-passfail" in js and "mod-active" in js


def test_fields_are_rendered_by_type_and_escaped() -> None:
    long = "word " * 40
    out = fields_html(
        {
            "story": long + "<script>x</script>",
            "tags": ["a", "<b>", 3],
            "meta": {"k": [1, 2], "html": "<i>"},
            "as_text": '{"x": 1}',
            "n": 3.5,
            "flag": True,
        }
    )
    assert "<script>" not in out and "&lt;script&gt;" in out and "&lt;b&gt;" in out
    assert 'class="fw-value fw-text fw-long"' in out  # long text wraps
    assert '<ol class="fw-value fw-list"><li>a</li><li>&lt;b&gt;</li><li>3</li></ol>' in out
    assert '<pre class="fw-value fw-json">{\n  &quot;k&quot;: [\n    1,' in out  # pretty JSON
    assert "&quot;x&quot;: 1" in out  # JSON text of an object is pretty-printed too
    assert '<div class="fw-value fw-scalar">3.5</div>' in out
    assert '<div class="fw-value fw-scalar">true</div>' in out


def test_skip_and_undo(rt: Runtime) -> None:
    ids, name = fresh_queue(rt, ROUTER, 3, ("dana",))
    panel = rating_panel(model=ROUTER, reviewer="dana", queue=name)
    assert panel.undo.disabled and shown(panel) == ids[0]
    panel.skip.click()
    assert shown(panel) == ids[1]
    panel.undo.click()  # undo the skip: the skipped item is back
    assert shown(panel) == ids[0]

    panel.corrections["category"].value = "shipping"
    panel.comment.value = "first try"
    panel.down.click()
    assert valid_assessments(rt, ids[0])["user_rating"][0].value == "thumbs_down"
    panel.undo.click()  # take the rating back: its assessments leave MLflow, the item is shown again
    assert shown(panel) == ids[0]
    assert valid_assessments(rt, ids[0]) == {}
    assert panel.corrections["category"].value == "shipping" and panel.comment.value == "first try"
    assert ids[0] in unrated(rt, ROUTER)

    panel.up.click()
    assert valid_assessments(rt, ids[0])["user_rating"][0].value == "thumbs_up"
    panel.skip.click()  # ids[1] skipped -> ids[2]
    assert shown(panel) == ids[2]
    panel.up.click()  # only the skipped one is left: it comes back
    assert shown(panel) == ids[1]


def test_two_reviewers_never_share_an_item_and_lose_no_rating(rt: Runtime) -> None:
    ids, name = fresh_queue(rt, ROUTER, 6, ("ann", "ben"))
    a = rating_panel(model=ROUTER, reviewer="ann", queue=name)
    b = rating_panel(model=ROUTER, reviewer="ben", queue=name)
    seen: dict[str, list[str]] = {"ann": [], "ben": []}
    for who, panel in (("ann", a), ("ben", b)):
        while shown(panel) is not None:
            current = shown(panel)
            assert current is not None
            seen[who].append(current)
            panel.up.click()
    assert not set(seen["ann"]) & set(seen["ben"])
    assert sorted(seen["ann"] + seen["ben"]) == sorted(ids)
    ratings = {t: valid_assessments(rt, t)["user_rating"] for t in ids}
    assert all(len(r) == 1 for r in ratings.values())


def test_a_typed_name_is_ignored_behind_authentication(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, name = fresh_queue(rt, ROUTER, 1, ("sso-sam",))
    monkeypatch.setenv("FLYWHEEL_REVIEWER_HEADER", "X-Forwarded-User")
    monkeypatch.setenv("HTTP_X_FORWARDED_USER", "SSO-Sam")  # what Voila hands the kernel
    rt.settings = get_settings.__wrapped__()  # this runtime now runs behind the proxy
    try:
        panel = rating_panel(f"reviewer=mallory&model={ROUTER}&queue={name}", runtime=rt)
        assert panel.reviewer.value == "sso-sam" and panel.reviewer.disabled
        assert "Signed in as <b>sso-sam</b>" in panel.identity.value
        assert shown(panel) == ids[0]
        panel.channel.value = json.dumps(
            {"events": [{"seq": 1, "action": "thumbs_up", "trace": ids[0], "reviewer": "mallory"}]}
        )
        assert [a.source.source_id for a in valid_assessments(rt, ids[0])["user_rating"]] == ["sso-sam"]
        monkeypatch.delenv("HTTP_X_FORWARDED_USER")  # the proxy sent nobody
        nobody = rating_panel(f"reviewer=mallory&model={ROUTER}&queue={name}", runtime=rt)
        assert nobody.reviewer.value == "" and "Sign-in required" in nobody.identity.value
        assert nobody.queue is not None and nobody.queue.current is None
    finally:
        monkeypatch.delenv("FLYWHEEL_REVIEWER_HEADER")
        rt.settings = get_settings.__wrapped__()


def test_a_panel_built_before_its_request_opens_as_the_request_says(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preheated kernel builds the panel before Voila hands over the query string and headers
    (`warm_up(rating_panel_ahead)`): opened for the request, it is the reviewer's worklist, and
    behind authentication the signed-in user from the header that came with the request."""
    ids, name = fresh_queue(rt, ROUTER, 2, ("alice", "sso-sam"), k=2)  # both see every item
    ahead = rating_panel_ahead(rt)
    # rehearsed for the first model's first reviewer (compiled SQL, loaded code), then forgotten:
    # nothing of that reviewer's worklist is left to show or to rate from
    assert isinstance(ahead, RatingPanel) and ahead.queue is None and card_trace(ahead) is None
    assert ahead.up.disabled and ahead.down.disabled and ahead.editor.layout.display == "none"
    opened = rating_panel(f"reviewer=alice&model={ROUTER}&queue={name}", ahead=ahead)
    assert opened is ahead and ahead.reviewer.value == "alice" and not ahead.reviewer.disabled
    assert ahead.queue is not None and not ahead.queue.history and ahead.queue.reviewer == "alice"
    assert ahead.queue_choice.value == name and shown(ahead) == ids[0]
    assert "No authentication is configured" in ahead.identity.value

    monkeypatch.setenv("FLYWHEEL_REVIEWER_HEADER", "X-Forwarded-User")
    rt.settings = get_settings.__wrapped__()
    try:
        behind = rating_panel_ahead(rt)  # built before the header arrives
        monkeypatch.setenv("HTTP_X_FORWARDED_USER", "SSO-Sam")  # the request's header, via Voila
        rating_panel(f"reviewer=mallory&model={ROUTER}&queue={name}", ahead=behind)
        assert behind.reviewer.value == "sso-sam" and behind.reviewer.disabled
        assert "Signed in as <b>sso-sam</b>" in behind.identity.value and shown(behind) == ids[0]
    finally:
        monkeypatch.delenv("FLYWHEEL_REVIEWER_HEADER")
        rt.settings = get_settings.__wrapped__()


def test_a_rehearsal_that_failed_leaves_nothing_on_the_request_s_page(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preheated kernel rehearses the panel long before the request; an error then (MLflow
    down at the time) is not shown to the reviewer who comes later, when it works again."""
    ids, name = fresh_queue(rt, ROUTER, 1, ("alice",))

    def down(self: ReviewQueue) -> None:
        raise RuntimeError("MLflow is down")

    monkeypatch.setattr(ReviewQueue, "next", down)
    ahead = rating_panel_ahead(rt)
    assert isinstance(ahead, RatingPanel) and ahead.status.value == ""
    monkeypatch.undo()
    rating_panel(f"reviewer=alice&model={ROUTER}&queue={name}", ahead=ahead)
    assert shown(ahead) == ids[0] and ahead.status.value == ""


def test_a_deferred_open_runs_after_the_cell_and_the_page_sees_it_whole(rt: Runtime) -> None:
    """The rating dashboard opens its preheated panel just after the cell (`defer=True`), on the
    kernel's event loop: the cell returns the panel still closed, and once the loop turns (before
    it answers anything the page asks) the panel is the request's worklist."""
    ids, name = fresh_queue(rt, ROUTER, 1, ("alice",))
    ahead = rating_panel_ahead(rt)
    states: list[tuple[Any, ...]] = []

    async def cell_then_loop() -> None:
        returned = rating_panel(f"reviewer=alice&model={ROUTER}&queue={name}", ahead=ahead, defer=True)
        states.append((returned is ahead, ahead.queue, card_trace(ahead)))
        await asyncio.sleep(0)  # the kernel goes back to its loop: the deferred open runs
        states.append((ahead.queue is not None and ahead.queue.reviewer, card_trace(ahead)))

    asyncio.run(cell_then_loop())
    assert states == [(True, None, None), ("alice", ids[0])]
    assert not ahead.up.disabled and ahead.status.value == ""


def test_a_request_whose_open_fails_never_shows_the_rehearsal_s_worklist(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rehearsal opened the panel for another reviewer before the request; when the request's
    own open fails (MLflow went down in between), the page says so and shows no card and no
    buttons of that other reviewer's worklist, so nothing is rated in their name. Deferred, an
    open that cannot even list the models shows the store error the synchronous path returns."""
    fresh_queue(rt, ROUTER, 1, ("alice", "bob"))
    ahead = rating_panel_ahead(rt)
    assert isinstance(ahead, RatingPanel)

    def down(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("MLflow is down")

    monkeypatch.setattr(registry, "list_versions", down)
    rating_panel(f"reviewer=bob&model={ROUTER}", ahead=ahead)
    assert ahead.queue is None and card_trace(ahead) is None and ahead.up.disabled
    assert "MLflow is down" in status_of(ahead)

    later = rating_panel_ahead(rt)
    assert isinstance(later, RatingPanel)
    monkeypatch.setattr("flywheel.ui.review.model_names", down)
    asyncio.run(_cell(lambda: rating_panel("reviewer=bob", ahead=later, defer=True)))
    page = " ".join(getattr(w, "value", "") for w in later.children)
    assert later.queue is None and "Cannot open the flywheel store" in page and "MLflow is down" in page


async def _cell(body: Any) -> None:
    body()
    await asyncio.sleep(0)


def test_another_process_holding_outbox_items_never_stalls_a_click(rt: Runtime) -> None:
    ids, name = fresh_queue(rt, ROUTER, 2, ("eve",))
    other = Outbox(rt.settings.flywheel_home / "outbox.db")  # a busy server elsewhere
    other.put("feedback", "tr-held", {"note": "claimed by another process"})
    assert [i.trace_id for i in other._claim()] == ["tr-held"]
    try:
        panel = rating_panel(model=ROUTER, reviewer="eve", queue=name)
        started = time.monotonic()
        panel.up.click()
        panel.undo.click()
        assert time.monotonic() - started < 5
        assert "fw-msg-error" not in panel.status.value and shown(panel) == ids[0]
    finally:
        other._db().execute("DELETE FROM items WHERE trace_id='tr-held'")
    assert valid_assessments(rt, ids[0]) == {}  # the rating was taken back


def test_queue_filters_by_version(rt: Runtime) -> None:
    name = f"t{next(_queues)}"
    review.create_queue(rt.store, JOKES, ["vic"], name=name, backlog=False)
    old = flywheel.predict(JOKES, {"topic": "old"}, "1", runtime=rt).trace_id
    flywheel.predict(JOKES, {"topic": "new"}, "2", runtime=rt)
    rt.outbox.flush(timeout=10)
    panel = rating_panel(f"model={JOKES}&version=1&reviewer=vic&queue={name}")
    assert panel.version.value == "1" and shown(panel) == old
    panel.up.click()
    assert shown(panel) is None
    panel.version.value = "all"
    assert shown(panel) is not None and "v2" in panel.item.value


def test_queue_rejects_a_non_numeric_version(rt: Runtime) -> None:
    with pytest.raises(Exception, match="number"):
        ReviewQueue(rt, ROUTER, "1' OR 1=1")


def test_a_channel_event_rates_with_the_values_it_carries(rt: Runtime) -> None:
    """What the Voila key/click listener sends: the page's values travel with the action, so a
    correction the kernel has not received yet is still saved; stale and repeated events do nothing."""
    ids, name = fresh_queue(rt, ROUTER, 3, ("kim",))
    panel = rating_panel(model=ROUTER, reviewer="kim", queue=name)
    assert shown(panel) == ids[0]
    panel.corrections["category"].value = "stale"  # what the kernel holds; the page has more
    sent = [
        {
            "seq": 1,
            "action": "thumbs_down",
            "trace": ids[0],
            "reviewer": "kim",
            "correction": {"category": "typed just before the key", "nope": "x"},
            "comment": "fast",
        },
        {
            "seq": 2,
            "action": "thumbs_down",
            "trace": ids[0],
            "correction": {},
            "comment": "",
        },  # pressed twice
    ]
    panel.channel.value = json.dumps({"events": sent})
    assert shown(panel) == ids[1] and "no longer shown" in status_of(panel)
    panel.channel.value = json.dumps({"events": sent[:1]})  # an old value again: acted on once only
    assert shown(panel) == ids[1]
    got = valid_assessments(rt, ids[0])
    assert [a.value for a in got["user_rating"]] == ["thumbs_down"]
    assert got["corrected_output"][0].value == {"category": "typed just before the key"}
    assert got["comment"][0].value == "fast"
    panel.channel.value = json.dumps({"events": [{"seq": 3, "action": "skip", "trace": ids[1]}]})
    assert shown(panel) == ids[2]
    panel.corrections["category"].value = "other team"  # boxes the page had not drawn yet: the kernel's
    panel.channel.value = json.dumps(
        {"events": [{"seq": 4, "action": "thumbs_up", "trace": ids[2], "correction": None, "comment": None}]}
    )
    assert valid_assessments(rt, ids[2])["corrected_output"][0].value == {"category": "other team"}
    panel.channel.value = "not json"
    assert "fw-msg-error" not in panel.status.value and valid_assessments(rt, ids[1]) == {}


def test_keyboard_shortcuts_click_the_buttons_by_class() -> None:
    html = key_listener_html()
    assert html.startswith("<img") and "onerror=" in html
    for cls in ("fw-rate-up", "fw-rate-down", "fw-skip", "fw-undo"):
        assert cls in html and cls in KEYS.values()
    assert "TEXTAREA" in html  # typing in a text box never triggers a shortcut


def test_parse_query() -> None:
    assert parse_query("reviewer=al%20ice&model=m&version=2") == {
        "reviewer": "al ice",
        "model": "m",
        "version": "2",
    }
    assert parse_query("?user=bo")["reviewer"] == "bo"
    assert parse_query("") == {}


# --- models and promotion ---------------------------------------------------------------------


def test_models_panel_versions_stats_and_trend(rt: Runtime) -> None:
    panel = models_panel()
    assert isinstance(panel, ModelsPanel)
    assert JOKES in panel.overview.value and ROUTER in panel.overview.value
    assert panel.model.value == JOKES
    table = panel.versions.value
    assert "<b>v2</b>" in table and "<b>v1</b>" in table and "champion" in table
    assert "fw-badge-Production" in table and "fw-badge-Archived" in table

    rows = flywheel.export_rows(JOKES, runtime=rt)
    stats = rating_stats(JOKES, rt)
    assert sum(s.ratings for s in stats.values()) == len(rows) > 0
    for version, s in stats.items():
        mine = [r for r in rows if r["model_version"] == version]
        assert s.up == sum(r["rating"] == "thumbs_up" for r in mine)
    assert bytes(panel.trend.value).startswith(b"\x89PNG")
    assert trend_png({}) == b""


def test_promote_needs_confirmation_and_moves_the_stage(rt: Runtime) -> None:
    panel = models_panel(model=JOKES)
    assert isinstance(panel, ModelsPanel)
    assert panel.admin_key.layout.display == "none"
    panel.promote_version.value = "1"
    panel.stage_buttons["Production"].click()
    assert panel.confirm_box.layout.display == "flex" and "v2 (now Production) will be archived" in (
        panel.confirm_text.value
    )
    assert registry.resolve(JOKES, "Production", rt.store).version == "2"  # nothing yet
    panel.confirm_no.click()
    assert panel.confirm_box.layout.display == "none"
    assert registry.resolve(JOKES, "Production", rt.store).version == "2"
    try:
        panel.stage_buttons["Production"].click()
        panel.confirm_yes.click()
        assert registry.resolve(JOKES, "Production", rt.store).version == "1"
        assert registry.get_version(JOKES, "2", rt.store).stage == "Archived"
        assert "v1 is now Production" in status_of(panel)
        assert flywheel.predict(JOKES, {"topic": "x"}, runtime=rt).model_version == "1"
        panel.promote_version.value = "2"
        panel.stage_buttons["Staging"].click()
        panel.confirm_yes.click()
        assert registry.get_version(JOKES, "2", rt.store).stage == "Staging"
    finally:
        registry.promote(JOKES, "2", "Production", rt.store)


@pytest.fixture
def admin_key(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    monkeypatch.setenv("FLYWHEEL_ADMIN_KEY", "s3cret")
    get_settings.cache_clear()
    yield get_runtime()
    monkeypatch.delenv("FLYWHEEL_ADMIN_KEY")
    get_settings.cache_clear()
    reset_runtime()


def test_promotion_needs_the_admin_key_when_one_is_set(admin_key: Runtime) -> None:
    panel = models_panel(model=ROUTER, runtime=admin_key)
    assert isinstance(panel, ModelsPanel)
    assert panel.admin_key.layout.display == "flex"
    panel.promote_version.value = "1"
    for typed in ("", "wrong"):
        panel.admin_key.value = typed
        panel.stage_buttons["Staging"].click()
        panel.confirm_yes.click()
        assert "admin key" in status_of(panel)
        assert registry.get_version(ROUTER, "1", admin_key.store).stage == "Production"
    panel.admin_key.value = "s3cret"
    try:
        panel.confirm_yes.click()
        assert registry.get_version(ROUTER, "1", admin_key.store).stage == "Staging"
    finally:
        registry.promote(ROUTER, "1", "Production", admin_key.store)


# --- export ------------------------------------------------------------------------------------


def test_export_panel_filters_counts_downloads_and_converts(rt: Runtime) -> None:
    p = flywheel.predict(JOKES, {"topic": "export me"}, runtime=rt)
    flywheel.submit_feedback(
        p.trace_id, "thumbs_down", corrected_output={"joke": "fixed"}, comment="c", runtime=rt
    )
    panel = export_panel(JOKES)
    assert isinstance(panel, ExportPanel)
    everything = flywheel.export_rows(JOKES, runtime=rt)
    assert len(panel.rows) == len(everything) and f"<b>{len(everything)}</b> rows" in panel.counts.value
    row = next(r for r in panel.rows if r["trace_id"] == p.trace_id)
    assert row["joke"] == "fixed" and row["topic"] == "export me"

    csv_link = find(panel, "fw-downloads").value
    data = re.search(
        r'fw-download-csv" download="[^"]+" href="data:text/csv;charset=utf-8;base64,([^"]+)"', csv_link
    )
    assert data is not None and base64.b64decode(data.group(1)).decode() == export.to_csv(panel.rows)

    panel.rating.value = "thumbs_up"
    assert panel.rows and all(r["rating"] == "thumbs_up" for r in panel.rows)
    assert p.trace_id not in {r["trace_id"] for r in panel.rows}
    examples = panel.examples()
    assert len(examples) == len(panel.rows) and set(examples[0].inputs().keys()) == {"topic"}
    assert list(panel.dataframe().columns)[:2] == ["topic", "joke"]

    panel.rating.value = "any"
    panel.start.value = date.today() + timedelta(days=2)
    assert panel.rows == [] and "No rated traces" in panel.preview.value and panel.downloads.value == ""
    panel.end.value = date.today()
    assert "fw-msg-error" in panel.status.value  # start after end: one line, no traceback


# --- empty store --------------------------------------------------------------------------------


def test_every_panel_has_a_friendly_empty_state(fresh_store: store.Store) -> None:
    reset_runtime()
    try:
        for panel in (predict_panel(), rating_panel(), models_panel(), export_panel()):
            assert "registered" in find(panel, "fw-empty").value
    finally:
        reset_runtime()
