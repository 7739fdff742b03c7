"""What tracing costs: the bare DSPy call, flywheel's full path, and `mlflow.dspy.autolog()`, in one run.

    .venv/bin/python -m benchmarks.trace_cost [--calls 300] [--burst 1000]

One process, the offline LM, the demo joke program (a `dspy.Predict` with 4 demos), CPU time
(`time.process_time`, every thread of the process: autolog's exporter thread and flywheel's
outbox thread count) per call, each measured with its traces written to a fresh sqlite store:

- bare: the program under `dspy.context(lm=...)`, nothing traced;
- flywheel: `serving.apredict` (the API's path: the call tree recorded by `calltree.CallTree`,
  the trace committed to the outbox before the answer), then the outbox drained into MLflow;
- autolog: the program with `mlflow.dspy.autolog()`, then MLflow's async queue flushed.

Then a burst: `--burst` calls submitted at 200 a second from 16 threads, for autolog and for
flywheel, and how many of their traces reached MLflow. Prints a markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MODEL = "bench-jokes"
TOPICS = ["cat", "dog", "coffee", "space", "music", "pizza", "weather", "math"]


def _cpu(fn: Callable[[], None]) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--burst", type=int, default=1000)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="flywheel-trace-cost-"))
    os.environ.update(
        FLYWHEEL_HOME=str(home),
        MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
        FLYWHEEL_LM="offline",
        FLYWHEEL_RESOLVE_TTL="3600",
    )
    import dspy
    import mlflow

    from flywheel import registry, serving
    from flywheel.demo.seed import joke_program
    from flywheel.lm import OfflineLM
    from flywheel.runtime import Runtime
    from flywheel.store import connect

    store = connect()
    info = registry.register_program(joke_program(4), MODEL, store=store)
    registry.promote(MODEL, info.version, "Production", store)
    program = joke_program(4)
    lm = OfflineLM()
    n = args.calls

    def bare() -> None:
        with dspy.context(lm=lm):
            for i in range(n):
                program(topic=TOPICS[i % len(TOPICS)])

    runtime = Runtime()

    async def through_flywheel(count: int) -> list[str]:
        return [
            (await serving.apredict(runtime, MODEL, {"topic": TOPICS[i % len(TOPICS)]})).trace_id
            for i in range(count)
        ]

    def flywheel_path() -> None:
        asyncio.run(through_flywheel(n))
        assert runtime.outbox.flush(timeout=600), runtime.outbox.last_error

    def autolog() -> None:
        with dspy.context(lm=lm):
            for i in range(n):
                program(topic=TOPICS[i % len(TOPICS)])
        mlflow.flush_trace_async_logging()

    # autolog writes to its own experiment of the same store, through MLflow's global URI (not
    # Store.fluent(): holding its lock while flywheel loads a program would deadlock)
    mlflow.set_tracking_uri(store.tracking_uri)
    autolog_experiment = mlflow.set_experiment("autolog").experiment_id

    bare()  # warm imports and caches of each path before timing
    asyncio.run(through_flywheel(5))
    runtime.outbox.flush(timeout=60)
    mlflow.dspy.autolog()
    autolog()
    mlflow.dspy.autolog(disable=True)

    cost = {"bare": _cpu(bare), "flywheel": _cpu(flywheel_path)}
    mlflow.dspy.autolog()
    try:
        cost["autolog"] = _cpu(autolog)
    finally:
        mlflow.dspy.autolog(disable=True)
    per_call = {k: v * 1000 / n for k, v in cost.items()}
    fly_over = per_call["flywheel"] - per_call["bare"]
    auto_over = per_call["autolog"] - per_call["bare"]
    sample = asyncio.run(through_flywheel(1))[0]
    runtime.outbox.flush(timeout=60)
    spans = len(store.client.get_trace(sample).data.spans)

    print(f"\nstore: {home}  calls: {n}  cores: {os.cpu_count()}  spans per flywheel trace: {spans}\n")
    print("| path | CPU ms per call | overhead above the bare call |")
    print("|---|---|---|")
    print(f"| bare DSPy call (no tracing) | {per_call['bare']:.1f} | — |")
    print(f"| flywheel (call tree, trace delivered) | {per_call['flywheel']:.1f} | {fly_over:.1f} ms |")
    print(f"| mlflow.dspy.autolog() (trace flushed) | {per_call['autolog']:.1f} | {auto_over:.1f} ms |")
    print(
        f"\nflywheel's overhead is {fly_over / auto_over:.3f} of autolog's "
        f"(1/{auto_over / max(fly_over, 1e-9):.1f}; target: at most 1/20)"
    )

    # --- the burst: submitted at 200/s from 16 threads ----------------------------------------
    burst = args.burst

    def paced(call: Callable[[int], Any]) -> float:
        began = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            futures = []
            for i in range(burst):
                delay = began + i / 200 - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(call, i))
            for f in futures:
                f.result()
        return burst / (time.monotonic() - began)

    local = threading.local()

    def autolog_call(i: int) -> None:
        with dspy.context(lm=lm):
            program(topic=f"burst {i}")

    def flywheel_call(i: int) -> None:
        loop = getattr(local, "loop", None) or asyncio.new_event_loop()
        local.loop = loop
        loop.run_until_complete(serving.apredict(runtime, MODEL, {"topic": f"burst {i}"}))

    def stored(experiment_id: str, flt: str = "") -> int:
        count, token = 0, None
        while True:
            infos, token = store.tracking.search_traces(
                locations=[experiment_id], filter_string=flt or None, max_results=500, page_token=token
            )
            count += len(infos)
            if not token:
                return count

    before = stored(autolog_experiment)
    mlflow.dspy.autolog()
    try:
        auto_rate = paced(autolog_call)
        mlflow.flush_trace_async_logging()
    finally:
        mlflow.dspy.autolog(disable=True)
    auto_stored = stored(autolog_experiment) - before
    fly_before = stored(store.experiment_id)
    fly_rate = paced(flywheel_call)
    assert runtime.outbox.flush(timeout=600), runtime.outbox.last_error
    fly_stored = stored(store.experiment_id) - fly_before
    runtime.close()

    print(f"\n| burst of {burst} calls submitted at 200/s | calls/s achieved | traces stored | dropped |")
    print("|---|---|---|---|")
    print(f"| mlflow.dspy.autolog() | {auto_rate:.0f} | {auto_stored} | {burst - auto_stored} |")
    print(f"| flywheel | {fly_rate:.0f} | {fly_stored} | {burst - fly_stored} |")


if __name__ == "__main__":
    main()
