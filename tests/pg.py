"""A real PostgreSQL and an `mlflow server` on it, started once per test session.

The cluster is unprivileged: `initdb` and `pg_ctl` run as the `postgres` user (when the tests run
as root) on a temporary directory, a free port and a socket directory inside it. The tracking
server is started with the command docs/deploy.md gives (`deploy_command`), with MLflow's
basic-auth app configured by the file it gives (`deploy_file`), so that document cannot rot; the
admin's login is then put in this process's environment (MLFLOW_TRACKING_USERNAME / _PASSWORD), as
docs/deploy.md has it on every flywheel host, so in-process clients and spawned hosts log in.
PostgreSQL missing is a failure, never a skip: scripts/install-test-deps installs it.

tests/conftest.py loads this module as a plugin; its `mlflow_on_postgres` fixture is the one
server of the session, and `reset()` empties its database between tests (much faster than a
server per test).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from processes import free_port, wait_until_up
from processes import stop_group as stop

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
BIN = Path(sys.executable).parent
PG_USER = "postgres"


def wait_healthy(url: str, timeout: float = 180, proc: subprocess.Popen[bytes] | None = None) -> None:
    wait_until_up(url, timeout, proc)


def deploy_file(name: str, **values: str) -> str:
    """The file docs/deploy.md gives under `<!-- file: name -->`, its `<PLACEHOLDERS>` filled."""
    text = DEPLOY_DOC.read_text()
    found = re.search(rf"<!-- file: {re.escape(name)} -->\s*```\w*\n(.*?)```", text, re.S)
    assert found, f"docs/deploy.md has no fenced block marked <!-- file: {name} -->"

    def fill(match: re.Match[str]) -> str:
        key = match.group(1).lower()
        assert key in values, f"docs/deploy.md's {name} file needs <{match.group(1)}>"
        return values[key]

    return re.sub(r"<([A-Z_]+)>", fill, found.group(1))


def deploy_command(name: str, **values: str) -> tuple[dict[str, str], list[str]]:
    """The command docs/deploy.md gives under `<!-- command: name -->`, its `<PLACEHOLDERS>`
    filled from `values` (keys in lower case): (environment assignments, argv)."""
    text = DEPLOY_DOC.read_text()
    found = re.search(rf"<!-- command: {re.escape(name)} -->\s*```bash\n(.*?)```", text, re.S)
    assert found, f"docs/deploy.md has no fenced block marked <!-- command: {name} -->"
    command = found.group(1).replace("\\\n", " ")

    def fill(match: re.Match[str]) -> str:
        key = match.group(1).lower()
        assert key in values, f"docs/deploy.md's {name} command needs <{match.group(1)}>"
        return values[key]

    words = shlex.split(re.sub(r"<([A-Z_]+)>", fill, command))
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def spawn(argv: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen[bytes]:
    """A process in its own session (killed as a group), with the venv's scripts first on PATH;
    PYTHONPATH and the rest of this process's environment pass through."""
    full = dict(os.environ, **env)
    full["PATH"] = f"{BIN}:{full.get('PATH', '')}"
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(argv, env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]


def postgres_bin() -> Path:
    """The directory of initdb/pg_ctl: FLYWHEEL_TEST_PG_BIN, else the newest Debian cluster
    binaries, else initdb on PATH. pytest.fail (never skip) when there is none."""
    override = os.environ.get("FLYWHEEL_TEST_PG_BIN")
    if override:
        candidates = [Path(override)]
    else:
        candidates = sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
            reverse=True,
        )
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    pytest.fail(
        "PostgreSQL is not installed (no initdb/pg_ctl"
        + (f" in FLYWHEEL_TEST_PG_BIN={override}" if override else " under /usr/lib/postgresql")
        + "): run scripts/install-test-deps as root, or apt-get install postgresql",
        pytrace=False,
    )


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user then."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser") is None:
        pytest.fail("running as root without runuser: cannot start PostgreSQL as 'postgres'", pytrace=False)
    return ["runuser", "-u", PG_USER, "--", *argv]


@dataclass
class PostgresCluster:
    bin: Path
    directory: Path
    port: int
    host: str = "127.0.0.1"
    user: str = PG_USER

    def uri(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> object:
        import psycopg

        return psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname=database, autocommit=True
        )


