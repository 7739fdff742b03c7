"""Serving loads only what flywheel registered, and alias moves made outside flywheel are audited.

On real MLflow stores (embedded sqlite, and an `mlflow server` on PostgreSQL): a version made with
MLflow's own API and a version whose files were swapped after registration are refused (409)
before anything is unpickled, with one `refused-load` audit entry; an alias moved with a raw
MlflowClient shows in the audit timeline as `moved-outside` after the next resolution.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dspy
import mlflow
import pytest
from fastapi.testclient import TestClient

from flywheel import audit, canary, registry
from flywheel.errors import FlywheelError
from flywheel.http.api import create_app
from flywheel.loader import Loader, load_program
from flywheel.runtime import Runtime
from flywheel.store import Store

pytestmark = pytest.mark.backends("sqlite", "postgres")

NAME = "jokes"
OUTSIDE = "moved-outside"  # the audit action (registry.OUTSIDE_ACTION)
REGISTERED_TAG, CONTENT_TAG = "flywheel.registered", "flywheel.content_sha256"  # registry's names


class _Payload:
    """Unpickling this runs a shell command (what the red team's python_model.pkl did)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


class _EvilModel(mlflow.pyfunc.PythonModel):
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)

    def predict(self, context: object, model_input: list[str], params: object = None) -> list[str]:
        return model_input


def _register(store: Store, joke: str) -> registry.VersionInfo:
    program = dspy.Predict("topic -> joke")
    program.demos = [dspy.Example(topic="anything", joke=joke)]
    return registry.register_program(program, NAME, store=store)


