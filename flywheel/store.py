"""The MLflow connection: tracking URI, registry URI and flywheel's experiment.

The embedded default keeps the sqlite database and every artifact under
FLYWHEEL_HOME, so nothing lands in a stray ./mlruns. An http(s) URI points
everything at a tracking server with no other change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import httpx
import mlflow
from mlflow import MlflowClient

from flywheel.config import ConfigError, Settings, apply_mlflow_client_settings, get_settings

_lock = threading.Lock()
_connected: dict[tuple[str, str], Store] = {}


@dataclass(frozen=True)
class Store:
    tracking_uri: str
    experiment_id: str
    settings: Settings

    @cached_property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    @cached_property
    def tracking(self) -> Any:
        """MLflow's tracking store: trace and assessment calls `MlflowClient` does not expose
        (`get_trace_info`, `start_trace`, `log_spans`, `create_assessment`)."""
        return self.client._tracking_client.store

    @contextmanager
    def active_model_preserved(self) -> Iterator[None]:
        """pyfunc's loader makes the loaded model this thread's "active model", which would
        silently attach later runs and metrics to it: put the caller's context back."""
        from mlflow.tracking import fluent

        previous = fluent._ACTIVE_MODEL_CONTEXT.get()
        try:
            yield
        finally:
            fluent._ACTIVE_MODEL_CONTEXT.set(previous)

    @staticmethod
    def unwrap_pyfunc(pyfunc: Any) -> Any:
        """The DSPy program inside a pyfunc model logged with the mlflow.dspy flavor (or None)."""
        wrapper = getattr(pyfunc, "_model_impl", None)  # the flavor's DspyModelWrapper
        return getattr(wrapper, "model", None)


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Raise ConfigError in one line when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach the MLflow tracking server at {uri}: {exc}") from None


def connect(settings: Settings | None = None) -> Store:
    """Point MLflow at the configured store and make sure flywheel's experiment exists."""
    settings = settings or get_settings()
    key = (settings.mlflow_tracking_uri, settings.flywheel_experiment)
    with _lock:
        store = _connected.get(key)
        if store is not None and mlflow.get_tracking_uri() == store.tracking_uri:
            return store
        uri = settings.mlflow_tracking_uri
        apply_mlflow_client_settings()
        if settings.is_embedded:
            settings.artifact_root.mkdir(parents=True, exist_ok=True)
        else:
            check_reachable(uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        with quiet("mlflow.store.db.utils", "alembic.runtime.migration"):  # "Creating initial tables..."
            experiment_id = ensure_experiment(settings, settings.flywheel_experiment)
        store = Store(uri, experiment_id, settings)
        _connected[key] = store
        return store


@contextmanager
def quiet(*loggers: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise MLflow loggers' threshold for a moment: their INFO lines land in notebook cells."""
    logs = [logging.getLogger(name) for name in loggers]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(level)
    try:
        yield
    finally:
        for log, old in zip(logs, levels, strict=True):
            log.setLevel(old)


def ensure_experiment(settings: Settings, name: str) -> str:
    """Get or create an experiment whose artifacts stay under FLYWHEEL_HOME when embedded."""
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    try:
        experiment = client.get_experiment_by_name(name)
    except Exception as exc:  # an unreachable database or server: one line, not a traceback
        raise ConfigError(f"cannot open the MLflow store {settings.mlflow_tracking_uri}: {exc}") from None
    if experiment is not None:
        return experiment.experiment_id
    location = (settings.artifact_root / name).as_uri() if settings.is_embedded else None
    return client.create_experiment(name, artifact_location=location)


def reset() -> None:
    """Forget cached connections (tests point flywheel at a fresh store)."""
    with _lock:
        _connected.clear()
