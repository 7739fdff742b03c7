"""Scale-out benchmark: two API hosts on one PostgreSQL-backed MLflow tracking server.

    .venv/bin/python -m benchmarks.scale_bench [--duration 20] [--concurrency 64] [--workers 2]

Starts a throw-away PostgreSQL cluster and `mlflow server` on it, then two `flywheel serve` hosts
with their own FLYWHEEL_HOME, every one with the command docs/deploy.md gives (tests/pg.py, as the
tests do). The program runs on the stand-in LM that only sleeps 100 ms (benchmarks/sleep_lm.py).
Each host gets half of `--concurrency` closed-loop clients (load_client.py, in their own processes).
Half-way through, `flywheel promote` (docs/deploy.md's command) moves Production to another
version; a probe asks both hosts every 50 ms which version they serve. Prints a markdown table;
nothing here is asserted. Needs PostgreSQL (scripts/install-test-deps) and runs as root or as a
user that may start it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.serve_bench import LM_SPEC, MODEL, run_load

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the cluster and deploy.md helpers the tests use

import pg  # noqa: E402


def register_two_versions(url: str) -> None:
    from benchmarks.sleep_lm import SleepLM
    from flywheel import registry
    from flywheel.demo.seed import joke_program
    from flywheel.store import connect

    store = connect()
    assert store.tracking_uri == url
    for k in (4, 2):
        info = registry.register_program(joke_program(k), MODEL, lm=SleepLM(), store=store)
    registry.promote(MODEL, "1", "Production", store)
    assert info.version == "2"


def delivered(cluster: pg.PostgresCluster, database: str, trace_ids: list[str]) -> int:
    with cluster.connect(database) as db:  # type: ignore[attr-defined]
        row = db.execute(
            "SELECT count(*) FROM trace_info WHERE request_id = ANY(%s)", (trace_ids,)
        ).fetchone()
    return int(row[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=64, help="clients over both hosts")
    parser.add_argument("--workers", type=int, default=2, help="flywheel serve workers per host")
    parser.add_argument("--ttl", type=float, default=2.0, help="FLYWHEEL_RESOLVE_TTL on the hosts")
    parser.add_argument("--drain-limit", type=float, default=300, help="seconds to wait for the outboxes")
    args = parser.parse_args()

    cluster = pg.start_cluster()
    procs: list[Any] = []
    server = None
    try:
        server = pg.start_tracking_server(cluster)
        mlflow_port = server.url.rsplit(":", 1)[1]
        home = cluster.directory / "homes"
        home.mkdir()
        os.environ.update(
            MLFLOW_TRACKING_URI=server.url,
            FLYWHEEL_HOME=str(home / "setup"),
            FLYWHEEL_LM=LM_SPEC,
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        register_two_versions(server.url)
        hosts = []
        for name in ("a", "b"):
            port = pg.free_port()
            env, argv = pg.deploy_command(
                "api-host",
                mlflow_host="127.0.0.1",
                mlflow_port=mlflow_port,
                flywheel_home=str(home / name),
                resolve_ttl=f"{args.ttl:g}",
                api_bind="127.0.0.1",
                api_port=str(port),
                api_workers=str(args.workers),
            )
            procs.append(pg.spawn(argv, env, home / f"{name}.log"))
            hosts.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(hosts, procs, strict=True):
            pg.wait_healthy(f"{url}/health", proc=proc)
        each = max(1, args.concurrency // 2)
        for url in hosts:  # warm every worker (each loads the program once)
            run_load(f"{url}/predict", "flywheel", each, 3)
        print(
            f"LM: sleeps 100 ms  clients: {each} per host  duration: {args.duration:.0f}s  "
            f"workers: {args.workers} per host  FLYWHEEL_RESOLVE_TTL: {args.ttl:g}s  cores: {os.cpu_count()}",
            flush=True,
        )

        results: dict[str, dict[str, Any]] = {}
        seen: list[tuple[float, str, str]] = []  # (asked at, host, version) from the probe
        backlog: list[int] = []
        stop = threading.Event()

        def load(url: str) -> None:
            results[url] = run_load(f"{url}/predict", "flywheel", each, args.duration)

        def probe() -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    for url in hosts:
                        asked = time.monotonic()
                        r = client.post(f"{url}/predict", json={"model": MODEL, "inputs": {"topic": "probe"}})
                        if r.status_code == 200:
                            seen.append((asked, url, r.json()["model_version"]))
                        backlog.append(client.get(f"{url}/health").json()["outbox_backlog"])
                    time.sleep(0.05)

        threads = [threading.Thread(target=load, args=(u,)) for u in hosts]
        prober = threading.Thread(target=probe)
        began = time.monotonic()
        for t in [*threads, prober]:
            t.start()
        time.sleep(args.duration / 2)
        env, argv = pg.deploy_command(
            "promote",
            mlflow_host="127.0.0.1",
            mlflow_port=mlflow_port,
            flywheel_home=str(home / "cli"),
            model=MODEL,
            version="2",
        )
        full = {**os.environ, **env, "PATH": f"{pg.BIN}:{os.environ.get('PATH', '')}"}
        subprocess.run(argv, env=full, check=True, capture_output=True)
        promoted_at = time.monotonic()
        for t in threads:
            t.join()
        load_end = time.monotonic()
        # the probe runs on until every host answers with the new version (or 60 s more)
        while time.monotonic() < load_end + 60 and not all(
            any(u == url and v == "2" and a > promoted_at for a, u, v in seen) for url in hosts
        ):
            time.sleep(0.1)
        stop.set()
        prober.join()

        def waiting() -> int:
            return sum(httpx.get(f"{u}/health", timeout=30).json()["outbox_backlog"] for u in hosts)

        at_end = left = waiting()
        while left > 0 and time.monotonic() < load_end + args.drain_limit:
            time.sleep(0.2)
            left = waiting()
        drained = time.monotonic()

        ids = [t for r in results.values() for t in r["trace_ids"]]
        stored = delivered(cluster, server.database, ids)
        requests = sum(r["requests"] for r in results.values())
        errors = sum(r["errors"] for r in results.values())
        rps = sum(r["rps"] for r in results.values())
        delays = {}
        for url in hosts:  # from the CLI's return to the first answer with the new version
            new_after = [a for a, u, v in seen if u == url and v == "2" and a > promoted_at]
            delays[url] = (min(new_after, default=float("nan")) - promoted_at, bool(new_after))
        print(
            "\n| hosts | req/s (both) | share of the limit | p50 ms | p99 ms | errors |"
            " traces/s delivered | backlog at end of load (peak) | drained after | traces in MLflow |"
            " promotion visible after |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        limit = 2 * each / 0.1
        unfinished = "" if left == 0 else f" ({left} still queued)"
        p50 = max(r["p50_ms"] for r in results.values())
        p99 = max(r["p99_ms"] for r in results.values())
        worst = max(d for d, _ in delays.values())
        print(
            f"| 2 x `flywheel serve --workers {args.workers}` | {rps:.0f} | "
            f"{rps / limit:.0%} of {limit:.0f} | "
            f"{p50:.0f} | {p99:.0f} | {errors} | {stored / (drained - began):.0f} | {at_end} "
            f"({max(backlog, default=0)}) | {drained - load_end:.1f} s{unfinished} | "
            f"{stored / max(1, len(ids)):.1%} | "
            f"{worst:.1f} s (TTL {args.ttl:g} s) |"
        )
        per_host = ", ".join(
            f"{u}: {results[u]['rps']:.0f} req/s, p99 {results[u]['p99_ms']:.0f} ms" for u in hosts
        )
        print(
            f"\n{requests} predictions, {len(ids)} trace ids answered; per host: {per_host}; "
            f"new version seen on every host: {all(s for _, s in delays.values())}"
        )
    finally:
        for proc in procs:
            pg.stop(proc)
        if server is not None:
            pg.stop(server.proc)
        for log in sorted((cluster.directory / "homes").glob("*.log")):  # what delivery said
            lines = log.read_text(errors="replace").splitlines()
            said = [line for line in lines if "outbox" in line or "Traceback" in line]
            print(f"{log.name}: {len(said)} outbox lines" + "".join(f"\n  {x[:300]}" for x in said[:5]))
        pg.stop_cluster(cluster)


if __name__ == "__main__":
    main()
