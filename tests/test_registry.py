"""The registry on a real sqlite MLflow store: register, list, resolve, promote, load."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dspy
import mlflow
import pytest

from flywheel import registry
from flywheel.loader import Loader
from flywheel.store import Store

pytestmark = pytest.mark.backends("sqlite", "postgres")

ROOT = Path(__file__).resolve().parent.parent


def _program(joke: str) -> dspy.Module:
    program = dspy.Predict("topic -> joke")
    program.demos = [dspy.Example(topic="anything", joke=joke)]
    return program


def _register(store: Store, joke: str, **tags: str) -> registry.VersionInfo:
    return registry.register_program(
        _program(joke), "jokes", description=f"says {joke}", tags=tags, store=store
    )


def test_register_records_version_description_tags_and_fields(
    fresh_store: Store, artifact_dir: Callable[[Store], Path]
) -> None:
    v1 = _register(fresh_store, "one", optimizer="LabeledFewShot", score="0.5", dataset="d1")
    v2 = _register(fresh_store, "two")
    assert (v1.version, v2.version) == ("1", "2")
    assert v1.stage == "None" and v1.aliases == ()
    assert v1.description == "says one"
    assert v1.tags["optimizer"] == "LabeledFewShot" and v1.tags["dataset"] == "d1"
    assert v1.score == 0.5
    assert v1.input_fields == ["topic"] and v1.output_fields == ["joke"]
    assert v1.run_id and fresh_store.client.get_run(v1.run_id).info.experiment_id == fresh_store.experiment_id
    listed = registry.list_versions("jokes", fresh_store)
    assert [v.version for v in listed] == ["2", "1"]
    models = registry.list_models(fresh_store)
    assert [m.name for m in models] == ["jokes"] and models[0].latest_version == "2"
    # the artifacts stay under FLYWHEEL_HOME (or the tracking server's), never in a stray ./mlruns
    assert not (Path.cwd() / "mlruns").exists()
    assert any(artifact_dir(fresh_store).rglob("MLmodel"))


def test_resolve_every_reference_form(fresh_store: Store) -> None:
    for joke in ("one", "two", "three"):
        _register(fresh_store, joke)
    registry.promote("jokes", "1", "Production", fresh_store)
    registry.promote("jokes", "2", "Staging", fresh_store)
    registry.set_alias("jokes", "champion", "1", fresh_store)

    def version(ref: str | int | None) -> str:
        return registry.resolve("jokes", ref, fresh_store).version

    assert version("3") == version(3) == version("v3") == "3"
    assert version("Production") == version("production") == version(None) == "1"
    assert version("Staging") == "2"
    assert version("champion") == "1"
    assert version("latest") == "3"
    assert version("None") == "3"
    for bad in ("9", "nope", "Archived"):
        with pytest.raises(registry.ModelNotFound, match="Model not found: 'jokes'"):
            registry.resolve("jokes", bad, fresh_store)
    with pytest.raises(registry.ModelNotFound, match='Model not found: "it\'s"'):
        registry.resolve("it's", "Production", fresh_store)


def test_promote_archives_previous_holder_and_keeps_stage_and_alias_in_step(
    fresh_store: Store,
) -> None:
    for joke in ("one", "two"):
        _register(fresh_store, joke)
    registry.promote("jokes", "1", "Production", fresh_store)
    after = registry.promote("jokes", "2", "production", fresh_store)
    assert after.stage == "Production" and after.aliases == ("Production",)
    old = registry.get_version("jokes", "1", fresh_store)
    assert old.stage == "Archived" and "Production" not in old.aliases

    # MLflow itself agrees: both URI forms name the same version
    client = fresh_store.client
    assert str(client.get_model_version_by_alias("jokes", "Production").version) == "2"
    with fresh_store.fluent():
        by_stage = mlflow.pyfunc.load_model("models:/jokes/Production").metadata.model_id
        by_alias = mlflow.pyfunc.load_model("models:/jokes@Production").metadata.model_id
    assert by_stage == by_alias == after.model_id

    archived = registry.promote("jokes", "2", "Archived", fresh_store)
    assert archived.stage == "Archived" and archived.aliases == ()
    with pytest.raises(registry.ModelNotFound):
        registry.resolve("jokes", "Production", fresh_store)
    with pytest.raises(registry.InvalidStage, match="valid stages are: None, Staging"):
        registry.promote("jokes", "2", "Prod", fresh_store)
    with pytest.raises(registry.ModelNotFound):
        registry.promote("jokes", "7", "Staging", fresh_store)


def test_no_api_key_reaches_the_store(
    fresh_store: Store,
    monkeypatch: pytest.MonkeyPatch,
    artifact_dir: Callable[[Store], Path],
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    env_secret, passed_secret = "sk-env-secret-2f9c1d", "sk-passed-secret-77ab02"
    monkeypatch.setenv("OPENAI_API_KEY", env_secret)
    lm = dspy.LM("openai/gpt-4o-mini", api_key=passed_secret, api_base="http://127.0.0.1:9")
    registry.register_program(_program("one"), "jokes", lm=lm, store=fresh_store)
    with dspy.context(lm=lm):  # the global/contextual LM path too
        registry.register_program(_program("two"), "jokes", store=fresh_store)
    places = {fresh_store.settings.flywheel_home, artifact_dir(fresh_store)}
    files = [p for place in places for p in place.rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        data = path.read_bytes()
        assert env_secret.encode() not in data, path
        assert passed_secret.encode() not in data, path
    if backend == "postgres":  # the database itself: every row of every table
        rows = request.getfixturevalue("mlflow_on_postgres").dump_text()
        assert "jokes" in rows  # the registered model: the dump holds the store
        assert env_secret not in rows and passed_secret not in rows
    # the LM itself survived without its key, so `mlflow models serve` can still use it
    saved = Loader(fresh_store).load("jokes", "1")
    assert saved.program is not None


@pytest.mark.slow
def test_cli_lists_promotes_and_reports_errors_in_one_line(fresh_store: Store) -> None:
    _register(fresh_store, "one")
    run = [sys.executable, "-m", "flywheel"]
    out = subprocess.run([*run, "promote", "jokes", "1", "Staging"], capture_output=True, text=True)
    assert out.returncode == 0 and "jokes version 1 -> Staging" in out.stdout
    out = subprocess.run([*run, "models"], capture_output=True, text=True)
    assert "v1" in out.stdout and "Staging" in out.stdout
    out = subprocess.run([*run, "promote", "jokes", "1", "Prod"], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0
    assert "valid stages are" in out.stderr
    out = subprocess.run(
        [*run, "models"], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "API_PORT": "x"}
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "flywheel: configuration error: API_PORT='x' is not a number"


# sqlite only: a module-scoped store on PostgreSQL would pin the server while this module's
# fresh stores need it emptied (tests/pg.py refuses that rather than wipe a store in use)
@pytest.mark.slow
@pytest.mark.backends("sqlite")
def test_mlflow_models_serve_serves_a_flywheel_model(demo_store: Store) -> None:
    """`mlflow models serve -m models:/joke-generator@Production` answers /invocations."""
    import os
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = str(Path(sys.executable).parent)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ.get('PATH', '')}",
        MLFLOW_TRACKING_URI=demo_store.tracking_uri,
    )
    proc = subprocess.Popen(
        [
            f"{bin_dir}/mlflow",
            "models",
            "serve",
            "-m",
            "models:/joke-generator@Production",
            "-p",
            str(port),
            "--env-manager",
            "local",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/invocations", json={"inputs": {"topic": "cat"}}, timeout=30
        )
        assert reply.status_code == 200, reply.text
        assert "keyboard" in reply.json()["predictions"]["joke"]  # the cat demo's joke
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_an_unreachable_tracking_server_is_one_clear_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "flywheel", "models"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
    )
    assert out.returncode == 2
    assert out.stderr.startswith(
        "flywheel: configuration error: cannot reach the MLflow tracking server at http://127.0.0.1:9"
    )
    assert out.stderr.strip().count("\n") == 0


def test_promotion_never_leaves_the_stage_without_a_holder(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    for joke in ("one", "two"):
        _register(fresh_store, joke)
    registry.promote("jokes", "1", "Production", fresh_store)
    client = fresh_store.client
    seen: list[str | None] = []
    steps = ("transition_model_version_stage", "set_registered_model_alias", "delete_registered_model_alias")
    for method in steps:
        original = getattr(client, method)

        def step(*args: object, _original=original, **kwargs: object) -> object:
            result = _original(*args, **kwargs)
            try:  # what a request resolving right now gets
                seen.append(registry.resolve("jokes", "Production", fresh_store).version)
            except registry.ModelNotFound:
                seen.append(None)
            return result

        monkeypatch.setattr(client, method, step)
    after = registry.promote("jokes", "2", "Production", fresh_store)
    assert None not in seen and seen[-1] == "2", seen
    assert after.stage == "Production" and after.aliases == ("Production",)
    assert registry.get_version("jokes", "1", fresh_store).stage == "Archived"
