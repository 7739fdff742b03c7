"""The MLflow UI that `flywheel up` starts is locked (issue 31): MLflow's basic-auth app, on
127.0.0.1 only even under `--host 0.0.0.0`, with none of flywheel's secrets in its environment.

Before, anyone who reached its port could move Production with a plain
`POST /api/2.0/mlflow/registered-models/alias`. The slow tests start the real `flywheel up`
(API, Voila, `mlflow server`) on a store with a registered model and ask its MLflow UI over HTTP;
the others check the login file and the allow-listed environment without starting anything."""

from __future__ import annotations

import configparser
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import psutil
import pytest
from processes import interrupt_up

from flywheel import store
from flywheel.config import child_environment, load_settings
from flywheel.errors import ConfigError

HOST = "127.0.0.1"
READY = "Ctrl-C stops all of it."
MODEL = "locked-model"
SECRETS = {
    "FLYWHEEL_ADMIN_KEY": "admin-key-do-not-leak",
    "FLYWHEEL_PREDICT_KEY": "predict-key-do-not-leak",
    "FLYWHEEL_FEEDBACK_KEY": "feedback-key-do-not-leak",
    "OPENAI_API_KEY": "sk-openai-do-not-leak",
    "FLYWHEEL_LM_API_BASE": "http://user:lm-pass-do-not-leak@127.0.0.1:9/v1",
    "MLFLOW_TRACKING_PASSWORD": "tracking-pass-do-not-leak",
}
ALIAS = "/api/2.0/mlflow/registered-models/alias"


# --- the login file and the environment (no process started) --------------------------------------


def test_the_login_is_generated_once_kept_0600_and_a_different_given_password_is_refused(
    tmp_path: Path,
) -> None:
    from flywheel.ui.mlflow_ui import prepare_login

    settings = load_settings({"FLYWHEEL_HOME": str(tmp_path / "home")}, env_file=None)
    first = prepare_login(settings)
    assert first.new and not first.given and first.username == "admin" and len(first.password) >= 20
    assert stat.S_IMODE(first.config.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.config.parent.stat().st_mode) == 0o700
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(first.config)
    assert ini["mlflow"]["admin_password"] == first.password
    assert ini["mlflow"]["database_uri"] == f"sqlite:///{first.config.parent / 'basic_auth.db'}"
    assert ini["mlflow"]["default_permission"] == "READ"

    again = prepare_login(settings)
    assert (again.username, again.password, again.new) == ("admin", first.password, False)

    (first.config.parent / "basic_auth.db").touch()  # MLflow made the admin with the kept password
    given = load_settings(
        {"FLYWHEEL_HOME": str(tmp_path / "home"), "MLFLOW_AUTH_ADMIN_PASSWORD": "another-password-1"},
        env_file=None,
    )
    with pytest.raises(ConfigError, match="MLFLOW_AUTH_ADMIN_PASSWORD"):
        prepare_login(given)
    fresh = load_settings(
        {"FLYWHEEL_HOME": str(tmp_path / "fresh"), "MLFLOW_AUTH_ADMIN_PASSWORD": "chosen-password-1"},
        env_file=None,
    )
    chosen = prepare_login(fresh)
    assert (chosen.password, chosen.given) == ("chosen-password-1", True)


def test_the_mlflow_ui_environment_holds_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flywheel.ui.mlflow_ui import mlflow_ui_environment, prepare_login

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "given-admin-password")
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")
    settings = load_settings({"FLYWHEEL_HOME": str(tmp_path / "home")}, env_file=None)
    login = prepare_login(settings)
    env = mlflow_ui_environment(login, {"PYTHONUNBUFFERED": "1"})
    values = "\n".join(env.values())
    for name, value in SECRETS.items():
        assert name not in env and value not in values
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" not in env  # it is in the 0600 config, not the environment
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(login.config)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"  # the user's own MLflow setting
    assert env["PATH"] == os.environ["PATH"] and env["PYTHONUNBUFFERED"] == "1"
    # nor do the API and the dashboards get the MLflow UI's admin password
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" not in child_environment(load_settings(env_file=None))


# --- the real `flywheel up` ---------------------------------------------------------------------