def start_cluster() -> PostgresCluster:
    pg_bin = postgres_bin()
    # not under pytest's tmp dirs: those are root-only (0700), and the server runs as `postgres`
    directory = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, PG_USER, PG_USER)
    port = free_port()
    data = directory / "data"
    run = _as_postgres(
        [str(pg_bin / "initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER, "-E", "UTF8", "--no-sync"]
    )
    done = subprocess.run(run, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"initdb failed: {done.stderr.strip()}", pytrace=False)
    options = (
        f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    start = _as_postgres(
        [str(pg_bin / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(directory / "log"), "-w", "start"]
    )
    done = subprocess.run(start, capture_output=True, text=True)
    if done.returncode != 0:
        log = (directory / "log").read_text() if (directory / "log").exists() else ""
        pytest.fail(f"pg_ctl start failed: {done.stderr.strip()} {log[-2000:]}", pytrace=False)
    return PostgresCluster(pg_bin, directory, port)


def stop_cluster(cluster: PostgresCluster) -> None:
    data = cluster.directory / "data"
    subprocess.run(
        _as_postgres([str(cluster.bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
        capture_output=True,
    )
    shutil.rmtree(cluster.directory, ignore_errors=True)


@dataclass
class TrackingServer:
    """An `mlflow server` on PostgreSQL, artifacts proxied into `artifacts`."""

    url: str
    cluster: PostgresCluster
    database: str
    artifacts: Path
    log: Path
    proc: subprocess.Popen[bytes]
    pinned: str | None = field(default=None)
    login: tuple[str, str] = ("", "")  # the admin of its basic-auth app

    def reset(self, owner: str | None = None) -> None:
        """Empty every MLflow table but the default experiment (what a fresh database holds), and
        the artifacts. `owner` (a module-scoped store) pins the contents until `release()`:
        another reset while pinned fails instead of wiping that store's data."""
        assert self.pinned is None, f"the PostgreSQL store is in use by {self.pinned}; cannot reset it"
        keep = {"alembic_version", "experiments"}
        with self.cluster.connect(self.database) as db:  # type: ignore[attr-defined]
            tables = [
                row[0]
                for row in db.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                ).fetchall()
                if row[0] not in keep
            ]
            names = ", ".join(f'"{t}"' for t in tables)
            db.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
            db.execute("DELETE FROM experiments WHERE experiment_id <> 0")
            db.execute("SELECT setval(pg_get_serial_sequence('experiments', 'experiment_id'), 1, false)")
        for child in self.artifacts.iterdir():
            shutil.rmtree(child, ignore_errors=True)
        self.pinned = owner

    def release(self) -> None:
        self.pinned = None

    def dump_text(self) -> str:
        """Every row of every table as text (tests look for secrets in it)."""
        chunks: list[str] = []
        with self.cluster.connect(self.database) as db:  # type: ignore[attr-defined]
            tables = db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
            for (table,) in tables:
                chunks += [row[0] for row in db.execute(f'SELECT t::text FROM "{table}" t').fetchall()]
        return "\n".join(chunks)


def start_tracking_server(cluster: PostgresCluster, workers: int = 2) -> TrackingServer:
    database = "mlflow"
    env, argv = deploy_command(
        "createdb", pg_host=cluster.host, pg_port=str(cluster.port), pg_user=cluster.user
    )
    argv[0] = str(cluster.bin / argv[0])
    done = subprocess.run(argv, env=dict(os.environ, **env), capture_output=True, text=True)
    assert done.returncode == 0, f"createdb failed: {done.stderr}"
    env, argv = deploy_command(
        "createdb-auth", pg_host=cluster.host, pg_port=str(cluster.port), pg_user=cluster.user
    )
    argv[0] = str(cluster.bin / argv[0])
    done = subprocess.run(argv, env=dict(os.environ, **env), capture_output=True, text=True)
    assert done.returncode == 0, f"createdb (auth) failed: {done.stderr}"
    login = ("flywheel-admin", secrets.token_urlsafe(18))
    config = cluster.directory / "basic_auth.ini"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(
            deploy_file(
                "basic-auth-ini",
                pg_user=cluster.user,
                pg_host=cluster.host,
                pg_port=str(cluster.port),
                mlflow_admin=login[0],
            )
        )
    artifacts = cluster.directory / "artifacts"
    artifacts.mkdir()
    port = free_port()
    env, argv = deploy_command(
        "mlflow-server",
        auth_config=str(config),
        mlflow_bind="127.0.0.1",
        mlflow_host="127.0.0.1",
        mlflow_port=str(port),
        pg_user=cluster.user,
        pg_host=cluster.host,
        pg_port=str(cluster.port),
        artifacts=str(artifacts),
        mlflow_workers=str(workers),
    )
    # the two secrets docs/deploy.md has in the server's environment, not on its command line
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = login[1]
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
    log = cluster.directory / "mlflow-server.log"
    proc = spawn(argv, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health", timeout=240, proc=proc)
    except Exception as exc:
        stop(proc)
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        pytest.fail(f"mlflow server on PostgreSQL did not start: {exc}\n{tail}", pytrace=False)
    # this process and every process it starts are flywheel hosts of docs/deploy.md: their MLflow
    # login is in the environment, where MLflow's client finds it
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = login
    return TrackingServer(url, cluster, database, artifacts, log, proc, login=login)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """An unprivileged PostgreSQL cluster for the session (stopped and removed afterwards)."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


@pytest.fixture(scope="session")
def mlflow_on_postgres(postgres: PostgresCluster) -> Iterator[TrackingServer]:
    """The session's `mlflow server` on PostgreSQL, started as docs/deploy.md says."""
    server = start_tracking_server(postgres)
    try:
        yield server
    finally:
        stop(server.proc)
