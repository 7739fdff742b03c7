"""Retention: one pass that archives old traces and deletes old unrated ones, never a rated one.

Settings (docs/configuration.md): FLYWHEEL_DELETE_UNRATED_AFTER_DAYS deletes flywheel's traces
older than that which carry no human assessment and are in no registered version's lineage;
FLYWHEEL_ARCHIVE_AFTER_DAYS moves the span payloads of older traces out of the database through
MLflow's own trace archival (tags, metadata and assessments stay, MLflow reads archived spans
back from the archive). Either unset: that half does nothing.

What is never deleted:
- a trace with any human assessment (source HUMAN: a rating, correction, comment, review answer,
  pairwise preference, an adjudication), valid or not, as MLflow returns them;
- a trace in the lineage of a registered version: the train and dev trace ids compile logs in
  its run (`lineage/trace_ids.json`). When the lineage of a version that has one cannot be read,
  nothing is deleted (RetentionError).

Both halves use MLflow's APIs only: `MlflowClient.delete_traces(trace_ids=...)` (which also removes
review-queue items and archived payloads of the traces it deletes), and the tracking store's
`archive_traces` (the method MLflow's server scheduler calls) scoped to flywheel's experiment by
its `mlflow.trace.archivalRetention` tag. On a tracking server there is no archival call: the
server archives (its MLFLOW_TRACE_ARCHIVAL_CONFIG) and honours the same tag, which the pass sets;
a server that does not archive is an error of the pass, not zero archived.

The pass works in pages of FLYWHEEL_RETENTION_BATCH traces, oldest first (keyset on the start
time), and reports each page. A trace rated between its page being read and deleted is the one
race left: a rating that arrives for a trace just deleted becomes a dead letter in the outbox.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.errors import ConfigError, RetentionError
from flywheel.store import archive_traces, server_archives_traces, supports_sql_traces, trace_archival_names

if TYPE_CHECKING:
    from flywheel.config import Settings
    from flywheel.store import Store

LINEAGE_ARTIFACT = "lineage/trace_ids.json"  # what flywheel.compile logs in a version's run
LINEAGE_TAG = "lineage.count"  # on every version flywheel.compile registered
DAY_MS = 86_400_000
BROADER = "36500d"  # MLflow's pass-wide retention: only an experiment's own tag makes a trace due

_log = logging.getLogger("flywheel.retention")


@dataclass
class RetentionReport:
    """What one pass did (or, with `dry_run`, would do). `archived` is None when archival was not
    asked for or the tracking server does it (`archive_mode` "server"); `archive_due` counts
    traces past the archival age whose spans are still in the database (capped at one batch
    after a real pass). `errors` is never empty when something asked for did not happen."""

    dry_run: bool
    archive_after_days: int | None
    delete_unrated_after_days: int | None
    archive_mode: str = "off"  # off | store (flywheel ran MLflow's archival) | server
    archived: int | None = None
    archive_due: int | None = None
    scanned: int = 0
    deleted: int = 0
    kept_rated: int = 0
    kept_lineage: int = 0
    lineage_versions: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        would = "would be " if self.dry_run else ""
        out = []
        if self.delete_unrated_after_days is None:
            out.append("deletion: off (FLYWHEEL_DELETE_UNRATED_AFTER_DAYS unset)")
        else:
            out.append(
                f"deletion (unrated, older than {self.delete_unrated_after_days} days): "
                f"{self.scanned} old traces read, {self.deleted} {would}deleted, "
                f"{self.kept_rated} kept as rated, {self.kept_lineage} kept as lineage "
                f"of {self.lineage_versions} registered versions"
            )
        if self.archive_after_days is None:
            out.append("archival: off (FLYWHEEL_ARCHIVE_AFTER_DAYS unset)")
        elif self.dry_run:
            out.append(
                f"archival (older than {self.archive_after_days} days, by the {self.archive_mode}): "
                f"{self.archive_due} traces would be archived"
            )
        elif self.archive_mode == "server":
            out.append(
                f"archival (older than {self.archive_after_days} days): done by the tracking server; "
                f"{self.archive_due} traces still waiting for it"
            )
        else:
            out.append(
                f"archival (older than {self.archive_after_days} days): {self.archived} traces archived"
            )
        out += [f"error: {e}" for e in self.errors]
        return out


def enabled(settings: Settings) -> bool:
    return (
        settings.flywheel_archive_after_days is not None
        or settings.flywheel_delete_unrated_after_days is not None
    )


def archive_location(settings: Settings) -> str:
    """Where MLflow's archival puts span payloads when flywheel runs it on a SQL store."""
    if settings.flywheel_archive_location:
        return settings.flywheel_archive_location
    if settings.is_embedded:
        return (settings.artifact_root / "trace-archive").as_uri()
    raise ConfigError(
        "FLYWHEEL_ARCHIVE_AFTER_DAYS needs FLYWHEEL_ARCHIVE_LOCATION (an artifact URI every host and "
        "the tracking server can read, e.g. s3://bucket/trace-archive) for a database store"
    )


