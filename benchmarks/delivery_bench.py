"""What one host delivers per second to a PostgreSQL-backed MLflow tracking server.

    .venv/bin/python -m benchmarks.delivery_bench [--traces 1000] [--server-workers 2]

Starts a throw-away PostgreSQL cluster and `mlflow server` on it (as docs/deploy.md says, through
tests/pg.py), then writes `--traces` traces as serving records them (the demo joke program under
flywheel's call tree, on the stand-in LM with no wait: 4 spans and token usage per trace), each
set of fresh ids, three ways:

- baseline: MLflow's public path as its own exporter writes, `start_trace` per trace, then the
  spans (`tracing._write_public`);
- flywheel, one request in flight: `log_spans` requests only (`tracing._write_rest`, the path
  `write_traces` takes for a tracking server) with one request in flight;
- flywheel as shipped: the same with `REST_IN_FLIGHT` requests in flight;

and, with the database itself (in this process, as a host's deliverer does with
FLYWHEEL_TRACE_DATABASE_URI or an in-process SQL store):

- MLflow's public path in process: `start_trace` per trace + `log_spans` on MLflow's own
  SqlAlchemyStore on the same database;
- flywheel's batched SQL path (`trace_sql`: executemany in one transaction a batch);
- flywheel's bulk writer (`trace_copy`: COPY into temporary tables, then INSERT ... ON CONFLICT
  DO NOTHING), the path a deliverer given FLYWHEEL_TRACE_DATABASE_URI takes.

Every path writes `--batch` traces a call (the outbox's batch, outbox.BATCH, by default). For
each it prints traces per second, the ratio to the baseline and to the in-process public path,
this process's CPU per trace, and the CPU the rest of the machine spent per trace (the tracking
server and PostgreSQL). Asserts nothing. Needs PostgreSQL (scripts/install-test-deps).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the cluster and deploy.md helpers the tests use

import pg  # noqa: E402


def sample_record(
    topic: str = "coffee", model: str = "bench-jokes", version: str = "1", model_id: str = "m-bench"
) -> Any:
    """One served prediction as serving records it: the demo joke program's real DSPy call tree
    (4 spans) on the stand-in LM, answering at once. The benchmarks copy it with fresh ids."""
    import dspy

    from benchmarks.sleep_lm import SleepLM
    from flywheel.calltree import CallTree
    from flywheel.demo.seed import joke_program
    from flywheel.tracing import TraceRecord, new_trace_id

    tree = CallTree()
    started = time.time_ns()
    with dspy.context(lm=SleepLM(latency=0), callbacks=[tree], usage_tracker=tree, track_usage=False):
        answer = joke_program(4)(topic=topic)
    return TraceRecord(
        new_trace_id(),
        model,
        version,
        model_id,
        {"topic": topic},
        {"joke": answer.joke},
        started,
        time.time_ns(),
        route="stable",
        spans=tree.spans(),
        **tree.summary(),
    )


def other_cpu() -> float:
    """CPU seconds the whole machine spent, minus this process's."""
    import psutil

    machine = psutil.cpu_times()
    mine = psutil.Process().cpu_times()
    return machine.user + machine.system + machine.nice - (mine.user + mine.system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", type=int, default=1000)
    parser.add_argument("--server-workers", type=int, default=2, help="`mlflow server --workers`")
    parser.add_argument("--batch", type=int, default=500, help="traces a call (outbox.BATCH)")
    args = parser.parse_args()

    import psutil
    from mlflow import MlflowClient

    from flywheel import trace_copy, trace_sql, tracing
    from flywheel.tracing import TraceRecord, new_trace_id

    sample = sample_record()
    cluster = pg.start_cluster()
    server = None
    try:
        server = pg.start_tracking_server(cluster, workers=args.server_workers)
        client = MlflowClient(tracking_uri=server.url)
        experiment_id = client.create_experiment("delivery-bench")
        store = client._tracking_client.store
        shipped = tracing.REST_IN_FLIGHT

        def batch(n: int) -> list[Any]:
            return [TraceRecord(**{**sample.to_dict(), "trace_id": new_trace_id()}) for _ in range(n)]

        def flywheel(in_flight: int) -> Callable[[list[Any]], Any]:
            return lambda records: tracing._write_rest(store, experiment_id, records, in_flight)

        database = cluster.uri(server.database)  # the tracking server's own database
        sql_store = MlflowClient(tracking_uri=database)._tracking_client.store  # MLflow's SqlAlchemyStore
        assert trace_sql.supports(sql_store)

        paths: list[tuple[str, Callable[[list[Any]], Any]]] = [
            (
                "baseline: MLflow's public path through the server (`start_trace` per trace + `log_spans`)",
                lambda r: tracing._write_public(store, experiment_id, r),
            ),
            ("flywheel: `log_spans` only, 1 request in flight", flywheel(1)),
            (f"flywheel: `log_spans` only, {shipped} in flight (shipped REST path)", flywheel(shipped)),
            (
                "MLflow's public path in process (SqlAlchemyStore: `start_trace` per trace + `log_spans`)",
                lambda r: tracing._write_public(sql_store, experiment_id, r),
            ),
            (
                "flywheel: batched SQL in process (`trace_sql`, executemany)",
                lambda r: tracing.write_traces(sql_store, experiment_id, r),
            ),
            (
                "flywheel: bulk writer (`trace_copy`, COPY; FLYWHEEL_TRACE_DATABASE_URI)",
                lambda r: trace_copy.write(database, experiment_id, r, "delivery-bench"),
            ),
        ]
        for _, write in paths:  # warm the server's code paths and the client's connections
            write(batch(tracing.PUBLIC_CHUNK))
        rows = []
        for name, write in paths:
            records = batch(args.traces)
            cpu, mine = other_cpu(), psutil.Process().cpu_times()
            began = time.perf_counter()
            for start in range(0, len(records), args.batch):
                write(records[start : start + args.batch])
            seconds = time.perf_counter() - began
            cpu = other_cpu() - cpu
            after = psutil.Process().cpu_times()
            own = (after.user + after.system) - (mine.user + mine.system)
            stored = client.get_trace(records[-1].trace_id)  # read back through the server
            assert len(stored.data.spans) == len(sample.spans), "a trace came back incomplete"
            rows.append((name, len(records) / seconds, own * 1000 / len(records), cpu * 1000 / len(records)))
    finally:
        if server is not None:
            pg.stop(server.proc)  # its workers would retry the database forever
        pg.stop_cluster(cluster)

    base, public = rows[0][1], rows[3][1]
    print(
        f"\ntraces: {args.traces} per path, {args.batch} a call, {len(sample.spans)} spans each  "
        f"mlflow server --workers {args.server_workers}  cores: {os.cpu_count()}\n"
    )
    print(
        "| path | traces/s | vs baseline | vs public path in process | "
        "this process CPU ms per trace | server + PostgreSQL CPU ms per trace |"
    )
    print("|---|---|---|---|---|---|")
    for name, rate, own_ms, cpu_ms in rows:
        ratios = f"{rate / base:.2f}x | {rate / public:.2f}x"
        print(f"| {name} | {rate:.0f} | {ratios} | {own_ms:.1f} | {cpu_ms:.1f} |")
    copy = rows[-1][1]
    print(
        f"\nbulk writer: {copy:.0f} traces/s (target >= 400), {copy / public:.1f}x MLflow's public path in "
        f"process and {copy / base:.1f}x through the server (target >= 15x)"
    )


if __name__ == "__main__":
    main()
