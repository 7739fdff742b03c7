"""The rating dashboard's panel: one unrated trace at a time, rate / correct / comment / skip / undo.

ipywidgets has no key events, so the shortcuts are a tiny document key
listener injected through an HTML widget (an `<img onerror>`: scripts inside
innerHTML never run, event attributes do). It is only installed in Voila,
where no notebook shortcuts (d, z, ...) compete, and it listens in the capture
phase because ipywidgets' text boxes stop key events from bubbling (Esc must
still leave them, Ctrl+Enter must still rate).

A fast reviewer must not lose what they typed: ipywidgets holds back a text
box's value while an earlier message of that box is unanswered (a busy
kernel), but a button click goes at once, so a click could reach the kernel
before the correction typed just before it. So in Voila neither a key nor a
click of the four buttons talks to the kernel directly: the listener reads the
shown trace id, the correction boxes, the comment and the reviewer from the
page (only boxes marked with the shown trace id: the card may be drawn
before that item's boxes) and sends them with the action in one message, as the JSON value of a
hidden Text widget (`fw-channel`). The reviewer it sends is a name only without authentication;
behind it the panel rates as the signed-in user it read on the server (`base.Visitor`), whatever
the page sends. That value carries the last few events with
increasing `seq` numbers (a held-back value is replaced, not queued, so a
lone event could be lost); the kernel acts on each new `seq` once, in order,
rates with the values the event carries, and ignores an event meant for an
item no longer shown (a key pressed twice before the page caught up).
Without the listener (JupyterLab, tests) the buttons work as usual.
"""

from __future__ import annotations

import atexit
import html
import json
import math
import time
from typing import Any

import ipywidgets as widgets

from flywheel import registry, review
from flywheel.review import NUMERIC, PASS_FAIL, TEXT, Label, QueueItem, ReviewQueue, list_queues
from flywheel.review import steps as review_steps
from flywheel.runtime import Runtime, get_runtime
from flywheel.ui.base import (
    CSS,
    Looks,
    Visitor,
    after_cell,
    badge,
    button,
    classed,
    empty_state,
    esc,
    fields_html,
    fmt_time,
    friendly,
    guarded,
    html_widget,
    lm_saw_html,
    log,
    model_names,
    parse_query,
    say,
    store_error,
    text_of,
    trace_link,
)
from flywheel.ui.models import progress_html
from flywheel.ui.predict import edited

