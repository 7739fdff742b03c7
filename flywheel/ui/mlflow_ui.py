"""The MLflow UI that `flywheel up` starts: locked, on loopback, with nothing of flywheel's secrets.

`mlflow server` on the embedded store used to answer anyone who reached its port, and to take
writes: a plain `POST /api/2.0/mlflow/registered-models/alias` moved Production with no key. It now
runs MLflow's own `basic-auth` app (`mlflow server --app-name basic-auth`):

- Its configuration is FLYWHEEL_HOME/mlflow-ui/basic_auth.ini (mode 0600, in a 0700 folder),
  given to MLflow through `MLFLOW_AUTH_CONFIG_PATH`: its own user database beside it
  (basic_auth.db), `default_permission = READ` for users an admin adds, and a login cache so that
  the UI's many requests do not each pay for a password hash (scrypt, about 0.1 s of CPU).
- Every request but `/health`, `/static` and MLflow's server-info needs a login: anonymous
  requests get 401 with a `WWW-Authenticate` challenge (the browser asks for the password), so
  there is no anonymous read and no anonymous write.
- The admin login is MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD when they are set
  (MLflow's own names), else `admin` and a generated password. MLflow creates that admin when its
  user database is first made; the login is kept in the ini file and printed once, at the first
  start; later starts say where it is.
- It listens on 127.0.0.1 only, whatever `flywheel up --host` says (a password sent as basic
  auth over plain HTTP is readable on the network; docs/deploy.md runs a shared tracking server).
- Its environment is built from an allow-list (`mlflow_ui_environment`): no flywheel key, no LM
  provider credentials, no FLYWHEEL_LM_API_BASE; it does not need them.
"""

from __future__ import annotations

import configparser
import io
import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from flywheel.config import Settings, environment_subset
from flywheel.errors import ConfigError

HOST = "127.0.0.1"  # the only address the MLflow UI that `flywheel up` starts listens on
DEFAULT_ADMIN = "admin"
AUTH_CACHE_TTL = 600  # seconds a checked login is remembered (one worker: a change applies at once)

# MLflow's server starts a job runner by default: seven `huey_consumer` processes, each importing
# MLflow, for jobs launched from its UI (judges, prompt optimisation, trace archival) that flywheel
# never submits. On this 2-core machine they took both cores for about 40 s after `flywheel up`
# printed its URLs (19.5 s of CPU per 10 s), and rating pages opened then took 2.1 to 3.1 s instead
# of about 2 s. A user who wants those jobs sets the variable to true in the environment.
MLFLOW_UI_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

# What the MLflow UI's process is given of this process's environment: the basics a Python
# process needs, and MLflow's own server settings. Nothing else: flywheel's keys, the LM
# provider's credentials and whatever else the shell holds stay out.
_PASSED = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "VIRTUAL_ENV"}
_PASSED_PREFIXES = ("LC_", "PYTHON", "MLFLOW_")
# ... except MLflow variables that are credentials or that flywheel sets itself
_NOT_PASSED = re.compile(
    r"MLFLOW_(TRACKING_URI|TRACKING_USERNAME|TRACKING_PASSWORD|TRACKING_TOKEN|AUTH_.*|"
    r"FLASK_SERVER_SECRET_KEY|.*(PASSWORD|TOKEN|SECRET|KEY).*)"
)


@dataclass(frozen=True)
class MlflowLogin:
    """The MLflow UI's admin login and where it is kept."""

    username: str
    password: str
    config: Path  # the basic-auth ini file (holds the login too)
    new: bool  # made at this start: `flywheel up` prints the password once
    given: bool  # from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD


def auth_dir(settings: Settings) -> Path:
    return settings.flywheel_home / "mlflow-ui"


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from the start (never readable by others, not even
    for a moment), replacing the file in one rename."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an old .tmp left behind keeps its mode otherwise
        with os.fdopen(fd, "w") as out:
            fd = -1
            out.write(text)
    finally:
        if fd >= 0:
            os.close(fd)
    os.replace(tmp, path)


