"""The predict-and-rate panel (notebook 02, dashboards/predict.ipynb): choose a version, type
inputs, predict, rate, see it stored.

Predict streams (`streaming.stream`, the in-process twin of POST /predict/stream): the result
box shows each output field's text growing as the LM writes it, then the finished prediction
(version, latency, trace link) exactly as a plain prediction shows it.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from flywheel import feedback, registry, serving, streaming
from flywheel.calltree import steps
from flywheel.runtime import Runtime, get_runtime
from flywheel.ui.base import (
    CSS,
    NO_MODELS,
    SIGN_IN_REQUIRED,
    Visitor,
    button,
    classed,
    empty_state,
    esc,
    feedback_table,
    fields_html,
    guarded,
    hold_name,
    html_widget,
    lm_saw_html,
    model_names,
    parse_query,
    ref_options,
    say,
    stored_feedback,
    text_of,
    trace_link,
)

_WIDE = widgets.Layout(width="100%")


class PredictPanel(widgets.VBox):
    """A VBox whose controls are attributes, so notebooks and tests can drive it from code."""

    def __init__(self, runtime: Runtime, model: str | None, ref: str | None, user_id: str) -> None:
        super().__init__()
        self.add_class("fw-panel")
        self.add_class("fw-predict-panel")
        self.runtime = runtime
        self.prediction: serving.Prediction | None = None
        self.receipt: feedback.Receipt | None = None
        self.rating: str | None = None
        self._quiet = False
        # who the feedback is from, read on the server now (see `Visitor`): behind authentication
        # the signed-in user, whatever the "Your name" box or `?user=` says
        self.visitor = Visitor.at_open(runtime.settings)
        self.status = html_widget("", "fw-status")
        names = model_names(runtime)
        if not names:
            self.children = [
                html_widget(CSS),
                empty_state(NO_MODELS),
            ]
            return
        self.model = classed(
            widgets.Dropdown(options=names, value=model if model in names else names[0], description="Model"),
            "fw-model",
        )
        self.ref = classed(widgets.Dropdown(description="Version"), "fw-ref")
        self.inputs: dict[str, widgets.Textarea] = {}
        self.inputs_box = classed(widgets.VBox(), "fw-inputs")
        self.predict_button = button("Predict", "fw-predict", "primary", icon="play")
        self.result = html_widget("", "fw-result")
        self.up = button("Thumbs up", "fw-rate-up", icon="thumbs-up")
        self.down = button("Thumbs down", "fw-rate-down", icon="thumbs-down")
        self.corrections: dict[str, widgets.Textarea] = {}
        self.corrections_box = classed(widgets.VBox(), "fw-corrections")
        self.comment = classed(
            widgets.Textarea(placeholder="comment (optional)", layout=_WIDE, description="Comment"),
            "fw-comment",
        )
        self.user = classed(widgets.Text(value=user_id, description="Your name"), "fw-user")
        hold_name(self.user, self.visitor)
        self.identity = html_widget(self.visitor.note("the Your name box"), "fw-identity")
        self.submit_button = button("Submit feedback", "fw-submit", "success", icon="check")
        self.stored = html_widget("", "fw-stored")
        self.rate_box = classed(
            widgets.VBox(
                [
                    html_widget('<div class="fw-title">Rate it</div>'),
                    widgets.HBox([self.up, self.down]),
                    html_widget('<div class="fw-muted">Correction (edit the output if it is wrong)</div>'),
                    self.corrections_box,
                    self.comment,
                    widgets.HBox([self.user, self.submit_button]),
                    self.identity,
                    self.stored,
                ],
                layout=widgets.Layout(display="none"),
            ),
            "fw-rate-box",
        )
        self.children = [
            html_widget(CSS),
            widgets.HBox([self.model, self.ref]),
            self.inputs_box,
            self.predict_button,
            self.result,
            self.rate_box,
            self.status,
        ]
        guard = guarded(self.status)
        self.model.observe(guard(lambda _: self._load_refs(None)), names="value")
        self.ref.observe(guard(lambda _: self._quiet or self._load_inputs()), names="value")
        self.predict_button.on_click(guard(lambda _: self.do_predict()))
        self.up.on_click(guard(lambda _: self.choose("thumbs_up")))
        self.down.on_click(guard(lambda _: self.choose("thumbs_down")))
        self.submit_button.on_click(guard(lambda _: self.do_submit()))
        guard(self._load_refs)(ref)

    def _load_refs(self, wanted: str | None) -> None:
        options = ref_options(registry.list_versions(self.model.value, self.runtime.store))
        values = [v for _, v in options]
        default = self.runtime.settings.default_model_stage
        chosen = (
            wanted if wanted in values else default if default in values else values[0] if values else None
        )
        self._quiet = True
        try:
            self.ref.options = options
            self.ref.value = chosen
        finally:
            self._quiet = False
        self._load_inputs()

    def _load_inputs(self) -> None:
        if self.ref.value is None:
            self.inputs, self.inputs_box.children = {}, []
            return
        info = registry.resolve(self.model.value, self.ref.value, self.runtime.store)
        old = {k: w.value for k, w in self.inputs.items()}
        self.inputs = {
            f: classed(
                widgets.Textarea(value=old.get(f, ""), description=f, layout=_WIDE, rows=2),
                "fw-input",
                f"fw-input-{f}",
            )
            for f in info.input_fields
        }
        self.inputs_box.children = list(self.inputs.values())

    def do_predict(self) -> serving.Prediction | None:
        if self.visitor.writer("") is None:  # behind authentication with nobody signed in: no trace
            say(self.status, "error", SIGN_IN_REQUIRED)
            return None
        values = {k: w.value for k, w in self.inputs.items()}
        model, ref = self.model.value, self.ref.value
        written: dict[str, str] = {}
        answer: dict[str, Any] = {}
        say(self.status, "info", f"Predicting with {model} ({ref})…")
        for event in streaming.stream(self.runtime, model, values, ref):  # raises what predict raises
            if self.prediction is not None or self.rate_box.layout.display != "none":
                # it runs: the previous prediction is no longer the one shown (an input error keeps it)
                self.prediction, self.receipt, self.rating = None, None, None
                self.rate_box.layout.display = "none"
            if event["event"] == streaming.CHUNK:
                written[event["field"]] = written.get(event["field"], "") + event["chunk"]
                self.result.value = (
                    f'<div class="fw-card fw-streaming">{fields_html(written)}'
                    '<div class="fw-muted">writing…</div></div>'
                )
            elif event["event"] == streaming.RESULT:
                answer = event
        self.prediction = p = answer["prediction"]
        self.result.value = (
            f'<div class="fw-card">{fields_html(p.result)}<div class="fw-muted">{esc(p.model)} '
            f"v{esc(p.model_version)} · {p.latency_ms:.0f} ms · trace {trace_link(p.trace_id, self.runtime)}"
            f"</div>{lm_saw_html(steps(p.spans))}</div>"
        )
        self.corrections = {
            k: classed(
                widgets.Textarea(value=text_of(v), description=k, layout=_WIDE, rows=2),
                "fw-correction",
                f"fw-correction-{k}",
            )
            for k, v in p.result.items()
        }
        self.corrections_box.children = list(self.corrections.values())
        self.comment.value, self.stored.value = "", ""
        self._highlight()
        self.rate_box.layout.display = "flex"
        say(self.status, "ok", f"Predicted with version {p.model_version}; rate it below.")
        return p

    def choose(self, rating: str) -> None:
        self.rating = rating
        self._highlight()

    def _highlight(self) -> None:
        self.up.button_style = "success" if self.rating == "thumbs_up" else ""
        self.down.button_style = "danger" if self.rating == "thumbs_down" else ""

    def do_submit(self) -> feedback.Receipt | None:
        user_id = self.visitor.writer(self.user.value)  # behind authentication: the signed-in user
        if user_id is None:
            say(self.status, "error", SIGN_IN_REQUIRED)
            return None
        if self.prediction is None:
            say(self.status, "error", "Predict something first.")
            return None
        if self.rating is None:
            say(self.status, "error", "Choose thumbs up or thumbs down first.")
            return None
        self.receipt = feedback.submit(
            self.runtime,
            self.prediction.trace_id,
            self.rating,
            corrected_output=corrections(self.corrections, self.prediction.result),
            comment=self.comment.value,
            user_id=user_id,
        )
        delivered = self.runtime.outbox.deliver_available(max_batches=20)
        rows = stored_feedback(self.prediction.trace_id, self.runtime) if delivered else []
        note = "" if delivered else '<div class="fw-muted">Queued: MLflow is unreachable; it is kept.</div>'
        self.stored.value = '<div class="fw-title">Stored in MLflow</div>' + feedback_table(rows) + note
        say(self.status, "ok", f"Feedback saved as {self.receipt.user_id}.")
        return self.receipt


def corrections(boxes: dict[str, widgets.Textarea], original: dict[str, Any]) -> dict[str, str] | None:
    """The edited output fields only; None when nothing was changed (no correction to store)."""
    return edited({k: b.value for k, b in boxes.items()}, original)


def edited(values: dict[str, str], original: dict[str, Any]) -> dict[str, str] | None:
    """The fields of `values` (texts of an output's fields) that differ from `original`; None if none."""
    changed = {k: v for k, v in values.items() if v.strip() and v != text_of(original.get(k))}
    return changed or None


def predict_panel(
    model: str | None = None,
    ref: str | None = None,
    *,
    user_id: str = "",
    runtime: Runtime | None = None,
    query_string: str = "",
) -> PredictPanel:
    """Pick a model and version, type its inputs, predict, rate and see the stored assessments.

    `query_string` (Voila's QUERY_STRING) may set `model`, `version` and `user` (or `reviewer`;
    ignored behind authentication: see `Visitor`)."""
    q = parse_query(query_string)
    return PredictPanel(
        runtime or get_runtime(), q.get("model", model), q.get("version", ref), q.get("reviewer", user_id)
    )
