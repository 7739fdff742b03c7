"""Export by one query (flywheel.export_sql) gives the rows MLflow's `search_traces` paging gives.

A store with a varied set of rated traces, written the way flywheel writes them (traces through
`tracing.write_traces`, feedback through `submit_feedback` and the outbox, adjudications through
the adjudicator's role): end users and reviewers (one sharing an end user's id), majorities, ties,
an adjudicated disagreement, corrections, overridden (invalidated) ratings, truncated inputs and
outputs, traces on three days (one on a day's first millisecond, two in the same millisecond),
two models and an unrated trace. Every combination of rating filter, date bounds, limit and
export policy exported both ways must be the same list of rows.

On PostgreSQL the store is a tracking server (tests/pg.py): the one-query export reads the
server's database through FLYWHEEL_EXPORT_DATABASE_URI, a second URI to the same database (as a
read replica would be), and, in another test, through MLflow's SQL store in this process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flywheel import export, export_sql, registry, tracing
from flywheel.errors import ExportError, Unavailable
from flywheel.export import export_rows
from flywheel.runtime import Runtime, get_runtime, reset_runtime
from flywheel.store import Store

pytestmark = pytest.mark.backends("sqlite", "postgres")

ROUTER, JOKES = "support-router", "joke-generator"
UP, DOWN = "thumbs_up", "thumbs_down"
TODAY = datetime.now(UTC).date()
DAYS = (TODAY, TODAY - timedelta(days=2), TODAY - timedelta(days=9))


def _at(day: date, ms: int) -> int:
    """Nanoseconds `ms` milliseconds into `day` (UTC)."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return (int(start.timestamp() * 1000) + ms) * 1_000_000


def _write(rt: Runtime, model: str, inputs: dict[str, Any], outputs: dict[str, Any], start_ns: int) -> str:
    version = registry.list_versions(model, rt.store)[0]
    record = tracing.TraceRecord(
        tracing.new_trace_id(at=start_ns / 1e9),
        model,
        version.version,
        version.model_id,
        inputs,
        outputs,
        start_ns,
        start_ns + 5_000_000,
    )
    tracing.write_traces(rt.store.tracking, rt.store.experiment_id, [record])
    return record.trace_id


def _rate(rt: Runtime, trace_id: str, rating: str, **kwargs: Any) -> None:
    rt.submit_feedback(trace_id, rating, **kwargs)
    assert rt.outbox.flush(timeout=30)
    time.sleep(0.003)  # each assessment in its own millisecond: no tie for `newest` to break


def _mlflow_assessment(rt: Runtime, trace_id: str, kind: str, value: str, overrides: bool = False) -> None:
    """An assessment written with MLflow's own API, as its UI or a script writes one (no role)."""
    import mlflow.entities as entities

    tracking = rt.store.tracking
    previous = None
    if overrides:
        infos = tracking.get_trace_info(trace_id).assessments
        previous = next(a.assessment_id for a in infos if a.name == "user_rating" and a.valid is not False)
    source = entities.AssessmentSource(source_type="HUMAN", source_id="zed")
    made = getattr(entities, kind)(name="user_rating", value=value, source=source)
    if previous is not None:
        made.overrides = previous
    made.trace_id = trace_id
    tracking.create_assessment(made)
    time.sleep(0.003)


@pytest.fixture(scope="module")
def rt(demo_store_rw: Store) -> Iterator[Runtime]:
    reset_runtime()
    yield get_runtime()
    reset_runtime()