ALL_VERSIONS = "all"
KEYS = {
    "u": "fw-rate-up",
    "+": "fw-rate-up",
    "d": "fw-rate-down",
    "-": "fw-rate-down",
    "s": "fw-skip",
    "z": "fw-undo",
}
ACTIONS = {"fw-rate-up": "thumbs_up", "fw-rate-down": "thumbs_down", "fw-skip": "skip", "fw-undo": "undo"}
CHOICE_KEYS = {"p": 0, "f": 1}  # pass / fail of the first pass-or-fail question
MAX_DIGIT_CHOICES = 9  # keys 1-9: the categorical questions' answers, numbered in order
SUBMIT = "fw-rate-down"  # Ctrl+Enter in a text box: a corrected output is a wrong one
CHANNEL_KEEP = 8  # events the hidden channel's value carries (the kernel acts on new ones only)
_KEY_JS = """(function(img){img.remove();
if (window.__fwKeys || (document.querySelector('.jp-LabShell') && !document.body.hasAttribute('data-voila')))
  return;
window.__fwKeys = true;
var keys = %(keys)s, actions = %(actions)s, choiceKeys = %(choice_keys)s, seq = 0;
function field(el) {
  for (var i = 0; i < el.classList.length; i++) {
    if (el.classList[i].indexOf('fw-correction-') === 0) return el.classList[i].slice(14);
  }
  return null;
}
function label(el) {
  for (var i = 0; i < el.classList.length; i++) {
    if (el.classList[i].indexOf('fw-label-') === 0) return el.classList[i].slice(9);
  }
  return null;
}
function choose(panel, key) {
  var card = panel.querySelector('.fw-item .fw-card'), trace = card ? card.getAttribute('data-trace-id') : '';
  var mine = '.fw-for-' + CSS.escape(trace || ''), b = null;
  if (/^[1-9]$/.test(key)) {
    b = panel.querySelectorAll('.fw-categorical' + mine + ' button')[parseInt(key, 10) - 1];
  } else {
    b = panel.querySelectorAll('.fw-passfail' + mine + ' button')[choiceKeys[key]];
  }
  if (!b || b.disabled) return false;
  b.click();
  return true;
}
function send(panel, cls) {
  var b = panel.querySelector('button.' + cls), box = panel.querySelector('.fw-channel input');
  if (!b || b.disabled || !box) return false;
  var card = panel.querySelector('.fw-item .fw-card'), who = panel.querySelector('.fw-reviewer input');
  var trace = card ? card.getAttribute('data-trace-id') : null, mine = '.fw-for-' + CSS.escape(trace || '');
  var note = panel.querySelector('.fw-comment' + mine + ' textarea'), fixed = null;
  panel.querySelectorAll('.fw-correction' + mine).forEach(function (w) {
    var k = field(w), t = w.querySelector('textarea');
    if (k !== null && t) { fixed = fixed || {}; fixed[k] = t.value; }
  });
  var answers = null;
  panel.querySelectorAll('.fw-label' + mine).forEach(function (w) {
    var i = label(w), t = w.querySelector('input, textarea'), on = w.querySelector('button.mod-active');
    if (i === null) return;
    if (t) { answers = answers || {}; answers[i] = t.value; }
    else if (on) { answers = answers || {}; answers[i] = on.getAttribute('title'); }
  });
  var ev = {seq: ++seq, action: actions[cls], trace: trace, correction: fixed, answers: answers,
    comment: note ? note.value : null, reviewer: who && !who.disabled ? who.value : null};
  box.__fwEvents = (box.__fwEvents || []).concat([ev]).slice(-%(keep)d);
  box.value = JSON.stringify({events: box.__fwEvents});
  box.dispatchEvent(new Event('input', {bubbles: true}));
  return true;
}
document.addEventListener('keydown', function (e) {
  var t = e.target || {}, panel;
  if (t.tagName === 'TEXTAREA' || t.tagName === 'INPUT' || t.isContentEditable) {
    if (e.key === 'Escape') { t.blur(); }
    else if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && t.closest && t.closest('.fw-editor')) {
      panel = t.closest('.fw-rating-panel');
      e.preventDefault(); e.stopPropagation();
      if (panel && !e.repeat) send(panel, '%(submit)s');
    }
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
  var key = (e.key || '').toLowerCase(), cls = keys[key];
  panel = document.querySelector('.fw-rating-panel');
  if (panel && (/^[1-9]$/.test(key) || choiceKeys[key] !== undefined)) {
    if (choose(panel, key)) e.preventDefault();
    return;
  }
  if (cls && panel && send(panel, cls)) e.preventDefault();
}, true);
document.addEventListener('click', function (e) {
  var b = e.target && e.target.closest ? e.target.closest('button') : null;
  var panel = b && b.closest('.fw-rating-panel');
  if (!panel) return;
  for (var cls in actions) {
    if (b.classList.contains(cls)) {
      if (send(panel, cls)) { e.preventDefault(); e.stopPropagation(); }
      return;
    }
  }
}, true);})(this);"""
LEGEND = [
    ("1-9", "choose the numbered answer"),
    ("P / F", "pass / fail"),
    ("U", "thumbs up"),
    ("D", "thumbs down"),
    ("S", "skip"),
    ("Z", "undo"),
    ("Ctrl+Enter", "in a text box: save thumbs down with what you typed"),
    ("Esc", "leave a text box"),
]
HELP = (
    '<div class="fw-legend"><b>Keys</b> (outside the text boxes; in a text box letters are just text): '
    + "".join(
        f"<span>{''.join(f'<kbd>{k}</kbd>' for k in key.split(' / '))} {what}</span>" for key, what in LEGEND
    )
    + " Ratings are saved to MLflow at once.</div>"
)


