"""Serving benchmark: flywheel serve vs mlflow models serve, trace completeness, export time.

Traces are complete when MLflow holds the trace and every span of its DSPy call tree (the
stand-in LM's call included, with token usage, as a real LM call's).

    .venv/bin/python -m benchmarks.serve_bench [--duration 20] [--concurrency 64] [--workers 2]

Both servers run the same registered program on a stand-in LM that only
sleeps 100 ms (benchmarks/sleep_lm.py), under the same closed-loop load of
`--concurrency` clients (aiohttp, in its own process), in one run. Prints a
markdown table; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-jokes"
LM_SPEC = "py:benchmarks.sleep_lm:SleepLM"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the load generator (runs in its own process) -------------------------------------------


async def _load(url: str, body_kind: str, concurrency: int, duration: float) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    trace_ids: list[str] = []
    deadline = time.perf_counter() + duration
    topics = ["cat", "dog", "coffee", "space", "music", "pizza", "weather", "math"]

    async def worker(n: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        i = 0
        while time.perf_counter() < deadline:
            topic = topics[(n + i) % len(topics)]
            i += 1
            body = (
                {"model": MODEL, "inputs": {"topic": topic}}
                if body_kind == "flywheel"
                else {"inputs": {"topic": topic}}
            )
            start = time.perf_counter()
            try:
                async with session.post(url, json=body) as response:
                    data = await response.json()
                    if response.status != 200:
                        errors += 1
                        continue
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            if body_kind == "flywheel":
                trace_ids.append(data["trace_id"])

    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=concurrency)
    began = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(worker(n, session) for n in range(concurrency)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "trace_ids": trace_ids,
    }


def run_load(url: str, kind: str, concurrency: int, duration: float) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.serve_bench",
            "--load",
            url,
            kind,
            str(concurrency),
            str(duration),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


# --- servers --------------------------------------------------------------------------------


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a server; its output goes to `<FLYWHEEL_HOME>/<command>.log` (read it when a figure is odd)."""
    log = Path(env["FLYWHEEL_HOME"]) / f"{Path(cmd[0]).name}-{cmd[2] if len(cmd) > 2 else 'server'}.log"
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def setup_store(home: Path) -> None:
    from benchmarks.sleep_lm import SleepLM
    from flywheel import registry
    from flywheel.demo.seed import joke_program
    from flywheel.store import connect

    store = connect()
    info = registry.register_program(joke_program(4), MODEL, lm=SleepLM(), store=store)
    registry.promote(MODEL, info.version, "Production", store)


def expected_spans() -> int:
    """How many spans one prediction's call tree has (the program run here under a CallTree)."""
    import dspy

    from benchmarks.sleep_lm import SleepLM
    from flywheel.calltree import CallTree
    from flywheel.demo.seed import joke_program

    tree = CallTree()
    with dspy.context(lm=SleepLM(0), callbacks=[tree], usage_tracker=tree):
        joke_program(4)(topic="cat")
    return len(tree.spans())


def complete_traces(trace_ids: list[str]) -> int:
    """How many of these ids have a trace info *and* every span of the call tree in MLflow."""
    from mlflow.store.tracking.dbmodels.models import SqlSpan, SqlTraceInfo
    from sqlalchemy import func, select

    from flywheel.store import connect

    tracking = connect().tracking
    wanted = expected_spans()
    complete = 0
    with tracking.ManagedSessionMaker() as session:
        for i in range(0, len(trace_ids), 500):
            chunk = trace_ids[i : i + 500]
            infos = {
                r[0]
                for r in session.execute(
                    select(SqlTraceInfo.request_id).where(SqlTraceInfo.request_id.in_(chunk))
                )
            }
            spans = {
                r[0]
                for r in session.execute(
                    select(SqlSpan.trace_id, func.count())
                    .where(SqlSpan.trace_id.in_(chunk))
                    .group_by(SqlSpan.trace_id)
                )
                if r[1] == wanted
            }
            complete += len(infos & spans)
    return complete


