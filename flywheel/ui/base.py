"""Shared pieces of the widget panels: HTML snippets, status lines, error guards, choices.

Every handler runs behind `guarded`, so a failure shows one friendly line in
the panel instead of a traceback (Voila must never show one).
"""

from __future__ import annotations

import asyncio
import functools
import html
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs

import ipywidgets as widgets
from ipywidgets.widgets.widget_description import DescriptionStyle
from ipywidgets.widgets.widget_string import HTMLStyle, TextStyle

from flywheel import registry
from flywheel.config import Settings, signed_in_user
from flywheel.errors import FlywheelError

if TYPE_CHECKING:
    from flywheel.runtime import Runtime

log = logging.getLogger("flywheel.ui.widgets")
F = TypeVar("F", bound=Callable[..., Any])

CSS = """<style>
.fw-panel {max-width: 920px; gap: 6px;}
.fw-card {border: 1px solid #d9dde3; border-radius: 8px; padding: 10px 16px; background: #fbfcfd;}
.fw-title {font-size: 18px; font-weight: 600; margin: 4px 0;}
.fw-muted {color: #667085; font-size: 12px;}
.fw-field {color: #667085; font-size: 11px; text-transform: uppercase; letter-spacing: .04em;
  margin-top: 6px;}
.fw-value {white-space: pre-wrap; font-size: 14px; line-height: 1.45; overflow-wrap: anywhere;}
.fw-long {max-width: 72ch;}
.fw-list {white-space: normal; margin: 2px 0; padding-left: 22px;}
.fw-json {font-size: 12px; background: #f5f6f8; padding: 6px 8px; border-radius: 4px; margin: 2px 0;
  white-space: pre-wrap; max-height: 24em; overflow: auto;}
.fw-scalar {font-variant-numeric: tabular-nums;}
.fw-legend {font-size: 12px; color: #475467; margin-top: 6px;}
.fw-legend kbd {display: inline-block; min-width: 1.4em; padding: 0 5px; border: 1px solid #d0d5dd;
  border-bottom-width: 2px; border-radius: 4px; background: #fff; font: 12px/1.5 monospace;
  text-align: center; margin-right: 3px;}
.fw-legend span {margin-right: 14px; white-space: nowrap;}
.fw-badge {display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px; background: #eef0f3;
  color: #344054; margin-right: 4px;}
.fw-badge-Production {background: #d1fadf; color: #05603a;}
.fw-badge-Staging {background: #fef0c7; color: #93370d;}
.fw-badge-Archived {background: #f2f4f7; color: #667085;}
.fw-table {border-collapse: collapse; font-size: 13px; margin: 4px 0;}
.fw-table th {text-align: left; color: #475467; font-weight: 600; border-bottom: 2px solid #d0d5dd;
  padding: 4px 10px; white-space: nowrap;}
.fw-table td {padding: 4px 10px; border-bottom: 1px solid #eaecf0; vertical-align: top;}
.fw-msg-ok {color: #05603a;} .fw-msg-error {color: #b42318;} .fw-msg-info {color: #475467;}
.fw-nowrap {white-space: nowrap;}
.fw-trace-link {color: #175cd3; text-decoration: underline;}
.fw-lm-saw {margin-top: 8px; font-size: 13px;}
.fw-lm-saw summary {cursor: pointer; color: #344054; font-weight: 600;}
.fw-lm-call {border-left: 3px solid #d0d5dd; padding: 2px 10px; margin: 8px 0;}
.fw-lm-message pre, .fw-lm-response pre {white-space: pre-wrap; margin: 2px 0 6px; font-size: 12px;
  background: #f5f6f8; padding: 6px 8px; border-radius: 4px; max-height: 24em; overflow: auto;}
.fw-role {color: #475467; font-size: 11px; text-transform: uppercase; letter-spacing: .04em;}
.fw-empty-state {padding: 18px; border: 1px dashed #d0d5dd; border-radius: 8px; color: #475467;}
</style>"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def fmt_value(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def text_of(value: Any) -> str:
    """An output field as the text a correction box starts from."""
    return value if isinstance(value, str) else "" if value is None else str(value)


def nowrap(html_text: str) -> str:
    return f'<span class="fw-nowrap">{html_text}</span>'


def fmt_time(value: datetime | int | float | None) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value / 1000, tz=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def badge(text: str) -> str:
    return f'<span class="fw-badge fw-badge-{esc(text)}">{esc(text)}</span>'


def table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """An HTML table; cells are HTML already (escape user text before)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="fw-table {cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


LONG_TEXT = 80  # characters: a longer text (or one with line breaks) is a wrapped block


