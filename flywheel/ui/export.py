"""The export panel (notebook 04): filter rated traces, preview, count, download CSV / JSON.

Downloads are data: URIs in plain links, so they work in JupyterLab and Voila
alike without a file server; the rows stay on the panel for pandas and DSPy.
"""

from __future__ import annotations

import base64
from datetime import date
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from flywheel import export, registry
from flywheel.runtime import Runtime, get_runtime
from flywheel.ui.base import (
    CSS,
    NO_MODELS,
    button,
    classed,
    empty_state,
    esc,
    fmt_value,
    guarded,
    html_widget,
    model_names,
    nowrap,
    say,
    store_error,
    table,
)

if TYPE_CHECKING:
    import dspy
    import pandas as pd

PREVIEW_ROWS = 20
_MIME = {"csv": "text/csv", "json": "application/json", "jsonl": "application/x-ndjson"}


def download_link(text: str, filename: str, fmt: str) -> str:
    data = base64.b64encode(text.encode()).decode()
    return (
        f'<a class="fw-download fw-download-{fmt}" download="{esc(filename)}" '
        f'href="data:{_MIME[fmt]};charset=utf-8;base64,{data}">{esc(filename)}</a>'
    )


class ExportPanel(widgets.VBox):
    def __init__(self, runtime: Runtime, model: str | None) -> None:
        super().__init__()
        self.add_class("fw-panel")
        self.add_class("fw-export-panel")
        self.runtime = runtime
        self.rows: list[dict[str, Any]] = []
        self.status = html_widget("", "fw-status")
        names = model_names(runtime)
        if not names:
            self.children = [html_widget(CSS), empty_state(NO_MODELS)]
            return
        self.model = classed(
            widgets.Dropdown(options=names, value=model if model in names else names[0], description="Model"),
            "fw-model",
        )
        self.rating = classed(
            widgets.Dropdown(
                options=[("any rating", "any"), ("thumbs up", "thumbs_up"), ("thumbs down", "thumbs_down")],
                description="Rating",
            ),
            "fw-rating",
        )
        self.start = classed(widgets.DatePicker(description="From"), "fw-start")
        self.end = classed(widgets.DatePicker(description="To"), "fw-end")
        self.limit = classed(
            widgets.BoundedIntText(0, min=0, max=10**7, description="Limit", tooltip="0 = all"), "fw-limit"
        )
        self.refresh_button = button("Export", "fw-export", "primary", icon="download")
        self.counts = html_widget("", "fw-counts")
        self.preview = html_widget("", "fw-preview")
        self.downloads = html_widget("", "fw-downloads")
        self.children = [
            html_widget(CSS),
            widgets.HBox([self.model, self.rating]),
            widgets.HBox([self.start, self.end]),
            widgets.HBox([self.limit, self.refresh_button]),
            self.status,
            self.counts,
            self.downloads,
            self.preview,
        ]
        guard = guarded(self.status)
        for w in (self.model, self.rating, self.start, self.end, self.limit):
            w.observe(guard(lambda _: self.refresh()), names="value")
        self.refresh_button.on_click(guard(lambda _: self.refresh()))
        guard(self.refresh)()

    def refresh(self) -> list[dict[str, Any]]:
        self.rows = export.export_rows(
            self.runtime,
            self.model.value,
            rating=self.rating.value,
            start_date=self.start.value,
            end_date=self.end.value,
            limit=self.limit.value or None,
        )
        rows = self.rows
        up = sum(r["rating"] == "thumbs_up" for r in rows)
        commented = sum(bool(r.get("comment")) for r in rows)
        self.counts.value = (
            f'<div class="fw-muted"><b>{len(rows)}</b> rows · {up} thumbs up · {len(rows) - up} thumbs down'
            f" · {commented} with a comment</div>"
        )
        base = export.safe_filename(f"{self.model.value}-{self.rating.value}-{date.today():%Y%m%d}")
        links = [download_link(_text(fmt, rows), f"{base}.{fmt}", fmt) for fmt in ("csv", "json", "jsonl")]
        self.downloads.value = "Download: " + " · ".join(links) if rows else ""
        if rows:
            columns = list(rows[0])
            cells = [
                [nowrap(esc(r[c])) if c == "trace_id" else esc(fmt_value(r.get(c))) for c in columns]
                for r in rows[:PREVIEW_ROWS]
            ]
            more = len(rows) - PREVIEW_ROWS
            tail = f'<div class="fw-muted">… and {more} more rows</div>' if more > 0 else ""
            self.preview.value = table(columns, cells, "fw-preview-table") + tail
        else:
            self.preview.value = '<div class="fw-empty-state">No rated traces match these filters yet.</div>'
        say(self.status, "ok", f"{len(rows)} rows exported from {self.model.value}.")
        return rows

    def dataframe(self) -> pd.DataFrame:
        return export.to_dataframe(self.rows)

    def examples(self) -> list[dspy.Example]:
        """The rows as dspy.Examples, inputs marked from the model's current input fields."""
        info = registry.list_versions(self.model.value, self.runtime.store)
        return export.to_examples(self.rows, info[0].input_fields if info else [])


def _text(fmt: str, rows: list[dict[str, Any]]) -> str:
    return {"csv": export.to_csv, "json": export.to_json, "jsonl": export.to_jsonl}[fmt](rows)


def export_panel(model: str | None = None, *, runtime: Runtime | None = None) -> widgets.VBox:
    """Filters (model, rating, dates, limit), counts, a preview and CSV / JSON / JSONL downloads."""
    try:
        return ExportPanel(runtime or get_runtime(), model)
    except Exception as exc:
        return store_error(exc)
