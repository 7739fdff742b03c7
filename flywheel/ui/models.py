"""The models panel (models dashboard, notebook 03): versions, stages, rating statistics, promotion,
live traffic per version, one-click rollback and the audit timeline.

Promotion and rollback ask for confirmation, and for the admin key when
FLYWHEEL_ADMIN_KEY is set: the dashboard acts in-process, so it must guard what
the API's key guards. Both are audited with the dashboard as the actor.

Adjudication (issue 15): an adjudicator opens the items waiting in a queue's adjudication
queue, sees every reviewer's answer and decides (`review.Adjudication.decide`); showing and
deciding both ask for the same admin key.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import ipywidgets as widgets

from flywheel import agreement, audit, canary, export, registry, review, rollback
from flywheel.errors import ModelNotFound, ReviewError
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
    fmt_time,
    friendly,
    guarded,
    hold_name,
    html_widget,
    log,
    nowrap,
    parse_query,
    say,
    store_error,
    table,
    text_of,
)

PROMOTE_STAGES = ("Staging", "Production", "Archived")
ROLLBACK = "rollback"  # the pending action of the rollback button (in place of a stage)
ACTOR = "models dashboard"


@dataclass
class VersionStats:
    up: int = 0
    down: int = 0
    points: list[tuple[int, bool]] = field(default_factory=list)  # (trace time ms, thumbs up?)

    @property
    def ratings(self) -> int:
        return self.up + self.down

    @property
    def share_up(self) -> float | None:
        return self.up / self.ratings if self.ratings else None


def rating_stats(model: str, runtime: Runtime) -> dict[str, VersionStats]:
    """Thumbs up/down per version of `model` (each trace's latest rating counts once)."""
    runtime.outbox.deliver_available(max_batches=20)
    stats: dict[str, VersionStats] = {}
    for info in export.rated_trace_infos(runtime, model):
        row = export.row_from_trace(info, policy=runtime.settings.export_rules)
        if row is None:
            continue
        s = stats.setdefault(str(row["model_version"]), VersionStats())
        good = row["rating"] == "thumbs_up"
        s.up, s.down = s.up + good, s.down + (not good)
        s.points.append((int(info.request_time), good))
    return stats


def plain_text() -> Any:
    """Matplotlib settings under which every text of a plot is drawn as it is: labels are user
    ids, queue and question names, and with mathtext on (matplotlib's default) a `$` in one
    (say the user id `$\\frac{$`) is parsed as TeX and the figure fails to draw."""
    import matplotlib

    return matplotlib.rc_context({"text.parse_math": False})


def trend_png(stats: dict[str, VersionStats]) -> bytes:
    """Cumulative share of thumbs up, one line per version (PNG bytes; empty when there are no ratings).

    Over time when the ratings span an hour or more; within a shorter span (a fresh demo) time
    says little, so the x axis is the ratings in prediction order.
    """
    with plain_text():
        return _trend_png(stats)


def _trend_png(stats: dict[str, VersionStats]) -> bytes:
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure

    times = [t for s in stats.values() for t, _ in s.points]
    if not times:
        return b""
    by_time = max(times) - min(times) >= 3_600_000
    fig = Figure(figsize=(7.5, 2.8), dpi=100)
    ax = fig.add_subplot()
    for version, s in sorted(stats.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        points = sorted(s.points)
        if not points:
            continue
        ups, shares = 0, []
        for n, (_, good) in enumerate(points, start=1):
            ups += good
            shares.append(ups / n)
        xs: list[Any] = (
            [datetime.fromtimestamp(t / 1000, tz=UTC) for t, _ in points]
            if by_time
            else list(range(1, len(points) + 1))
        )
        ax.plot(xs, shares, marker="o", markersize=4, label=f"v{version} ({len(points)} ratings)")
    if by_time:
        locator = AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    else:
        ax.set_xlabel("ratings, in prediction order")
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("share thumbs up")
    ax.set_title("Rating trend (cumulative share of thumbs up)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def fmt_stat(x: float | None) -> str:
    """A kappa or alpha as the dashboard shows it (3 decimals), '-' when undefined."""
    return "-" if x is None else f"{x:.3f}"


def agreement_png(lab: agreement.LabelAgreement) -> bytes:
    """Cohen's kappa per reviewer pair and per reviewer against consensus (PNG; empty if none).
    Reviewer ids and the label's name are drawn as plain text (`plain_text`)."""
    with plain_text():
        return _agreement_png(lab)


def _agreement_png(lab: agreement.LabelAgreement) -> bytes:
    from matplotlib.figure import Figure

    bars = [(f"{p.a} / {p.b}", p.kappa, "pair") for p in lab.pairs if p.kappa is not None]
    bars += [
        (f"{r.reviewer} / consensus", r.kappa, "consensus") for r in lab.vs_consensus if r.kappa is not None
    ]
    if not bars:
        return b""
    fig = Figure(figsize=(7.5, 0.6 + 0.32 * len(bars)), dpi=100)
    ax = fig.add_subplot()
    ys = list(range(len(bars)))[::-1]
    colors = ["#4c72b0" if kind == "pair" else "#dd8452" for _, _, kind in bars]
    ax.barh(ys, [k for _, k, _ in bars], color=colors)
    ax.set_yticks(ys, [name for name, _, _ in bars], fontsize=8)
    for y, (_, k, _) in zip(ys, bars, strict=True):
        ax.text(
            k + (0.02 if k >= 0 else -0.02),
            y,
            f"{k:.3f}",
            va="center",
            ha="left" if k >= 0 else "right",
            fontsize=8,
        )
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlim(min(-0.1, min(k for _, k, _ in bars) - 0.15), 1.12)
    ax.set_xlabel("Cohen's kappa (blue: reviewer pair, orange: reviewer vs consensus)")
    ax.set_title(
        f"{lab.label}: {lab.items} items, agreement {fmt_stat(lab.percent)}, "
        f"Fleiss' kappa {fmt_stat(lab.fleiss_kappa)}, "
        f"Krippendorff's alpha {fmt_stat(lab.krippendorff_alpha)}",
        fontsize=9,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def agreement_html(lab: agreement.LabelAgreement | None) -> str:
    """The label's figures; each kappa cell carries the pair it is for (`data-pair`)."""
    if lab is None:
        return '<div class="fw-muted">No item has two answers yet: agreement shows here.</div>'

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    head = (
        f'<div class="fw-agreement-summary">{esc(lab.label)} ({esc(lab.level)}): '
        f"{lab.items} items with two or more answers; all agree on <b>{pct(lab.percent)}</b>; Fleiss' kappa "
        f'<b class="fw-fleiss">{fmt_stat(lab.fleiss_kappa)}</b> ({lab.fleiss_items} items); '
        f'Krippendorff\'s alpha <b class="fw-alpha">{fmt_stat(lab.krippendorff_alpha)}</b></div>'
    )
    rows = [
        [esc(f"{p.a} / {p.b}"), str(p.items), pct(p.percent), _kappa_cell(f"{p.a} / {p.b}", p.kappa)]
        for p in lab.pairs
    ] + [
        [
            esc(f"{r.reviewer} / consensus"),
            str(r.items),
            pct(r.percent),
            _kappa_cell(f"{r.reviewer} / consensus", r.kappa),
        ]
        for r in lab.vs_consensus
    ]
    return head + table(["pair", "items", "agree", "Cohen's kappa"], rows, "fw-agreement-table")


def _kappa_cell(pair: str, kappa: float | None) -> str:
    return f'<span class="fw-kappa" data-pair="{esc(pair)}">{fmt_stat(kappa)}</span>'


def progress_html(rows: list[review.QueueProgress]) -> str:
    """Per queue and per reviewer: done, remaining, items per hour, agreement so far."""
    if not rows:
        return '<div class="fw-muted">No review queue for this model yet.</div>'
    body = []
    for q in rows:
        body.append(
            [
                f"<b>{esc(q.queue)}</b>",
                "<i>queue</i>",
                str(q.done),
                str(q.remaining),
                "-" if q.per_hour is None else f"{q.per_hour:.1f}",
                fmt_stat(q.kappa),
                str(q.adjudication),
            ]
        )
        for r in q.reviewers:
            body.append(
                [
                    "",
                    esc(r.reviewer),
                    str(r.done),
                    str(r.remaining),
                    "-" if r.per_hour is None else f"{r.per_hour:.1f}",
                    fmt_stat(r.kappa),
                    "",
                ]
            )
    header = ["queue", "reviewer", "done", "remaining", "items / hour", "kappa so far", "to adjudicate"]
    return table(header, body, "fw-progress-table")


class ModelsPanel(widgets.VBox):
    def __init__(self, runtime: Runtime, model: str | None, show_overview: bool) -> None:
        super().__init__()
        self.add_class("fw-panel")
        self.add_class("fw-models-panel")
        self.runtime = runtime
        self.pending: tuple[str, str] | None = None
        self.status = html_widget("", "fw-status")
        models = registry.list_models(runtime.store)
        if not models:
            self.children = [
                html_widget(CSS),
                empty_state(NO_MODELS),
            ]
            return
        names = [m.name for m in models]
        self.overview = html_widget("", "fw-models-table")
        self.model = classed(
            widgets.Dropdown(options=names, value=model if model in names else names[0], description="Model"),
            "fw-model",
        )
        self.refresh_button = button("Refresh", "fw-refresh", icon="refresh")
        self.versions = html_widget("", "fw-versions")
        self.trend = classed(
            widgets.Image(format="png", layout=widgets.Layout(max_width="760px")), "fw-trend"
        )
        self.trend_note = html_widget("", "fw-trend-note")
        self.agree_queue = classed(widgets.Dropdown(description="Queue"), "fw-agree-queue")
        self.agree_label = classed(widgets.Dropdown(description="Label"), "fw-agree-label")
        self.agreement = html_widget("", "fw-agreement")
        self.review_progress = html_widget("", "fw-review-progress")
        self.report: agreement.AgreementReport | None = None
        self.promote_version = classed(widgets.Dropdown(description="Version"), "fw-promote-version")
        self.stage_buttons = {
            s: button(f"→ {s}", f"fw-promote-{s.lower()}", "danger" if s == "Archived" else "info")
            for s in PROMOTE_STAGES
        }
        self.rollback_button = button("↶ Roll back Production", "fw-rollback", "warning")
        self.live = html_widget("", "fw-live")
        self.timeline = html_widget("", "fw-timeline")
        self.admin_key = classed(
            widgets.Password(description="Admin key", placeholder="FLYWHEEL_ADMIN_KEY"), "fw-admin-key"
        )
        self.admin_key.layout.display = "flex" if runtime.settings.flywheel_admin_key else "none"
        self.confirm_text = html_widget("", "fw-confirm-text")
        self.confirm_yes = button("Confirm", "fw-confirm-yes", "success")
        self.confirm_no = button("Cancel", "fw-confirm-no")
        self.confirm_box = classed(
            widgets.HBox([self.confirm_text, self.confirm_yes, self.confirm_no], layout={"display": "none"}),
            "fw-confirm",
        )
        self.adjudication: review.Adjudication | None = None
        self.adj_queue = classed(widgets.Dropdown(description="Queue"), "fw-adj-queue")
        # who adjudicates (and promotes, sets up), read on the server now (see `Visitor`): behind
        # authentication the signed-in user, whatever the Adjudicator box says
        self.visitor = Visitor.at_open(runtime.settings)
        self.adj_name = classed(widgets.Text(value="admin", description="Adjudicator"), "fw-adj-name")
        hold_name(self.adj_name, self.visitor)
        self.identity = html_widget("" if not self.visitor.locked else self.visitor.note(), "fw-identity")
        self.adj_next = button("Show next waiting item", "fw-adj-next", icon="gavel")
        self.adj_item = html_widget("", "fw-adj-item")
        self.adj_correction = classed(
            widgets.Textarea(placeholder="correction, a JSON object of output fields (optional)"),
            "fw-adj-correction",
        )
        self.adj_comment = classed(widgets.Text(placeholder="comment (optional)"), "fw-adj-comment")
        self.adj_answers: dict[str, widgets.Text] = {}
        self.adj_answers_box = classed(widgets.VBox(), "fw-adj-answers")
        self.adj_up = button("Decide thumbs up", "fw-adj-up", "success")
        self.adj_down = button("Decide thumbs down", "fw-adj-down", "danger")
        self.adj_editor = classed(
            widgets.VBox(
                [
                    self.adj_correction,
                    self.adj_comment,
                    self.adj_answers_box,
                    widgets.HBox([self.adj_up, self.adj_down]),
                ],
                layout={"display": "none"},
            ),
            "fw-adj-editor",
        )
        self.adj_status = html_widget("", "fw-adj-status")
        # review setup (admin): a model's own questions (MLflow label schemas) and its queues
        self.label_name = classed(
            widgets.Text(description="Question", placeholder="e.g. funny"), "fw-label-name"
        )
        self.label_kind = classed(
            widgets.Dropdown(options=list(review.KINDS), value=review.CATEGORICAL, description="Kind"),
            "fw-label-kind",
        )
        self.label_options = classed(
            widgets.Text(description="Options", placeholder="comma-separated (categorical)"),
            "fw-label-options",
        )
        self.label_add = button("Define question", "fw-label-add", icon="plus")
        self.queue_name = classed(widgets.Text(value="default", description="Queue"), "fw-queue-name")
        self.queue_reviewers = classed(
            widgets.Text(description="Reviewers", placeholder="comma-separated, at most 10"),
            "fw-queue-reviewers",
        )
        self.queue_k = classed(widgets.BoundedIntText(value=1, min=1, max=10, description="k"), "fw-queue-k")
        self.queue_blind = classed(widgets.Checkbox(value=True, description="Blind"), "fw-queue-blind")
        self.queue_labels = classed(widgets.SelectMultiple(description="Questions"), "fw-queue-labels")
        self.queue_add = button("Create or update queue", "fw-queue-add", icon="users")
        self.setup_status = html_widget("", "fw-setup-status")
        self.children = [
            html_widget(CSS),
            self.identity,
            *(
                [html_widget('<div class="fw-title">All models</div>'), self.overview]
                if show_overview
                else []
            ),
            widgets.HBox([self.model, self.refresh_button]),
            self.versions,
            self.trend_note,
            self.trend,
            html_widget('<div class="fw-title">Reviewer agreement</div>'),
            widgets.HBox([self.agree_queue, self.agree_label]),
            self.agreement,
            html_widget('<div class="fw-title">Review progress</div>'),
            self.review_progress,
            html_widget('<div class="fw-title">Promote</div>'),
            widgets.HBox([self.promote_version, *self.stage_buttons.values()]),
            self.rollback_button,
            self.admin_key,
            self.confirm_box,
            self.status,
            html_widget('<div class="fw-title">Adjudication</div>'),
            widgets.HBox([self.adj_queue, self.adj_name, self.adj_next]),
            self.adj_item,
            self.adj_editor,
            self.adj_status,
            html_widget('<div class="fw-title">Review setup</div>'),
            widgets.HBox([self.label_name, self.label_kind, self.label_options, self.label_add]),
            widgets.HBox([self.queue_name, self.queue_reviewers, self.queue_k, self.queue_blind]),
            widgets.HBox([self.queue_labels, self.queue_add]),
            self.setup_status,
            html_widget('<div class="fw-title">Live traffic</div>'),
            self.live,
            html_widget('<div class="fw-title">Audit timeline</div>'),
            self.timeline,
        ]
        guard = guarded(self.status)
        self.model.observe(guard(lambda _: self.refresh()), names="value")
        self.refresh_button.on_click(guard(lambda _: self.refresh()))
        self.agree_queue.observe(guard(lambda _: self.refresh_agreement()), names="value")
        self.agree_label.observe(guard(lambda _: self.show_agreement()), names="value")
        for stage, b in self.stage_buttons.items():
            b.on_click(guard(lambda _, stage=stage: self.ask(self.promote_version.value, stage)))
        self.rollback_button.on_click(guard(lambda _: self.ask_rollback()))
        self.confirm_yes.on_click(guard(lambda _: self.confirm()))
        self.confirm_no.on_click(guard(lambda _: self.cancel()))
        adj_guard = guarded(self.adj_status)
        self.adj_next.on_click(adj_guard(lambda _: self.show_adjudication()))
        self.adj_up.on_click(adj_guard(lambda _: self.decide("thumbs_up")))
        self.adj_down.on_click(adj_guard(lambda _: self.decide("thumbs_down")))
        self.adj_queue.observe(adj_guard(lambda _: self.close_adjudication()), names="value")
        setup_guard = guarded(self.setup_status)
        self.label_add.on_click(setup_guard(lambda _: self.define_label()))
        self.queue_add.on_click(setup_guard(lambda _: self.create_queue()))
        guard(self.refresh)()
        setup_guard(self._load_labels)()

    def refresh(self) -> None:
        """Draw every section again. Each draws on its own: one that fails (a plot that cannot be
        drawn, MLflow refusing one query) shows its error in its own place and the others still
        draw, so one bad label never blanks the promote list or the adjudication queue."""
        self._fetched: dict[str, Any] = {}  # what two sections read, read once per refresh
        sections = [
            (self._draw_overview, self.overview),
            (self._draw_versions, self.versions),
            (self._draw_trend, self.trend_note),
            (self._draw_promote, self.status),
            (self._draw_agreement_queues, self.agreement),
            (self._draw_progress, self.review_progress),
            (self._draw_live, self.live),
            (self._draw_timeline, self.timeline),
        ]
        for draw, place in sections:
            try:
                draw()
            except Exception as exc:
                log.warning("models dashboard: %s failed: %s", draw.__name__, exc, exc_info=True)
                place.value = (
                    f'<div class="fw-msg-error fw-section-error">This part could not be drawn: '
                    f"{esc(friendly(exc))}</div>"
                )

    def _versions(self) -> list[registry.VersionInfo]:
        if "versions" not in self._fetched:
            self._fetched["versions"] = registry.list_versions(self.model.value, self.runtime.store)
        return self._fetched["versions"]  # type: ignore[no-any-return]

    def _queues(self) -> list[Any]:
        if "queues" not in self._fetched:
            self._fetched["queues"] = review.list_queues(self.runtime.store, self.model.value)
        return self._fetched["queues"]  # type: ignore[no-any-return]

    def _draw_overview(self) -> None:
        rows = [
            [
                f"<b>{esc(m.name)}</b>",
                esc(m.description),
                esc(m.stages.get("Production", "-")),
                esc(m.stages.get("Staging", "-")),
                esc(m.latest_version or "-"),
            ]
            for m in registry.list_models(self.runtime.store)
        ]
        self.overview.value = table(["model", "description", "Production", "Staging", "latest"], rows)

    def _draw_versions(self) -> None:
        self._stats: dict[str, VersionStats] | None = None
        versions = self._versions()
        self._stats = rating_stats(self.model.value, self.runtime)
        self.versions.value = versions_table(versions, self._stats)

    def _draw_trend(self) -> None:
        self.trend.layout.display = "none"  # no stale plot, whatever happens below
        if self._stats is None:  # the versions section says why
            self.trend_note.value = ""
            return
        png = trend_png(self._stats)
        self.trend.value = png
        self.trend.layout.display = "block" if png else "none"
        self.trend_note.value = (
            "" if png else '<div class="fw-muted">No ratings yet for this model; the trend shows here.</div>'
        )

    def _draw_promote(self) -> None:
        versions = self._versions()
        current, values = self.promote_version.value, [v.version for v in versions]
        self.promote_version.options = [(f"v{v.version} · {v.stage}", v.version) for v in versions]
        self.promote_version.value = current if current in values else values[0] if values else None
        self.cancel()

    def _draw_agreement_queues(self) -> None:
        queues = self._queues()
        wanted = self.agree_queue.value
        self.agree_queue.options = [("all reviewers", "")] + [
            (q.name.split("/", 1)[1], q.name.split("/", 1)[1]) for q in queues
        ]
        names = [v for _, v in self.agree_queue.options]
        self.agree_queue.value = wanted if wanted in names else ""
        self.refresh_agreement()

    def _draw_progress(self) -> None:
        """The review progress table and the adjudication queue's choices (they share the figures)."""
        queues = self._queues()
        progress = [review.queue_progress(self.runtime, q) for q in queues]
        self.review_progress.value = progress_html(progress)
        chosen = self.adj_queue.value
        self.adj_queue.options = [
            (f"{q.name.split('/', 1)[1]} ({p.adjudication} waiting)", q.name.split("/", 1)[1])
            for q, p in zip(queues, progress, strict=True)
        ]
        shorts = [v for _, v in self.adj_queue.options]
        self.adj_queue.value = chosen if chosen in shorts else (shorts[0] if shorts else None)

    def _draw_live(self) -> None:
        self.live.value = live_table(canary.live_report(self.runtime, self.model.value))

    def _draw_timeline(self) -> None:
        self.timeline.value = timeline_html(audit.timeline(self.runtime.store, self.model.value, limit=50))

    def refresh_agreement(self) -> None:
        """Agreement of the chosen queue's reviewers (or of everyone who rated the model)."""
        queue = self.agree_queue.value or None
        self.report = self.runtime.agreement_report(self.model.value, queue)
        wanted = self.agree_label.value
        labels = list(self.report.labels)
        self.agree_label.options = labels
        self.agree_label.value = wanted if wanted in labels else (labels[0] if labels else None)
        self.show_agreement()

    def show_agreement(self) -> None:
        """The chosen label's table and plot, drawn as one HTML value (they never disagree)."""
        lab = (
            self.report.labels.get(self.agree_label.value) if self.report and self.agree_label.value else None
        )
        lab = lab if lab is not None and lab.items else None
        try:
            png = agreement_png(lab) if lab is not None else b""
        except Exception as exc:  # the figures above it still show
            log.warning("agreement plot failed: %s", exc, exc_info=True)
            why = esc(friendly(exc))
            png, failed = b"", f'<div class="fw-msg-error">The plot could not be drawn: {why}</div>'
        else:
            failed = ""
        plot = (
            f'<img class="fw-agreement-plot" alt="kappa per pair" style="max-width:760px" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            if png
            else failed
        )
        self.agreement.value = agreement_html(lab) + plot

    def ask(self, version: str | None, stage: str) -> None:
        """First click of a stage button: ask for confirmation, naming what else changes."""
        if version is None:
            say(self.status, "error", "Choose a version first.")
            return
        name = self.model.value
        note = ""
        if stage in ("Staging", "Production"):
            holder = next(
                (v for v in registry.list_versions(name, self.runtime.store) if v.stage == stage), None
            )
            if holder is not None and holder.version != version:
                note = f" v{holder.version} (now {stage}) will be archived."
        self.pending = (version, stage)
        self.confirm_text.value = f"<b>Move {esc(name)} v{esc(version)} to {esc(stage)}?</b>{esc(note)}"
        self.confirm_box.layout.display = "flex"
        say(self.status, "info", "Confirm or cancel the promotion.")

    def ask_rollback(self) -> None:
        """First click of the rollback button: name what is undone and what comes back."""
        name = self.model.value
        try:
            current = registry.resolve(name, "Production", self.runtime.store)
        except ModelNotFound:
            say(self.status, "error", f"{name} has no Production version to roll back.")
            return
        previous = current.tags.get(registry.PREVIOUS_TAG)
        if not previous:
            say(
                self.status,
                "error",
                f"v{current.version} has no previous Production recorded; promote instead.",
            )
            return
        self.pending = (current.version, ROLLBACK)
        self.confirm_text.value = (
            f"<b>Roll {esc(name)} back: v{esc(current.version)} out, v{esc(previous)} Production again?</b>"
        )
        self.confirm_box.layout.display = "flex"
        say(self.status, "info", "Confirm or cancel the rollback.")

    def confirm(self) -> registry.VersionInfo | None:
        if self.pending is None:
            say(self.status, "error", "Nothing to confirm.")
            return None
        if not self.signed_in_ok(self.status):
            return None
        if not self.admin_ok():
            what = "Rollback" if self.pending[1] == ROLLBACK else "Promotion"
            say(self.status, "error", f"{what} needs the admin key (FLYWHEEL_ADMIN_KEY is set).")
            return None
        version, stage = self.pending
        if stage == ROLLBACK:
            info = rollback.rollback(
                self.runtime.store,
                self.model.value,
                expected=version,
                actor=self.actor(),
                reason="rollback button",
            )
            self.refresh()
            say(self.status, "ok", f"Rolled back: {info.name} v{info.version} is Production again.")
            return info
        info = registry.promote(self.model.value, version, stage, self.runtime.store, actor=self.actor())
        self.refresh()
        say(
            self.status,
            "ok",
            f"{info.name} v{info.version} is now {info.stage}; servers use it from their next request.",
        )
        return info

    def cancel(self) -> None:
        self.pending = None
        self.confirm_box.layout.display = "none"

    def signed_in_ok(self, status: widgets.HTML) -> bool:
        """False (and says so in `status`) when authentication is configured and nobody signed in:
        such a page writes nothing."""
        if self.visitor.writer("") is None:
            say(status, "error", SIGN_IN_REQUIRED)
            return False
        return True

    def actor(self) -> str:
        """Who the audit trail names for a promotion or rollback: the dashboard, and behind
        authentication the signed-in user too."""
        return f"{ACTOR} ({self.visitor.signed_in})" if self.visitor.signed_in else ACTOR

    def admin_ok(self) -> bool:
        """The admin key typed matches FLYWHEEL_ADMIN_KEY (always true when none is set)."""
        wanted = self.runtime.settings.flywheel_admin_key
        return not wanted or hmac.compare_digest(self.admin_key.value.encode(), wanted.encode())

    # --- review setup (admin) -------------------------------------------------------------

    def _load_labels(self) -> None:
        found = review.labels(self.runtime.store, self.model.value)
        self.queue_labels.options = [(lab.title, lab.name) for lab in found if not lab.builtin]

    def define_label(self) -> review.Label | None:
        """Define one of the model's own questions (an MLflow label schema `model:question`)."""
        if not self.signed_in_ok(self.setup_status):
            return None
        if not self.admin_ok():
            say(
                self.setup_status,
                "error",
                "Defining questions needs the admin key (FLYWHEEL_ADMIN_KEY is set).",
            )
            return None
        options = [o.strip() for o in self.label_options.value.split(",") if o.strip()]
        label = review.define_label(
            self.runtime.store,
            self.model.value,
            self.label_name.value.strip(),
            self.label_kind.value,
            options=options or None,
        )
        self._load_labels()
        say(
            self.setup_status,
            "ok",
            f"Question {label.title!r} ({label.kind}) is defined for {self.model.value}.",
        )
        return label

    def create_queue(self) -> review.Queue | None:
        """Create (or update the reviewers and k of) a queue of the model, with the chosen questions."""
        if not self.signed_in_ok(self.setup_status):
            return None
        if not self.admin_ok():
            say(
                self.setup_status, "error", "Creating queues needs the admin key (FLYWHEEL_ADMIN_KEY is set)."
            )
            return None
        reviewers = [r.strip() for r in self.queue_reviewers.value.split(",") if r.strip()]
        queue = review.create_queue(
            self.runtime.store,
            self.model.value,
            reviewers,
            k=int(self.queue_k.value),
            name=self.queue_name.value.strip() or "default",
            label_names=[*self.queue_labels.value, review.CORRECTION, review.COMMENT]
            if self.queue_labels.value
            else None,
            blind=bool(self.queue_blind.value),
        )
        self.refresh()
        say(
            self.setup_status,
            "ok",
            f"Queue {queue.name!r}: {len(queue.reviewers)} reviewers, each item to {queue.k}.",
        )
        return queue

    # --- adjudication --------------------------------------------------------------------

    def close_adjudication(self) -> None:
        self.adjudication = None
        self.adj_item.value = ""
        self.adj_editor.layout.display = "none"

    def show_adjudication(self) -> review.AdjudicationItem | None:
        """The oldest item waiting in the chosen queue's adjudication queue, with every answer."""
        if not self.signed_in_ok(self.adj_status):
            return None
        if not self.admin_ok():
            say(self.adj_status, "error", "Adjudication needs the admin key (FLYWHEEL_ADMIN_KEY is set).")
            return None
        if not self.adj_queue.value:
            say(self.adj_status, "info", "This model has no review queue.")
            return None
        # behind authentication the signed-in user, never what the Adjudicator box says
        name = self.visitor.writer(self.adj_name.value) or "admin"
        adj = self.adjudication
        if adj is None or adj.queue is None or adj.name != review.normalize_reviewer(name):
            adj = self.adjudication = review.Adjudication(
                self.runtime, self.model.value, self.adj_queue.value, adjudicator=name
            )
        adj.next()
        self._draw_adjudication()
        return adj.current

    def _draw_adjudication(self) -> None:
        adj = self.adjudication
        current = adj.current if adj is not None else None
        if adj is None or current is None:
            self.close_adjudication()
            self.adj_item.value = '<div class="fw-muted fw-adj-empty">Nothing waits for adjudication.</div>'
            return
        self.adj_item.value = adjudication_html(current)
        self.adj_correction.value = ""
        self.adj_comment.value = ""
        extra = [lab for lab in adj.labels if not lab.builtin]
        self.adj_answers = {
            lab.name: classed(
                widgets.Text(
                    description=lab.title,
                    placeholder=" / ".join(lab.options) or lab.kind,
                ),
                "fw-adj-label",
            )
            for lab in extra
        }
        self.adj_answers_box.children = list(self.adj_answers.values())
        self.adj_editor.layout.display = "flex"

    def decide(self, rating: str) -> None:
        """The decision on the item shown: an assessment of source `adjudicator:<name>`."""
        if not self.signed_in_ok(self.adj_status):
            return
        if not self.admin_ok():
            say(self.adj_status, "error", "Adjudication needs the admin key (FLYWHEEL_ADMIN_KEY is set).")
            return
        adj = self.adjudication
        if adj is None or adj.current is None:
            say(self.adj_status, "info", "Show an item first.")
            return
        trace_id = adj.current.item.trace_id
        raw = self.adj_correction.value.strip()
        try:
            fixed = json.loads(raw) if raw else None
        except ValueError:
            raise ReviewError("the correction must be a JSON object of output fields") from None
        answers = {k: box.value.strip() for k, box in self.adj_answers.items() if box.value.strip()}
        receipt = adj.decide(rating, corrected_output=fixed, comment=self.adj_comment.value, answers=answers)
        self._draw_adjudication()
        say(self.adj_status, "ok", f"Decided {rating} on {trace_id} as {receipt.user_id}.")


def adjudication_html(item: review.AdjudicationItem) -> str:
    """One waiting item: inputs, output and every source's answers, the disputed questions marked."""
    names = list(dict.fromkeys(n for a in item.answers for n in a.values))
    rows = [
        [esc(a.source) + (" <i>(decision)</i>" if a.adjudicated else "")]
        + [
            esc(text_of(json.dumps(a.values[n]) if isinstance(a.values.get(n), dict) else a.values.get(n)))
            for n in names
        ]
        for a in item.answers
    ]
    header = ["source"] + [n + (" (disagree)" if n in item.disagree_on else "") for n in names]
    it = item.item
    return (
        f'<div class="fw-card fw-adj-card" data-trace-id="{esc(it.trace_id)}">'
        f'<div>{badge(f"v{it.version}")}<span class="fw-muted">{esc(it.model)} · trace {esc(it.trace_id)}'
        f" · disagree on {esc(', '.join(item.disagree_on) or '-')}</span></div>"
        f'<div class="fw-title">Inputs</div>{fields_html(item.item.inputs)}'
        f'<div class="fw-title">Output</div>{fields_html(item.item.outputs)}'
        f"{table(header, rows, 'fw-adj-answers-table')}</div>"
    )


def versions_table(versions: list[registry.VersionInfo], stats: dict[str, VersionStats]) -> str:
    rows = []
    for v in versions:
        s = stats.get(v.version, VersionStats())
        share = "-" if s.share_up is None else f"{s.share_up:.0%} ({s.up}/{s.ratings})"
        aliases = " ".join(badge(a) for a in v.aliases) or "-"
        rows.append(
            [
                f"<b>v{esc(v.version)}</b>",
                badge(v.stage),
                aliases,
                nowrap(esc(fmt_time(v.created_at))),
                "-" if v.score is None else f"{v.score:.3f}",
                str(s.ratings),
                share,
                esc(v.description),
            ]
        )
    header = ["version", "stage", "aliases", "created (UTC)", "score", "ratings", "thumbs up", "description"]
    return table(header, rows, "fw-versions-table")


def live_table(report: dict[str, Any]) -> str:
    """Per-version live figures from traces and ratings, and the traffic plan above them."""
    plan = report["plan"]
    parts = []
    if plan.get("canary"):
        parts.append(f"canary <b>{esc(plan['canary'])}</b> at {plan['share']:.0%}")
    if plan.get("shadow"):
        parts.append(f"shadow <b>{esc(plan['shadow'])}</b>")
    head = f'<div class="fw-muted">{" · ".join(parts) or "no canary, no shadow"}</div>'
    if not report["versions"]:
        return head + '<div class="fw-muted">No live traffic yet.</div>'

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    rows = []
    for v in report["versions"]:
        interval = v["thumbs_up_interval"]
        up = pct(v["thumbs_up_rate"]) + (f" [{interval[0]:.0%}, {interval[1]:.0%}]" if interval else "")
        rows.append(
            [
                f"<b>v{esc(v['version'])}</b>",
                str(v["requests"]),
                pct(v["error_rate"]),
                "-" if v["p50_ms"] is None else f"{v['p50_ms']:.0f} ms",
                "-" if v["p99_ms"] is None else f"{v['p99_ms']:.0f} ms",
                up,
            ]
        )
    header = ["version", "requests", "errors", "p50", "p99", "thumbs up (95% interval)"]
    return head + table(header, rows, "fw-live-table")


def timeline_html(entries: list[audit.AuditEntry]) -> str:
    """The audit trail, newest first: when, what, which version, who, why, and the evidence."""
    if not entries:
        return '<div class="fw-muted">Nothing recorded yet.</div>'
    items = []
    for e in entries:
        at = datetime.fromtimestamp(e.at_ms / 1000, tz=UTC)
        evidence = ", ".join(f"{k}: {v}" for k, v in sorted(e.evidence.items()) if not isinstance(v, dict))
        items.append(
            f'<li class="fw-audit fw-audit-{esc(e.action)}">{nowrap(esc(fmt_time(at)))} '
            f"{badge(e.action)} {'v' + esc(e.version) if e.version else ''} by <b>{esc(e.actor)}</b>"
            f"{': ' + esc(e.reason) if e.reason else ''}"
            f'<div class="fw-muted">{esc(evidence)}</div></li>'
        )
    return f'<ul class="fw-timeline-list">{"".join(items)}</ul>'


def models_panel(
    query_string: str = "",
    *,
    model: str | None = None,
    show_overview: bool = True,
    runtime: Runtime | None = None,
) -> widgets.VBox:
    """Versions per model with stages, aliases, rating statistics and a trend, plus promote buttons.

    `query_string` (Voila's QUERY_STRING) may choose the model (`?model=joke-generator`).
    """
    try:
        return ModelsPanel(
            runtime or get_runtime(), parse_query(query_string).get("model", model), show_overview
        )
    except Exception as exc:
        return store_error(exc)