def _outside_version(store: Store, marker: Path) -> str:
    """A version made with MLflow's API only: saved locally, uploaded through the artifact API,
    registered with create_model_version. Its python_model.pkl touches `marker` when unpickled."""
    client = store.client
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        with store.fluent():
            mlflow.pyfunc.save_model(str(local), python_model=_EvilModel(marker), pip_requirements=[])
        assert b"touch" in (local / "python_model.pkl").read_bytes()
        run = client.create_run(store.experiment_id)
        client.log_artifacts(run.info.run_id, str(local), "model")
        client.set_terminated(run.info.run_id)
    mv = client.create_model_version(NAME, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return str(mv.version)


def _entries(store: Store, action: str) -> list[audit.AuditEntry]:
    return [e for e in audit.timeline(store, NAME) if e.action == action]


@pytest.fixture
def runtime(fresh_store: Store) -> Iterator[Runtime]:
    rt = Runtime(store=fresh_store)
    try:
        yield rt
    finally:
        rt.close(timeout=10)


def test_a_version_made_outside_flywheel_is_refused_before_anything_is_unpickled(
    fresh_store: Store, runtime: Runtime, tmp_path: Path
) -> None:
    _register(fresh_store, "one")
    registry.promote(NAME, "1", "Production", fresh_store)
    marker = tmp_path / "pwned"
    evil = _outside_version(fresh_store, marker)
    assert not marker.exists()
    fresh_store.client.set_registered_model_alias(NAME, "Production", evil)  # raw MLflow, no flywheel

    with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
        body = {"model": NAME, "inputs": {"topic": "x"}}
        replies = [client.post("/predict", json=body) for _ in range(3)]
        replies.append(client.post("/predict/stream", json=body))
        replies.append(client.post("/predict", json={**body, "version": evil}))
    for reply in replies:
        assert reply.status_code == 409, reply.text
        assert reply.json()["detail"] == (
            f"version {evil} of 'jokes' was not registered by flywheel (no flywheel.content_sha256 tag)"
            " — refusing to load it"
        )
    assert not marker.exists()  # nothing was unpickled
    refused = _entries(fresh_store, "refused-load")
    assert len(refused) == 1  # once per version per process, not once per request
    assert refused[0].version == evil and "not registered by flywheel" in refused[0].reason
    assert refused[0].evidence["registered"] is False and refused[0].evidence["pid"] == os.getpid()
    # the alias move itself is in the audit trail too, found when the serving host resolved it
    moved = _entries(fresh_store, OUTSIDE)
    assert [(e.version, e.evidence["from"], e.evidence["to"]) for e in moved] == [(evil, "1", evil)]
    # the gate's path (load_program) refuses it as well
    with pytest.raises(FlywheelError, match="not registered by flywheel"):
        load_program(fresh_store, registry.get_version(NAME, evil, fresh_store))
    assert not marker.exists()


def test_a_canary_moved_to_an_untrusted_version_serves_its_share_from_stable(
    fresh_store: Store, runtime: Runtime, tmp_path: Path
) -> None:
    _register(fresh_store, "one")
    _register(fresh_store, "two")
    registry.promote(NAME, "1", "Production", fresh_store)
    registry.set_alias(NAME, "canary", "2", fresh_store)
    canary.set_canary(fresh_store, NAME, "canary", 1.0)
    marker = tmp_path / "pwned"
    evil = _outside_version(fresh_store, marker)
    fresh_store.client.set_registered_model_alias(NAME, "canary", evil)  # raw MLflow, no flywheel

    with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
        replies = [client.post("/predict", json={"model": NAME, "inputs": {"topic": "x"}}) for _ in range(3)]
    for reply in replies:  # the whole canary share, served by Production instead of refused
        assert reply.status_code == 200, reply.text
        assert reply.json()["model_version"] == "1" and reply.headers["X-Flywheel-Route"] == "stable"
    assert not marker.exists()
    assert [e.version for e in _entries(fresh_store, "refused-load")] == [evil]


def test_a_registered_version_whose_files_were_swapped_is_refused(
    fresh_store: Store, runtime: Runtime, tmp_path: Path
) -> None:
    good = _register(fresh_store, "one")
    assert good.tags[REGISTERED_TAG] == "true"
    assert len(good.tags[CONTENT_TAG]) == 64
    registry.promote(NAME, "1", "Production", fresh_store)
    marker = tmp_path / "pwned"
    with tempfile.TemporaryDirectory() as tmp:  # the same version's files, its pickle swapped
        with fresh_store.fluent():
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{good.model_id}", dst_path=tmp))
        (local / "data" / "model.pkl").write_bytes(pickle.dumps(_Payload(marker)))
        fresh_store.client.log_model_artifacts(good.model_id, str(local))

    with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
        reply = client.post("/predict", json={"model": NAME, "inputs": {"topic": "x"}})
        again = client.post("/predict", json={"model": NAME, "inputs": {"topic": "x"}})
    assert reply.status_code == again.status_code == 409, reply.text
    assert reply.json()["detail"].startswith(
        "version 1 of 'jokes' has files that differ from what flywheel registered (sha256 "
    )
    assert not marker.exists()
    [refused] = _entries(fresh_store, "refused-load")
    assert refused.evidence["expected"] == good.tags[CONTENT_TAG]
    assert refused.evidence["actual"] != refused.evidence["expected"]
    assert not _entries(fresh_store, OUTSIDE)  # flywheel promoted it: no move to report


def test_a_copy_spoilt_on_this_host_is_refused_then_fetched_afresh(
    fresh_store: Store, tmp_path: Path
) -> None:
    info = _register(fresh_store, "one")
    first = Loader(fresh_store)
    assert first.load(NAME, "1").version == "1"
    copy = first.lkg.model_dir(info)
    (copy / "data" / "model.pkl").write_bytes(pickle.dumps(_Payload(tmp_path / "pwned")))
    with pytest.raises(FlywheelError, match="differ from what flywheel registered"):
        Loader(fresh_store).load(NAME, "1")
    assert not (tmp_path / "pwned").exists() and not copy.exists()  # the spoilt copy is gone
    assert Loader(fresh_store).load(NAME, "1").version == "1"  # fetched again from the registry


def test_an_alias_moved_outside_flywheel_is_audited_once_after_the_next_resolve(fresh_store: Store) -> None:
    for joke in ("one", "two", "three"):
        _register(fresh_store, joke)
    registry.promote(NAME, "1", "Production", fresh_store)
    registry.promote(NAME, "2", "Production", fresh_store)
    registry.set_alias(NAME, "champion", "2", fresh_store)
    hosts = [Loader(fresh_store), Loader(fresh_store)]  # two serving hosts
    for host in hosts:
        assert host.resolve(NAME, "Production").version == "2"
        assert host.resolve(NAME, "champion").version == "2"
    assert not _entries(fresh_store, OUTSIDE)  # flywheel's own moves are not reported

    client = fresh_store.client
    client.set_registered_model_alias(NAME, "Production", "1")  # back to v1, as in the finding
    client.set_registered_model_alias(NAME, "champion", "3")
    for host in hosts:
        host.clear()  # the next resolution (a TTL later)
        assert host.resolve(NAME, "production").version == "1"
        assert host.resolve(NAME, "champion").version == "3"
    moved = _entries(fresh_store, OUTSIDE)
    found = sorted((e.evidence["alias"], e.evidence["from"], e.evidence["to"]) for e in moved)
    assert found == [("Production", "2", "1"), ("champion", "2", "3")]  # once each, not once per host
    assert all(e.actor == audit.SYSTEM and "outside flywheel" in e.reason for e in moved)

    # flywheel's next promotion is not an outside move; a later raw move again is one entry
    registry.promote(NAME, "3", "Production", fresh_store)
    assert hosts[0].resolve(NAME, "Production").version == "3"
    client.set_registered_model_alias(NAME, "Production", "1")
    hosts[0].clear()
    hosts[0].resolve(NAME, "Production")
    hosts[0].clear()
    hosts[0].resolve(NAME, "Production")
    moved = [e for e in _entries(fresh_store, OUTSIDE) if e.evidence["alias"] == "Production"]
    assert [(e.evidence["from"], e.evidence["to"]) for e in moved] == [("3", "1"), ("2", "1")]


def test_a_promotion_in_progress_is_not_an_outside_move(fresh_store: Store) -> None:
    for joke in ("one", "two"):
        _register(fresh_store, joke)
    registry.promote(NAME, "1", "Production", fresh_store)
    loader = Loader(fresh_store)
    assert loader.resolve(NAME, "Production").version == "1"
    # a host resolves between promote's alias move and its audit entry: it sees the intent tag
    registry._mark_move(fresh_store, NAME, "2", "Production")
    fresh_store.client.set_registered_model_alias(NAME, "Production", "2")
    loader.clear()
    assert loader.resolve(NAME, "Production").version == "2"
    assert not _entries(fresh_store, OUTSIDE)


def test_trust_adopts_an_inspected_version(fresh_store: Store) -> None:
    _register(fresh_store, "one")
    program = dspy.Predict("topic -> joke")
    program.demos = [dspy.Example(topic="anything", joke="outside")]
    with fresh_store.fluent():  # MLflow's own API, as anyone with access to the store can use it
        with mlflow.start_run(experiment_id=fresh_store.experiment_id):
            logged = mlflow.dspy.log_model(program, name="program", pip_requirements=[])
        mv = fresh_store.client.create_model_version(NAME, logged.model_uri, model_id=logged.model_id)
    version = str(mv.version)
    with pytest.raises(FlywheelError):
        Loader(fresh_store).load(NAME, version)
    trusted = registry.trust(NAME, version, fresh_store, actor="ann", reason="read its pickle")
    assert trusted.tags[REGISTERED_TAG] == "true"
    assert Loader(fresh_store).load(NAME, version).program.demos[0].joke == "outside"
    [entry] = _entries(fresh_store, "trust")
    assert (entry.actor, entry.reason, entry.version) == ("ann", "read its pickle", version)
    assert entry.evidence["content_sha256"] == trusted.tags[CONTENT_TAG]
    assert entry.evidence["previous_sha256"] is None


@pytest.mark.slow
@pytest.mark.backends("sqlite")
def test_the_trust_command(fresh_store: Store) -> None:
    _register(fresh_store, "one")
    fresh_store.client.delete_model_version_tag(NAME, "1", CONTENT_TAG)
    run = [sys.executable, "-m", "flywheel", "trust", NAME, "1", "--reason", "checked by hand"]
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("jokes version 1 trusted: sha256 ")
    assert registry.get_version(NAME, "1", fresh_store).tags[CONTENT_TAG] in out.stdout
    assert _entries(fresh_store, "trust")[0].reason == "checked by hand"


def test_the_names_the_tests_use_are_the_registrys() -> None:
    assert (registry.OUTSIDE_ACTION, registry.REGISTERED_TAG, registry.CONTENT_TAG) == (
        OUTSIDE,
        REGISTERED_TAG,
        CONTENT_TAG,
    )