def key_listener_html() -> str:
    js = _KEY_JS % {
        "keys": json.dumps(KEYS),
        "actions": json.dumps(ACTIONS),
        "keep": CHANNEL_KEEP,
        "submit": SUBMIT,
        "choice_keys": json.dumps(CHOICE_KEYS),
    }
    return f'<img src="data:," alt="" style="display:none" onerror="{html.escape(js, quote=True)}">'


class RatingPanel(widgets.VBox):
    def __init__(
        self,
        runtime: Runtime,
        model: str | None,
        version: str | None,
        reviewer: str,
        queue: str = "default",
        *,
        ahead: bool = False,
    ) -> None:
        """`ahead`: build the widgets only, before the request (see `open_for`)."""
        super().__init__()
        self.add_class("fw-panel")
        self.add_class("fw-rating-panel")
        self.runtime = runtime
        self.queue: ReviewQueue | None = None
        self.looks = looks = Looks()
        self.status = html_widget("", "fw-status", looks=looks)
        names = model_names(runtime)
        self.empty = not names  # nothing to open: rating_panel builds a fresh panel for a request
        if not names:
            self.children = [
                html_widget(CSS),
                empty_state(
                    "No models are registered yet, so there is nothing to review. Run "
                    "<code>flywheel demo</code> (or register a program) and make a few predictions."
                ),
            ]
            return
        # who rates: open_for reads it on the server (the header comes with the request); behind
        # authentication the Reviewer box only shows it (see `Visitor`)
        self.visitor = Visitor(None)
        self.reviewer = classed(
            widgets.Text(
                description="Reviewer", placeholder="your name", continuous_update=False, **looks.text
            ),
            "fw-reviewer",
        )
        self.queue_choice = classed(widgets.Dropdown(description="Queue", **looks.choice), "fw-queue")
        self._wanted_queue = queue
        self.identity = html_widget("", "fw-identity", looks=looks)
        self.labels: list[Label] = []
        self.answers: list[widgets.Widget] = []
        self.answers_box = classed(widgets.VBox(**looks.box), "fw-answers")
        self.model = classed(widgets.Dropdown(options=names, description="Model", **looks.choice), "fw-model")
        self.version = classed(widgets.Dropdown(description="Version", **looks.choice), "fw-version")
        self.progress = html_widget("", "fw-progress", looks=looks)
        self.item = html_widget("", "fw-item", looks=looks)
        self.corrections: dict[str, widgets.Textarea] = {}
        self.corrections_box = classed(widgets.VBox(**looks.box), "fw-corrections")
        self.comment = self._comment_box("")
        self.comment_box = classed(widgets.VBox([self.comment], **looks.box), "fw-comments")
        self.channel = classed(widgets.Text(layout=widgets.Layout(display="none")), "fw-channel")
        self._seq = 0  # the last channel event acted on
        self._retired: list[widgets.Widget] = []
        self.up = button("Thumbs up  [U]", "fw-rate-up", "success", looks=looks)
        self.down = button("Thumbs down  [D]", "fw-rate-down", "danger", looks=looks)
        self.skip = button("Skip  [S]", "fw-skip", looks=looks)
        self.undo = button("Undo  [Z]", "fw-undo", "warning", looks=looks)
        self.editor = classed(
            widgets.VBox(
                [
                    html_widget(
                        '<div class="fw-field">correction (edit the output if it is wrong)</div>', looks=looks
                    ),
                    self.corrections_box,
                    html_widget('<div class="fw-field">comment</div>', looks=looks),
                    self.comment_box,
                    self.answers_box,
                ]
            ),
            "fw-editor",
        )
        self.children = [
            html_widget(CSS, looks=looks),
            widgets.HBox([self.reviewer, self.model, self.version, self.queue_choice], **looks.box),
            self.identity,
            self.progress,
            self.item,
            self.editor,
            classed(widgets.HBox([self.up, self.down, self.skip, self.undo], **looks.box), "fw-actions"),
            self.status,
            html_widget(HELP, "fw-help", looks=looks),
            html_widget(key_listener_html(), "fw-keys", looks=looks),
            self.channel,
        ]
        guard = guarded(self.status)
        self._quiet = False
        atexit.register(self._release)  # a closed tab's kernel exits: deliver what is left
        self.up.on_click(guard(lambda _: self.do_rate("thumbs_up")))
        self.down.on_click(guard(lambda _: self.do_rate("thumbs_down")))
        self.skip.on_click(guard(lambda _: self.do_skip()))
        self.undo.on_click(guard(lambda _: self.do_undo()))
        # _quiet: the panel sets these itself (open_for, _load_versions); one restart after them all
        self.reviewer.observe(guard(lambda _: self._quiet or self._reviewer_changed(_)), names="value")
        self.model.observe(guard(lambda _: self._quiet or self._load_versions(None)), names="value")
        self.version.observe(guard(lambda _: self._quiet or self._restart()), names="value")
        self.queue_choice.observe(guard(lambda _: self._quiet or self._restart()), names="value")
        self.channel.observe(self._on_channel, names="value")
        if not ahead:
            self.open_for(model, version, reviewer, queue, names=names)

    def open_for(
        self,
        model: str | None,
        version: str | None,
        reviewer: str,
        queue: str = "default",
        *,
        names: list[str] | None = None,
    ) -> None:
        """Point the panel at a request's model, version, reviewer and queue (every panel opens
        this way; `names`: the model list when the caller has just read it).

        A preheated Voila kernel builds the panel `ahead` of the request (in the dashboard's first
        cell): in a kernel each widget costs a message to the page, and the panel's sixty-odd
        widgets took most of a second after the request. What depends on the request is read
        here: the signed-in reviewer (its header arrives with the request), the model list, the
        versions and queues, the worklist."""
        names = names if names is not None else model_names(self.runtime)
        # behind authentication the reviewer is who signed in, never what is typed or sent
        self.visitor = Visitor.at_open(self.runtime.settings)
        self._quiet = True
        try:
            self.reviewer.disabled = self.visitor.locked
            self.reviewer.value = self.visitor.shown_name(reviewer)
            self.model.options = names
            self.model.value = model if model in names else names[0]
        finally:
            self._quiet = False
        self.identity.value = self.visitor.note("the Reviewer box")
        self._wanted_queue = queue
        guarded(self.status)(self._load_versions)(version)

    def rehearse(self) -> None:
        """Open the panel once before the request, for the first reviewer of the first model's
        queue: the request's path (MLflow's registry and queue reads, about 220 SQL statements,
        and the card's HTML) then runs on compiled statements and loaded code. The first open
        took about 0.3 s and a rehearsed one about 0.1 s (in a plain process); the page is not
        sent before it ends. Reads only what that reviewer's own page would (a new trace is
        assigned to the queue, as any host may do at any time). Then it is all forgotten: the
        request's `open_for` starts a fresh queue for whoever asked, and should that fail, the
        page shows no card and no queue of the rehearsal's reviewer (a click would have rated
        as them), nor a message it left in the status line (MLflow down at the time, say)."""
        names = list(self.model.options)
        queue = review.get_queue(self.runtime.store, names[0]) if names else None
        who = queue.reviewers[0] if queue is not None and queue.reviewers else ""
        try:
            self.open_for(names[0] if names else None, None, who, names=names)
        finally:
            self._forget()

    def _forget(self) -> None:
        """Back to the panel as built: no queue, no item, no boxes, nothing in the status line
        (the rehearsal's boxes are closed: the page would get their models for nothing)."""
        queue, self.queue = self.queue, None
        for old in [*self._retired, *self.corrections.values(), *self.answers]:
            old.close()
        self._retired, self.corrections, self.answers = [], {}, []
        self.corrections_box.children = self.answers_box.children = ()
        self.item.value = self.progress.value = self.status.value = ""
        for b in (self.up, self.down, self.skip, self.undo):
            b.disabled = True
        self.editor.layout.display = "none"
        if queue is not None:
            queue.close()

    # --- queue plumbing ------------------------------------------------------------------

    def _load_versions(self, wanted: str | None) -> None:
        versions = registry.list_versions(self.model.value, self.runtime.store)
        options = [("all versions", ALL_VERSIONS)] + [
            (f"v{v.version} · {v.stage}", v.version) for v in versions
        ]
        value = wanted if wanted in [v for _, v in options] else ALL_VERSIONS
        prefix = f"{self.model.value}/"
        queues = [q.name[len(prefix) :] for q in list_queues(self.runtime.store, self.model.value)]
        queues = queues or ["default"]
        chosen = self._wanted_queue if self._wanted_queue in queues else queues[0]
        self._quiet = True
        try:
            self.version.options, self.version.value = options, value
            self.queue_choice.options, self.queue_choice.value = queues, chosen
        finally:
            self._quiet = False
        self._restart()

    def _restart(self) -> None:
        if self.queue is not None:
            self.queue.close()
        version = None if self.version.value in (None, ALL_VERSIONS) else self.version.value
        self.queue = ReviewQueue(
            self.runtime,
            self.model.value,
            version,
            self._who(),
            self.queue_choice.value or "default",
        )
        self.labels = self.queue.extra_labels
        self.queue.next()
        self._show()

    @property
    def signed_in(self) -> str | None:
        """The signed-in reviewer read when the panel opened; None without authentication."""
        return self.visitor.signed_in

    def _who(self) -> str:
        """Who the worklist (and so every rating, skip and undo) is for: the signed-in user
        behind authentication ("" when nobody: no worklist), else the typed name."""
        return self.visitor.writer(self.reviewer.value) or ""

    def _reviewer_changed(self, _: Any) -> None:
        if self.visitor.locked:
            # the page sent another name (a tampered box): show the signed-in user again; the
            # worklist never followed the box
            if self.reviewer.value != self.visitor.shown_name(""):
                self._quiet = True
                try:
                    self.reviewer.value = self.visitor.shown_name("")
                finally:
                    self._quiet = False
            return
        self._restart()  # another reviewer: another worklist

    def _release(self) -> None:
        try:
            if self.queue is not None:
                self.queue.close()
            self.runtime.outbox.deliver_available(
                max_batches=20
            )  # a rating a locked database held back is not left for later
        except Exception:  # at exit the store may be gone already; the outbox keeps what is left
            pass

    def _q(self) -> ReviewQueue:
        if self.queue is None:
            raise RuntimeError("the review queue did not start; see the message above")
        return self.queue

    def _show_progress(self) -> None:
        q = self._q()
        p = q.progress()
        more = "+" if p.capped else ""
        why = q.why_not()
        if why is not None:
            self.progress.value = f'<div class="fw-muted fw-why">Nothing to review: {esc(why)}.</div>'
            return
        self.progress.value = (
            f'<div class="fw-muted"><b>{p.rated}{more}</b> done by all reviewers · '
            f"<b>{p.remaining}{more}</b> remaining for you "
            f"· {p.mine} by you in this session · queue {esc(q.queue.name if q.queue else '')}"
            f" (k={q.queue.k if q.queue else 0})</div>"
        )
        self.progress.value += team_html(self.runtime, q.queue)

    def _show(self, prefill: dict[str, Any] | None = None) -> None:
        q = self._q()
        item = q.current
        self._show_progress()
        for b in (self.up, self.down, self.skip):
            b.disabled = item is None
        self.undo.disabled = not q.history
        if item is None and q.why_not() is not None:
            self.item.value = (
                f'<div class="fw-empty-state fw-empty">Nothing to review: {esc(q.why_not() or "")}.</div>'
            )
            self.editor.layout.display = "none"
            return
        if item is None:
            self.item.value = (
                '<div class="fw-empty-state fw-empty">All caught up: nothing left to review for '
                f"<b>{esc(q.model)}</b>{'' if q.version is None else f' v{esc(q.version)}'}.</div>"
            )
            self.editor.layout.display = "none"
            return
        self.editor.layout.display = "flex"
        prefill = prefill or {}
        # fresh boxes per item: a value the browser still holds back for the last item's boxes
        # lands on those, never on this item's; the boxes of two items ago are long settled
        for old in self._retired:
            old.close()
        self._retired = [*self.corrections.values(), self.comment, *self.answers]
        self.corrections = {
            k: classed(
                widgets.Textarea(
                    value=str(prefill.get("corrected_output", {}).get(k, text_of(v))),
                    description=k,
                    rows=3,
                    **self.looks.wide_text,
                ),
                "fw-correction",
                f"fw-correction-{k}",
                f"fw-for-{item.trace_id}",
            )
            for k, v in item.outputs.items()
        }
        self.corrections_box.children = list(self.corrections.values())
        self.comment = self._comment_box(prefill.get("comment") or "", item.trace_id)
        self.comment_box.children = [self.comment]
        self.answers = [
            self._answer_box(i, lab, item.trace_id, prefill.get("answers", {}))
            for i, lab in enumerate(self.labels)
        ]
        self.answers_box.children = self.answers
        self.item.value = self._card(item)  # last: the page tends to draw the card after the boxes

    def _comment_box(self, value: str, trace_id: str = "") -> widgets.Textarea:
        box = classed(
            widgets.Textarea(value=value, placeholder="comment (optional)", **self.looks.wide_text),
            "fw-comment",
            f"fw-for-{trace_id}",
        )
        return box

    def _answer_box(self, index: int, lab: Label, trace_id: str, prefill: dict[str, Any]) -> widgets.Widget:
        """One of the queue's own questions: a choice, or a text box (numbers and text)."""
        value = prefill.get(lab.name)
        title = lab.title + (f" ({lab.instruction})" if lab.instruction else "")
        if lab.kind in (NUMERIC, TEXT):
            box: widgets.Widget = widgets.Text(
                value="" if value is None else str(value),
                description=lab.title,
                placeholder=title,
                **self.looks.wide_text,
            )
        else:
            # one button per answer (a key chooses it: 1-9 numbered over the questions, P/F), the
            # answer itself in the title the key listener reads
            options = ["pass", "fail"] if lab.kind == PASS_FAIL else list(lab.options)
            if isinstance(value, bool):
                value = "pass" if value else "fail"
            first = 1 + sum(
                len(other.options)
                for other in self.labels[:index]
                if other.kind not in (PASS_FAIL, NUMERIC, TEXT)
            )
            if lab.kind == PASS_FAIL:
                names = ["pass  [P]", "fail  [F]"]
            else:
                names = [
                    f"{first + n}  {o}" if first + n <= MAX_DIGIT_CHOICES else o
                    for n, o in enumerate(options)
                ]
            box = widgets.ToggleButtons(
                options=list(zip(names, options, strict=True)),
                value=value if value in options else None,
                tooltips=options,
                description=lab.title,
                **self.looks.toggles,
            )
            box.add_class("fw-passfail" if lab.kind == PASS_FAIL else "fw-categorical")
        return classed(box, "fw-label", f"fw-label-{index}", f"fw-for-{trace_id}")

    def _answers(self, sent: dict[str, Any] | None) -> dict[str, Any]:
        """{schema name: value} from the boxes (the page's text values win: see the docstring)."""
        out: dict[str, Any] = {}
        for i, (lab, box) in enumerate(zip(self.labels, self.answers, strict=False)):
            value = box.value
            if sent and str(i) in sent and isinstance(sent[str(i)], str):
                choices = ("pass", "fail") if lab.kind == PASS_FAIL else lab.options
                if lab.kind in (NUMERIC, TEXT) or sent[str(i)] in choices:
                    value = sent[str(i)]
            if value not in ("", None):
                out[lab.name] = value
        return out

    def _card(self, item: QueueItem) -> str:
        q = self.queue
        blind = q is None or q.queue is None or q.queue.blind
        # blind review: a link to MLflow's trace page would show every reviewer's answers
        link = esc(item.trace_id) if blind else trace_link(item.trace_id, self.runtime)
        return (
            f'<div class="fw-card" data-trace-id="{esc(item.trace_id)}">'
            f'<div>{badge(f"v{item.version}")}<span class="fw-muted">{esc(item.model)} · '
            f"{esc(fmt_time(item.request_time))} UTC · trace {link}"
            "</span></div>"
            f"{picked_html(item.reason)}"
            f'<div class="fw-title">Inputs</div>{fields_html(item.inputs)}'
            f'<div class="fw-title">Output</div>{fields_html(item.outputs)}'
            f"{self._lm_saw(item.trace_id)}</div>"
        )

    def _lm_saw(self, trace_id: str) -> str:
        """The card's "what the LM saw" section: LM spans only, never another reviewer's answer."""
        try:
            return lm_saw_html(review_steps(self.runtime, trace_id))
        except Exception as exc:  # the card still works without it (e.g. MLflow just went down)
            log.warning("call tree of %s unavailable: %s", trace_id, exc)
            return '<div class="fw-muted">What the LM saw: unavailable right now.</div>'

    # --- actions (buttons and keys) --------------------------------------------------------

    def _on_channel(self, change: dict[str, Any]) -> None:
        """Act on each new event the key/click listener sent (see the module's docstring), in order."""
        try:
            sent = json.loads(change["new"] or "{}")
        except ValueError:
            return
        events = sent.get("events") if isinstance(sent, dict) else None
        fresh = [
            e
            for e in events or []
            if isinstance(e, dict) and isinstance(e.get("seq"), int) and e["seq"] > self._seq
        ]
        for event in sorted(fresh, key=lambda e: e["seq"]):
            self._seq = event["seq"]
            guarded(self.status)(self.act)(event)

    def act(self, event: dict[str, Any]) -> None:
        """One action with what the page showed when it was asked for: {action, trace, correction,
        comment, reviewer}; an action on an item no longer shown is ignored."""
        who = event.get("reviewer")  # the page's Reviewer box: a name only without authentication
        if not self.visitor.locked and isinstance(who, str) and who != self.reviewer.value:
            self.reviewer.value = who  # typed just before; its own sync may still be on its way
        action = event.get("action")
        if action == "undo":
            self.do_undo()
            return
        item = self._q().current
        if event.get("trace") != (item.trace_id if item else None):
            say(self.status, "info", "That key was meant for an item no longer shown; nothing was done.")
            return
        if action == "skip":
            self.do_skip()
        elif action in ("thumbs_up", "thumbs_down") and item is not None:
            # null: the page had not drawn this item's boxes yet, so nothing was typed in them and
            # the kernel's (pre-filled) values are the right ones
            fixed, comment = event.get("correction"), event.get("comment")
            values = (
                {k: v for k, v in fixed.items() if k in item.outputs and isinstance(v, str)}
                if isinstance(fixed, dict)
                else None
            )
            sent = event.get("answers")
            self.do_rate(
                action,
                values,
                comment if isinstance(comment, str) else None,
                sent if isinstance(sent, dict) else None,
            )

    def do_rate(
        self,
        rating: str,
        values: dict[str, str] | None = None,
        comment: str | None = None,
        answers: dict[str, Any] | None = None,
    ) -> None:
        """Rate the item shown; `values` (the correction boxes' texts) and `comment` default to the
        widgets' values in the kernel."""
        q = self._q()
        item = q.current
        if item is None:
            say(self.status, "info", "Nothing to rate.")
            return
        boxes = {k: b.value for k, b in self.corrections.items()}
        fixed = edited(boxes if values is None else values, item.outputs)
        receipt = q.rate(
            rating, fixed, self.comment.value if comment is None else comment, self._answers(answers)
        )
        extra = " with a correction" if receipt.corrected_output else ""
        word = "up" if rating == "thumbs_up" else "down"
        self._show()
        say(self.status, "ok", f"Saved thumbs {word}{extra} as {receipt.user_id}.")

    def do_skip(self) -> None:
        self._q().skip()
        self._show()
        say(self.status, "info", "Skipped; it comes back after the others.")

    def do_undo(self) -> None:
        try:
            item, receipt = self._q().undo()
        except Exception as exc:
            say(self.status, "error", friendly(exc))
            return
        prefill = receipt.to_dict() if receipt is not None else None
        if prefill is not None and prefill.get("corrected_output") is None:
            prefill["corrected_output"] = {}
        if prefill is not None:
            prefill["answers"] = self._q().undone_answers
        self._show(prefill)
        what = "rating taken back" if receipt is not None else "skip undone"
        say(self.status, "ok", f"Undone: {what}; the item is shown again.")


