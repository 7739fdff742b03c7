"""Widget panels for the notebooks and the Voila dashboards.

Each builder is a plain function returning an ipywidgets container whose
controls are also attributes (so notebooks and tests drive them from code)
and carry stable `fw-*` CSS classes (so browser tests and the keyboard
shortcuts find them). Notebooks and dashboards only call these.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import ipywidgets as widgets

from flywheel.review import ReviewQueue
from flywheel.runtime import Runtime, get_runtime
from flywheel.ui.base import (
    CSS,
    button,
    esc,
    fields_html,
    find,
    guarded,
    html_widget,
    nowrap,
    parse_query,
    say,
    stored_feedback,
    table,
    trace_link,
    trace_url,
)
from flywheel.ui.export import ExportPanel, export_panel
from flywheel.ui.models import ModelsPanel, models_panel, rating_stats, trend_png
from flywheel.ui.pairwise import PairwisePanel, pairwise_panel
from flywheel.ui.predict import PredictPanel, predict_panel
from flywheel.ui.review import RatingPanel, rating_panel, rating_panel_ahead

T = TypeVar("T")

__all__ = [
    "ExportPanel",
    "ModelsPanel",
    "PairwisePanel",
    "PredictPanel",
    "RatingPanel",
    "ReviewQueue",
    "ServerProbe",
    "export_panel",
    "find",
    "models_panel",
    "pairwise_panel",
    "parse_query",
    "predict_panel",
    "prediction_card",
    "rating_panel",
    "rating_panel_ahead",
    "rating_stats",
    "server_probe",
    "stored_feedback",
    "trace_url",
    "trend_png",
    "warm_up",
]


READY_LINE = "flywheel: dashboard kernel warm"


def warm_up(build: Callable[[], T] | None = None) -> T | None:
    """What a dashboard does before its request comes (Voila's preheated kernels run the notebook up
    to `voila.utils.wait_for_request()`): MLflow, DSPy and the widgets are imported by now, and this
    opens the store and reads the registry once, so the page only draws its panel after the request.
    `build` (say, `rating_panel_ahead`) makes the page's widgets now too; its result is returned.
    Reads nothing of the request: the query string and headers are not there yet."""
    import sys

    from flywheel.ui.base import model_names

    try:
        model_names(get_runtime())
    except Exception:  # a store that cannot be opened: the panel says so after the request
        pass
    built = build() if build is not None else None
    # to the kernel's own stderr (Voila's log), never into the page: `flywheel up` and the page
    # benchmark count these lines to know the preheated kernels are warm, not just started
    print(READY_LINE, file=sys.__stderr__, flush=True)
    return built


def prediction_card(response: dict[str, Any], *, runtime: Runtime | None = None) -> widgets.HTML:
    """A POST /predict answer as a card: result, version, latency and the trace linked to the MLflow UI."""
    runtime = runtime or get_runtime()
    trace_id = str(response.get("trace_id", ""))
    body = (
        f'<div class="fw-card">{fields_html(response.get("result") or {})}'
        f'<div class="fw-muted">version {esc(response.get("model_version"))} · '
        f"{float(response.get('latency_ms') or 0):.0f} ms · trace {trace_link(trace_id, runtime)}</div></div>"
    )
    return html_widget(CSS + body, "fw-prediction")


class ServerProbe(widgets.VBox):
    """Asks a running API the same question on each click and logs which version answered."""

    def __init__(self, url: str, model: str, inputs: dict[str, Any], api_key: str | None) -> None:
        super().__init__()
        self.add_class("fw-panel")
        self.add_class("fw-probe")
        self.url, self.model, self.inputs, self.api_key = url.rstrip("/"), model, inputs, api_key
        self.answers: list[dict[str, Any]] = []
        self.ask_button = button("Ask the server", "fw-probe-ask", "primary", icon="refresh")
        self.answers_table = html_widget("", "fw-probe-log")
        self.status = html_widget("", "fw-status")
        self.children = [html_widget(CSS), self.ask_button, self.answers_table, self.status]
        self.ask_button.on_click(guarded(self.status)(lambda _: self.ask()))

    def ask(self) -> dict[str, Any]:
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        body = {"model": self.model, "inputs": self.inputs}
        r = httpx.post(f"{self.url}/predict", json=body, headers=headers, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"the server answered {r.status_code}: {r.text[:200]}")
        answer = {**r.json(), "at": datetime.now(UTC).strftime("%H:%M:%S")}
        self.answers.append(answer)
        rows = [
            [esc(a["at"]), f"<b>v{esc(a['model_version'])}</b>", nowrap(esc(a["trace_id"])), esc(a["result"])]
            for a in reversed(self.answers)
        ]
        self.answers_table.value = table(["asked", "version served", "trace", "result"], rows)
        say(self.status, "ok", f"{self.url} served {self.model} v{answer['model_version']}.")
        return answer


def server_probe(url: str, model: str, inputs: dict[str, Any], *, api_key: str | None = None) -> ServerProbe:
    """A button that predicts over HTTP, to watch the live server switch versions after a promotion."""
    return ServerProbe(url, model, inputs, api_key)
