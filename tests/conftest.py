"""Shared fixtures: every test store is a real sqlite MLflow store in a temp directory."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
