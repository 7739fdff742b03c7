"""Retention on real MLflow stores: old unrated traces deleted, rated ones and a registered version's
lineage kept, old span payloads archived by MLflow's own archival, export and lineage still whole.

Old traces are written the way flywheel writes them (tracing.write_traces of TraceRecords) with
start times 40 days back, so nothing waits for a clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from flywheel import cli, retention, tracing
from flywheel.compile import compile_program
from flywheel.errors import RetentionError
from flywheel.runtime import Runtime, reset_runtime
from flywheel.store import Store, trace_archival_names
from flywheel.tracing import TraceRecord, new_trace_id

pytestmark = pytest.mark.backends("sqlite", "postgres")

MODEL = "retention-qa"
DAY_NS = 86_400 * 10**9
LONG = "Where is my parcel? " * 150  # 3,000 characters: the tag holds a marked preview


def _write(store: Store, n: int, days_ago: float, question: str = "q") -> list[str]:
    """`n` traces of MODEL v1 that started `days_ago` days ago, written as flywheel writes them."""
    records = []
    for i in range(n):
        start = time.time_ns() - int(days_ago * DAY_NS) + i * 1_000_000
        records.append(
            TraceRecord(
                new_trace_id(at=start / 1e9),
                MODEL,
                "1",
                None,
                {"question": f"{question} {i}"},
                {"answer": f"a {i}"},
                start,
                start + 5_000_000,
                route="stable",
            )
        )
    tracing.write_traces(store.tracking, store.experiment_id, records)
    return [r.trace_id for r in records]


def _assess(store: Store, trace_id: str, name: str, source_type: str) -> None:
    from mlflow.entities import AssessmentSource, Feedback

    a = Feedback(
        name=name, value="yes", source=AssessmentSource(source_type=source_type, source_id="someone")
    )
    a.trace_id = trace_id
    store.tracking.create_assessment(a)


def _ids(store: Store) -> set[str]:
    found, token = set(), None
    while True:
        infos, token = store.tracking.search_traces(
            locations=[store.experiment_id], max_results=500, page_token=token
        )
        found |= {i.trace_id for i in infos}
        if not token:
            return found


def _lineage(store: Store, version: str) -> dict[str, list[str]]:
    mv = store.client.get_model_version(MODEL, version)
    path = store.client.download_artifacts(mv.run_id, retention.LINEAGE_ARTIFACT)
    return json.loads(Path(path).read_text())


def _with(store: Store, **settings: Any) -> Store:
    return replace(store, settings=replace(store.settings, **settings))


@dataclass
class World:
    store: Store
    rated: list[str]  # thumbs up through feedback.submit; the first one's question is LONG
    corrected: str  # a correction and a thumbs down
    labelled: str  # only a review answer (a label schema's assessment, source HUMAN)
    judged: str  # only an LLM judge's assessment: unrated
    lineage: list[str]  # unrated, but the rows that trained (or held out for) version 1
    unrated: list[str]  # old and unrated: to delete
    recent: list[str]  # unrated but young: kept


@pytest.fixture
def world(fresh_store: Store) -> Iterator[World]:
    store = fresh_store
    old = 40
    lineage = _write(store, 4, old, "lineage")
    rows = [{"question": f"lineage {i}", "answer": f"a {i}", "trace_id": t} for i, t in enumerate(lineage)]
    compiled = compile_program(
        rows, "question -> answer", MODEL, optimizer="LabeledFewShot", progress=False, store=store
    )
    assert compiled.version.version == "1"
    rated = _write(store, 3, old, "rated")
    long_trace = TraceRecord(
        new_trace_id(at=time.time() - old * 86_400),
        MODEL,
        "1",
        None,
        {"question": LONG},
        {"answer": "in transit"},
        time.time_ns() - old * DAY_NS,
        time.time_ns() - old * DAY_NS + 1_000_000,
    )
    tracing.write_traces(store.tracking, store.experiment_id, [long_trace])
    rated = [long_trace.trace_id, *rated]
    corrected, labelled, judged = _write(store, 3, old, "other")
    unrated = _write(store, 7, old, "unrated")
    recent = _write(store, 2, 1, "recent")
    runtime = Runtime(store=store)
    try:
        for t in rated:
            runtime.submit_feedback(t, "thumbs_up")
        runtime.submit_feedback(corrected, "thumbs_down", corrected_output={"answer": "better"})
        assert runtime.outbox.flush(timeout=30)
    finally:
        runtime.close(timeout=10)
    _assess(store, labelled, f"{MODEL}:helpful", "HUMAN")
    _assess(store, judged, "safe", "LLM_JUDGE")
    yield World(store, rated, corrected, labelled, judged, lineage, unrated, recent)
    reset_runtime()


def _export(store: Store) -> list[dict[str, Any]]:
    runtime = Runtime(store=store)
    try:
        return runtime.export_rows(MODEL)
    finally:
        runtime.close(timeout=10)


def test_a_pass_deletes_old_unrated_traces_and_keeps_rated_lineage_and_recent(world: World) -> None:
    store = _with(world.store, flywheel_delete_unrated_after_days=30, flywheel_retention_batch=3)
    before = _ids(store)
    exported = _export(store)
    assert {r["trace_id"] for r in exported} == {*world.rated, world.corrected}

    dry = retention.run(store, dry_run=True)
    doomed = {*world.unrated, world.judged}
    assert dry.ok and dry.deleted == len(doomed)
    assert (dry.kept_rated, dry.kept_lineage, dry.lineage_versions) == (len(world.rated) + 2, 4, 1)
    assert _ids(store) == before  # a dry run changes nothing

    lines: list[str] = []
    report = retention.run(store, progress=lines.append)
    assert report.ok, report.errors
    assert report.deleted == len(doomed) and report.scanned == dry.scanned
    assert (report.kept_rated, report.kept_lineage) == (dry.kept_rated, dry.kept_lineage)
    assert len(lines) >= 4  # bounded batches of 3, each reported
    assert _ids(store) == before - doomed  # rated, corrected, labelled, lineage and recent survive
    assert _export(store) == exported  # the rows (the 3,000-character question whole) are unchanged
    lineage = _lineage(store, "1")
    assert set(lineage["train"]) | set(lineage["dev"]) == set(world.lineage)
    for trace_id in world.lineage:  # the lineage still resolves to its traces
        assert store.tracking.get_trace_info(trace_id).trace_id == trace_id

    again = retention.run(store)
    assert again.ok and again.deleted == 0 and again.kept_lineage == 4


def test_an_unreadable_lineage_deletes_nothing(world: World, artifact_dir: Any) -> None:
    store = _with(world.store, flywheel_delete_unrated_after_days=30)
    before = _ids(store)
    for found in artifact_dir(store).rglob("trace_ids.json"):
        if found.parent.name == "lineage":
            found.unlink()
    with pytest.raises(RetentionError, match="cannot read the lineage of retention-qa version 1"):
        retention.run(store)
    assert _ids(store) == before


@pytest.mark.backends("postgres")
def test_a_tracking_server_that_does_not_archive_is_an_error(world: World) -> None:
    store = _with(world.store, flywheel_archive_after_days=30)
    report = retention.run(store)
    assert report.archive_mode == "server" and report.archived is None
    assert not report.ok and "does not archive traces" in report.errors[0]
    names = trace_archival_names()
    assert names.retention_tag not in store.client.get_experiment(store.experiment_id).tags


# --- archival: MLflow's own, run by flywheel on a SQL store (sqlite; PostgreSQL directly) ----------


@pytest.fixture(params=["sqlite", "postgres-database"])
def sql_store(request: pytest.FixtureRequest, tmp_path: Path, make_store: Any) -> Iterator[Store]:
    if request.param == "sqlite":
        yield make_store(tmp_path / "home")
        return
    server = request.getfixturevalue("mlflow_on_postgres")
    server.reset(f"retention archival of {request.node.nodeid}")
    try:
        yield make_store(
            tmp_path / "home",
            MLFLOW_TRACKING_URI=server.cluster.uri(server.database),
            FLYWHEEL_ARCHIVE_LOCATION=(tmp_path / "archive").as_uri(),
        )
    finally:
        reset_runtime()
        server.release()


def test_archival_moves_old_span_payloads_and_export_reads_them_back(sql_store: Store) -> None:
    store = sql_store
    names = trace_archival_names()
    lineage = _write(store, 4, 40, "lineage")
    rows = [{"question": f"lineage {i}", "answer": f"a {i}", "trace_id": t} for i, t in enumerate(lineage)]
    compile_program(
        rows, "question -> answer", MODEL, optimizer="LabeledFewShot", progress=False, store=store
    )
    start = time.time_ns() - 40 * DAY_NS
    long_trace = TraceRecord(
        new_trace_id(at=start / 1e9), MODEL, "1", None, {"question": LONG}, {"answer": "x"}, start, start + 10
    )
    tracing.write_traces(store.tracking, store.experiment_id, [long_trace])
    rated = [long_trace.trace_id, *_write(store, 2, 40, "rated")]
    unrated = _write(store, 3, 40, "unrated")
    recent = _write(store, 2, 1, "recent")
    runtime = Runtime(store=store)
    try:
        for t in rated:
            runtime.submit_feedback(t, "thumbs_up")
        assert runtime.outbox.flush(timeout=30)
    finally:
        runtime.close(timeout=10)
    exported = _export(store)
    assert any(r["question"] == LONG for r in exported)
    store = _with(
        store,
        flywheel_archive_after_days=30,
        flywheel_delete_unrated_after_days=30,
        flywheel_retention_batch=2,
    )

    dry = retention.run(store, dry_run=True)
    assert (
        dry.ok and dry.archive_mode == "store" and dry.archive_due == len(rated) + len(lineage) + len(unrated)
    )
    assert dry.deleted == len(unrated)
    assert all(
        store.tracking.get_trace_info(t).tags[names.spans_location_tag] == names.in_store for t in rated
    )

    report = retention.run(store)
    assert report.ok, report.errors
    assert report.deleted == len(unrated)  # deleted first: their spans are not archived for nothing
    assert report.archived == len(rated) + len(lineage) and report.archive_due == 0
    for t in [*rated, *lineage]:
        assert store.tracking.get_trace_info(t).tags[names.spans_location_tag] == names.archived
    for t in recent:
        assert store.tracking.get_trace_info(t).tags[names.spans_location_tag] == names.in_store
    assert _ids(store) == {*rated, *lineage, *recent}
    root = next(s for s in store.tracking.get_trace(long_trace.trace_id).data.spans if s.parent_id is None)
    assert root.inputs == {"question": LONG}  # read back from the archive
    assert _export(store) == exported  # the truncated row is completed from the archived span
    assert set(sum(_lineage(store, "1").values(), [])) == set(lineage)
    tag = store.client.get_experiment(store.experiment_id).tags[names.retention_tag]
    assert json.loads(tag) == {"type": "duration", "value": "30d"}

    again = retention.run(store)
    assert again.ok and again.archived == 0 and again.deleted == 0


def test_the_command_runs_a_pass_and_says_when_retention_is_off(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flywheel import store as store_module
    from flywheel.config import get_settings

    assert cli.main(["retention"]) == 0
    assert "retention is off" in capsys.readouterr().out
    monkeypatch.setenv("FLYWHEEL_DELETE_UNRATED_AFTER_DAYS", "30")
    get_settings.cache_clear()
    store_module.reset()
    before = _ids(world.store)
    assert cli.main(["retention", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] and out["deleted"] == len(world.unrated) + 1 and out["errors"] == []
    assert _ids(world.store) == before
    assert cli.main(["retention"]) == 0
    assert f"{len(world.unrated) + 1} deleted" in capsys.readouterr().out
    assert _ids(world.store) == before - {*world.unrated, world.judged}
