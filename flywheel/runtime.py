"""The serving state of one process: settings, store, LM, outbox, metrics, uptime.

The API, notebooks and widgets share it, so a notebook that predicts and a
background server in the same kernel write through the same outbox.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import dspy

from flywheel import registry
from flywheel.config import Settings, get_settings
from flywheel.lm import make_lm
from flywheel.metrics import Metrics
from flywheel.outbox import Item, Outbox
from flywheel.store import Store, connect
from flywheel.tracing import TraceRecord, write_traces

log = logging.getLogger("flywheel.server")


@dataclass
class Runtime:
    settings: Settings
    store: Store
    lm: dspy.BaseLM
    outbox: Outbox = field(init=False)
    metrics: Metrics = field(init=False)
    started_at: float = field(default_factory=time.monotonic)
    log: logging.Logger = log

    def __post_init__(self) -> None:
        home = self.settings.flywheel_home
        self.outbox = Outbox(home / "outbox.db", self._deliver)
        self.metrics = Metrics(home / "metrics")

    def start(self) -> None:
        self.outbox.start()
        self.metrics.start()

    def stop(self) -> None:
        self.outbox.stop()
        self.metrics.stop()

    def record_trace(self, record: TraceRecord) -> None:
        if self.settings.mlflow_enabled:
            self.outbox.put("trace", record.trace_id, record.to_dict())

    def _deliver(self, items: list[Item]) -> list[int]:
        from flywheel import feedback

        traces = [i for i in items if i.kind == "trace"]
        done: list[int] = []
        if traces:
            records = [TraceRecord(**i.payload) for i in traces]
            write_traces(self.store.tracking, self.store.experiment_id, records)
            done += [i.id for i in traces]
        rest = [i for i in items if i.kind == "feedback"]
        if rest:
            done += feedback.deliver(self.store, rest)
        return done

    def health(self) -> dict[str, Any]:
        connected = self.outbox.connected and self._mlflow_answers()
        backlog = self.outbox.backlog()
        return {
            "status": "healthy" if connected else "degraded",
            "mlflow_connected": connected,
            "loaded_models_count": len(registry.cached_versions()),
            "uptime_seconds": round(time.monotonic() - self.started_at, 1),
            "outbox_backlog": backlog,
            "detail": None if connected else (self.outbox.last_error or "MLflow does not answer"),
        }

    def _mlflow_answers(self) -> bool:
        from flywheel.store import check_reachable

        try:
            check_reachable(self.store.tracking_uri, timeout=1.0)
        except Exception:
            return False
        return True


_lock = threading.Lock()
_runtime: Runtime | None = None
_built_from: Settings | None = None


def get_runtime() -> Runtime:
    """This process's runtime, built and started on first use from the current settings.

    Started here, not only by the API's lifespan: a notebook that predicts without a
    server still gets its traces and feedback delivered in the background.
    """
    global _runtime, _built_from
    with _lock:
        settings = get_settings()
        if _runtime is None or _built_from != settings:
            if _runtime is not None:
                _runtime.stop()
            _runtime = Runtime(settings, connect(settings), make_lm(settings.flywheel_lm))
            _runtime.start()
            _built_from = settings
        return _runtime


def reset_runtime() -> None:
    global _runtime, _built_from
    with _lock:
        _built_from = None
        if _runtime is not None:
            _runtime.stop()
        _runtime = None


atexit.register(reset_runtime)  # at exit: commit what is queued and deliver what MLflow takes
