"""Export of many rated traces from a PostgreSQL-backed tracking server, and a loop turn.

    .venv/bin/python -m benchmarks.export_bench [--traces 100000] [--loop-rows 10000]

Starts a throw-away PostgreSQL cluster and `mlflow server` on it (tests/pg.py: docs/deploy.md's
commands, as the tests and benchmarks/scale_bench.py do) and registers the demo joke program
twice through the server, as two models. Then it seeds, straight into the database:
`--traces` served predictions of the first model and `--loop-rows` of the second, each with a
four-span call tree (the rows `flywheel.trace_sql.write_records` writes, the same a host delivers)
and a reviewer's rating: `user_rating` (four in five thumbs up), and on one in ten a comment.
The ratings are bulk-inserted rows of MLflow's own assessments table, made from the `Feedback`
entities flywheel's feedback writes (`SqlAssessments.from_mlflow_entity`); seeding through
`create_assessment` would take an hour here. Seeding is not timed.

Timed, in one run, the rated traces of the first model (every row):
- the baseline, MLflow's own paging: `search_traces` through the tracking server's REST API with
  page tokens (what a script would write), and MLflow's SQL store in this process on the same
  database, 5,000 a page;
- `export_rows(reader="mlflow")`: flywheel's export paging MLflow through the server (a host
  without FLYWHEEL_EXPORT_DATABASE_URI);
- `export_rows(reader="sql")`: the one-query export (flywheel.export_sql) reading the database
  through FLYWHEEL_EXPORT_DATABASE_URI, as it would read a replica (target: 100,000 rows in 10 s).
  The two exports must give the same rows (checked; a difference is an error).
Then one `flywheel.loop` turn of the second model (export by one query, compile with
LabeledFewShot on the built-in offline LM, register the candidate through the artifact proxy,
gate on the held-out rows), with the time of each phase (`--loop-rows 0` skips it).
Prints a markdown table with each figure's ratio to the REST baseline; nothing else is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the cluster and deploy.md helpers the tests use

import pg  # noqa: E402

EXPORT_MODEL = "bench-export"
LOOP_MODEL = "bench-loop"
BATCH = 2000
TOPICS = ["coffee", "cats", "trains", "rain", "chess", "bread", "maps", "bees", "socks", "tea"]


def seed(sql_store: Any, experiment_id: str, model: str, version: str, model_id: str, n: int) -> None:
    """`n` served predictions of `model` with their ratings, written straight into the database."""
    from dataclasses import replace

    from mlflow.entities import AssessmentSource, Feedback
    from mlflow.store.tracking.dbmodels.models import SqlAssessments
    from sqlalchemy import insert

    from benchmarks.delivery_bench import sample_record
    from flywheel import trace_sql
    from flywheel.feedback import COMMENT, FEEDBACK_ID, RATING
    from flywheel.store import sql_session
    from flywheel.tracing import new_trace_id

    # ten real call trees, copied with fresh ids, inputs, outputs and times
    samples = [sample_record(topic, model, version, model_id) for topic in TOPICS]
    human = AssessmentSource(source_type="HUMAN", source_id="alice")
    base_ns = time.time_ns() - n * 1_000_000  # one prediction a millisecond, oldest first
    for start in range(0, n, BATCH):
        items, rated = [], []
        for i in range(start, min(n, start + BATCH)):
            sample = samples[i % len(samples)]
            shift = base_ns + i * 1_000_000 - sample.start_ns
            record = replace(
                sample,
                trace_id=new_trace_id(),
                inputs={"topic": f"{sample.inputs['topic']} #{i}"},
                outputs={"joke": f"{sample.outputs['joke']} ({i})"},
                start_ns=sample.start_ns + shift,
                end_ns=sample.end_ns + shift,
            )
            items.append(record)
            rated.append((record.trace_id, record.start_ns // 1_000_000, i))
        trace_sql.write_records(sql_store, experiment_id, items)
        rows = []
        for trace_id, at_ms, i in rated:
            values = {RATING: "thumbs_down" if i % 5 == 4 else "thumbs_up"}
            if i % 10 == 0:
                values[COMMENT] = f"checked by alice ({i})"
            for name, value in values.items():
                fb = Feedback(name=name, value=value, source=human, metadata={FEEDBACK_ID: f"fb-{i}"})
                fb.trace_id = trace_id
                row = SqlAssessments.from_mlflow_entity(fb)
                row.experiment_id, row.trace_timestamp_ms = int(experiment_id), at_ms
                rows.append({c.name: getattr(row, c.name) for c in SqlAssessments.__table__.columns})
        with sql_session(sql_store) as session:
            session.execute(insert(SqlAssessments.__table__), rows)
        print(f"  seeded {min(n, start + BATCH)}/{n} of {model}", file=sys.stderr, end="\r")
    print(file=sys.stderr)


def mlflow_paging(store: Any, experiment_id: str, model: str, page: int) -> int:
    """The baseline: MLflow's `search_traces`, page by page (page tokens), the same filter."""
    from flywheel.export import RATING
    from flywheel.tracing import model_filter

    flt = f"{model_filter(model)} AND feedback.`{RATING}` IS NOT NULL"
    token, count = None, 0
    while True:
        infos, token = store.search_traces(
            locations=[experiment_id],
            filter_string=flt,
            max_results=page,
            order_by=["timestamp_ms DESC"],
            page_token=token,
        )
        count += len(infos)
        if not token:
            return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--loop-rows", type=int, default=10_000)
    parser.add_argument("--server-workers", type=int, default=2, help="`mlflow server --workers`")
    args = parser.parse_args()

    cluster = pg.start_cluster()
    server = None
    try:
        server = pg.start_tracking_server(cluster, workers=args.server_workers)
        home = Path(tempfile.mkdtemp(prefix="export-bench-"))
        database = cluster.uri(server.database)
        os.environ.update(
            MLFLOW_TRACKING_URI=server.url,
            FLYWHEEL_HOME=str(home),
            FLYWHEEL_EXPORT_DATABASE_URI=database,  # the replica would be another host's URI
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            # a 500-trace page of the REST baseline can take longer than flywheel's 10 s client
            # timeout on a loaded machine; the baseline is timed, not cut short
            MLFLOW_HTTP_REQUEST_TIMEOUT=os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "300"),
        )
        from mlflow import MlflowClient

        from flywheel import registry
        from flywheel.demo.seed import joke_program
        from flywheel.export import PAGE, REST_PAGE, export_rows
        from flywheel.loop import loop
        from flywheel.runtime import open_runtime

        with open_runtime() as rt:
            versions = {}
            for model in (EXPORT_MODEL, LOOP_MODEL):
                info = registry.register_program(joke_program(4), model, store=rt.store)
                registry.promote(model, info.version, "Production", rt.store)
                versions[model] = info
            sql_store = MlflowClient(tracking_uri=database)._tracking_client.store
            for model, n in ((EXPORT_MODEL, args.traces), (LOOP_MODEL, args.loop_rows)):
                if n:
                    v = versions[model]
                    seed(sql_store, rt.store.experiment_id, model, v.version, v.model_id or "", n)
            exp = rt.store.experiment_id
            timed: list[tuple[str, int, float]] = []

            def clock(label: str, work: Any) -> Any:
                began = time.perf_counter()
                out = work()
                timed.append((label, out if isinstance(out, int) else len(out), time.perf_counter() - began))
                return out

            clock(
                "baseline: MLflow's `search_traces` through the server, page tokens",
                lambda: mlflow_paging(rt.store.tracking, exp, EXPORT_MODEL, REST_PAGE),
            )
            clock(
                f"MLflow's SQL store in process, {PAGE} a page",
                lambda: mlflow_paging(sql_store, exp, EXPORT_MODEL, PAGE),
            )
            paged_rows = clock(
                "`export_rows`, MLflow's paging through the server (`reader='mlflow'`)",
                lambda: export_rows(rt, EXPORT_MODEL, reader="mlflow"),
            )
            rows = clock(
                "`export_rows` by one query (`reader='sql'`; target 10 s for 100,000)",
                lambda: export_rows(rt, EXPORT_MODEL, reader="sql"),
            )
            if rows != paged_rows:
                raise SystemExit("the one-query export and MLflow's paging gave different rows")

            phases: list[tuple[str, float]] = []
            last = [time.perf_counter()]

            def progress(line: str) -> None:
                now = time.perf_counter()
                phases.append((line, now - last[0]))
                last[0] = now

            turn, turned = None, 0.0
            if args.loop_rows:
                began = time.perf_counter()
                turn = loop(rt, LOOP_MODEL, progress=progress)
                turned = time.perf_counter() - began
    finally:
        if server is not None:
            pg.stop(server.proc)  # its workers would retry the database forever
        pg.stop_cluster(cluster)

    print(f"\nPostgreSQL-backed `mlflow server --workers {args.server_workers}`, {os.cpu_count()} cores\n")
    print("| work | rows | seconds | rows/s | vs baseline |")
    print("|---|---|---|---|---|")
    baseline = timed[0][2]
    for label, count, seconds in timed:
        print(f"| {label} | {count} | {seconds:.2f} | {count / seconds:.0f} | {baseline / seconds:.1f}x |")
    if turn is None:
        return
    verdict = turn.gate.verdict if turn.gate is not None else f"inconclusive: {turn.failure}"
    print(
        f"| loop turn (export, compile, register, gate): {verdict} | {turn.rows_exported} | "
        f"{turned:.1f} | {turn.rows_exported / turned:.0f} | |"
    )
    print("\nLoop turn phases (seconds until each progress line; the first includes the export):\n")
    for line, seconds in phases:
        print(f"- {seconds:6.1f} s  {line}")
    rest = turned - sum(seconds for _, seconds in phases)
    print(f"- {rest:6.1f} s  gate: both versions on the held-out rows, then the verdict ({verdict})")


if __name__ == "__main__":
    main()