def _as_json(text: str) -> Any:
    """A string that is a JSON object or array, parsed; None otherwise (a program's output field
    typed `dict` or `list` may arrive as its JSON text)."""
    stripped = text.strip()
    if not stripped or stripped[0] not in "[{":
        return None
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    return value if isinstance(value, (dict, list)) else None


def value_html(value: Any) -> str:
    """One field's value as the program typed it, HTML-escaped: long text wraps (line breaks kept),
    a list of scalars becomes a list, an object (or a list of objects, or JSON text of either) is
    pretty-printed JSON, a number or a boolean stays a short value."""
    if isinstance(value, str):
        parsed = _as_json(value)
        if parsed is not None:
            return value_html(parsed)
        cls = "fw-text fw-long" if len(value) > LONG_TEXT or "\n" in value else "fw-text"
        return f'<div class="fw-value {cls}">{esc(value)}</div>'
    if isinstance(value, (list, tuple)) and all(
        v is None or isinstance(v, (str, int, float, bool)) for v in value
    ):
        if not value:
            return '<div class="fw-value fw-muted">(empty list)</div>'
        items = "".join(f"<li>{esc(fmt_value(v))}</li>" for v in value)
        return f'<ol class="fw-value fw-list">{items}</ol>'
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
        return f'<pre class="fw-value fw-json">{esc(text)}</pre>'
    if value is None:
        return '<div class="fw-value fw-muted">(none)</div>'
    return f'<div class="fw-value fw-scalar">{esc(fmt_value(value))}</div>'


def fields_html(values: dict[str, Any]) -> str:
    """A program's fields (inputs or outputs) by name, each rendered by its type (`value_html`)."""
    return "".join(f'<div class="fw-field">{esc(k)}</div>{value_html(v)}' for k, v in values.items())


def empty_state(message: str, cls: str = "fw-empty") -> widgets.HTML:
    return html_widget(f'<div class="fw-empty-state">{message}</div>', cls)


NO_MODELS = "No models registered yet: run <code>flywheel demo</code> or register a program."


def store_error(exc: BaseException) -> widgets.VBox:
    """What a panel shows instead of itself when the store cannot be opened."""
    return widgets.VBox(
        [html_widget(CSS), empty_state(f"Cannot open the flywheel store: {esc(friendly(exc))}")]
    )


def html_widget(value: str = "", *classes: str, looks: Looks | None = None) -> widgets.HTML:
    w = widgets.HTML(value, **(looks.html if looks else {}))
    for c in classes:
        w.add_class(c)
    return w


def button(
    description: str,
    cls: str,
    style: str = "",
    tooltip: str = "",
    icon: str = "",
    looks: Looks | None = None,
) -> widgets.Button:
    b = widgets.Button(
        description=description,
        button_style=style,
        tooltip=tooltip,
        icon=icon,
        **(looks.button if looks else {}),
    )
    b.add_class(cls)
    return b


class Looks:
    """A layout and a style per kind of widget, shared by the widgets of a panel that never change
    their own (`Looks().html` etc. are keyword arguments for the widget).

    Why: each ipywidget comes with a Layout and a style model of its own, and in Voila every model
    is sent to the page and built there before anything is drawn. The rating page had 95 models,
    62 of them layouts and styles; it has 42. A widget whose layout is changed later (shown and
    hidden) keeps its own."""

    def __init__(self) -> None:
        self.layout = widgets.Layout()
        self.wide = widgets.Layout(width="100%")
        self.html = {"layout": self.layout, "style": HTMLStyle()}
        self.button = {"layout": self.layout, "style": widgets.ButtonStyle()}
        self.choice = {"layout": self.layout, "style": DescriptionStyle()}
        self.text = {"layout": self.layout, "style": TextStyle()}
        self.wide_text = {"layout": self.wide, "style": self.text["style"]}
        self.toggles = {"layout": self.layout, "style": widgets.ToggleButtonsStyle(button_width="auto")}
        self.box = {"layout": self.layout}


def classed(widget: widgets.Widget, *classes: str) -> Any:
    for c in classes:
        widget.add_class(c)
    return widget


def say(status: widgets.HTML, kind: str, message: str) -> None:
    """Show one line in a panel's status area; kind is ok, error or info."""
    status.value = f'<div class="fw-msg-{kind}">{esc(message)}</div>'


