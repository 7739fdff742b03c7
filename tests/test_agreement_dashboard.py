"""The agreement view of the models dashboard in a real browser (Voila + Debian's Chromium): the kappa
it shows equals `flywheel.agreement_report`'s for the same answers. Takes the README's screenshot
(docs/screenshots/agreement.png with FLYWHEEL_REFRESH_DOCS=1)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_dashboards import (  # the browser, page and screenshot helpers of the dashboard tests
    LOAD,
    assert_clean,
    browser,  # noqa: F401 (a fixture)
    open_page,
    reset,
    screenshots,  # noqa: F401 (a fixture)
)

import flywheel
from flywheel import review, store
from flywheel.demo.seed import seed_demo
from flywheel.runtime import Runtime, get_runtime
from flywheel.ui.dashboards import Launched, free_port, launch
from flywheel.ui.models import fmt_stat

pytestmark = [pytest.mark.slow, pytest.mark.browser]

JOKES = "joke-generator"
UP, DOWN = "thumbs_up", "thumbs_down"
# (ann, ben, cid) per item
ANSWERS = [(UP, UP, UP), (UP, DOWN, UP), (DOWN, DOWN, DOWN), (DOWN, UP, UP), (UP, UP, DOWN), (UP, UP, UP)]
FUNNY = [(4, 4, 5), (2, 3, 2), (1, 1, 1), (3, 5, 4), (4, 3, 2), (5, 5, 5)]


@pytest.fixture(scope="module")
def agree_store(module_store: store.Store) -> Iterator[Runtime]:
    seed_demo(module_store, progress=lambda line: None)
    rt = get_runtime()
    review.define_label(module_store, JOKES, "funny", "numeric", minimum=1, maximum=5)
    topics = ["cats", "coffee", "mondays", "pizza", "robots", "trains"]
    ids = [flywheel.predict(JOKES, {"topic": t}, runtime=rt).trace_id for t in topics]
    assert rt.outbox.flush(timeout=30)
    queue = review.create_queue(module_store, JOKES, ["ann", "ben", "cid"], k=3, name="team", backlog=False)
    review.assign(module_store, queue, ids)
    for r, who in enumerate(("ann", "ben", "cid")):
        q = review.ReviewQueue(rt, JOKES, reviewer=who, queue="team")
        item = q.next()
        while item is not None:
            i = ids.index(item.trace_id)
            q.rate(ANSWERS[i][r], answers={"funny": FUNNY[i][r]})
            item = q.current
    assert rt.outbox.flush(timeout=30)
    yield rt
    reset()


@pytest.fixture(scope="module")
def voila(agree_store: Runtime) -> Iterator[Launched]:
    launched = launch(port=free_port(0), open_api=True, api_port=0, block=False, echo=lambda line: None)
    try:
        yield launched
    finally:
        launched.stop()


def test_dashboard_kappa_equals_the_functions(
    voila: Launched,
    browser: Any,  # noqa: F811
    agree_store: Runtime,
    screenshots: Path,  # noqa: F811
) -> None:
    report = flywheel.agreement_report(JOKES, queue="team", runtime=agree_store)
    page = open_page(browser, voila.urls["models.ipynb"] + f"?model={JOKES}", height=2600)  # one screen
    page.wait_for_selector(".fw-agreement", timeout=LOAD)
    page.select_option(".fw-agree-queue select", label="team")
    page.wait_for_selector(".fw-kappa[data-pair='ann / ben']")
    for label in ("user_rating", f"{JOKES}:funny"):
        page.select_option(".fw-agree-label select", label=label)
        page.wait_for_selector(f".fw-agreement-summary:has-text('{label} (')")
        lab = report[label]
        shown = {
            el.get_attribute("data-pair"): el.inner_text() for el in page.query_selector_all(".fw-kappa")
        }
        expected = {f"{p.a} / {p.b}": fmt_stat(p.kappa) for p in lab.pairs}
        expected |= {f"{r.reviewer} / consensus": fmt_stat(r.kappa) for r in lab.vs_consensus}
        assert shown == expected
        assert page.inner_text(".fw-fleiss") == fmt_stat(lab.fleiss_kappa)
        assert page.inner_text(".fw-alpha") == fmt_stat(lab.krippendorff_alpha)
    rating = report["user_rating"]
    assert fmt_stat(rating.pair("ann", "cid").kappa) == "0.250"  # by hand: p_o 2/3, p_e 5/9
    page.select_option(".fw-agree-label select", label="user_rating")
    page.wait_for_selector(".fw-agreement-summary:has-text('user_rating (')")
    page.wait_for_function("() => document.querySelector('img.fw-agreement-plot')?.naturalHeight > 0")
    assert "team" in page.inner_text(".fw-review-progress")
    assert_clean(page)
    top = page.locator(".fw-title:has-text('Reviewer agreement')").bounding_box()
    end = page.locator(".fw-review-progress").bounding_box()
    page.screenshot(
        path=str(screenshots / "agreement.png"),
        clip={"x": 0, "y": top["y"] - 8, "width": 1100, "height": end["y"] + end["height"] - top["y"] + 16},
    )
    page.close()
