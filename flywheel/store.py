"""The MLflow connection: tracking URI, registry URI, flywheel's experiment, and MLflow's internals.

The embedded default keeps the sqlite database and every artifact under
FLYWHEEL_HOME, so nothing lands in a stray ./mlruns. An http(s) URI points
everything at a tracking server with no other change.

`connect()` never repoints MLflow's process-wide ("fluent") tracking and
registry URI: every explicit call goes through `Store.client`, and the few
fluent calls (runs, `log_model`, `genai.evaluate`, pyfunc loading) run inside
`Store.fluent()`, which points MLflow at this store under one process-wide lock
and puts the URIs and their environment variables back on exit. So two stores
in one process never write into each other.

Every MLflow internal flywheel touches is reached through one named function
here (see MLFLOW_INTERNALS); tests/test_store.py fails, naming the internal,
when an MLflow release moves one. docs/dependencies.md says how to move the pin.

`connect(allow_offline=True)` (what a server's runtime uses) starts while the
tracking server is down, from the experiment id this host recorded under
FLYWHEEL_HOME/last-known-good the last time it connected: a worker restarted
during an outage serves from last-known-good state instead of failing to start.

A tracking URI is printed, logged and written down (experiments.json, errors, a Store's repr)
without the password it may hold: `limits.redact_uri`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, cached_property
from types import SimpleNamespace
from typing import Any

import httpx
import mlflow
from mlflow import MlflowClient

from flywheel.config import (
    ConfigError,
    Settings,
    apply_mlflow_client_settings,
    environment_snapshot,
    get_settings,
    restore_environment,
)
from flywheel.errors import RetentionError
from flywheel.limits import redact, redact_uri, uri_secrets

_lock = threading.Lock()
_connected: dict[tuple[str, str], Store] = {}

# One lock for MLflow's process-wide URIs: held while a fluent call runs against one store.
# Re-entrant: register_program runs inside compile's run, evaluations inside the gate's run.
_fluent_lock = threading.RLock()
_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


# --- MLflow internals: each one named here, each one checked by tests/test_store.py -------------


class MlflowInternalMoved(RuntimeError):
    """An MLflow internal flywheel relies on is not where this MLflow release keeps it."""


MLFLOW_INTERNALS: dict[str, str] = {
    "mlflow.tracking.client.MlflowClient._tracking_client": "Store.tracking",
    "mlflow.tracking._tracking_service.client.TrackingServiceClient.store": "Store.tracking",
    "mlflow.tracking.fluent._ACTIVE_MODEL_CONTEXT": "Store.active_model_preserved",
    "mlflow.pyfunc.PyFuncModel._model_impl": "Store.unwrap_pyfunc",
    "mlflow.dspy.wrapper.DspyModelWrapper.model": "Store.unwrap_pyfunc",
    "mlflow.tracking._tracking_service.utils._tracking_uri": "Store.fluent",
    "mlflow.tracking._model_registry.utils._registry_uri": "Store.fluent",
    "mlflow.store.tracking.sqlalchemy_store.SqlAlchemyStore.ManagedSessionMaker": "supports_sql_traces",
    "mlflow.store.tracking.dbmodels.models.SqlSpan": "sql_trace_schema",
    "mlflow.store.tracking.dbmodels.models.SqlTraceInfo": "sql_trace_schema",
    "mlflow.store.tracking.dbmodels.models.SqlTraceMetadata": "sql_trace_schema",
    "mlflow.store.tracking.dbmodels.models.SqlTraceTag": "sql_trace_schema",
    "mlflow.store.tracking.utils.trace_analytics.PROMOTED_TRACE_METADATA_KEYS": "sql_trace_schema",
    "mlflow.store.tracking.utils.trace_analytics.analytics_columns_from_metadata": "sql_trace_schema",
    "mlflow.store.tracking.utils.trace_analytics.validate_trace_name": "sql_trace_schema",
    "mlflow.tracing.constant.SpansLocation": "sql_trace_schema",
    "mlflow.tracing.constant.TraceMetadataKey": "sql_trace_schema",
    "mlflow.tracing.constant.TraceTagKey": "sql_trace_schema",
    "mlflow.store.tracking.utils.trace_analytics.bounded_model_dimension": "sql_trace_schema",
    "mlflow.store.tracking.utils.trace_analytics.finite_float_or_none": "sql_trace_schema",
    "mlflow.tracing.utils.calculate_cost_by_model_and_token_usage": "sql_trace_schema",
    "mlflow.tracing.utils.SpanAggregationNode": "sql_trace_schema",
    "mlflow.tracing.utils.aggregate_cost_from_span_nodes": "sql_trace_schema",
    "mlflow.tracing.utils.aggregate_usage_from_span_nodes": "sql_trace_schema",
    "mlflow.utils.mlflow_tags.MLFLOW_ARTIFACT_LOCATION": "sql_trace_schema",
    "mlflow.store.tracking.abstract_store.AbstractStore.archive_traces": "archive_traces",
    "mlflow.store.tracking.abstract_store.AbstractStore.supports_trace_archival": "archive_traces",
    "mlflow.tracing.constant.TraceExperimentTagKey": "trace_archival_names",
    "mlflow.utils.server_info.fetch_server_info": "server_archives_traces",
    "mlflow.store.tracking.rest_store.RestStore.get_host_creds": "server_archives_traces",
    "mlflow.utils.server_info.SERVER_INFO_TRACE_ARCHIVAL_ENABLED": "server_archives_traces",
}
"""Every MLflow internal flywheel uses (dotted path) -> the function here that uses it. Those in
INSTANCE_ATTRIBUTES are set in `__init__`: the tests check them on real objects instead."""

INSTANCE_ATTRIBUTES = frozenset(
    {
        "mlflow.tracking.client.MlflowClient._tracking_client",
        "mlflow.store.tracking.sqlalchemy_store.SqlAlchemyStore.ManagedSessionMaker",
        "mlflow.dspy.wrapper.DspyModelWrapper.model",
        "mlflow.store.tracking.rest_store.RestStore.get_host_creds",
    }
)


def _moved(path: str, detail: object = "") -> MlflowInternalMoved:
    user = f" (used by flywheel.store.{MLFLOW_INTERNALS[path]})" if path in MLFLOW_INTERNALS else ""
    return MlflowInternalMoved(
        f"MLflow internal `{path}`{user} is not in mlflow=={mlflow.__version__}"
        + (f": {detail}" if detail else "")
        + ". Adapt flywheel/store.py or keep the pin (docs/dependencies.md, 'Moving a pin')."
    )


def mlflow_internal(path: str) -> Any:
    """The object at `path` ("package.module.Name.attr") now, or MlflowInternalMoved naming it."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        for depth in range(split, len(parts)):
            try:
                obj = getattr(obj, parts[depth])
            except AttributeError:
                raise _moved(path, f"`{'.'.join(parts[:depth])}` has no `{parts[depth]}`") from None
        return obj
    raise _moved(path, "no part of it imports")


