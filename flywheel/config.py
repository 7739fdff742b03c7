"""Settings: the only place flywheel reads the environment.

Values come from the process environment, then an optional `.env` file (the
environment wins). Every setting is documented in docs/configuration.md; a
test fails when one is not.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from flywheel.errors import STAGES, ConfigError

EXPORT_RULES = ("adjudicated", "majority", "single", "latest")  # flywheel.agreement's rules
ROUTING_RULES = ("thumbs_down", "low_judge", "stratified")  # flywheel.review's routing rules
DELIVERY_MODES = ("thread", "process")  # who delivers the outbox (flywheel.deliverer)
EXPORT_DATABASES = ("sqlite:", "postgresql://", "postgresql+psycopg://", "postgres://")  # export_sql reads
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def canonical_stage(value: str) -> str:
    """Map a stage name typed in any case to MLflow's spelling, or raise ConfigError."""
    for stage in STAGES:
        if value.strip().lower() == stage.lower():
            return stage
    raise ConfigError(f"unknown stage {value!r}; valid stages are: {', '.join(STAGES)}")


@dataclass(frozen=True)
class Settings:
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = 4
    api_reuse_port: bool = True  # each serve worker its own SO_REUSEPORT socket (flywheel.http.balance)
    worker_healthcheck_timeout: int = 60
    flywheel_delivery: str = "thread"  # "process": a deliverer process consumes the outbox (flywheel serve)
    default_model_stage: str = "Production"
    model_cache_enabled: bool = True
    feedback_enabled: bool = True
    mlflow_enabled: bool = True
    mlflow_tracking_uri: str = ""
    flywheel_trace_database_uri: str | None = None  # the deliverer COPYs traces into it (trace_copy)
    flywheel_export_database_uri: str | None = None  # export reads rated traces from it (export_sql)
    flywheel_home: Path = Path(".flywheel")
    flywheel_lm: str | None = None
    flywheel_lm_api_base: str | None = None
    flywheel_lm_engine: str = "auto"
    flywheel_lm_retries: int = 3
    flywheel_lm_timeout: float | None = None
    lm_cache_serving: bool = False
    lm_cache_compile: bool = True
    program_threads: int = 8
    flywheel_experiment: str = "flywheel"
    flywheel_resolve_ttl: float = 2.0
    feedback_wait: float = 300.0
    feedback_pending_max_bytes: int = 64 << 20  # held (202) feedback of every client, in outbox.db
    feedback_pending_per_client: int = 100  # held (202) feedback items of one user_id or address
    request_timeout: float = 30.0
    flywheel_predict_key: str | None = None
    flywheel_feedback_key: str | None = None
    flywheel_admin_key: str | None = None
    flywheel_reviewer_header: str | None = None
    mlflow_ui_url: str = "http://127.0.0.1:5000"
    mlflow_auth_admin_username: str | None = None  # the MLflow UI `flywheel up` starts (MLflow's names)
    mlflow_auth_admin_password: str | None = None
    flywheel_preheat_kernels: int = 1
    flywheel_kernel_idle_timeout: float = 600.0
    flywheel_kernel_connect_timeout: float = 45.0  # a dashboard page that never connected
    flywheel_kernels_per_user: int = 5
    flywheel_dashboards_token: str | None = None  # unset: a new one per start, in the printed URLs
    flywheel_trusted_proxies: str = "127.0.0.1,::1"  # peers whose FLYWHEEL_REVIEWER_HEADER counts
    flywheel_dashboards_hosts: str = ""  # Host names Voila answers besides IP addresses and localhost
    registry_needs_key: bool = False
    max_request_bytes: int = 4_194_304  # a 1 MB text field, JSON-escaped, with room to spare
    max_field_chars: int = 1_048_576
    max_trace_chars: int = 4_194_304
    api_limit_concurrency: int = 200
    api_timeout_keep_alive: int = 5
    api_max_connections: int = 1000
    body_read_timeout: float = 10.0
    api_allowed_hosts: str = ""
    gate_alpha: float = 0.05
    gate_margin: float = 0.0
    gate_min_rows: int = 10
    gate_non_inferiority: bool = False
    watch_enabled: bool = False
    watch_interval: float = 60.0
    watch_margin: float = 0.05
    watch_alpha: float = 0.05
    watch_min_requests: int = 100
    watch_min_ratings: int = 30
    watch_baseline_window: float = 86400.0
    export_policy: str = "adjudicated,majority,single,latest"
    review_routing: str = "thumbs_down,low_judge"  # stratified: opt in
    review_judge_below: float = 0.5
    review_seed: int = 0
    flywheel_archive_after_days: int | None = None  # flywheel.retention: MLflow's trace archival
    flywheel_delete_unrated_after_days: int | None = None  # flywheel.retention: unrated traces deleted
    flywheel_archive_location: str | None = None  # where archived span payloads go (an artifact URI)
    flywheel_retention_batch: int = 500

    @property
    def export_rules(self) -> tuple[str, ...]:
        """EXPORT_POLICY as the ordered rules (checked by load_settings)."""
        return parse_rules("EXPORT_POLICY", self.export_policy, EXPORT_RULES)

    @property
    def routing_rules(self) -> tuple[str, ...]:
        """REVIEW_ROUTING as the ordered rules (checked by load_settings)."""
        return parse_rules("REVIEW_ROUTING", self.review_routing, ROUTING_RULES)

    @property
    def artifact_root(self) -> Path:
        return self.flywheel_home / "artifacts"

    @property
    def is_embedded(self) -> bool:
        return self.mlflow_tracking_uri.startswith("sqlite:")

    def __repr__(self) -> str:  # a repr lands in logs and tracebacks: no key, password or token
        from flywheel.limits import MASK, redact_uri

        shown = []
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, str) and value and _secret_name(field.name):
                value = MASK
            elif field.name in _URI_SECRETS and value:
                value = redact_uri(value)
            shown.append(f"{field.name}={value!r}")
        return f"Settings({', '.join(shown)})"


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use true or false")


