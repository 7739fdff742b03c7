"""Request counters, aggregated across worker processes through a small file per process.

Each process keeps its counters in memory and a daemon thread writes them to
FLYWHEEL_HOME/metrics/<pid>.json every half second while they change (and when
asked to report), so /metrics in any worker sums every worker's numbers. The file
of a process that no longer runs still counts for DEAD_FILE_GRACE seconds after
its last write (a worker killed a moment ago), then a report deletes it, so a
long-lived FLYWHEEL_HOME does not sum every process it ever ran.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_FLUSH_EVERY = 0.5
DEAD_FILE_GRACE = 60.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@dataclass
class Counters:
    request_count: int = 0
    error_count: int = 0
    latency_sum_ms: float = 0.0
    models_served: set[str] = field(default_factory=set)


class RequestCounters:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / f"{os.getpid()}.json"
        self.counters = Counters()
        self._lock = threading.Lock()
        self._flushed = 0.0
        self._dirty = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Flush every half second while dirty, so idle workers still report their last requests."""
        if self._thread is None:
            self.flush()  # a reused pid's stale file from a dead process is replaced now
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="flywheel-metrics", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(_FLUSH_EVERY):
            if self._dirty:
                self.flush()

    def record(self, model: str | None, latency_ms: float, error: bool) -> None:
        with self._lock:
            self.counters.request_count += 1
            self.counters.error_count += int(error)
            if not error:
                self.counters.latency_sum_ms += latency_ms
                if model:
                    self.counters.models_served.add(model)
            self._dirty = True

    def flush(self) -> None:
        with self._lock:
            data = {
                "request_count": self.counters.request_count,
                "error_count": self.counters.error_count,
                "latency_sum_ms": self.counters.latency_sum_ms,
                "models_served": sorted(self.counters.models_served),
            }
            self._flushed = time.monotonic()
            self._dirty = False
        self.directory.mkdir(parents=True, exist_ok=True)
        # a temp name of this thread's own: two flushes at once (a report and the timer) never
        # rename each other's file away
        tmp = self.path.with_suffix(f".{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.path)

    def report(self) -> dict[str, Any]:
        """SPEC.md's /metrics JSON, summed over every process that served this FLYWHEEL_HOME."""
        self.flush()
        total = Counters()
        now = time.time()
        for path in self.directory.glob("*.json"):
            if path != self.path and self._expired(path, now):
                path.unlink(missing_ok=True)
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # a file being replaced right now
            total.request_count += data["request_count"]
            total.error_count += data["error_count"]
            total.latency_sum_ms += data["latency_sum_ms"]
            total.models_served.update(data["models_served"])
        ok = total.request_count - total.error_count
        return {
            "request_count": total.request_count,
            "error_count": total.error_count,
            "average_latency_ms": round(total.latency_sum_ms / ok, 2) if ok else 0.0,
            "models_served": sorted(total.models_served),
        }

    @staticmethod
    def _expired(path: Path, now: float) -> bool:
        """The file of a process that is gone and has not written for DEAD_FILE_GRACE seconds."""
        if not path.stem.isdigit() or _alive(int(path.stem)):
            return False
        try:
            return now - path.stat().st_mtime > DEAD_FILE_GRACE
        except OSError:
            return False


def prometheus(report: dict[str, Any], extra: dict[str, float] | None = None) -> str:
    lines = [
        "# HELP flywheel_requests_total Prediction requests served.",
        "# TYPE flywheel_requests_total counter",
        f"flywheel_requests_total {report['request_count']}",
        "# HELP flywheel_errors_total Prediction requests that failed.",
        "# TYPE flywheel_errors_total counter",
        f"flywheel_errors_total {report['error_count']}",
        "# HELP flywheel_average_latency_ms Mean latency of successful predictions.",
        "# TYPE flywheel_average_latency_ms gauge",
        f"flywheel_average_latency_ms {report['average_latency_ms']}",
    ]
    if "models_served" in report:  # left out of a report without the key for model names (/metrics)
        lines += [
            "# HELP flywheel_model_served Models that served at least one prediction.",
            "# TYPE flywheel_model_served gauge",
        ]
        lines += [f'flywheel_model_served{{model="{_label(m)}"}} 1' for m in report["models_served"]]
    for name, value in (extra or {}).items():
        lines += [f"# TYPE flywheel_{name} gauge", f"flywheel_{name} {value}"]
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