def _attribute(obj: Any, attr: str, path: str) -> Any:
    try:
        return getattr(obj, attr)
    except AttributeError:
        raise _moved(path) from None


def supports_sql_traces(tracking_store: Any) -> bool:
    """Whether `tracking_store` is MLflow's SQL store, whose tables trace_sql writes directly."""
    return hasattr(tracking_store, "ManagedSessionMaker") and hasattr(tracking_store, "get_experiment")


def sql_session(tracking_store: Any) -> Any:
    """A transaction on a SQL tracking store's database (committed when the block ends)."""
    return _attribute(
        tracking_store,
        "ManagedSessionMaker",
        "mlflow.store.tracking.sqlalchemy_store.SqlAlchemyStore.ManagedSessionMaker",
    )()


@cache
def sql_trace_schema() -> SimpleNamespace:
    """MLflow's trace tables and the helpers its SQL store uses to fill them (for trace_sql)."""
    paths = [p for p, user in MLFLOW_INTERNALS.items() if user == "sql_trace_schema"]
    return SimpleNamespace(**{p.rsplit(".", 1)[1]: mlflow_internal(p) for p in paths})


def trace_archival_names() -> SimpleNamespace:
    """MLflow's names for trace archival: the experiment tag that sets an experiment's archival
    retention, the trace tag saying where a trace's spans live, and its values."""
    tags = mlflow_internal("mlflow.tracing.constant.TraceTagKey")
    where = mlflow_internal("mlflow.tracing.constant.SpansLocation")
    return SimpleNamespace(
        retention_tag=mlflow_internal("mlflow.tracing.constant.TraceExperimentTagKey").ARCHIVAL_RETENTION,
        spans_location_tag=tags.SPANS_LOCATION,
        in_store=where.TRACKING_STORE.value,
        archived=where.ARCHIVE_REPO.value,
    )


