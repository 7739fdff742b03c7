"""No secret in any span, log or file (issue 31, findings 3 and 11b).

A provider's error that quotes the credential it was sent (OpenAI's 401: "Incorrect API key
provided: sk-..."; a gateway quoting the user:password of FLYWHEEL_LM_API_BASE) is answered
502 and traced with state ERROR: every span, event, status, tag and log line holds it
redacted, and nothing raw is written anywhere (the MLflow store, its artifacts, the outbox and
its WAL). A tracking URI with a password is redacted from the startup error and from
last-known-good's experiments.json.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import programs_zoo as zoo
import pytest
from fastapi.testclient import TestClient
from openai_stub import OpenAIStub, _credential

from flywheel import registry
from flywheel.http.api import create_app
from flywheel.runtime import get_runtime, reset_runtime
from flywheel.store import Store

KEY = "sk-test-SECRET123abcdef0123456789"
PASSWORD = "pw-SECRET456xyz"


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    server = OpenAIStub().start()
    yield server
    server.stop()


def _leaks(home: Path, text: str, secrets: list[str]) -> list[str]:
    """Where any secret appears: every row of the sqlite stores (dumped), every file under
    FLYWHEEL_HOME as bytes (artifacts, outbox.db, -wal, -shm, logs) and `text` (captured output)."""
    found = []
    for db in home.rglob("*.db"):
        with sqlite3.connect(db) as conn:
            dump = "\n".join(conn.iterdump())
        found += [f"{db} (rows): {s}" for s in secrets if s in dump]
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    found += [f"output: {s}" for s in secrets if s in text]
    return found


@pytest.mark.parametrize(
    ("engine", "gateway"),
    [("auto", False), ("litellm", False), ("auto", True)],
    ids=["key-native", "key-litellm", "gateway-password"],
)
def test_a_provider_error_quoting_the_credential_is_stored_redacted(
    stub: OpenAIStub,
    tmp_path: Path,
    make_store: Callable[..., Store],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    engine: str,
    gateway: bool,
) -> None:
    """The stub answers 401 quoting what it was sent: the key, or a gateway's user:password."""
    base = f"http://u:{PASSWORD}@127.0.0.1:{stub.port}/v1" if gateway else stub.url
    home = tmp_path / "home"
    store = make_store(
        home,
        FLYWHEEL_LM=f"openai/stub-{uuid.uuid4().hex[:8]}",
        FLYWHEEL_LM_API_BASE=base,
        FLYWHEEL_LM_ENGINE=engine,
        FLYWHEEL_LM_RETRIES="0",
        OPENAI_API_KEY=KEY,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        DEFAULT_MODEL_STAGE="None",
    )
    registry.register_program(zoo.capital_qa(), "capital", store=store)
    stub.reset(key="sk-the-one-the-stub-accepts-000")  # ours is refused, and quoted back
    quoted = f"u:{PASSWORD}" if gateway else KEY
    try:
        with caplog.at_level(logging.INFO), TestClient(create_app(get_runtime())) as client:
            r = client.post("/predict", json={"model": "capital", "inputs": {"country": "Japan"}})
            assert stub.calls() and _credential(stub.calls()[-1].headers) == quoted  # what it quoted back
            assert r.status_code == 502, r.text
            detail = r.json()["detail"]
            assert "Incorrect API key provided" in detail and "***" in detail, detail
            runtime = get_runtime()
            assert runtime.outbox.flush(), runtime.outbox.last_error
            trace_id = r.headers.get("x-flywheel-trace-id") or _last_error_trace(store)
            trace = store.client.get_trace(trace_id)
            # the open files, WAL included, before anything is checkpointed or closed
            live = _leaks(home, "", [KEY, PASSWORD])
    finally:
        reset_runtime()
    assert live == [], "\n".join(live)
    out, err = capfd.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records) + out + err  # INFO: what `serve` logs
    leaks = _leaks(home, logged + json.dumps(trace.to_dict(), default=str), [KEY, PASSWORD])
    assert leaks == [], "\n".join(leaks)
    lm_spans = [s for s in trace.data.spans if s.name.endswith(".__call__")]
    assert lm_spans, [s.name for s in trace.data.spans]
    for span in lm_spans:
        assert "Incorrect API key provided" in span.status.description and "***" in span.status.description
        events = [e for e in span.events if e.name == "exception"]
        assert events and "***" in events[0].attributes["exception.message"]
        assert "api_key" not in (span.inputs or {}) and "api_key" not in span.attributes


def _last_error_trace(store: Store) -> str:
    infos, _ = store.tracking.search_traces(
        locations=[store.experiment_id], filter_string="trace.status = 'ERROR'", max_results=1
    )
    assert infos
    return infos[0].trace_id


def test_a_tracking_uri_password_is_redacted_from_the_startup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`flywheel serve` on an unreachable tracking server whose URI holds a password: one line,
    naming the server, without the password."""
    from flywheel.cli import main
    from flywheel.config import get_settings
    from flywheel.store import reset

    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:{PASSWORD}@127.0.0.1:9/")
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    reset()
    try:
        assert main(["serve", "--port", "0"]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "cannot reach the MLflow tracking server at http://user:***@127.0.0.1:9" in err, err
    assert PASSWORD not in err


def test_last_known_good_experiments_json_holds_no_password(
    tmp_path: Path, empty_home: Callable[[str], Path]
) -> None:
    """experiments.json names the store by its URI: with the password redacted, and the offline
    start still finds the experiment by it."""
    from dataclasses import replace

    from flywheel.config import load_settings
    from flywheel.store import _record_experiment, _recorded_experiment

    home = empty_home("home")
    settings = load_settings(
        {"FLYWHEEL_HOME": str(home), "MLFLOW_TRACKING_URI": f"postgresql://fw:{PASSWORD}@db.example/fw"},
        env_file=None,
    )
    _record_experiment(settings, "7")
    written = (home / "last-known-good" / "experiments.json").read_text()
    assert PASSWORD not in written and "postgresql://fw:***@db.example/fw flywheel" in written, written
    assert _recorded_experiment(settings) == "7"
    other = replace(settings, mlflow_tracking_uri="postgresql://fw:other@db.example/fw")
    assert _recorded_experiment(other) == "7"  # the same store, whatever its password now


def test_redact_covers_known_values_keys_bearers_and_userinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    from flywheel.config import get_settings
    from flywheel.limits import redact_uri
    from flywheel.lm import redact

    monkeypatch.setenv("ANTHROPIC_API_KEY", "anthropic-VALUE-77aa")  # no sk- prefix: found by value
    monkeypatch.setenv("FLYWHEEL_LM_API_BASE", f"http://gw:{PASSWORD}@gw.example/v1")
    get_settings.cache_clear()
    try:
        text = redact(
            f"refused anthropic-VALUE-77aa; gateway said bad password {PASSWORD}; "
            f"Authorization: Bearer abcdefghijklmnop; {KEY}; http://a:b-c@host:1/x"
        )
    finally:
        get_settings.cache_clear()
    for secret in ("anthropic-VALUE-77aa", PASSWORD, "abcdefghijklmnop", KEY, "b-c@"):
        assert secret not in text, text
    assert "http://a:***@host:1/x" in text and "Bearer ***" in text
    assert redact("no capital parser for 'Peru' at 12:30") == "no capital parser for 'Peru' at 12:30"
    assert redact_uri("postgresql://u:p@h/db") == "postgresql://u:***@h/db"
    assert redact_uri("http://token@h:5000") == "http://***@h:5000"
    assert redact_uri("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"