def bench_flywheel(env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    proc = start(
        [
            sys.executable,
            "-m",
            "flywheel",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(args.workers),
        ],
        env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health")
        run_load(f"{base}/predict", "flywheel", args.concurrency, 3)  # warm every worker
        result = run_load(f"{base}/predict", "flywheel", args.concurrency, args.duration)
        drain_started = time.monotonic()
        while httpx.get(f"{base}/health", timeout=10).json()["outbox_backlog"] > 0:
            time.sleep(0.2)
        result["drain_s"] = time.monotonic() - drain_started
    finally:
        stop(proc)
    ids = result.pop("trace_ids")
    result["traces_complete"] = complete_traces(ids) / max(1, len(ids))
    return result


def bench_mlflow_serve(env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    proc = start(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{MODEL}@Production",
            "-p",
            str(port),
            "--env-manager",
            "local",
        ],
        env,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping")
        run_load(f"http://127.0.0.1:{port}/invocations", "mlflow", args.concurrency, 3)
        result = run_load(f"http://127.0.0.1:{port}/invocations", "mlflow", args.concurrency, args.duration)
    finally:
        stop(proc)
    result.pop("trace_ids")
    return result


def bench_export(sizes: list[int], rated_share: float) -> list[dict[str, Any]]:
    """Export time at each store size: traces written in bulk, a share of them rated for real."""
    import flywheel
    from flywheel.runtime import get_runtime
    from flywheel.tracing import TraceRecord, new_trace_id, write_traces

    runtime = get_runtime()
    tracking = runtime.store.tracking
    version = "1"
    results = []
    have = 0
    for size in sizes:
        records = []
        for i in range(have, size):
            now = time.time_ns()
            records.append(
                TraceRecord(
                    new_trace_id(),
                    MODEL,
                    version,
                    None,
                    {"topic": f"t{i}"},
                    {"joke": f"j{i}"},
                    now,
                    now + 1_000_000,
                )
            )
        for i in range(0, len(records), 2000):
            write_traces(tracking, runtime.store.experiment_id, records[i : i + 2000])
        step = max(1, round(1 / rated_share)) if rated_share > 0 else 0
        for n, record in enumerate(records):
            if step and n % step == 0:
                flywheel.submit_feedback(
                    record.trace_id,
                    "thumbs_up" if n % 3 else "thumbs_down",
                    runtime=runtime,
                    corrected_output={"joke": "fixed"} if n % 5 == 0 else None,
                )
        runtime.outbox.flush(timeout=3600)
        have = size
        began = time.perf_counter()
        rows = flywheel.export_rows(MODEL, runtime=runtime)
        elapsed = time.perf_counter() - began
        results.append({"traces": size, "rated": len(rows), "seconds": elapsed})
        print(f"  export at {size:,} traces ({len(rows):,} rated): {elapsed:.2f}s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4, help="flywheel serve workers (API_WORKERS default)")
    parser.add_argument("--export-sizes", default="10000,100000")
    parser.add_argument("--rated-share", type=float, default=0.1)
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--skip-baseline", action="store_true", help="measure flywheel serve only")
    parser.add_argument("--load", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        url, kind, concurrency, duration = args.load
        print(json.dumps(asyncio.run(_load(url, kind, int(concurrency), float(duration)))))
        return

    home = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    env = dict(
        os.environ,
        FLYWHEEL_HOME=str(home),
        FLYWHEEL_LM=LM_SPEC,
        PYTHONPATH=str(ROOT),
        MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    )
    os.environ.update({k: env[k] for k in ("FLYWHEEL_HOME", "FLYWHEEL_LM", "MLFLOW_TRACKING_URI")})
    setup_store(home)
    limit = args.concurrency / 0.1
    print(
        f"store: {home}  LM: sleeps 100 ms  clients: {args.concurrency}  duration: {args.duration:.0f}s  "
        f"cores: {os.cpu_count()}",
        flush=True,
    )
    rows = []
    if not args.skip_serve:
        fly = bench_flywheel(env, args)
        print(f"  flywheel serve: {fly}", flush=True)
        rows = [(f"flywheel serve --workers {args.workers}", fly)]
        if not args.skip_baseline:
            ml = bench_mlflow_serve(env, args)
            print(f"  mlflow models serve: {ml}", flush=True)
            rows.append(("mlflow models serve (defaults)", ml))
    if rows:
        fly = rows[0][1]
        print(
            f"\nflywheel: {fly['rps'] / limit:.0%} of the {limit:.0f} req/s ceiling; "
            f"p99 {fly['p99_ms']:.0f} ms = {fly['p99_ms'] / 100:.1f} x the LM's 100 ms; "
            f"outbox drained {fly['drain_s']:.1f}s after the load"
        )
    sizes = [int(s) for s in args.export_sizes.split(",") if s]
    exports = bench_export(sizes, args.rated_share) if sizes else []

    print("\n| server | req/s | share of limit | p50 ms | p99 ms | errors | traces complete |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        complete = f"{r['traces_complete']:.1%}" if "traces_complete" in r else "n/a (no tracing)"
        print(
            f"| {name} | {r['rps']:.0f} | {r['rps'] / limit:.0%} of {limit:.0f} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['errors']} | {complete} |"
        )
    if len(rows) > 1:
        print(
            f"\nflywheel / mlflow models serve throughput: {rows[0][1]['rps'] / rows[1][1]['rps']:.1f}x; "
            f"outbox drained {rows[0][1]['drain_s']:.1f}s after the load stopped"
        )
    if exports:
        print("\n| traces in store | rated rows exported | export time |")
        print("|---|---|---|")
        for e in exports:
            print(f"| {e['traces']:,} | {e['rated']:,} | {e['seconds']:.2f} s |")


if __name__ == "__main__":
    main()