def friendly(exc: BaseException) -> str:
    """One line for a person: a FlywheelError's own message (written for people in errors.py);
    anything else is unexpected, so its kind is named too."""
    if isinstance(exc, FlywheelError) and str(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def guarded(status: widgets.HTML) -> Callable[[F], F]:
    """Catch any error of a handler and show it in `status` instead of a traceback."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                log.debug("widget handler %s failed", fn.__name__, exc_info=True)  # never into a cell
                say(status, "error", friendly(exc))
                return None

        return inner  # type: ignore[return-value]

    return wrap


def after_cell(fn: Callable[[], None]) -> None:
    """Run `fn` just after the running cell has finished, on the kernel's event loop (at once
    where no loop runs: a plain script).

    Why: Voila sends the end of a page, the scripts that draw its widgets, only when the last
    cell has finished, and the browser then takes about a second to load them and connect to the
    kernel. Work deferred here overlaps that second instead of coming before it. The page cannot
    see it half done: `fn` holds the kernel's loop, so the page's request for the widgets' state
    is answered after `fn` returns."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        fn()
        return
    loop.call_soon(fn)


def find(root: widgets.Widget, cls: str) -> Any:
    """The first widget under `root` carrying CSS class `cls` (for tests and notebooks)."""
    stack = [root]
    while stack:
        w = stack.pop(0)
        if cls in getattr(w, "_dom_classes", ()):
            return w
        stack.extend(getattr(w, "children", ()))
    raise LookupError(f"no widget with class {cls!r}")


# --- MLflow links and stored feedback -------------------------------------------------------


def trace_url(trace_id: str, runtime: Runtime) -> str:
    ui, exp = runtime.settings.mlflow_ui_url.rstrip("/"), runtime.store.experiment_id
    return f"{ui}/#/experiments/{exp}/traces?selectedEvaluationId={trace_id}"


def trace_link(trace_id: str, runtime: Runtime) -> str:
    url = esc(trace_url(trace_id, runtime))
    return f'<a class="fw-trace-link" href="{url}" target="_blank" rel="noopener">{esc(trace_id)}</a>'


def lm_saw_html(steps: Sequence[Any]) -> str:
    """The collapsed "what the LM saw" section of a prediction's card, from its call tree
    (`calltree.steps`): every step with its time, then each LM call's messages, response and
    tokens. Everything shown is escaped: prompts and answers are user and model text."""
    if not steps:
        return ""
    calls = [s for s in steps if s.is_lm]
    tokens = sum(int((s.tokens or {}).get("total_tokens") or 0) for s in calls)
    summary = f"What the LM saw · {len(calls)} LM call{'s' * (len(calls) != 1)}"
    summary += f" · {tokens} tokens" if tokens else ""
    rows = [
        [
            f'<span style="padding-left:{14 * s.depth}px">{esc(s.name)}</span>',
            esc(s.kind),
            nowrap(f"{s.duration_ms:.1f} ms"),
            f'<span class="fw-msg-error">{esc(s.error)}</span>' if s.error else "",
        ]
        for s in steps
    ]
    parts = [table(["step", "type", "time", ""], rows, "fw-steps")]
    for n, call in enumerate(calls, start=1):
        used = call.tokens or {}
        figures = (
            f" · {used.get('input_tokens', 0)} in / {used.get('output_tokens', 0)} out tokens" if used else ""
        )
        messages = "".join(
            f'<div class="fw-lm-message"><span class="fw-role">{esc(m.get("role"))}</span>'
            f"<pre>{esc(text_of(m.get('content')))}</pre></div>"
            for m in call.messages or []
            if isinstance(m, dict)
        )
        response = call.response
        if isinstance(response, list) and len(response) == 1:
            response = response[0]
        parts.append(
            f'<div class="fw-lm-call"><div class="fw-muted">LM call {n} · {esc(call.name)} · '
            f"{call.duration_ms:.1f} ms{esc(figures)}</div>{messages}"
            f'<div class="fw-lm-response"><span class="fw-role">response</span>'
            f"<pre>{esc(text_of(response) if response is not None else call.error or '')}</pre></div></div>"
        )
    return f'<details class="fw-lm-saw"><summary>{esc(summary)}</summary>{"".join(parts)}</details>'


def stored_feedback(trace_id: str, runtime: Runtime) -> list[dict[str, Any]]:
    """The valid assessments MLflow holds for a trace, oldest first (what a panel shows as stored)."""
    from flywheel.feedback import assessment_value

    info = runtime.store.tracking.get_trace_info(trace_id)
    rows = []
    for a in sorted(info.assessments or [], key=lambda a: a.create_time_ms or 0):
        if a.valid is False:
            continue
        rows.append(
            {
                "name": a.name,
                "value": assessment_value(a),
                "source": str(getattr(a.source, "source_type", "")).rsplit(".", 1)[-1],
                "user_id": getattr(a.source, "source_id", None),
                "time": fmt_time(a.create_time_ms),
            }
        )
    return rows


