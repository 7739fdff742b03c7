"""The predict dashboard in a real browser: the answer's text grows as the LM writes it.

Voila serves dashboards/predict.ipynb over a seeded temp store; its kernel's LM is
tests/stream_lms.py's stand-in (the offline LM's answers, a pause before each few-word
delta), so the page can be watched while the text arrives. Debian's Chromium through
Playwright, as in test_dashboards.py.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_dashboards import LOAD, assert_clean, browser, open_page, ratings  # noqa: F401  # browser: the fixture

from flywheel.demo.seed import seed_demo
from flywheel.runtime import get_runtime
from flywheel.store import Store
from flywheel.ui.dashboards import Launched, free_port, launch

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parent.parent
PACE = "0.3"  # seconds before each delta of the kernel's LM
JOKE = "My cat sits on my keyboard because it wants to keep an eye on the mouse."

WATCH = """() => {
    window.fwSeen = [];
    const box = document.querySelector('.fw-result');
    new MutationObserver(() => {
        const value = box.querySelector('.fw-value');
        window.fwSeen.push([performance.now(), value ? value.textContent : '']);
    }).observe(box, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def paced_store(tmp_path_factory: pytest.TempPathFactory, make_module_store: Callable[..., Store]) -> Store:
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    store = make_module_store(
        tmp_path_factory.mktemp("paced") / "home",
        FLYWHEEL_LM="py:stream_lms:stand_in",  # the kernels get it (and the pace) from the environment
        STREAM_TEST_PACE=PACE,
        PYTHONPATH=path.rstrip(os.pathsep),
    )
    seed_demo(store, progress=lambda line: None)
    return store


@pytest.fixture(scope="module")
def voila(paced_store: Store) -> Iterator[Launched]:
    launched = launch(port=free_port(0), open_api=False, block=False, echo=lambda line: None)
    try:
        yield launched
    finally:
        launched.stop()


def test_the_predict_panel_shows_the_answer_growing_then_rates_it(
    voila: Launched,
    browser: Any,  # noqa: F811
) -> None:
    page = open_page(browser, f"{voila.urls['predict.ipynb']}?model=joke-generator&version=2&user=ann")
    page.wait_for_selector(".fw-input-topic textarea", timeout=LOAD)
    assert_clean(page)
    page.fill(".fw-input-topic textarea", "cat")
    page.evaluate(WATCH)
    page.click("button.fw-predict")
    page.wait_for_selector(".fw-status:has-text('Predicted with version 2')", timeout=LOAD)

    seen = [(at, text) for at, text in page.evaluate("window.fwSeen") if text]
    texts = [text for _, text in seen]
    assert texts[-1] == JOKE
    growing = list(dict.fromkeys(texts))  # each distinct text, in the order shown
    assert len(growing) >= 4, growing
    assert all(JOKE.startswith(t) for t in growing), growing  # every step a prefix of the answer
    assert [len(t) for t in growing] == sorted(len(t) for t in growing)  # only ever longer
    assert seen[-1][0] - seen[0][0] > 1000 * float(PACE) * 2, seen  # over time, not all at once

    result = page.inner_html(".fw-result")
    trace_id = re.search(r"tr-[0-9a-f]{32}", result)
    assert trace_id and "selectedEvaluationId=" + trace_id.group(0) in result
    assert page.input_value(".fw-correction-joke textarea") == JOKE  # pre-filled, as without streaming
    page.click("button.fw-rate-up")
    page.click("button.fw-submit")
    page.wait_for_selector(".fw-status:has-text('Feedback saved as ann')")
    assert_clean(page)
    got = ratings(get_runtime(), trace_id.group(0))
    assert [(a.value, a.source.source_id) for a in got["user_rating"]] == [("thumbs_up", "ann")]
    page.close()