_TEAM: dict[str, tuple[float, str]] = {}  # queue id -> (when, its progress block)


def team_html(runtime: Runtime, queue: review.Queue | None, every: float = review.TOP_UP_EVERY) -> str:
    """Per reviewer of the queue: done, remaining, items per hour and kappa so far (the models
    dashboard's progress table for this queue), worked out at most every `every` seconds."""
    if queue is None:
        return ""
    at, block = _TEAM.get(queue.queue_id, (-math.inf, ""))
    if time.monotonic() - at >= every:
        table = progress_html([review.queue_progress(runtime, queue)])
        block = f'<div class="fw-team-progress">{table}</div>'
        _TEAM[queue.queue_id] = (time.monotonic(), block)
    return block


def picked_html(reason: str) -> str:
    """The card's one line on why routing (REVIEW_ROUTING) put this item here."""
    return f'<div class="fw-muted fw-reason">picked because: {esc(reason)}</div>' if reason else ""


def rating_panel(
    query_string: str = "",
    *,
    model: str | None = None,
    version: str | None = None,
    reviewer: str = "",
    queue: str = "default",
    runtime: Runtime | None = None,
    ahead: widgets.VBox | None = None,
    defer: bool = False,
) -> widgets.VBox:
    """The review queue; `query_string` (Voila's QUERY_STRING) may set reviewer (ignored behind
    authentication), model, version and queue. `ahead`: the panel `rating_panel_ahead` built
    before the request, opened for it instead of building another. `defer` (with `ahead`): open
    it just after the cell (`after_cell`), so Voila sends the page's scripts while the kernel
    reads the worklist; the rating dashboard does."""
    q = parse_query(query_string)
    wanted = (
        q.get("model", model),
        q.get("version", version),
        q.get("reviewer", reviewer),
        q.get("queue", queue),
    )
    try:
        if isinstance(ahead, RatingPanel) and not ahead.empty:
            if defer:
                after_cell(lambda: _open_later(ahead, wanted))
            else:
                ahead.open_for(*wanted)
            return ahead
        return RatingPanel(runtime or get_runtime(), *wanted)
    except Exception as exc:  # a store that cannot be opened: one line, not a traceback
        return store_error(exc)


def _open_later(panel: RatingPanel, wanted: tuple[Any, ...]) -> None:
    try:
        panel.open_for(*wanted)
    except Exception as exc:  # what `rating_panel` returns when it cannot open the panel at once
        panel.children = store_error(exc).children


def rating_panel_ahead(runtime: Runtime | None = None) -> widgets.VBox | None:
    """The rating panel's widgets, built before the request comes (a preheated kernel's first
    cell); `rating_panel(..., ahead=...)` opens it for the request. None when it cannot be built
    now (no store yet, say): the request then builds its panel as usual."""
    try:
        panel = RatingPanel(runtime or get_runtime(), None, None, "", ahead=True)
    except Exception:
        return None
    if not panel.empty:
        try:
            panel.rehearse()
        except Exception:  # only a head start: the request opens the panel as it would anyway
            pass
    return panel