def archive_traces(tracking_store: Any, *, location: str, retention: str, max_traces: int) -> int:
    """One bounded pass of MLflow's own trace archival on a SQL tracking store (sqlite,
    PostgreSQL): span payloads of finished traces older than each experiment's retention (its
    `mlflow.trace.archivalRetention` tag, else `retention`) move to `location`; how many did.
    MLflow's server scheduler calls the same method (mlflow.tracing.trace_archival_service)."""
    supported = _attribute(
        tracking_store,
        "supports_trace_archival",
        "mlflow.store.tracking.abstract_store.AbstractStore.supports_trace_archival",
    )
    if not supported:
        raise RetentionError(f"{type(tracking_store).__name__} does not archive traces")
    archive = _attribute(
        tracking_store, "archive_traces", "mlflow.store.tracking.abstract_store.AbstractStore.archive_traces"
    )
    return int(
        archive(
            resolved_trace_archival_location=location,
            broader_retention=retention,
            max_traces_per_pass=max_traces,
        )
    )


def server_archives_traces(tracking_store: Any) -> bool:
    """Whether the tracking server behind a REST store runs MLflow's trace archival (its
    MLFLOW_TRACE_ARCHIVAL_CONFIG enables it): its /api/3.0/mlflow/server-info says so."""
    fetch = mlflow_internal("mlflow.utils.server_info.fetch_server_info")
    key = mlflow_internal("mlflow.utils.server_info.SERVER_INFO_TRACE_ARCHIVAL_ENABLED")
    creds = _attribute(
        tracking_store, "get_host_creds", "mlflow.store.tracking.rest_store.RestStore.get_host_creds"
    )
    answer = fetch(creds())
    if answer.status_code != 200 or answer.data is None:
        raise RetentionError(
            f"the tracking server's server-info answered {answer.status_code}: {str(answer.text)[:200]}"
        )
    return bool(answer.data.get(key))


def _fluent_uris() -> tuple[str | None, str | None]:
    """MLflow's process-wide tracking and registry URIs as set (None: never set, so MLflow falls
    back to the environment and its defaults). The public getters resolve that fallback, which
    could then not be put back as it was."""
    return (
        mlflow_internal("mlflow.tracking._tracking_service.utils._tracking_uri"),
        mlflow_internal("mlflow.tracking._model_registry.utils._registry_uri"),
    )


@dataclass(frozen=True)
class Store:
    tracking_uri: str
    experiment_id: str
    settings: Settings

    def __repr__(self) -> str:  # a repr lands in logs and tracebacks: the URI without its password
        return f"Store({redact_uri(self.tracking_uri)!r}, experiment {self.experiment_id})"

    @cached_property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    @cached_property
    def tracking(self) -> Any:
        """MLflow's tracking store: trace and assessment calls `MlflowClient` does not expose
        (`get_trace_info`, `start_trace`, `log_spans`, `create_assessment`)."""
        service = _attribute(
            self.client, "_tracking_client", "mlflow.tracking.client.MlflowClient._tracking_client"
        )
        return _attribute(
            service, "store", "mlflow.tracking._tracking_service.client.TrackingServiceClient.store"
        )

    def claim(self, key: str) -> bool:
        """Take a one-time claim every host sees: True for exactly one caller per `key`, ever.

        MLflow offers no compare-and-set, but an experiment's name is unique in every backend
        (a unique constraint in the database, the same through a tracking server), so creating
        one named after the key succeeds once. The claim is deleted at once (a deleted
        experiment keeps its name): it never shows in the UI's experiment list.
        """
        from mlflow.exceptions import MlflowException

        name = f"{self.settings.flywheel_experiment}-claims/{key}"
        location = (self.settings.artifact_root / "claims").as_uri() if self.settings.is_embedded else None
        try:
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_ALREADY_EXISTS":
                return False
            raise
        try:
            self.client.delete_experiment(experiment_id)
        except MlflowException:
            pass  # only tidiness: the claim is taken either way
        return True

    @contextmanager
    def fluent(self) -> Iterator[None]:
        """Point MLflow's process-wide ("fluent") tracking and registry URI at this store for the
        block, under one process-wide re-entrant lock; on exit put back both URIs and the
        MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI variables exactly as they were, and this
        thread's active model (`mlflow.genai.evaluate(model_id=...)` and pyfunc loading set it; left
        in place, the next store's runs and metrics would point at a model that store lacks).

        Wrap only MLflow calls in it (runs, log_model, genai.evaluate, pyfunc loading), never a
        long optimisation: every other store's fluent calls wait for it.
        """
        with _fluent_lock:
            tracking, registry = _fluent_uris()
            environ = environment_snapshot(_URI_VARIABLES)
            try:
                mlflow.set_tracking_uri(self.tracking_uri)
                mlflow.set_registry_uri(self.tracking_uri)
                with self.active_model_preserved():
                    yield
            finally:
                mlflow.set_tracking_uri(tracking)  # type: ignore[arg-type]  # None: back to unset
                mlflow.set_registry_uri(registry)  # type: ignore[arg-type]
                restore_environment(environ)

    @contextmanager
    def active_model_preserved(self) -> Iterator[None]:
        """pyfunc's loader makes the loaded model this thread's "active model", which would
        silently attach later runs and metrics to it: put the caller's context back."""
        context = mlflow_internal("mlflow.tracking.fluent._ACTIVE_MODEL_CONTEXT")
        previous = context.get()
        try:
            yield
        finally:
            context.set(previous)

    @staticmethod
    def unwrap_pyfunc(pyfunc: Any) -> Any:
        """The DSPy program inside a pyfunc model logged with the mlflow.dspy flavor (or None
        for another flavor)."""
        wrapper = _attribute(pyfunc, "_model_impl", "mlflow.pyfunc.PyFuncModel._model_impl")
        return getattr(wrapper, "model", None)  # the dspy flavor's DspyModelWrapper.model


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Raise ConfigError in one line when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
    except httpx.HTTPError as exc:  # the URI's password masked, in the URI and in the error
        detail = redact(str(exc), uri_secrets(uri))
        raise ConfigError(f"cannot reach the MLflow tracking server at {redact_uri(uri)}: {detail}") from None


