"""One error hierarchy: each FlywheelError carries its HTTP status; the API, widgets and CLI use the class."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

import flywheel
from flywheel import errors, registry
from flywheel.errors import FlywheelError
from flywheel.http.api import create_app
from flywheel.runtime import Runtime
from flywheel.store import Store

STATUSES = {404, 409, 422, 429, 500, 502, 503, 504}
UNKNOWN_TRACE = "tr-" + "0" * 32


def _all_subclasses() -> list[type[FlywheelError]]:
    # import every module, so an error class defined outside errors.py is checked too
    for info in pkgutil.walk_packages(flywheel.__path__, "flywheel."):
        if info.name != "flywheel.__main__":  # that one runs the CLI
            importlib.import_module(info.name)
    found: list[type[FlywheelError]] = []
    todo = [FlywheelError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: c.__name__)


SUBCLASSES = _all_subclasses()


def _instance(cls: type[FlywheelError]) -> FlywheelError:
    """An instance with a message, whatever the class's constructor takes."""
    if "__init__" not in vars(cls):
        return cls(f"a {cls.__name__} for a person")
    params = [
        p
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return cls(*(f"{p.name}-value" for p in params))


def test_the_hierarchy_is_the_one_in_errors_py() -> None:
    names = {cls.__name__ for cls in SUBCLASSES}
    assert {"ModelNotFound", "TraceNotFound", "InvalidStage", "InputError", "ConfigError"} <= names
    for cls in SUBCLASSES:
        assert getattr(errors, cls.__name__) is cls, f"{cls.__name__} is defined outside flywheel/errors.py"
        assert cls.__name__ in errors.__all__


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_every_error_has_a_known_status_and_a_message(cls: type[FlywheelError]) -> None:
    assert isinstance(cls.status, int) and cls.status in STATUSES, (cls.__name__, cls.status)
    assert str(_instance(cls)), f"{cls.__name__} has an empty message"


def test_statuses_the_spec_promises() -> None:
    assert errors.ModelNotFound.status == 404 and errors.TraceNotFound.status == 404
    assert errors.InvalidStage.status == 422 and errors.InputError.status == 422
    assert errors.PredictTimeout.status == 504 and errors.LMFailure.status == 502


# --- the API answers with the class's status -------------------------------------------------


@pytest.fixture
def client(fresh_store: Store) -> Iterator[TestClient]:
    runtime = Runtime(store=fresh_store)
    try:
        with TestClient(create_app(runtime), raise_server_exceptions=False) as c:
            yield c
    finally:
        runtime.close(timeout=5)


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_the_api_maps_every_error_by_class(
    cls: type[FlywheelError], client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = _instance(cls)

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(registry, "list_models", fail)
    r = client.get("/models")
    assert r.status_code == cls.status
    assert r.json() == {"detail": str(error)}


def test_an_unexpected_error_is_a_500_naming_it(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise KeyError("surprise")

    monkeypatch.setattr(registry, "list_models", fail)
    r = client.get("/models")
    assert r.status_code == 500 and r.json()["detail"].startswith("internal error: KeyError")


@pytest.mark.parametrize(
    ("method", "path", "body", "cls"),
    [
        ("post", "/predict", {"model": "no-such-model", "inputs": {"topic": "cat"}}, errors.ModelNotFound),
        ("get", "/models/no-such-model/versions", None, errors.ModelNotFound),
        ("post", "/feedback", {"trace_id": UNKNOWN_TRACE, "rating": "thumbs_up"}, errors.TraceNotFound),
        ("post", "/feedback", {"trace_id": "  ", "rating": "thumbs_up"}, errors.FeedbackError),
        ("post", "/models/no-such-model/stage", {"version": "1", "stage": "Bogus"}, errors.InvalidStage),
    ],
    ids=["predict-model", "versions-model", "feedback-trace", "feedback-empty", "stage"],
)
def test_real_routes_answer_with_the_error_status(
    client: TestClient, method: str, path: str, body: dict[str, object] | None, cls: type[FlywheelError]
) -> None:
    r = client.request(method.upper(), path, json=body)
    assert r.status_code == cls.status, r.text
    prefix = {errors.ModelNotFound: "Model not found", errors.TraceNotFound: "Trace not found"}.get(cls)
    if prefix:
        assert r.json()["detail"].startswith(prefix)


# --- widgets and the CLI show the message, chosen by class --------------------------------------


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_widgets_show_a_flywheel_error_as_its_message(cls: type[FlywheelError]) -> None:
    from flywheel.ui.base import friendly

    error = _instance(cls)
    assert friendly(error) == str(error)


def test_widgets_name_the_kind_of_an_unexpected_error() -> None:
    from flywheel.ui.base import friendly

    assert friendly(KeyError("x")) == "KeyError: 'x'"

    class ModelNotFound(Exception):  # the same name is not the same class
        pass

    assert friendly(ModelNotFound("y")) == "ModelNotFound: y"


def test_cli_reports_flywheel_errors_as_one_line(
    fresh_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    from flywheel.cli import main

    assert main(["promote", "no-such-model", "1", "Production"]) == 1
    assert capsys.readouterr().err.strip().startswith("flywheel: Model not found: 'no-such-model'")
    assert main(["promote", "no-such-model", "1", "Bogus"]) == 1
    assert capsys.readouterr().err.strip().startswith("flywheel: Invalid stage 'Bogus'")
    assert main(["loop", "no-such-model"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("flywheel: Model not found"), err
