"""Shared fixtures: every test store is a real MLflow store: embedded sqlite in a temp directory, or
(in modules marked `pytest.mark.backends("sqlite", "postgres")`) also a tracking server on PostgreSQL.

A module marked `backends(...)` runs each test that takes a store fixture once per backend; a test's
own `backends(...)` marker narrows that (say, to "sqlite" for a heavy test). The PostgreSQL backend
is one `mlflow server` per session (tests/pg.py) whose database is emptied for each fresh store.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flywheel import store
from flywheel.config import get_settings

pytest_plugins = ["pg"]  # tests/pg.py: the session's PostgreSQL and tracking server
# every Voila the tests start requires this token (Voila's launchers pass the setting on); the
# dashboard tests' `open_page` adds it to the URL as a person's first click does
os.environ.setdefault("FLYWHEEL_DASHBOARDS_TOKEN", "flywheel-tests-dashboards-token")
BACKENDS = ("sqlite", "postgres")

_ENV_NAMES = [
    "MLFLOW_TRACKING_URI",
    "FLYWHEEL_LM",
    "DEFAULT_MODEL_STAGE",
    "MODEL_CACHE_ENABLED",
    "FLYWHEEL_RESOLVE_TTL",
    "FLYWHEEL_PREDICT_KEY",
    "FLYWHEEL_FEEDBACK_KEY",
    "FLYWHEEL_ADMIN_KEY",
    "FLYWHEEL_REVIEWER_HEADER",
    "FLYWHEEL_LM_API_BASE",
    "FLYWHEEL_LM_ENGINE",
    "FLYWHEEL_LM_RETRIES",
    "FLYWHEEL_LM_TIMEOUT",
    "LM_CACHE_SERVING",
    "LM_CACHE_COMPILE",
    "PROGRAM_THREADS",
    "REQUEST_TIMEOUT",
]


_TEMPLATE: list[Path] = []


def _empty_database() -> Path:
    """An sqlite file with MLflow's schema already migrated (the migrations cost ~1 s per store)."""
    if not _TEMPLATE:
        import tempfile

        from mlflow import MlflowClient

        path = Path(tempfile.mkdtemp(prefix="flywheel-template-")) / "mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
        _TEMPLATE.append(path)
    return _TEMPLATE[0]


def use_home(monkeypatch: pytest.MonkeyPatch, home: Path, **env: str) -> store.Store:
    """Point flywheel (settings, MLflow, caches) at a fresh store under `home`.

    The store starts from a copy of an empty, migrated database; flywheel's own
    experiment (with its artifacts under `home`) is created by `connect` as usual.
    """
    if "MLFLOW_TRACKING_URI" not in env:
        home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_database(), home / "mlflow.db")
    for name in _ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.chdir(home.parent)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _reset()
    return store.connect()


def _reset() -> None:
    """Stop servers and forget every cached setting, connection, program and runtime."""
    from flywheel.http.server import stop_background
    from flywheel.runtime import reset_runtime

    stop_background()
    reset_runtime()
    get_settings.cache_clear()
    store.reset()


def _fingerprint(s: store.Store) -> dict[str, Any]:
    """What a test could change in a store: registry versions (stage, aliases, tags), traces with their
    assessments, and items waiting in the outbox."""
    versions = sorted(
        (v.name, v.version, v.current_stage, tuple(sorted(v.aliases)), tuple(sorted(v.tags.items())))
        for v in s.client.search_model_versions()
    )
    traces, token = [], None
    while True:
        infos, token = s.tracking.search_traces(
            locations=[s.experiment_id], max_results=500, page_token=token
        )
        traces += [(i.trace_id, len(i.assessments or [])) for i in infos]
        if not token:
            break
    outbox = s.settings.flywheel_home / "outbox.db"
    waiting = 0
    if outbox.exists():
        with sqlite3.connect(outbox) as db:
            waiting = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    return {"versions": versions, "traces": sorted(traces), "outbox": waiting}


def _seed(mp: pytest.MonkeyPatch, home: Path, **env: str) -> store.Store:
    from flywheel.demo.seed import seed_demo

    s = use_home(mp, home, **env)
    seed_demo(s, progress=lambda line: None)
    return s


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is None or "backend" not in metafunc.fixturenames:
        return
    unknown = set(marker.args) - set(BACKENDS)
    assert not unknown, f"unknown backends {unknown}; known: {BACKENDS}"
    metafunc.parametrize("backend", marker.args, indirect=True, scope="module")


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    """The MLflow backend of this module's stores: "sqlite" (embedded; the default) or "postgres"
    (the session's tracking server on PostgreSQL)."""
    return str(getattr(request, "param", "sqlite"))


