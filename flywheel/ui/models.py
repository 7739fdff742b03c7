"""The models panel (models dashboard, notebook 03): versions, stages, rating statistics, promotion.

Promotion asks for confirmation, and for the admin key when FLYWHEEL_ADMIN_KEY
is set: the dashboard promotes in-process, so it must guard what the API's
key guards.
"""

from __future__ import annotations

import hmac
import io
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import ipywidgets as widgets

from flywheel import export, registry
from flywheel.runtime import Runtime, get_runtime
from flywheel.ui.base import (
    CSS,
    NO_MODELS,
    badge,
    button,
    classed,
    empty_state,
    esc,
    fmt_time,
    guarded,
    html_widget,
    nowrap,
    parse_query,
    say,
    store_error,
    table,
)

PROMOTE_STAGES = ("Staging", "Production", "Archived")


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
        row = export.row_from_trace(info)
        if row is None:
            continue
        s = stats.setdefault(str(row["model_version"]), VersionStats())
        good = row["rating"] == "thumbs_up"
        s.up, s.down = s.up + good, s.down + (not good)
        s.points.append((int(info.request_time), good))
    return stats


def trend_png(stats: dict[str, VersionStats]) -> bytes:
    """Cumulative share of thumbs up, one line per version (PNG bytes; empty when there are no ratings).

    Over time when the ratings span an hour or more; within a shorter span (a fresh demo) time
    says little, so the x axis is the ratings in prediction order.
    """
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
        self.promote_version = classed(widgets.Dropdown(description="Version"), "fw-promote-version")
        self.stage_buttons = {
            s: button(f"→ {s}", f"fw-promote-{s.lower()}", "danger" if s == "Archived" else "info")
            for s in PROMOTE_STAGES
        }
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
        self.children = [
            html_widget(CSS),
            *(
                [html_widget('<div class="fw-title">All models</div>'), self.overview]
                if show_overview
                else []
            ),
            widgets.HBox([self.model, self.refresh_button]),
            self.versions,
            self.trend_note,
            self.trend,
            html_widget('<div class="fw-title">Promote</div>'),
            widgets.HBox([self.promote_version, *self.stage_buttons.values()]),
            self.admin_key,
            self.confirm_box,
            self.status,
        ]
        guard = guarded(self.status)
        self.model.observe(guard(lambda _: self.refresh()), names="value")
        self.refresh_button.on_click(guard(lambda _: self.refresh()))
        for stage, b in self.stage_buttons.items():
            b.on_click(guard(lambda _, stage=stage: self.ask(self.promote_version.value, stage)))
        self.confirm_yes.on_click(guard(lambda _: self.confirm()))
        self.confirm_no.on_click(guard(lambda _: self.cancel()))
        guard(self.refresh)()

    def refresh(self) -> None:
        store = self.runtime.store
        if hasattr(self, "overview"):
            rows = [
                [
                    f"<b>{esc(m.name)}</b>",
                    esc(m.description),
                    esc(m.stages.get("Production", "-")),
                    esc(m.stages.get("Staging", "-")),
                    esc(m.latest_version or "-"),
                ]
                for m in registry.list_models(store)
            ]
            self.overview.value = table(["model", "description", "Production", "Staging", "latest"], rows)
        versions = registry.list_versions(self.model.value, store)
        stats = rating_stats(self.model.value, self.runtime)
        self.versions.value = versions_table(versions, stats)
        png = trend_png(stats)
        self.trend.value = png
        self.trend.layout.display = "block" if png else "none"
        self.trend_note.value = (
            "" if png else '<div class="fw-muted">No ratings yet for this model; the trend shows here.</div>'
        )
        current, values = self.promote_version.value, [v.version for v in versions]
        self.promote_version.options = [(f"v{v.version} · {v.stage}", v.version) for v in versions]
        self.promote_version.value = current if current in values else values[0] if values else None
        self.cancel()

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

    def confirm(self) -> registry.VersionInfo | None:
        if self.pending is None:
            say(self.status, "error", "Nothing to confirm.")
            return None
        wanted = self.runtime.settings.flywheel_admin_key
        if wanted and not hmac.compare_digest(self.admin_key.value.encode(), wanted.encode()):
            say(self.status, "error", "Promotion needs the admin key (FLYWHEEL_ADMIN_KEY is set).")
            return None
        version, stage = self.pending
        info = registry.promote(self.model.value, version, stage, self.runtime.store)
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