def prepare_login(settings: Settings) -> MlflowLogin:
    """Write the basic-auth configuration under FLYWHEEL_HOME (0600) and return the admin login.

    The login is kept from one start to the next; a given MLFLOW_AUTH_ADMIN_PASSWORD that differs
    from the kept one for the same user is refused (MLflow sets an admin's password only when it
    creates the admin, so it would not apply)."""
    folder = auth_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    config = folder / "basic_auth.ini"
    kept: tuple[str, str] | None = None
    if config.is_file():
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(config)
        user = parser.get("mlflow", "admin_username", fallback="")
        password = parser.get("mlflow", "admin_password", fallback="")
        if user and password:
            kept = (user, password)
    given_user = settings.mlflow_auth_admin_username
    given_password = settings.mlflow_auth_admin_password
    username = given_user or (kept[0] if kept else DEFAULT_ADMIN)
    if given_password:
        if kept and kept[0] == username and kept[1] != given_password and (folder / "basic_auth.db").exists():
            raise ConfigError(
                f"MLFLOW_AUTH_ADMIN_PASSWORD is not the MLflow UI's password for {username!r}, kept in "
                f"{config}: MLflow sets an admin's password only when it creates the admin. Change it "
                "through MLflow's update-password API (and in that file), or unset the variable"
            )
        password = given_password
    elif kept and kept[0] == username:
        password = kept[1]
    else:
        password = secrets.token_urlsafe(18)
    parser = configparser.ConfigParser(interpolation=None)
    parser["mlflow"] = {
        # for users an admin adds later; anonymous requests are refused whatever this says
        "default_permission": "READ",
        "database_uri": f"sqlite:///{folder / 'basic_auth.db'}",
        "admin_username": username,
        "admin_password": password,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access": "false",
        "auth_cache_ttl_seconds": str(AUTH_CACHE_TTL),
    }
    lines = [
        "# The MLflow UI that `flywheel up` starts reads this file (MLFLOW_AUTH_CONFIG_PATH).",
        "# flywheel writes it at each start and keeps the admin login below; MLflow sets the",
        "# password when it creates the admin in basic_auth.db (delete both to start afresh).",
    ]
    out = io.StringIO()
    parser.write(out)
    _write_private(config, "\n".join(lines) + "\n" + out.getvalue())
    return MlflowLogin(
        username,
        password,
        config,
        new=kept != (username, password),
        given=bool(given_password),
    )


def mlflow_ui_environment(login: MlflowLogin, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The MLflow UI's whole environment: an allow-list of this process's variables, the job
    runner off unless the environment says otherwise, the auth configuration, and a fresh Flask
    secret key (CSRF tokens of MLflow's sign-up form; one worker, so one key per start is enough)."""
    env = environment_subset(
        lambda name: (
            (name in _PASSED or name.startswith(_PASSED_PREFIXES)) and not _NOT_PASSED.fullmatch(name)
        )
    )
    env = {**MLFLOW_UI_ENV, **env}  # the user's own setting wins
    env.update(extra or {})
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(login.config)
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
    return env


def store_environment(tracking_uri: str) -> dict[str, str]:
    """The MLflow UI's store, as `mlflow server` reads it from its environment (`--backend-store-uri`'s
    variable)."""
    return {"MLFLOW_BACKEND_STORE_URI": tracking_uri}


def mlflow_ui_command(artifacts: Path, port: int) -> list[str]:
    """`mlflow server` with MLflow's basic-auth app, on 127.0.0.1 only, one worker. Its store comes
    in its environment (`store_environment`), never on the command line, which every local user can
    read (`ps`): a database URI may hold a password."""
    return [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--app-name",
        "basic-auth",
        "--default-artifact-root",
        artifacts.as_uri(),
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