def run(
    store: Store,
    *,
    dry_run: bool = False,
    now_ms: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> RetentionReport:
    """One retention pass over flywheel's experiment, as the settings of `store` ask."""
    settings = store.settings
    report = RetentionReport(
        dry_run, settings.flywheel_archive_after_days, settings.flywheel_delete_unrated_after_days
    )
    say = progress or _log.info
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    batch = settings.flywheel_retention_batch
    in_store = supports_sql_traces(store.tracking)
    location = None
    if report.archive_after_days is not None:
        report.archive_mode = "store" if in_store else "server"
        if in_store:
            location = archive_location(settings)  # a configuration error stops the pass before any work
    if report.delete_unrated_after_days is not None:
        _delete_unrated(store, report, now - report.delete_unrated_after_days * DAY_MS, batch, say)
    if report.archive_after_days is not None:
        _archive(store, report, now, batch, location, say)
    return report


# --- deletion ------------------------------------------------------------------------------------


def is_rated(info: Any) -> bool:
    """Whether a person assessed the trace (source HUMAN), whatever the assessment's name."""
    return any(
        a.source is not None and str(a.source.source_type).rsplit(".", 1)[-1] == "HUMAN"
        for a in info.assessments or ()
    )


def lineage_trace_ids(store: Store) -> tuple[set[str], int]:
    """(every trace id in the lineage of a registered version, how many versions have one).

    RetentionError when a version compile registered (it carries LINEAGE_TAG) has no readable
    lineage artifact: without it, which traces trained it is unknown."""
    client = store.client
    ids: set[str] = set()
    versions = 0
    token = None
    with tempfile.TemporaryDirectory(prefix="flywheel-lineage-") as tmp:
        while True:
            page = client.search_model_versions(max_results=1000, page_token=token)
            for mv in page:
                if LINEAGE_TAG not in (mv.tags or {}):
                    continue
                where = f"{mv.name} version {mv.version} (run {mv.run_id}, {LINEAGE_ARTIFACT})"
                try:
                    dst = Path(tmp) / str(versions)
                    dst.mkdir()
                    path = client.download_artifacts(mv.run_id, LINEAGE_ARTIFACT, str(dst))
                    lineage = json.loads(Path(path).read_text())
                    ids.update(lineage.get("train", []), lineage.get("dev", []))
                except Exception as exc:
                    raise RetentionError(
                        f"cannot read the lineage of {where}: {exc}; nothing was deleted"
                    ) from exc
                versions += 1
            token = page.token
            if not token:
                return ids, versions


def _delete_unrated(
    store: Store, report: RetentionReport, cutoff_ms: int, batch: int, say: Callable[[str], None]
) -> None:
    protected, report.lineage_versions = lineage_trace_ids(store)
    for page in old_traces(store, cutoff_ms, batch):
        doomed = []
        for info in page:
            report.scanned += 1
            if is_rated(info):
                report.kept_rated += 1
            elif info.trace_id in protected:
                report.kept_lineage += 1
            else:
                doomed.append(info.trace_id)
        if doomed and not report.dry_run:
            report.deleted += store.client.delete_traces(store.experiment_id, trace_ids=doomed)
        elif doomed:
            report.deleted += len(doomed)
        say(
            f"retention: {report.scanned} old traces read, {report.deleted} "
            f"{'to delete' if report.dry_run else 'deleted'}, {report.kept_rated} rated and "
            f"{report.kept_lineage} in a lineage kept"
        )


def old_traces(store: Store, cutoff_ms: int, batch: int, extra: str = "") -> Iterator[list[Any]]:
    """Pages of flywheel's traces that started at or before `cutoff_ms`, oldest first, with their
    assessments and no spans. Keyset on the start time (what the caller deletes between two pages
    shifts no offset); a trace is yielded once."""
    lo: int | None = None
    seen: set[str] = set()
    while True:
        flt = f"trace.timestamp_ms <= {cutoff_ms}" + extra
        if lo is not None:
            flt += f" AND trace.timestamp_ms >= {lo}"
        infos, _ = store.tracking.search_traces(
            locations=[store.experiment_id],
            filter_string=flt,
            max_results=batch,
            order_by=["timestamp_ms ASC"],
        )
        fresh = [i for i in infos if i.trace_id not in seen]
        if fresh:
            yield fresh
        if len(infos) < batch:
            return
        top = max(i.request_time for i in infos)
        if not fresh:  # a whole page of traces kept at one millisecond: step past them
            _log.warning(
                "retention: more than %d kept traces started at %d ms; the rest is skipped", batch, top
            )
            lo, seen = top + 1, set()
            continue
        seen = (seen if lo == top else set()) | {i.trace_id for i in infos if i.request_time == top}
        lo = top


# --- archival ------------------------------------------------------------------------------------


def _due_filter() -> str:
    names = trace_archival_names()
    return f" AND tags.`{names.spans_location_tag}` = '{names.in_store}'"


def _count(store: Store, cutoff_ms: int, batch: int, cap: int | None = None) -> int:
    count = 0
    for page in old_traces(store, cutoff_ms, batch, _due_filter()):
        count += len(page)
        if cap is not None and count >= cap:
            break
    return count


def _archive(
    store: Store,
    report: RetentionReport,
    now_ms: int,
    batch: int,
    location: str | None,
    say: Callable[[str], None],
) -> None:
    days = report.archive_after_days
    cutoff = now_ms - days * DAY_MS  # type: ignore[operator]
    if report.dry_run:
        report.archive_due = _count(store, cutoff, batch)
        return
    names = trace_archival_names()
    tag = json.dumps({"type": "duration", "value": f"{days}d"})
    if report.archive_mode == "server":
        if not server_archives_traces(store.tracking):
            report.errors.append(
                "the tracking server does not archive traces: start it with MLFLOW_TRACE_ARCHIVAL_CONFIG "
                "(trace_archival.enabled: true) and MLFLOW_SERVER_ENABLE_JOB_EXECUTION (docs/deploy.md)"
            )
            return
        store.client.set_experiment_tag(store.experiment_id, names.retention_tag, tag)
        report.archive_due = _count(store, cutoff, batch, cap=batch)
        say(f"retention: the tracking server archives traces older than {days} days")
        return
    store.client.set_experiment_tag(store.experiment_id, names.retention_tag, tag)
    report.archived = 0
    while True:
        done = archive_traces(store.tracking, location=location or "", retention=BROADER, max_traces=batch)
        report.archived += done
        say(f"retention: {report.archived} traces archived")
        if done < batch:
            break
    report.archive_due = _count(store, cutoff, batch, cap=batch)
    if report.archive_due:
        report.errors.append(
            f"{report.archive_due}{'+' if report.archive_due >= batch else ''} traces older than {days} "
            "days could not be archived (MLflow's log says why: mlflow.store.tracking.sqlalchemy_store); "
            "their spans stay in the database and the next pass tries again"
        )
