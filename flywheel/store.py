"""The MLflow connection: tracking URI, registry URI and flywheel's experiment.

The embedded default keeps the sqlite database and every artifact under
FLYWHEEL_HOME, so nothing lands in a stray ./mlruns. An http(s) URI points
everything at a tracking server with no other change.

`connect(allow_offline=True)` (what a server's runtime uses) starts while the
tracking server is down, from the experiment id this host recorded under
FLYWHEEL_HOME/last-known-good the last time it connected: a worker restarted
during an outage serves from last-known-good state instead of failing to start.
"""

from __future__ import annotations

import json
import logging
import os
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


def connect(settings: Settings | None = None, *, allow_offline: bool = False) -> Store:
    """Point MLflow at the configured store and make sure flywheel's experiment exists.

    `allow_offline`: when the store cannot be reached but this host has connected to it
    before, return a store with the recorded experiment id (not cached, so the next
    `connect` asks again) instead of raising ConfigError.
    """
    settings = settings or get_settings()
    key = (settings.mlflow_tracking_uri, settings.flywheel_experiment)
    with _lock:
        store = _connected.get(key)
        if store is not None and mlflow.get_tracking_uri() == store.tracking_uri:
            return store
        uri = settings.mlflow_tracking_uri
        apply_mlflow_client_settings()
        try:
            if settings.is_embedded:
                settings.artifact_root.mkdir(parents=True, exist_ok=True)
            else:
                check_reachable(uri)
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            with quiet("mlflow.store.db.utils", "alembic.runtime.migration"):  # "Creating initial tables..."
                experiment_id = ensure_experiment(settings, settings.flywheel_experiment)
        except ConfigError as exc:
            known = _recorded_experiment(settings) if allow_offline else None
            if known is None:
                raise
            logging.getLogger("flywheel.store").warning(
                "%s; starting from last-known-good state (experiment %s)", exc, known
            )
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            return Store(uri, known, settings)
        store = Store(uri, experiment_id, settings)
        _record_experiment(settings, experiment_id)
        _connected[key] = store
        return store


def _experiments_file(settings: Settings) -> Any:
    return settings.flywheel_home / "last-known-good" / "experiments.json"


def _recorded_experiment(settings: Settings) -> str | None:
    try:
        known = json.loads(_experiments_file(settings).read_text())
    except (OSError, ValueError):
        return None
    value = known.get(f"{settings.mlflow_tracking_uri} {settings.flywheel_experiment}")
    return str(value) if value else None


def _record_experiment(settings: Settings, experiment_id: str) -> None:
    if _recorded_experiment(settings) == experiment_id:
        return
    path = _experiments_file(settings)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known[f"{settings.mlflow_tracking_uri} {settings.flywheel_experiment}"] = experiment_id
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: no offline start, nothing else lost


def is_missing(exc: BaseException) -> bool:
    """MLflow answered that the thing does not exist (as opposed to not answering at all)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


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