class Up:
    def __init__(self, proc: subprocess.Popen[str], lines: list[str]) -> None:
        self.proc, self.lines = proc, lines
        self.urls = {
            m.group(1).strip(): m.group(2)
            for line in lines
            if (m := re.match(r"\s+([A-Za-z ]+):\s+(http\S+)", line))
        }
        self.mlflow = self.urls["MLflow UI"]

    def mlflow_processes(self) -> list[psutil.Process]:
        """The `mlflow server` process that `up` started and every process under it."""
        found = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "server" in p.cmdline() and any(a.endswith("/mlflow") for a in p.cmdline()[:2]):
                    found += [p, *p.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return found

    def stop(self) -> None:
        stop(self.proc)


def stop(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C (SIGINT) as a user stops `up`; whatever of its family is left is killed."""
    interrupt_up(proc)


def start_up(*args: str, env: dict[str, str] | None = None) -> Up:
    cmd = [sys.executable, "-m", "flywheel", "up", "--api-port", "0", "--dashboards-port", "0"]
    cmd += ["--mlflow-port", "0", "--preheat", "0", *args]
    full = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})}
    proc = subprocess.Popen(cmd, env=full, stdout=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + 240
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if READY in line:
            return Up(proc, lines)
    stop(proc)
    raise AssertionError(lines)


@pytest.fixture(scope="module")
def seeded(make_module_store: Any, tmp_path_factory: pytest.TempPathFactory) -> store.Store:
    """A store with MODEL at two versions, Production on v1, and one trace."""
    s: store.Store = make_module_store(tmp_path_factory.mktemp("locked") / "home")
    client = s.client
    client.create_registered_model(MODEL)
    for _ in range(2):
        client.create_model_version(MODEL, source=(s.settings.artifact_root / "m").as_uri())
    client.set_registered_model_alias(MODEL, "Production", "1")
    return s


@pytest.fixture(scope="module")
def up(seeded: store.Store) -> Iterator[Up]:
    started = start_up("--host", "0.0.0.0", env=SECRETS)
    try:
        yield started
    finally:
        started.stop()


def production(s: store.Store) -> str:
    return str(s.client.get_model_version_by_alias(MODEL, "Production").version)


def login_of(up: Up) -> tuple[str, str]:
    found = [m for line in up.lines if (m := re.search(r"MLflow UI login: (\S+) / (\S+)", line))]
    assert len(found) == 1, up.lines
    return found[0].group(1), found[0].group(2)


@pytest.mark.slow
def test_anonymous_requests_to_the_mlflow_ui_are_refused_and_production_does_not_move(
    seeded: store.Store, up: Up
) -> None:
    base = up.mlflow
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200  # `up`'s readiness check
    move = {"name": MODEL, "alias": "Production", "version": "2"}
    refused = httpx.post(f"{base}{ALIAS}", json=move, timeout=30)
    assert refused.status_code == 401, refused.text
    assert refused.headers["www-authenticate"].startswith("Basic")  # the browser asks for a login
    assert production(seeded) == "1"

    with seeded.fluent():
        trace = seeded.client.start_trace("probe", experiment_id=seeded.experiment_id)
        seeded.client.end_trace(trace.trace_id)
        mlflow.flush_trace_async_logging()
    assert seeded.tracking.get_trace_info(trace.trace_id).assessments == []
    assessment = {
        "assessment": {
            "trace_id": trace.trace_id,
            "assessment_name": "user_rating",
            "source": {"source_type": "HUMAN", "source_id": "mallory"},
            "feedback": {"value": "thumbs_down"},
        }
    }
    anonymous = [
        httpx.post(f"{base}/api/3.0/mlflow/traces/{trace.trace_id}/assessments", json=assessment),
        httpx.post(
            f"{base}/api/2.0/mlflow/model-versions/create", json={"name": MODEL, "source": "file:///tmp/x"}
        ),
        httpx.put(f"{base}/api/2.0/mlflow-artifacts/artifacts/0/x/python_model.pkl", content=b"pickle"),
        httpx.get(f"{base}/api/2.0/mlflow/registered-models/get", params={"name": MODEL}),  # no read
        httpx.get(f"{base}/ajax-api/2.0/mlflow/experiments/search", params={"max_results": 1}),
    ]
    assert [r.status_code for r in anonymous] == [401] * len(anonymous)
    assert not seeded.tracking.get_trace_info(trace.trace_id).assessments
    assert len(seeded.client.search_model_versions(f"name='{MODEL}'")) == 2

    user, password = login_of(up)
    wrong = httpx.post(f"{base}{ALIAS}", json=move, auth=(user, password + "x"), timeout=30)
    assert wrong.status_code == 401
    allowed = httpx.post(f"{base}{ALIAS}", json=move, auth=(user, password), timeout=30)
    assert allowed.status_code == 200, allowed.text  # the same request with the login does work
    assert production(seeded) == "2"
    seeded.client.set_registered_model_alias(MODEL, "Production", "1")


@pytest.mark.slow
def test_the_mlflow_ui_listens_on_loopback_only_under_host_0_0_0_0_and_holds_no_secret(up: Up) -> None:
    assert up.mlflow.startswith(f"http://{HOST}:"), up.lines
    assert any("listens on 127.0.0.1 only" in line for line in up.lines), up.lines
    processes = up.mlflow_processes()
    assert processes, [p.cmdline() for p in psutil.Process(up.proc.pid).children(recursive=True)]
    listening = {
        (c.laddr.ip, c.laddr.port)
        for p in processes
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    port = int(up.mlflow.rsplit(":", 1)[1])
    assert listening and {ip for ip, _ in listening} == {HOST}, listening
    assert port in {p for _, p in listening}
    for p in processes:
        environ = Path(f"/proc/{p.pid}/environ").read_bytes().decode(errors="replace")
        names = {entry.partition("=")[0] for entry in environ.split("\0")}
        for name, value in SECRETS.items():
            assert name not in names and value not in environ, (p.pid, name)
        # the store's URI (a database URI may hold a password) is in no command line, which `ps` shows
        assert not any("mlflow.db" in part or "sqlite:" in part for part in p.cmdline()), p.cmdline()
    # the API and the dashboards were told --host 0.0.0.0 and do listen there
    api = up.urls["API docs"]
    assert api.startswith("http://0.0.0.0:")


@pytest.mark.slow
def test_a_later_start_keeps_the_login_and_prints_where_it_is_not_the_password(
    seeded: store.Store, up: Up
) -> None:
    user, password = login_of(up)
    up.stop()
    again = start_up()
    try:
        assert not any(password in line for line in again.lines), again.lines
        config = seeded.settings.flywheel_home / "mlflow-ui" / "basic_auth.ini"
        assert any(f"password in {config}" in line for line in again.lines), again.lines
        base = again.mlflow
        got = httpx.get(
            f"{base}/api/2.0/mlflow/registered-models/get", params={"name": MODEL}, auth=(user, password)
        )
        assert got.status_code == 200, got.text
        anonymous = httpx.get(f"{base}/api/2.0/mlflow/registered-models/get", params={"name": MODEL})
        assert anonymous.status_code == 401
    finally:
        again.stop()


@pytest.mark.slow
def test_the_tracking_server_of_docs_deploy_md_refuses_anonymous_writes(mlflow_on_postgres: Any) -> None:
    """docs/deploy.md's tracking server runs MLflow's basic-auth app (tests/pg.py starts it from
    that document): anonymous requests get 401, its admin (a flywheel host's login) may write."""
    server = mlflow_on_postgres
    server.reset()
    name = "deployed-model"
    create = {"name": name}
    anonymous = httpx.post(f"{server.url}/api/2.0/mlflow/registered-models/create", json=create)
    assert anonymous.status_code == 401, anonymous.text
    assert httpx.get(f"{server.url}/api/2.0/mlflow/registered-models/search").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200
    created = httpx.post(
        f"{server.url}/api/2.0/mlflow/registered-models/create", json=create, auth=server.login
    )
    assert created.status_code == 200, created.text
    move = {"name": name, "alias": "Production", "version": "1"}
    assert httpx.post(f"{server.url}{ALIAS}", json=move).status_code == 401