@pytest.fixture(scope="module")
def traces(rt: Runtime) -> dict[str, str]:
    """The varied store: name -> trace id."""
    long_ticket = "My parcel is late and nobody answers. " * 150  # past a tag: stored truncated
    long_category = "shipping, " * 400
    ids: dict[str, str] = {}
    made = 0

    def trace(name: str, day: date, model: str = ROUTER, ms: int | None = None, **fields: Any) -> str:
        nonlocal made
        made += 1
        inputs = {"ticket": fields.get("ticket", f"{name} ticket")} if model == ROUTER else {"topic": name}
        outputs = {"category": fields.get("category", "billing")} if model == ROUTER else {"joke": name}
        at = _at(day, 3_600_000 + made * 1000 if ms is None else ms)
        ids[name] = _write(rt, model, inputs, outputs, at)
        return ids[name]

    for d, day in enumerate(DAYS):
        _rate(rt, trace(f"single-up-{d}", day), UP, user_id="eve")
        _rate(
            rt,
            trace(f"single-down-{d}", day),
            DOWN,
            user_id="fay",
            corrected_output={"category": f"fixed {d}"},
            comment=f"wrong on day {d}",
        )
    # an end user changes their mind: the first rating is overridden (invalid)
    changed = trace("changed", DAYS[1])
    _rate(rt, changed, UP, user_id="gus", comment="first thought")
    _rate(rt, changed, DOWN, user_id="gus", corrected_output={"category": "refund"})
    # three reviewers, two agree (the majority); the dissenter's correction stays out
    majority = trace("majority", DAYS[0])
    _rate(rt, majority, UP, user_id="ann", role="reviewer", comment="fine")
    _rate(rt, majority, DOWN, user_id="ben", role="reviewer", corrected_output={"category": "ben's"})
    _rate(rt, majority, UP, user_id="cid", role="reviewer")
    # all three down, two with corrections: the newest corrected one
    down = trace("majority-down", DAYS[2])
    _rate(rt, down, DOWN, user_id="ann", role="reviewer", corrected_output={"category": "ann's"})
    _rate(rt, down, DOWN, user_id="ben", role="reviewer")
    _rate(rt, down, DOWN, user_id="cid", role="reviewer", corrected_output={"category": "cid's"})
    # a tie between two reviewers: only `latest` decides it
    tie = trace("tie", DAYS[0])
    _rate(rt, tie, UP, user_id="ann", role="reviewer")
    _rate(rt, tie, DOWN, user_id="ben", role="reviewer", corrected_output={"category": "tie"})
    # a disagreement an adjudicator decided
    judged = trace("adjudicated", DAYS[1])
    _rate(rt, judged, UP, user_id="ann", role="reviewer")
    _rate(rt, judged, DOWN, user_id="ben", role="reviewer")
    _rate(
        rt,
        judged,
        DOWN,
        user_id="adjudicator:judy",
        adjudication=True,
        corrected_output={"category": "judged"},
        comment="decided",
    )
    # an end user and a reviewer with the same id are two people
    twins = trace("twins", DAYS[0])
    _rate(rt, twins, UP, user_id="alice", comment="as a user")
    _rate(rt, twins, DOWN, user_id="alice", role="reviewer", corrected_output={"category": "reviewed"})
    # a reviewer overrides their own rating
    redo = trace("redo", DAYS[2])
    _rate(rt, redo, DOWN, user_id="dan", role="reviewer", corrected_output={"category": "first"})
    _rate(rt, redo, UP, user_id="dan", role="reviewer", comment="on second look")
    # truncated tags: the input, then the output (corrected by the reviewer)
    _rate(rt, trace("long-input", DAYS[0], ticket=long_ticket), UP, user_id="eve")
    _rate(rt, trace("long-output", DAYS[1], category=long_category), DOWN, user_id="hal", role="reviewer")
    _rate(
        rt,
        trace("long-output-fixed", DAYS[1], category=long_category),
        DOWN,
        user_id="hal",
        role="reviewer",
        corrected_output={"category": "short"},
    )
    # date edges: a day's first millisecond and its last, and two traces in the same millisecond
    _rate(rt, trace("first-ms", DAYS[1], ms=0), UP, user_id="eve")
    _rate(rt, trace("last-ms", DAYS[2], ms=86_399_999), DOWN, user_id="eve")
    _rate(rt, trace("same-ms-a", DAYS[1], ms=43_200_000), UP, user_id="ivy")
    _rate(rt, trace("same-ms-b", DAYS[1], ms=43_200_000), DOWN, user_id="ivy")
    # someone overrides an end user's rating in MLflow's own UI (a Feedback that `overrides` it):
    # the end user's becomes invalid and counts no more
    taken = trace("overridden-in-mlflow", DAYS[0])
    _rate(rt, taken, UP, user_id="eve")
    _mlflow_assessment(rt, taken, "Feedback", DOWN, overrides=True)
    # an expectation named like the rating is no rating: the trace is not a rated one
    _mlflow_assessment(rt, trace("expectation-only", DAYS[0]), "Expectation", UP)
    # another model's rated traces, and an unrated trace
    for d, day in enumerate(DAYS):
        _rate(rt, trace(f"joke-{d}", day, model=JOKES), UP if d else DOWN, user_id="eve")
    trace("unrated", DAYS[0])
    return ids


