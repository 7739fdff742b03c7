"""The pairwise panel: a shadow's answer beside the answer Production served, on the same inputs.

A is what Production answered, B what the shadow answered; the reviewer prefers A, B or
neither (tie), with the buttons or the keys A, B and T. Each choice is a
`pairwise_preference` assessment on both traces (`feedback.prefer`); no rating is
written, so a comparison never enters the export or the gate.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets

from flywheel import canary, feedback, registry
from flywheel.runtime import Runtime, get_runtime
from flywheel.ui.base import (
    CSS,
    NO_MODELS,
    SIGN_IN_REQUIRED,
    Visitor,
    badge,
    button,
    classed,
    empty_state,
    esc,
    fields_html,
    hold_name,
    html_widget,
    parse_query,
    say,
    store_error,
)

CHOICES = {"fw-prefer-a": "A", "fw-prefer-b": "B", "fw-prefer-tie": "tie"}
_KEYS_JS = """(function(img){img.remove(); if (window.__fwPairKeys) return; window.__fwPairKeys = true;
var keys = {a: 'fw-prefer-a', b: 'fw-prefer-b', t: 'fw-prefer-tie'};
document.addEventListener('keydown', function (e) {
  var t = e.target || {};
  if (t.tagName === 'TEXTAREA' || t.tagName === 'INPUT') return;
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
  var cls = keys[(e.key || '').toLowerCase()], panel = document.querySelector('.fw-pairwise-panel');
  var b = cls && panel ? panel.querySelector('button.' + cls) : null;
  if (b && !b.disabled) { e.preventDefault(); b.click(); }
}, true);})(this);"""


class PairwisePanel(widgets.VBox):
    def __init__(self, runtime: Runtime, model: str, reviewer: str) -> None:
        super().__init__()
        self.add_class("fw-panel")
        self.add_class("fw-pairwise-panel")
        self.runtime, self.model = runtime, model
        # who prefers, read on the server now (see `Visitor`): behind authentication the signed-in
        # user, whatever the Reviewer box or `?reviewer=` says
        self.visitor = Visitor.at_open(runtime.settings)
        self.reviewer = classed(widgets.Text(value=reviewer, description="Reviewer"), "fw-reviewer")
        hold_name(self.reviewer, self.visitor)
        self.identity = html_widget(self.visitor.note("the Reviewer box"), "fw-identity")
        self.card = html_widget("", "fw-pair")
        self.status = html_widget("", "fw-status")
        self.buttons = {
            cls: button(label, cls, style)
            for cls, label, style in (
                ("fw-prefer-a", "A is better", "info"),
                ("fw-prefer-tie", "Tie", ""),
                ("fw-prefer-b", "B is better", "info"),
            )
        }
        self.current: canary.ShadowPair | None = None
        keys = f'<img src="data:," alt="" style="display:none" onerror="{html.escape(_KEYS_JS, quote=True)}">'
        self.children = [
            html_widget(CSS),
            html_widget(keys, "fw-keys"),
            self.reviewer,
            self.identity,
            self.card,
            widgets.HBox(list(self.buttons.values())),
            html_widget('<div class="fw-muted">Keys: <b>A</b>, <b>B</b>, <b>T</b> (tie).</div>'),
            self.status,
        ]
        for cls, b in self.buttons.items():
            b.on_click(lambda _, choice=CHOICES[cls]: self.choose(choice))
        self.next()

    def _who(self) -> str | None:
        """The reviewer's id (None: anyone without authentication, nobody behind it)."""
        return self.visitor.writer(self.reviewer.value) or None

    def next(self) -> canary.ShadowPair | None:
        if self.visitor.writer("") is None:  # behind authentication, nobody signed in: nothing to do
            self.current = None
            for b in self.buttons.values():
                b.disabled = True
            self.card.value = f'<div class="fw-muted">{esc(SIGN_IN_REQUIRED)}</div>'
            return None
        pairs = canary.shadow_pairs(self.runtime, self.model, self._who(), limit=1)
        self.current = pairs[0] if pairs else None
        for b in self.buttons.values():
            b.disabled = self.current is None
        if self.current is None:
            self.card.value = '<div class="fw-muted">No shadow answers waiting for a comparison.</div>'
            return None
        p = self.current
        self.card.value = (
            f'<div class="fw-card" data-a="{esc(p.a_trace)}" data-b="{esc(p.b_trace)}">'
            f'<div class="fw-title">Inputs</div>{fields_html(p.inputs)}'
            '<div class="fw-pair-sides">'
            f'<div class="fw-side-a"><div class="fw-title">A {badge("v" + p.a_version)}</div>'
            f"{fields_html(p.a_outputs)}</div>"
            f'<div class="fw-side-b"><div class="fw-title">B {badge("v" + p.b_version)}</div>'
            f"{fields_html(p.b_outputs)}</div></div></div>"
        )
        return p

    def choose(self, preferred: str) -> list[str] | None:
        if self.visitor.writer("") is None:
            say(self.status, "error", SIGN_IN_REQUIRED)
            return None
        if self.current is None:
            say(self.status, "error", "Nothing to compare.")
            return None
        p = self.current
        try:
            ids = feedback.prefer(self.runtime, p.a_trace, p.b_trace, preferred, user_id=self._who())
        except Exception as exc:
            say(self.status, "error", str(exc))
            return None
        self.runtime.outbox.flush(timeout=10)  # so the next pair is not this one again
        say(self.status, "ok", f"Saved: {'tie' if preferred == 'tie' else preferred + ' is better'}.")
        self.next()
        return ids


def pairwise_panel(
    query_string: str = "",
    *,
    model: str | None = None,
    reviewer: str = "",
    runtime: Runtime | None = None,
) -> Any:
    """A/B review of a model's shadow answers against the answers Production served.

    `query_string` (Voila's QUERY_STRING) may choose the model and the reviewer
    (`?model=joke-generator&reviewer=alice`; the reviewer is ignored behind authentication: see
    `Visitor`); without a model, the first registered one.
    """
    try:
        query = parse_query(query_string)
        runtime = runtime or get_runtime()
        model = query.get("model", model)
        if model is None:
            models = registry.list_models(runtime.store)
            if not models:
                return widgets.VBox([html_widget(CSS), empty_state(NO_MODELS)])
            model = models[0].name
        return PairwisePanel(runtime, model, query.get("reviewer", reviewer))
    except Exception as exc:
        return store_error(exc)