def connect(settings: Settings | None = None, *, allow_offline: bool = False) -> Store:
    """The configured store, with flywheel's experiment made sure of.

    MLflow's process-wide URI is left alone: use `Store.client`, or `Store.fluent()` for fluent calls.
    `allow_offline`: when the store cannot be reached but this host has connected to it
    before, return a store with the recorded experiment id (not cached, so the next
    `connect` asks again) instead of raising ConfigError.
    """
    settings = settings or get_settings()
    key = (settings.mlflow_tracking_uri, settings.flywheel_experiment)
    with _lock:
        store = _connected.get(key)
        if store is not None:
            return store
        uri = settings.mlflow_tracking_uri
        apply_mlflow_client_settings()
        try:
            if settings.is_embedded:
                settings.artifact_root.mkdir(parents=True, exist_ok=True)
            else:
                check_reachable(uri)
            with quiet("mlflow.store.db.utils", "alembic.runtime.migration"):  # "Creating initial tables..."
                with _one_opener(settings):
                    experiment_id = ensure_experiment(settings, settings.flywheel_experiment)
        except ConfigError as exc:
            known = _recorded_experiment(settings) if allow_offline else None
            if known is None:
                raise
            logging.getLogger("flywheel.store").warning(
                "%s; starting from last-known-good state (experiment %s)", exc, known
            )
            return Store(uri, known, settings)
        store = Store(uri, experiment_id, settings)
        _record_experiment(settings, experiment_id)
        _connected[key] = store
        return store


@contextmanager
def _one_opener(settings: Settings) -> Iterator[None]:
    """For the embedded store, one process of the host at a time creates or upgrades mlflow.db and
    flywheel's experiment: MLflow runs its migrations on every first open, and 8 processes opening a
    fresh FLYWHEEL_HOME at once (a server's workers, its deliverers, a kernel) failed in alembic
    ("expected to match one row ... in 'alembic_version'"). A lock file beside it (flock: released
    when its holder dies); a server's store migrates on the server."""
    if not settings.is_embedded:
        yield
        return
    import fcntl

    settings.flywheel_home.mkdir(parents=True, exist_ok=True)
    with open(settings.flywheel_home / "mlflow.db.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _experiments_file(settings: Settings) -> Any:
    return settings.flywheel_home / "last-known-good" / "experiments.json"


def _experiment_key(settings: Settings) -> str:
    """The store and experiment as experiments.json names them: the URI without its password."""
    return f"{redact_uri(settings.mlflow_tracking_uri)} {settings.flywheel_experiment}"


def _recorded_experiment(settings: Settings) -> str | None:
    try:
        known = json.loads(_experiments_file(settings).read_text())
    except (OSError, ValueError):
        return None
    value = known.get(_experiment_key(settings))
    return str(value) if value else None


def _record_experiment(settings: Settings, experiment_id: str) -> None:
    if _recorded_experiment(settings) == experiment_id:
        return
    path = _experiments_file(settings)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known = {redact(str(k)): v for k, v in known.items()}  # a key an older flywheel wrote raw
    known[_experiment_key(settings)] = experiment_id
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
        uri = settings.mlflow_tracking_uri
        detail = redact(str(exc), uri_secrets(uri))
        raise ConfigError(f"cannot open the MLflow store {redact_uri(uri)}: {detail}") from None
    if experiment is not None:
        return experiment.experiment_id
    location = (settings.artifact_root / name).as_uri() if settings.is_embedded else None
    return client.create_experiment(name, artifact_location=location)


def reset() -> None:
    """Forget cached connections (tests point flywheel at a fresh store)."""
    with _lock:
        _connected.clear()