RATINGS = ("any", UP, DOWN)
BOUNDS = (
    (None, None),
    (DAYS[1], DAYS[1]),
    (DAYS[2], DAYS[1]),
    (DAYS[1], None),
    (None, DAYS[2]),
    (None, DAYS[1] - timedelta(days=1)),  # ends just before "first-ms"
    (TODAY + timedelta(days=1), None),
)
POLICIES = ("adjudicated,majority,single,latest", "adjudicated,majority,single", "latest", "single,majority")


def _both(rt: Runtime, model: str, **kwargs: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return export_rows(rt, model, reader="sql", **kwargs), export_rows(rt, model, reader="mlflow", **kwargs)


@pytest.fixture
def sql_reader(rt: Runtime, backend: str, request: pytest.FixtureRequest) -> Iterator[Runtime]:
    """The runtime with the one-query export available: in process on sqlite; on PostgreSQL
    through FLYWHEEL_EXPORT_DATABASE_URI, a second URI to the tracking server's database."""
    saved = rt.settings
    if backend == "postgres":
        server = request.getfixturevalue("mlflow_on_postgres")
        cluster = server.cluster
        uri = (
            f"postgresql://{cluster.user}@localhost:{cluster.port}/{server.database}?application_name=replica"
        )
        rt.settings = replace(saved, flywheel_export_database_uri=uri)
    try:
        yield rt
    finally:
        rt.settings = saved


def test_one_query_export_equals_mlflow_paging(sql_reader: Runtime, traces: dict[str, str]) -> None:
    rt = sql_reader
    everything, same = _both(rt, ROUTER, with_corrected=True)
    assert everything == same
    by_id = {r["trace_id"]: r for r in everything}
    # the store is as varied as meant: every rule, corrections, truncated values read whole
    assert {r["decision_rule"] for r in everything} == {"single", "majority", "latest", "adjudicated"}
    assert by_id[traces["adjudicated"]]["category"] == "judged"
    assert by_id[traces["changed"]]["rating"] == DOWN and by_id[traces["changed"]]["category"] == "refund"
    assert by_id[traces["long-input"]]["ticket"].startswith("My parcel") and len(
        by_id[traces["long-input"]]["ticket"]
    ) == len("My parcel is late and nobody answers. " * 150)
    assert len(by_id[traces["long-output"]]["category"]) == len("shipping, " * 400)
    assert traces["unrated"] not in by_id and traces["joke-0"] not in by_id
    assert traces["expectation-only"] not in by_id
    assert by_id[traces["overridden-in-mlflow"]]["decision_rule"] == "single"  # eve's is invalid
    order = [r["trace_id"] for r in everything]
    pair = sorted((traces["same-ms-a"], traces["same-ms-b"]))  # one millisecond: MLflow's tie-break
    assert order.index(pair[1]) == order.index(pair[0]) + 1
    for rating in RATINGS:
        for start, end in BOUNDS:
            for corrected in (False, True):
                got, want = _both(
                    rt, ROUTER, rating=rating, start_date=start, end_date=end, with_corrected=corrected
                )
                assert got == want, (rating, start, end, corrected)
    for limit in (1, 2, 5):
        for rating in RATINGS:
            got, want = _both(rt, ROUTER, rating=rating, limit=limit)
            assert got == want and len(got) <= limit, (limit, rating)
    jokes, same_jokes = _both(rt, JOKES)
    assert jokes == same_jokes and len(jokes) == 3
    jokes, same_jokes = _both(rt, JOKES, start_date=DAYS[2], end_date=DAYS[1])
    assert jokes == same_jokes and len(jokes) == 2


def test_every_export_policy_gives_the_same_rows(sql_reader: Runtime, traces: dict[str, str]) -> None:
    rt = sql_reader
    saved = rt.settings
    try:
        for policy in POLICIES:
            rt.settings = replace(saved, export_policy=policy)
            for rating in RATINGS:
                got, want = _both(rt, ROUTER, rating=rating, with_corrected=True)
                assert got == want, (policy, rating)
    finally:
        rt.settings = saved


def test_auto_reads_by_one_query_where_it_can(
    sql_reader: Runtime, traces: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = sql_reader
    assert export_sql.configured(rt)
    want = export_rows(rt, ROUTER, reader="mlflow")

    def paged(*args: Any, **kwargs: Any) -> Any:  # MLflow's paging: auto must not take it here
        raise AssertionError("auto paged through MLflow's search_traces")

    monkeypatch.setattr(export, "rated_trace_infos", paged)
    assert export_rows(rt, ROUTER) == want
    with pytest.raises(ExportError, match="reader must be one of"):
        export_rows(rt, ROUTER, reader="rest")


@pytest.mark.backends("postgres")
def test_the_export_database_is_where_rows_come_from(
    rt: Runtime, traces: dict[str, str], mlflow_on_postgres: Any, empty_home: Any, tmp_path: Path
) -> None:
    """FLYWHEEL_EXPORT_DATABASE_URI is read, not the tracking server: through a second URI to the
    same database the rows are the server's (and the connection is the replica URI's); a replica
    that holds nothing yet gives nothing; one that does not answer is a 503 without its password."""
    assert not export_sql.configured(rt)  # a tracking server alone: MLflow's paging
    with pytest.raises(ExportError, match="FLYWHEEL_EXPORT_DATABASE_URI"):
        export_rows(rt, ROUTER, reader="sql")
    cluster, database = mlflow_on_postgres.cluster, mlflow_on_postgres.database
    saved = rt.settings
    try:
        replica = f"postgresql+psycopg://{cluster.user}@localhost:{cluster.port}/{database}?application_name=fw-replica"
        rt.settings = replace(saved, flywheel_export_database_uri=replica)
        assert export_rows(rt, ROUTER) == export_rows(rt, ROUTER, reader="mlflow") != []
        with cluster.connect(database) as db:
            names = {row[0] for row in db.execute("SELECT application_name FROM pg_stat_activity").fetchall()}
        assert "fw-replica" in names
        lagging = empty_home("lagging") / "mlflow.db"  # MLflow's schema, no trace yet
        rt.settings = replace(saved, flywheel_export_database_uri=f"sqlite:///{lagging}")
        assert export_rows(rt, ROUTER) == []
        from processes import free_port

        down = f"postgresql://{cluster.user}:pw-never-shown-42@127.0.0.1:{free_port()}/{database}"
        rt.settings = replace(saved, flywheel_export_database_uri=down)
        with pytest.raises(Unavailable) as info:
            export_rows(rt, ROUTER)
        assert "pw-never-shown-42" not in str(info.value) and "***" in str(info.value)
        assert "pw-never-shown-42" not in repr(rt.settings)
    finally:
        rt.settings = saved


@pytest.mark.backends("postgres")
def test_mlflow_sql_store_in_process_on_postgres(
    rt: Runtime, traces: dict[str, str], mlflow_on_postgres: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLFLOW_TRACKING_URI naming the PostgreSQL database itself: export reads by one query through
    MLflow's own session (store.sql_session) and gives the tracking server's rows."""
    from flywheel import store
    from flywheel.config import get_settings

    served = export_rows(rt, ROUTER, reader="mlflow", with_corrected=True)
    cluster = mlflow_on_postgres.cluster
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cluster.uri(mlflow_on_postgres.database))
    get_settings.cache_clear()
    store.reset()
    direct = Runtime()
    try:
        assert direct.store.experiment_id == rt.store.experiment_id
        assert export_sql.configured(direct)
        for rating in RATINGS:
            got = export_rows(direct, ROUTER, reader="sql", rating=rating, with_corrected=True)
            assert got == [r for r in served if rating == "any" or r["rating"] == rating]
            assert got == export_rows(direct, ROUTER, reader="mlflow", rating=rating, with_corrected=True)
    finally:
        direct.close()
        monkeypatch.undo()
        get_settings.cache_clear()
        store.reset()


def test_bad_export_database_uri_is_a_config_error() -> None:
    from flywheel.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="FLYWHEEL_EXPORT_DATABASE_URI='mysql://u:\\*\\*\\*@h/db'"):
        load_settings({"FLYWHEEL_EXPORT_DATABASE_URI": "mysql://u:secret-pw@h/db"}, env_file=None)
    settings = load_settings({"FLYWHEEL_EXPORT_DATABASE_URI": "postgresql://u:secret-pw@h/db"}, env_file=None)
    assert "secret-pw" not in repr(settings)