def _backend_env(request: pytest.FixtureRequest, backend: str, owner: str | None = None) -> dict[str, str]:
    """Settings pointing a store at `backend`; for "postgres" the server's database is emptied first
    (a module-scoped store passes `owner` to keep it until `_release`)."""
    if backend == "sqlite":
        return {}
    server = request.getfixturevalue("mlflow_on_postgres")
    server.reset(owner)
    return {"MLFLOW_TRACKING_URI": server.url}


def _release(request: pytest.FixtureRequest, backend: str) -> None:
    if backend == "postgres":
        request.getfixturevalue("mlflow_on_postgres").release()


@pytest.fixture
def artifact_dir(backend: str, request: pytest.FixtureRequest) -> Callable[[store.Store], Path]:
    """`artifact_dir(store)`: the directory where this backend keeps the store's artifacts."""
    if backend == "postgres":
        server = request.getfixturevalue("mlflow_on_postgres")
        return lambda s: server.artifacts
    return lambda s: s.settings.artifact_root


@pytest.fixture
def fresh_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, request: pytest.FixtureRequest
) -> Iterator[store.Store]:
    yield use_home(monkeypatch, tmp_path / "home", **_backend_env(request, backend))
    _reset()


@pytest.fixture
def make_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., store.Store]]:
    """`make_store(home, **env)`: point flywheel at a fresh store under `home` with extra settings
    (`use_home` for one test); every server, cache and runtime is reset after the test."""

    def make(home: Path, **env: str) -> store.Store:
        return use_home(monkeypatch, home, **env)

    yield make
    _reset()


@pytest.fixture(scope="module")
def make_module_store() -> Iterator[Callable[..., store.Store]]:
    """`make_module_store(home, **env)`: `make_store` for module-scoped fixtures (a store shared by a
    module's tests); every server, cache and runtime is reset after the module."""
    with pytest.MonkeyPatch.context() as mp:
        yield lambda home, **env: use_home(mp, home, **env)
        _reset()


@pytest.fixture
def empty_home(tmp_path: Path) -> Callable[[str], Path]:
    """`empty_home(name)`: tmp_path/name holding an empty, migrated MLflow database (settings untouched)."""

    def make(name: str) -> Path:
        home = tmp_path / name
        home.mkdir(parents=True)
        shutil.copyfile(_empty_database(), home / "mlflow.db")
        return home

    return make


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[store.Store]:
    """A fresh, empty store shared (and written) by a module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        yield use_home(mp, tmp_path_factory.mktemp("module") / "home")
        _reset()


@pytest.fixture(scope="module")
def demo_store(
    tmp_path_factory: pytest.TempPathFactory, backend: str, request: pytest.FixtureRequest
) -> Iterator[store.Store]:
    """A store seeded with the demo, shared by a module's read-only tests.

    Read-only is checked: when a module's tests predict, rate or promote on it, its teardown
    fails (those tests take `demo_store_rw`).
    """
    from flywheel.runtime import reset_runtime

    with pytest.MonkeyPatch.context() as mp:
        env = _backend_env(request, backend, owner=f"demo_store of {request.node.nodeid}")
        s = _seed(mp, tmp_path_factory.mktemp("demo") / "home", **env)
        before = _fingerprint(s)
        try:
            yield s
            reset_runtime()  # a runtime a test used delivers what it queued, so the check sees it
            after = _fingerprint(s)
        finally:
            _reset()
            _release(request, backend)
        assert after == before, "a test wrote to the read-only demo_store: give it demo_store_rw"


@pytest.fixture(scope="module")
def demo_store_rw(
    tmp_path_factory: pytest.TempPathFactory, backend: str, request: pytest.FixtureRequest
) -> Iterator[store.Store]:
    """A store seeded with the demo that a module's tests write to (predictions, ratings, promotions)."""
    with pytest.MonkeyPatch.context() as mp:
        env = _backend_env(request, backend, owner=f"demo_store_rw of {request.node.nodeid}")
        try:
            yield _seed(mp, tmp_path_factory.mktemp("demo-rw") / "home", **env)
        finally:
            _reset()
            _release(request, backend)


class _Refusing:
    """A dspy LM engine that cannot reach its provider for requests whose last message contains
    `bad` (every request when None); other requests get the offline LM's answer."""

    def __init__(self, bad: str | None = None) -> None:
        from flywheel.lm import RetrievalEngine

        self.bad, self.offline = bad, RetrievalEngine()

    def complete(self, request: Any) -> Any:
        if self.bad is None or self.bad in (request.messages[-1].text or ""):
            raise ConnectionError("connection refused (test)")
        return self.offline.complete(request)


@pytest.fixture
def failing_lm() -> Callable[..., Any]:
    """`failing_lm(bad=None)`: a dspy.LM whose calls raise (only for inputs containing `bad`, if given)."""
    import dspy

    def make(bad: str | None = None) -> Any:
        return dspy.LM("flaky/test", engine=_Refusing(bad), cache=False)

    return make
