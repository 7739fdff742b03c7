"""Shared fixtures: every test store is a real sqlite MLflow store in a temp directory."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from flywheel import store
from flywheel.config import get_settings

_ENV_NAMES = [
    "MLFLOW_TRACKING_URI",
    "FLYWHEEL_LM",
    "DEFAULT_MODEL_STAGE",
    "MODEL_CACHE_ENABLED",
    "FLYWHEEL_RESOLVE_TTL",
    "FLYWHEEL_PREDICT_KEY",
    "FLYWHEEL_FEEDBACK_KEY",
    "FLYWHEEL_ADMIN_KEY",
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


@pytest.fixture
def fresh_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[store.Store]:
    yield use_home(monkeypatch, tmp_path / "home")
    _reset()


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[store.Store]:
    """A store seeded with the demo, shared by a module's read-only tests."""
    from flywheel.demo.seed import seed_demo

    with pytest.MonkeyPatch.context() as mp:
        s = use_home(mp, tmp_path_factory.mktemp("demo") / "home")
        seed_demo(s, progress=lambda line: None)
        yield s
        _reset()