def feedback_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<div class="fw-muted">Nothing stored in MLflow for this trace yet.</div>'
    cells = [
        [esc(r["name"]), esc(fmt_value(r["value"])), esc(r["source"]), esc(r["user_id"]), esc(r["time"])]
        for r in rows
    ]
    return table(["assessment", "value", "source", "user", "stored (UTC)"], cells, "fw-stored-table")


def parse_query(query_string: str) -> dict[str, str]:
    """`reviewer` (or `user`), `model` and `version` from a Voila page's query string."""
    values = {k: v[-1] for k, v in parse_qs(query_string.lstrip("?")).items() if v}
    if "user" in values and "reviewer" not in values:
        values["reviewer"] = values["user"]
    return values


# --- who writes -----------------------------------------------------------------------------

SIGN_IN_REQUIRED = (
    "Sign-in required: this dashboard takes your name from the signed-in user, and no user came "
    "with this page, so nothing is saved."
)


class Visitor:
    """Who a dashboard page writes as, read once on the server when the page opens
    (`Visitor.at_open`) and kept in the panel.

    Behind authentication (FLYWHEEL_REVIEWER_HEADER, or a JupyterHub kernel's JUPYTERHUB_USER;
    see `config.signed_in_user`) that is the signed-in user from the kernel's environment, as
    Voila hands it over with the request. Nothing the browser sends changes it: a name box is
    only a display (a `disabled` widget is disabled in the browser alone: the page can remove the
    attribute and send any value), and `?reviewer=` / `?user=` are ignored. When a header is
    configured and none came, nobody is signed in and the page writes nothing. Without
    authentication the name typed in the page is used, and the page says so."""

    def __init__(self, signed_in: str | None) -> None:
        self.signed_in = signed_in  # None: no authentication; "": configured, nobody signed in

    @classmethod
    def at_open(cls, settings: Settings) -> Visitor:
        return cls(signed_in_user(settings))

    @property
    def locked(self) -> bool:
        """Authentication is configured: the page's name box is a display only."""
        return self.signed_in is not None

    def writer(self, typed: str | None) -> str | None:
        """The user id a write is made as: the signed-in user behind authentication (`typed`, what
        the page sent, is ignored), else the typed name; None when nobody is signed in."""
        if self.signed_in is None:
            return (typed or "").strip()
        return self.signed_in or None

    def shown_name(self, typed: str) -> str:
        """What the page's name box shows: the signed-in user (empty when nobody), else `typed`."""
        return typed if self.signed_in is None else self.signed_in

    def note(self, typed_into: str = "the name box") -> str:
        """One line on who the page writes as (CSS classes fw-no-auth / fw-not-signed-in / fw-signed-in)."""
        if self.signed_in is None:
            return (
                '<div class="fw-muted fw-no-auth">No authentication is configured: what you save is '
                f"recorded under the name typed in {esc(typed_into)}.</div>"
            )
        if not self.signed_in:
            return f'<div class="fw-msg fw-msg-error fw-not-signed-in">{esc(SIGN_IN_REQUIRED)}</div>'
        return f'<div class="fw-muted fw-signed-in">Signed in as <b>{esc(self.signed_in)}</b>.</div>'


def hold_name(box: widgets.Text, visitor: Visitor) -> None:
    """Show the signed-in user in `box` and put it back whenever the page changes it (the page
    can: see `Visitor`); the value is never read for a write behind authentication."""
    if not visitor.locked:
        return
    box.disabled = True
    box.value = visitor.shown_name("")

    def back(change: dict[str, Any]) -> None:
        if change["new"] != visitor.shown_name(""):
            box.value = visitor.shown_name("")

    box.observe(back, names="value")


# --- choices --------------------------------------------------------------------------------


def model_names(runtime: Runtime) -> list[str]:
    return [m.name for m in registry.list_models(runtime.store)]


def ref_options(versions: list[registry.VersionInfo]) -> list[tuple[str, str]]:
    """Dropdown choices naming versions the way users do: stages, aliases, then numbers."""
    options: list[tuple[str, str]] = []
    for stage in ("Production", "Staging"):
        holder = next((v for v in versions if v.stage == stage or stage in v.aliases), None)
        if holder is not None:
            options.append((f"{stage} (v{holder.version})", stage))
    for v in versions:
        for alias in v.aliases:
            if alias not in ("Production", "Staging"):
                options.append((f"@{alias} (v{v.version})", alias))
    options += [(f"v{v.version} · {v.stage}", v.version) for v in versions]
    return options
