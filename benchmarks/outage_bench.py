"""Outage benchmark: /health and the traces while the MLflow tracking server is down, under load.

    .venv/bin/python -m benchmarks.outage_bench [--duration 90] [--outage 60] [--outage-at 15]
        [--outage-mode stop|kill] [--concurrency 64] [--workers 4] [--json results.json]

The issue's "Done when" (issue 26): during a 60 s MLflow outage under load, /health answers
within 100 ms and says `degraded`, and nothing acknowledged is lost. One run:

1. a real `mlflow server` (sqlite backend, artifacts proxied, as tests/processes.py starts it),
   the benchmark's program registered there, `flywheel serve --workers N` pointed at it by
   MLFLOW_TRACKING_URI; a warm-up until every worker answered and the outbox is empty
   (benchmarks/serve_bench.py's);
2. serve_bench's closed-loop load (`--concurrency` clients, the 100 ms stand-in LM) for the whole
   scenario, in its own process;
3. meanwhile a poller sends GET /health every 200 ms, each on a fresh connection and in its own
   thread (a hung /health does not hide the next ones, as a load balancer's checks go on), and
   records when, how long, the status code, `status` and `outbox_backlog`;
4. at `--outage-at` the tracking server goes away for `--outage` seconds: `stop` SIGSTOPs its
   whole process group (a hung server: the kernel accepts connections, nobody answers: the
   harder case, every call waits for its timeout), `kill` SIGKILLs it and starts it again on the
   same port and store at the end of the outage;
5. after the load, the outbox's drain (bounded), then how many of the acknowledged trace ids
   (every 200's `trace_id`) are complete in the server's sqlite file (serve_bench's
   complete_traces: trace info state OK and every span of autolog's call tree).

Prints /health's latency and answers per phase (before, during, after the outage, the drain),
req/s and errors per phase, the time from the resume until /health says healthy again, the
drain, traces acknowledged vs complete, and the issue's targets met or NOT MET; --json writes
everything. Nothing here is asserted. Logs: the store folder printed first (FLYWHEEL_HOME).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.serve_bench import (
    LM_SECONDS,
    LM_SPEC,
    ROOT,
    _finite,
    _load,
    _p99,
    backlog,
    complete_traces,
    free_port,
    print_run,
    server_cpu,
    setup_store,
    start,
    stop,
    wait_drained,
    wait_http,
    warm_up,
)

HEALTH_MS = 100.0  # the bound on a /health answer during the outage
SERVED_SHARE = 0.9  # "under load": predictions go on through the outage, at this share of before
# what to grep a log for when a figure is odd (uvicorn's worker health check, tracebacks, 503s)
LOG_SIGNS = ("Traceback", "ERROR", "died", "timed out", "Terminating", "Killing", "health check", "503")


# --- the tracking server --------------------------------------------------------------------


def mlflow_server(home: Path, port: int) -> subprocess.Popen[bytes]:
    """`mlflow server` as tests/processes.py starts it (one worker, sqlite, artifacts proxied, no job
    runner), in its own session; its output is appended to `<home>/mlflow-server.log`."""
    from flywheel.ui.mlflow_ui import MLFLOW_UI_ENV

    argv = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{home / 'server.db'}",
        "--artifacts-destination",
        str(home / "artifacts"),
        "--workers",
        "1",
    ]
    env = {**MLFLOW_UI_ENV, **os.environ}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    with open(home / "mlflow-server.log", "ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


class Outage:
    """Takes the tracking server away and brings it back: `stop` (SIGSTOP/SIGCONT of its process
    group) or `kill` (SIGKILL, then a new server on the same port and sqlite file)."""

    def __init__(self, mode: str, home: Path, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.mode, self.home, self.port, self.proc = mode, home, port, proc
        self.restart_s: float | None = None  # kill: from the new start until it answers /health

    def begin(self) -> None:
        if self.mode == "stop":
            os.killpg(self.proc.pid, signal.SIGSTOP)
        else:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def end(self) -> None:
        if self.mode == "stop":
            os.killpg(self.proc.pid, signal.SIGCONT)
            return
        self.proc = mlflow_server(self.home, self.port)
        began = time.monotonic()
        wait_http(f"http://127.0.0.1:{self.port}/health", timeout=120)
        self.restart_s = time.monotonic() - began

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)  # a stopped group would not act on SIGTERM
        except ProcessLookupError:
            return
        stop(self.proc)


# --- the /health poller ---------------------------------------------------------------------


def health_once(port: int, timeout: float) -> dict[str, Any]:
    """GET /health on a fresh connection: latency (connect to last byte), status code or the
    exception's name, the body's status and outbox_backlog."""
    began = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/health", headers={"Connection": "close"})
        response = conn.getresponse()
        raw = response.read()
        code: int | str = response.status
    except (OSError, http.client.HTTPException) as exc:
        return {"ms": 1000 * (time.perf_counter() - began), "code": type(exc).__name__, "status": None}
    finally:
        conn.close()
    ms = 1000 * (time.perf_counter() - began)
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    return {
        "ms": ms,
        "code": code,
        "status": body.get("status"),
        "backlog": body.get("outbox_backlog"),
        "detail": body.get("detail"),
    }


class Poller:
    """GET /health every `every` seconds from `origin` (time.time()), each in its own thread."""

    def __init__(self, port: int, origin: float, every: float, timeout: float) -> None:
        self.port, self.origin, self.every, self.timeout = port, origin, every, timeout
        self.polls: list[dict[str, Any]] = []
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._runner = threading.Thread(target=self._run, name="health-poller", daemon=True)

    def start(self) -> None:
        self._runner.start()

    def _run(self) -> None:
        k = 0
        while not self._done.is_set():
            at = self.origin + k * self.every
            self._done.wait(max(0.0, at - time.time()))
            if self._done.is_set():
                return
            thread = threading.Thread(target=self._poll, daemon=True)
            thread.start()
            self._threads.append(thread)
            k += 1

    def _poll(self) -> None:
        t = time.time() - self.origin
        result = health_once(self.port, self.timeout)
        self.polls.append({"t": round(t, 3), **result})

    def stop(self) -> list[dict[str, Any]]:
        self._done.set()
        self._runner.join()
        for thread in self._threads:
            thread.join(self.timeout + 1)
        return sorted(self.polls, key=lambda p: p["t"])


# --- the load (serve_bench's, with the moment it starts) --------------------------------------


def load_process(url: str, args: argparse.Namespace, home: Path) -> tuple[subprocess.Popen[str], float]:
    """serve_bench's closed-loop load in its own process for --duration; returns it and the
    time.time() its clock started (the scenario's origin: outage and polls are timed from it)."""
    began_file = home / "load-began"
    began_file.unlink(missing_ok=True)
    spec = {
        "url": url,
        "kind": "flywheel",
        "concurrency": args.concurrency,
        "duration": args.duration,
        "began_file": str(began_file),
    }
    with open(home / "load.log", "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.outage_bench", "--load", json.dumps(spec)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    deadline = time.monotonic() + 60
    while not began_file.exists() or not began_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the load process did not start (see {home / 'load.log'})")
        time.sleep(0.01)
    return proc, float(began_file.read_text())


def _load_entry(spec: dict[str, Any]) -> None:
    import httptools  # noqa: F401  # imported before the clock starts, as _load does first
    import uvloop  # noqa: F401

    from benchmarks import load_client  # noqa: F401

    Path(spec["began_file"]).write_text(repr(time.time()))
    print(json.dumps(_load(spec)))


# --- the figures ----------------------------------------------------------------------------


def phases(args: argparse.Namespace, resumed: float, load_end: float, drained: float) -> dict[str, tuple]:
    """Scenario time ranges (seconds from the load's start): before, during, after the outage, drain."""
    return {
        "before": (0.0, args.outage_at),
        "during": (args.outage_at, resumed),
        "after": (resumed, load_end),
        "drain": (load_end, drained),
    }


def health_stats(polls: list[dict[str, Any]]) -> dict[str, Any]:
    ms = sorted(p["ms"] for p in polls)
    statuses = [p["status"] for p in polls]
    return {
        "polls": len(polls),
        "p50_ms": statistics.median(ms) if ms else math.nan,
        "p99_ms": _p99(ms),
        "max_ms": ms[-1] if ms else math.nan,
        "over_100ms": sum(m > HEALTH_MS for m in ms),
        "degraded_share": statuses.count("degraded") / len(polls) if polls else math.nan,
        "healthy": statuses.count("healthy"),
        "degraded": statuses.count("degraded"),
        "not_200": sum(p["code"] != 200 for p in polls),
        "codes": sorted({str(p["code"]) for p in polls}),
    }


def load_stats(timeline: list[dict[str, Any]], lo: float, hi: float) -> dict[str, Any]:
    """req/s, errors and the per-second p99s of the load's seconds that start in [lo, hi)."""
    seconds = [t for t in timeline if not t["tail"] and lo <= t["second"] - 1 < hi]
    p99s = sorted(t["p99_ms"] for t in seconds if not math.isnan(t["p99_ms"]))
    return {
        "seconds": len(seconds),
        "rps": sum(t["requests"] for t in seconds) / len(seconds) if seconds else math.nan,
        "errors": sum(t["errors"] for t in seconds),
        "silent_seconds": sum(t["requests"] == 0 for t in seconds),
        "p99_ms_median_second": statistics.median(p99s) if p99s else math.nan,
        "p99_ms_worst_second": p99s[-1] if p99s else math.nan,
    }


def recovery(polls: list[dict[str, Any]], resumed: float) -> dict[str, Any]:
    """Seconds from the resume to the first healthy /health, and whether any later one was not."""
    after = [p for p in polls if p["t"] >= resumed]
    first = next((i for i, p in enumerate(after) if p["status"] == "healthy"), None)
    if first is None:
        return {"healthy_after_s": None, "relapses": 0}
    return {
        "healthy_after_s": after[first]["t"] - resumed,
        "relapses": sum(p["status"] != "healthy" for p in after[first:]),
    }


def detection(polls: list[dict[str, Any]], began: float, resumed: float) -> dict[str, Any]:
    """When /health first said degraded after the outage began; how many answers after that, and
    after the probe's lag (each worker answers from its own probe, so until every worker's probe has
    checked once, answers may differ), did not say so."""
    from flywheel.runtime import MLFLOW_PROBE_EVERY, MLFLOW_PROBE_TIMEOUT

    lag = MLFLOW_PROBE_EVERY + MLFLOW_PROBE_TIMEOUT
    during = [p for p in polls if began <= p["t"] < resumed]
    settled = sum(p["status"] != "degraded" for p in during if p["t"] >= began + lag)
    first = next((i for i, p in enumerate(during) if p["status"] == "degraded"), None)
    if first is None:
        return {
            "degraded_after_s": None,
            "not_degraded_after_detection": len(during),
            "not_degraded_after_lag": settled,
        }
    return {
        "degraded_after_s": during[first]["t"] - began,
        "not_degraded_after_detection": sum(p["status"] != "degraded" for p in during[first:]),
        "not_degraded_after_lag": settled,
    }


def per_second(polls: list[dict[str, Any]], seconds: int) -> tuple[str, list[float]]:
    """One letter per second (h healthy, D degraded, E no 200 answer, . no poll; the worst of the
    second wins) and each second's slowest /health."""
    rank = {"h": 0, "D": 1, "E": 2}
    letters, worst = ["."] * seconds, [math.nan] * seconds
    for p in polls:
        s = int(p["t"])
        if not 0 <= s < seconds:
            continue
        letter = "E" if p["code"] != 200 else ("D" if p["status"] == "degraded" else "h")
        if letters[s] == "." or rank[letter] > rank[letters[s]]:
            letters[s] = letter
        worst[s] = p["ms"] if math.isnan(worst[s]) else max(worst[s], p["ms"])
    return "".join(letters), worst


def log_signs(home: Path) -> dict[str, list[str]]:
    """Lines of each log under `home` that name a failure (LOG_SIGNS), the first 8 of each."""
    found = {}
    for log in sorted(home.glob("*.log")):
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if any(s in ln for s in LOG_SIGNS)]
        if lines:
            found[log.name] = [f"({len(lines)} lines)", *lines[:8]]
    return found


def targets(
    health: dict[str, Any], detect: dict[str, Any], traces: dict[str, Any], drain: Any, load: dict[str, Any]
) -> list:
    from flywheel.runtime import MLFLOW_PROBE_EVERY, MLFLOW_PROBE_TIMEOUT

    bound = MLFLOW_PROBE_EVERY + MLFLOW_PROBE_TIMEOUT  # the probe's own lag: one pause and one check
    during = health["during"]
    after_s, late = detect["degraded_after_s"], detect["not_degraded_after_lag"]
    rows = [
        ("/health p99 during the outage", f"<= {HEALTH_MS:.0f} ms", f"{during['p99_ms']:.0f} ms",
         during["p99_ms"] <= HEALTH_MS),
        ("/health max during the outage", f"<= {HEALTH_MS:.0f} ms", f"{during['max_ms']:.0f} ms",
         during["max_ms"] <= HEALTH_MS),
        ("/health answered 200 during the outage", "every poll",
         f"{during['polls'] - during['not_200']} of {during['polls']}", during["not_200"] == 0),
        ("/health degraded throughout the outage",
         f"from <= {bound:.0f} s after it began (the probe's lag) to its end",
         "never" if after_s is None else f"first at {after_s:.1f} s, {late} not degraded after {bound:.0f} s",
         after_s is not None and after_s <= bound and late == 0),
        ("nothing acknowledged lost", "every acknowledged trace in MLflow, complete",
         f"{traces['traces'] - traces['traces_without_info']} of {traces['traces']} in MLflow, "
         f"{traces['traces_complete']:.2%} complete",
         traces["traces_without_info"] == 0 and traces["traces_complete"] >= 1.0),
        ("predictions served through the outage (implied: 'under load')",
         f">= {SERVED_SHARE:.0%} of the req/s before it, no second without an answer",
         f"{load['during']['rps']:.0f} req/s of {load['before']['rps']:.0f}, "
         f"{load['during']['silent_seconds']} seconds without an answer",
         load["during"]["rps"] >= SERVED_SHARE * load["before"]["rps"]
         and load["during"]["silent_seconds"] == 0),
        ("outbox drained after the load", "within --drain-timeout",
         "not drained" if drain is None else f"{drain:.1f} s", drain is not None),
    ]  # fmt: skip
    return [{"target": t, "wanted": w, "measured": m, "met": ok} for t, w, m, ok in rows]


# --- the run --------------------------------------------------------------------------------


def scenario(args: argparse.Namespace, home: Path, env: dict[str, str], ml_port: int, outage: Outage) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "flywheel", "serve", "--host", "127.0.0.1", "--port", str(port)]
    serve = start([*cmd, "--workers", str(args.workers)], env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health")
        warm = warm_up(base, f"{base}/predict", "flywheel", args, outbox=True)
        cpu_before = server_cpu(serve.pid)
        load, origin = load_process(f"{base}/predict", args, home)
        poller = Poller(port, origin, args.poll_every, args.health_timeout)
        poller.start()
        time.sleep(max(0.0, origin + args.outage_at - time.time()))
        outage.begin()
        began = time.time() - origin
        print(f"  outage ({args.outage_mode}) began at {began:.2f}s", flush=True)
        time.sleep(max(0.0, origin + args.outage_at + args.outage - time.time()))
        resume_at = time.time() - origin
        outage.end()
        resumed = time.time() - origin
        print(
            f"  outage ended at {resume_at:.2f}s (server answering from {resumed:.2f}s)"
            if args.outage_mode == "kill"
            else f"  outage ended (SIGCONT) at {resumed:.2f}s",
            flush=True,
        )
        out, _ = load.communicate()
        if load.returncode:
            raise RuntimeError(f"the load process failed (see {home / 'load.log'})")
        run = json.loads(out)
        load_end = time.time() - origin
        drain_s = wait_drained(base, args.drain_timeout)
        drained = time.time() - origin
        left = backlog(base) if drain_s is None else 0
        polls = poller.stop()
        cpu_after = server_cpu(serve.pid)
    finally:
        stop(serve)
    run["cpu_s"] = cpu_after["seconds"] - cpu_before["seconds"]
    run["cpu_ms_per_request"] = 1000 * run["cpu_s"] / run["requests"] if run["requests"] else math.nan
    run["processes"] = cpu_after["processes"]
    run["drain_s"] = drain_s
    return {
        "warmup": warm,
        "load": run,
        "polls": polls,
        "began": began,
        "resume_at": resume_at,
        "resumed": resumed,
        "load_end": load_end,
        "drained": drained,
        "left_in_outbox": left,
    }


def report(args: argparse.Namespace, home: Path, s: dict[str, Any], traces: dict[str, Any]) -> dict:
    run, polls = s["load"], s["polls"]
    spans = phases(args, s["resumed"], s["load_end"], s["drained"])
    health = {name: health_stats([p for p in polls if lo <= p["t"] < hi]) for name, (lo, hi) in spans.items()}
    load = {name: load_stats(run["timeline"], lo, hi) for name, (lo, hi) in spans.items() if name != "drain"}
    detect = detection(polls, s["began"], s["resumed"])
    recover = recovery(polls, s["resumed"])
    signs = log_signs(home)
    met = targets(health, detect, traces, run["drain_s"], load)

    print()
    print_run(f"flywheel serve --workers {args.workers} (whole scenario)", run)
    letters, worst = per_second(polls, math.ceil(s["drained"]))
    out_lo, out_hi = int(s["began"]), int(s["resumed"])
    print("  /health per second (h healthy, D degraded, E not 200 or no answer; ^ the outage):")
    for i in range(0, len(letters), 60):
        print(f"    {i:>4}s {letters[i : i + 60]}")
        print("          " + "".join("^" if out_lo <= j < out_hi else " " for j in range(i, i + 60)).rstrip())
    slow = [(j, ms) for j, ms in enumerate(worst) if ms > HEALTH_MS]
    if slow:
        shown = ", ".join(f"{j}s: {ms:.0f}" for j, ms in slow[:20])
        print(f"  seconds with a /health over {HEALTH_MS:.0f} ms ({len(slow)}): {shown} ms")

    print("\n| phase | seconds | /health p50 | p99 | max | > 100 ms | degraded | not 200 | req/s | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (lo, hi) in spans.items():
        h, ld = health[name], load.get(name)
        rps = "-" if ld is None else f"{ld['rps']:.0f}"
        errors = "-" if ld is None else str(ld["errors"])
        print(
            f"| {name} | {lo:.1f}-{hi:.1f} | {h['p50_ms']:.1f} ms | {h['p99_ms']:.1f} ms "
            f"| {h['max_ms']:.1f} ms | {h['over_100ms']} of {h['polls']} | {h['degraded_share']:.0%} "
            f"| {h['not_200']} | {rps} | {errors} |"
        )
    errors = ", ".join(f"{k}: {n}" for k, n in sorted(run["errors_by_kind"].items())) or "none"
    print(f"\nload errors by kind (whole run): {errors}")
    for name, ld in load.items():
        print(
            f"  {name}: {ld['rps']:.0f} req/s ({ld['silent_seconds']} s without an answer), per-second "
            f"p99 median {ld['p99_ms_median_second']:.0f} ms, worst {ld['p99_ms_worst_second']:.0f} ms"
        )
    after, late = detect["degraded_after_s"], detect["not_degraded_after_detection"]
    print(
        f"/health said degraded {'never' if after is None else f'{after:.1f}s'} after the outage began"
        f"{'' if after is None else f', then {late} answers were not'}"
    )
    if args.outage_mode == "kill":
        print(f"tracking server restarted in {outage_restart(s):.1f}s")
    back, relapses = recover["healthy_after_s"], recover["relapses"]
    print(
        f"/health healthy again {'never' if back is None else f'{back:.1f}s'} after the resume"
        f"{'' if back is None else f' ({relapses} answers not healthy after that)'}"
    )
    peak = max((p["backlog"] or 0 for p in polls if p.get("backlog") is not None), default=0)
    drain = "NOT drained" if run["drain_s"] is None else f"{run['drain_s']:.1f}s"
    print(f"outbox: peak backlog {peak}, drained {drain} after the load ({s['left_in_outbox']} left)")
    acked, share = traces["traces"], traces["traces_complete"]
    print(
        f"traces: {acked} acknowledged, {acked - traces['traces_without_info']} in "
        f"MLflow, {round(share * acked)} complete ({share:.2%}; "
        f"spans missing or wrong {traces['traces_with_spans_missing_or_wrong']}, LM span without usage "
        f"{traces['traces_lm_span_without_usage']})"
    )
    workers = run["workers"]
    if len(workers) != args.workers:  # more: one was restarted; fewer: one got no connection of the load
        started = sum(
            "Started server process" in ln for ln in (home / "python-flywheel.log").read_text().splitlines()
        )
        print(
            f"WORKERS: {len(workers)} distinct worker pids answered the load (of {args.workers}); "
            f"{started} worker processes were started (more than {args.workers}: some were restarted)"
        )
    if signs:
        print(f"log lines naming a failure (under {home}):")
        for name, lines in signs.items():
            print(f"  {name} {lines[0]}")
            for line in lines[1:]:
                print(f"    {line[:200]}")
    print("\ntargets (issue 26, outage):")
    for t in met:
        print(f"  {t['target']} ({t['wanted']}): {t['measured']}: {'met' if t['met'] else 'NOT MET'}")
    print(f"targets met: {sum(t['met'] for t in met)} of {len(met)}")
    return {"health": health, "load_phases": load, "detection": detect, "recovery": recover,
            "log_signs": signs, "targets": met, "peak_backlog": peak}  # fmt: skip


def outage_restart(s: dict[str, Any]) -> float:
    return float(s["resumed"] - s["resume_at"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=90, help="seconds of load, the whole scenario")
    parser.add_argument("--outage", type=float, default=60, help="seconds the tracking server is away")
    parser.add_argument("--outage-at", type=float, default=15, help="seconds into the load it goes")
    parser.add_argument(
        "--outage-mode", choices=("stop", "kill"), default="stop",
        help="stop: SIGSTOP its process group (hung: connections accepted, never answered); "
        "kill: SIGKILL, then started again on the same port and store",
    )  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--poll-every", type=float, default=0.2, help="seconds between two /health")
    parser.add_argument("--health-timeout", type=float, default=10, help="a /health's own bound, seconds")
    parser.add_argument("--warmup-timeout", type=float, default=120)
    parser.add_argument("--drain-timeout", type=float, default=180)
    parser.add_argument("--json", type=Path, help="write every figure of the run to this file")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        _load_entry(json.loads(args.load))
        return
    if args.outage_at + args.outage > args.duration:
        parser.error("--outage-at + --outage must end within --duration (the load runs throughout)")

    home = Path(tempfile.mkdtemp(prefix="flywheel-outage-"))
    ml_port = free_port()
    tracking = mlflow_server(home, ml_port)
    outage = Outage(args.outage_mode, home, ml_port, tracking)
    try:
        ml_uri = f"http://127.0.0.1:{ml_port}"
        wait_http(f"{ml_uri}/health", timeout=120)
        env = dict(
            os.environ,
            FLYWHEEL_HOME=str(home),
            FLYWHEEL_LM=LM_SPEC,
            PYTHONPATH=str(ROOT),
            MLFLOW_TRACKING_URI=ml_uri,
            PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        )
        os.environ.update({k: env[k] for k in ("FLYWHEEL_HOME", "FLYWHEEL_LM", "MLFLOW_TRACKING_URI")})
        setup_store(home)
        print(
            f"store: {home}  tracking: mlflow server {ml_uri} (sqlite)  "
            f"LM: sleeps {LM_SECONDS * 1000:.0f} ms  clients: {args.concurrency}  "
            f"workers: {args.workers}  cores: {os.cpu_count()}\n"
            f"scenario: {args.duration:.0f}s of load, the tracking server {args.outage_mode}ped from "
            f"{args.outage_at:.0f}s for {args.outage:.0f}s; /health every {args.poll_every * 1000:.0f} ms\n",
            flush=True,
        )
        s = scenario(args, home, env, ml_port, outage)
    finally:
        outage.close()
    # the acknowledged ids, read from the server's sqlite file (complete_traces reads a SQL store)
    from flywheel.config import get_settings

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'server.db'}"
    get_settings.cache_clear()
    ids = s["load"].pop("trace_ids")
    traces = complete_traces(ids)
    figures = report(args, home, s, traces)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("json", "load")}
        result = {"config": {**config, "store": str(home)}, "scenario": s, "traces": traces, **figures}
        args.json.write_text(json.dumps(_finite(result), indent=2, default=str))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
