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
- flywheel as shipped: the same with `REST_IN_FLIGHT` requests in flight.

For each it prints traces per second, the ratio to the baseline, and the CPU the rest of the
machine spent per trace (the tracking server and PostgreSQL; everything but this process).
Asserts nothing. Needs PostgreSQL (scripts/install-test-deps).
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
    args = parser.parse_args()

    from mlflow import MlflowClient

    from flywheel import tracing
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

        paths: list[tuple[str, Callable[[list[Any]], Any]]] = [
            (
                "baseline: MLflow's public path (`start_trace` per trace + `log_spans`)",
                lambda r: tracing._write_public(store, experiment_id, r),
            ),
            ("flywheel: `log_spans` only, 1 request in flight", flywheel(1)),
            (f"flywheel: `log_spans` only, {shipped} in flight (shipped)", flywheel(shipped)),
        ]
        for _, write in paths:  # warm the server's code paths and the client's connections
            write(batch(tracing.PUBLIC_CHUNK))
        rows = []
        for name, write in paths:
            records = batch(args.traces)
            cpu = other_cpu()
            began = time.perf_counter()
            for start in range(0, len(records), 500):  # the outbox's batch (outbox.BATCH)
                write(records[start : start + 500])
            seconds = time.perf_counter() - began
            cpu = other_cpu() - cpu
            stored = client.get_trace(records[-1].trace_id)
            assert len(stored.data.spans) == len(sample.spans), "a trace came back incomplete"
            rows.append((name, len(records) / seconds, cpu * 1000 / len(records)))
    finally:
        if server is not None:
            pg.stop(server.proc)  # its workers would retry the database forever
        pg.stop_cluster(cluster)

    base = rows[0][1]
    print(
        f"\ntraces: {args.traces} per path, {len(sample.spans)} spans each  "
        f"mlflow server --workers {args.server_workers}  cores: {os.cpu_count()}\n"
    )
    print("| path | traces/s | vs baseline | server + PostgreSQL CPU ms per trace |")
    print("|---|---|---|---|")
    for name, rate, cpu_ms in rows:
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}x | {cpu_ms:.1f} |")


if __name__ == "__main__":
    main()