def _parse_number(name: str, raw: str, kind: type, low: float, high: float) -> Any:
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r} is out of range ({low:g} to {high:g})")
    return value


def parse_rules(name: str, raw: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated, ordered list of rules from `allowed`, each at most once, at least one."""
    parts = [p.strip().lower() for p in raw.split(",") if p.strip()]
    if not parts or len(set(parts)) != len(parts) or any(p not in allowed for p in parts):
        raise ConfigError(
            f"{name}={raw!r} must list one or more of {', '.join(allowed)}, each once, in order"
        )
    return tuple(parts)


_NUMBERS: dict[str, tuple[type, float, float]] = {
    "api_port": (int, 0, 65535),
    "api_workers": (int, 1, 64),
    "worker_healthcheck_timeout": (int, 1, 3600),
    "flywheel_resolve_ttl": (float, 0, 3600),
    "feedback_wait": (float, 0, 7 * 86400),
    "feedback_pending_max_bytes": (int, 0, 1 << 40),
    "feedback_pending_per_client": (int, 0, 10_000_000),
    "request_timeout": (float, 0.001, 86400),
    "max_request_bytes": (int, 1024, 1 << 30),
    "max_field_chars": (int, 100, 1 << 30),
    "max_trace_chars": (int, 1000, 1 << 30),
    "api_limit_concurrency": (int, 1, 100_000),
    "api_timeout_keep_alive": (int, 1, 3600),
    "api_max_connections": (int, 1, 1_000_000),
    "body_read_timeout": (float, 0.1, 3600),
    "flywheel_lm_retries": (int, 0, 20),
    "flywheel_lm_timeout": (float, 0.001, 86400),
    "program_threads": (int, 1, 256),
    "flywheel_preheat_kernels": (int, 0, 16),
    "flywheel_kernel_idle_timeout": (float, 5, 30 * 86400),
    "flywheel_kernel_connect_timeout": (float, 5, 86400),
    "flywheel_kernels_per_user": (int, 1, 1000),
    "gate_alpha": (float, 0.0001, 0.5),
    "gate_margin": (float, 0, 1),
    "gate_min_rows": (int, 1, 1_000_000),
    "watch_interval": (float, 0.1, 86400),
    "watch_margin": (float, 0, 1),
    "watch_alpha": (float, 0.0001, 0.5),
    "watch_min_requests": (int, 1, 10_000_000),
    "watch_min_ratings": (int, 1, 10_000_000),
    "watch_baseline_window": (float, 1, 365 * 86400),
    "review_judge_below": (float, -1e12, 1e12),
    "review_seed": (int, 0, 2**63 - 1),
    "flywheel_archive_after_days": (int, 1, 36500),
    "flywheel_delete_unrated_after_days": (int, 1, 36500),
    "flywheel_retention_batch": (int, 1, 500),
}


_PROJECT_MARKERS = (".env", ".flywheel", "pyproject.toml", ".git")


def project_dir(start: Path | None = None) -> Path:
    """The nearest directory from `start` (the cwd) up that looks like the project's root.

    Notebooks and dashboards run in notebooks/ and dashboards/: the `.env` and a
    relative FLYWHEEL_HOME are found and resolved from here, not from the kernel's cwd.
    """
    start = (start or Path.cwd()).resolve()
    for directory in (start, *start.parents):
        if any((directory / marker).exists() for marker in _PROJECT_MARKERS):
            return directory
    return start


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | os.PathLike[str] | None = ".env"
) -> Settings:
    """Build Settings from `environ` (default os.environ) over an optional `.env` file.

    A relative `env_file` or FLYWHEEL_HOME is taken from the project directory.
    """
    root = project_dir()
    merged: dict[str, str] = {}
    if env_file is not None and not Path(env_file).is_absolute():
        env_file = root / env_file
    if env_file is not None and Path(env_file).is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ if environ is None else environ)

    values: dict[str, Any] = {}
    for field in fields(Settings):
        name = field.name.upper()
        if name not in merged:
            continue
        raw = merged[name]
        if field.name in _NUMBERS:
            values[field.name] = _parse_number(name, raw, *_NUMBERS[field.name])
        elif field.type == "bool":
            values[field.name] = _parse_bool(name, raw)
        elif field.name == "default_model_stage":
            values[field.name] = canonical_stage(raw)
        elif field.name == "flywheel_lm_engine":
            values[field.name] = raw.strip().lower() or "auto"
            if values[field.name] not in ("auto", "lm15", "litellm"):
                raise ConfigError(f"FLYWHEEL_LM_ENGINE={raw!r} is not one of auto, lm15, litellm")
        elif field.name == "flywheel_delivery":
            values[field.name] = raw.strip().lower() or "thread"
            if values[field.name] not in DELIVERY_MODES:
                raise ConfigError(f"FLYWHEEL_DELIVERY={raw!r} is not one of {', '.join(DELIVERY_MODES)}")
        elif field.name == "export_policy":
            values[field.name] = ",".join(parse_rules(name, raw, EXPORT_RULES))
        elif field.name == "review_routing":
            values[field.name] = ",".join(parse_rules(name, raw, ROUTING_RULES))
        elif field.name == "flywheel_home":
            values[field.name] = Path(raw)
        else:
            values[field.name] = raw.strip() or None if "None" in str(field.type) else raw.strip()

    settings = Settings(**values)
    home = settings.flywheel_home.expanduser()
    home = (home if home.is_absolute() else root / home).resolve()
    uri = settings.mlflow_tracking_uri or f"sqlite:///{home / 'mlflow.db'}"
    if not uri.startswith(("sqlite:", "http://", "https://", "postgresql", "mysql", "file:")):
        from flywheel.limits import redact_uri

        raise ConfigError(
            f"MLFLOW_TRACKING_URI={redact_uri(uri)!r} is not supported; use sqlite:///path, "
            "http(s)://host:port or a database URI"
        )
    trace_db = settings.flywheel_trace_database_uri
    if trace_db and not trace_db.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
        from flywheel.limits import redact_uri

        raise ConfigError(
            f"FLYWHEEL_TRACE_DATABASE_URI={redact_uri(trace_db)!r} is not supported; use the tracking "
            "server's PostgreSQL database, postgresql://user@host:port/database"
        )
    export_db = settings.flywheel_export_database_uri
    if export_db and not export_db.startswith(EXPORT_DATABASES):
        from flywheel.limits import redact_uri

        raise ConfigError(
            f"FLYWHEEL_EXPORT_DATABASE_URI={redact_uri(export_db)!r} is not supported; use the tracking "
            "store's database or a read replica of it: postgresql://user@host:port/database or sqlite:///path"
        )
    return replace(settings, flywheel_home=home, mlflow_tracking_uri=uri)


def apply_mlflow_client_settings() -> None:
    """Fail fast instead of MLflow's minutes of HTTP retries, so an outage degrades, not hangs.

    Explicit values in the environment win.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # a worker fetching a model into last-known-good must not draw a progress bar into logs or cells
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # LiteLLM (imported by DSPy and mlflow.genai) would fetch a price list from the network
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def environment_subset(keep: Callable[[str], bool]) -> dict[str, str]:
    """The variables of this process's environment whose names `keep` accepts: for a child that
    must not inherit the rest (the MLflow UI `flywheel up` starts gets an allow-list)."""
    return {name: value for name, value in os.environ.items() if keep(name)}


def export_environment(values: Mapping[str, str]) -> None:
    """Set variables in this process's environment for the children it starts next (`flywheel
    serve` tells its uvicorn workers FLYWHEEL_DELIVERY=process); `get_settings` reads them again
    only after `get_settings.cache_clear()`."""
    os.environ.update(values)


def take_environment(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Remove `names` from this process's environment and return their values (unset ones are
    absent): for a secret one process reads and none of its children may inherit (Voila's token)."""
    return {name: os.environ.pop(name) for name in names if name in os.environ}


# the MLflow UI's admin login: `flywheel up` writes it to that UI's own 0600 config, no child needs it
NOT_FOR_CHILDREN = frozenset({"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"})


def child_environment(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus every resolved setting, for child processes (Voila kernels)
    that start elsewhere and would not find a relative FLYWHEEL_HOME or the project's `.env`."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_FOR_CHILDREN}
    for field in fields(settings):
        value = getattr(settings, field.name)
        if value is not None and field.name.upper() not in NOT_FOR_CHILDREN:
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            env[field.name.upper()] = text
    env.update(extra or {})
    return env


def header_variable(header: str) -> str:
    """The variable Voila (`http_header_envs`, RFC 3875) sets in a kernel for a request header."""
    return "HTTP_" + header.strip().upper().replace("-", "_")


def signed_in_user(settings: Settings, environ: Mapping[str, str] | None = None) -> str | None:
    """Who the dashboard's visitor is, when authentication is configured; None when it is not.

    With FLYWHEEL_REVIEWER_HEADER set, the id is that request header as Voila hands it to the
    kernel (set by a reverse proxy or JupyterHub that signed the user in); "" when the header did
    not come (nobody is signed in). Under JupyterHub without a header, JUPYTERHUB_USER (the
    single-user server's owner) is the id. Ids are lower-cased, as MLflow's review queues store them.
    """
    env = os.environ if environ is None else environ
    if settings.flywheel_reviewer_header:
        return (env.get(header_variable(settings.flywheel_reviewer_header)) or "").strip().lower()
    hub = (env.get("JUPYTERHUB_USER") or "").strip().lower()
    return hub or None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; tests call `get_settings.cache_clear()`."""
    return load_settings()


# settings that are URIs which may hold a password (user:password@): shown and written redacted
_URI_SECRETS = (
    "mlflow_tracking_uri",
    "flywheel_lm_api_base",
    "flywheel_trace_database_uri",
    "flywheel_export_database_uri",
)

_SECRET_NAME = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS")


def secret_values(settings: Settings | None = None, environ: Mapping[str, str] | None = None) -> set[str]:
    """Values never to write down (`limits.redact` masks them in any text): every setting and
    environment variable named like a secret (FLYWHEEL_ADMIN_KEY, OPENAI_API_KEY, HF_TOKEN,
    PGPASSWORD, ...) and the password in MLFLOW_TRACKING_URI, FLYWHEEL_LM_API_BASE,
    FLYWHEEL_TRACE_DATABASE_URI and FLYWHEEL_EXPORT_DATABASE_URI.
    `settings`: the process's when None (none when they cannot be read)."""
    from flywheel.limits import uri_secrets

    env = os.environ if environ is None else environ
    found = {v for k, v in env.items() if _secret_name(k) and v}
    try:
        settings = settings or get_settings()
    except ConfigError:
        return found
    for field in fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, str) and value and _secret_name(field.name):
            found.add(value)
    for name in _URI_SECRETS:
        found.update(uri_secrets(getattr(settings, name)))
    return found


def _secret_name(name: str) -> bool:
    upper = name.upper()
    return "PASSWORD" in upper or "PASSWD" in upper or any(p in _SECRET_NAME for p in upper.split("_"))


def environment_snapshot(names: tuple[str, ...] | list[str]) -> dict[str, str | None]:
    """The current values of `names` (None: unset), for `restore_environment`.

    MLflow's `set_tracking_uri` writes MLFLOW_TRACKING_URI into the environment;
    the store takes a snapshot before pointing MLflow at itself and puts it back after.
    """
    return {name: os.environ.get(name) for name in names}


def restore_environment(snapshot: Mapping[str, str | None]) -> None:
    """Put variables back exactly as `environment_snapshot` saw them (unset ones are removed)."""
    for name, value in snapshot.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
