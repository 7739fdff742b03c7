"""Rollback in one step, exactly once across hosts, and the watcher that judges live traffic.

Live traffic is constructed as real traces written through the runtime's outbox (the one trace
write path), with chosen times and outcomes, on a real sqlite MLflow store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import dspy
import pytest

from flywheel import audit, registry, rollback
from flywheel.canary import LiveFigures
from flywheel.config import get_settings
from flywheel.errors import ModelNotFound, RollbackError
from flywheel.runtime import Runtime
from flywheel.store import Store
from flywheel.tracing import TraceRecord, new_trace_id

MODEL = "svc"
ROOT = Path(__file__).resolve().parent.parent


def _program(answer: str) -> dspy.Module:
    program = dspy.Predict("question -> answer")
    program.demos = [dspy.Example(question="anything", answer=answer)]
    return program


@pytest.fixture(scope="module")
def store(module_store: Store) -> Store:
    for answer in ("old", "new"):
        registry.register_program(_program(answer), MODEL, store=module_store)
    return module_store


def _promote_fresh(store: Store) -> str:
    """v1 Production, then v2 over it: a new promotion (its own promoted_at) to judge."""
    registry.promote(MODEL, "1", "Production", store, actor="test")
    time.sleep(0.01)
    registry.promote(MODEL, "2", "Production", store, actor="test", reason="candidate won the gate")
    return registry.get_version(MODEL, "2", store).tags[registry.PROMOTED_AT_TAG]


def _traffic(store: Store, version: str, n: int, errors: int, at_ms: int) -> None:
    """`n` traces of `version` at `at_ms` (+1 ms each), the first `errors` of them failed."""
    info = registry.get_version(MODEL, version, store)
    with Runtime(store=store) as runtime:
        for i in range(n):
            start = (at_ms + i) * 1_000_000
            trace_id = new_trace_id(at=at_ms / 1000)
            if i < errors:
                record = TraceRecord.failed(
                    trace_id, info, {"question": f"q{i}"}, start, "program error: boom"
                )
            else:
                record = TraceRecord.ok(
                    trace_id, info, {"question": f"q{i}"}, {"answer": "a"}, start, start + 5_000_000
                )
            runtime.record_trace(replace(record, end_ns=start + 5_000_000))
        assert runtime.outbox.flush(), runtime.outbox.last_error


def _settings_store(store: Store, **changes: object) -> Store:
    return replace(store, settings=replace(store.settings, **changes))


def _watching(store: Store) -> Store:
    return _settings_store(store, watch_min_requests=100, watch_margin=0.05, watch_alpha=0.05)


def test_the_watcher_rolls_back_once_on_worse_live_traffic(store: Store) -> None:
    promoted_at = int(_promote_fresh(store))
    _traffic(store, "1", 200, 4, promoted_at - 60_000)  # before: 2% errors
    _traffic(store, "2", 200, 60, promoted_at + 1)  # after: 30% errors
    watched = _watching(store)
    verdict = rollback.watch_once(watched, MODEL, watcher="w1")
    assert verdict.decision == rollback.ROLLBACK and verdict.acted, verdict
    assert "error rate" in verdict.reason and verdict.evidence["error rate difference lower bound"] > 0.05
    assert registry.resolve(MODEL, "Production", store).version == "1"
    again = rollback.watch_once(watched, MODEL, watcher="w1")
    assert not again.acted and again.decision == rollback.KEEP  # never rolls forward
    assert registry.resolve(MODEL, "Production", store).version == "1"
    entry = next(e for e in audit.timeline(store, MODEL) if e.action == "rollback")
    assert entry.actor == "w1" and entry.version == "1" and entry.evidence["rolled_back"] == "2"
    assert entry.evidence["new"]["errors"] == 60 and entry.evidence["old"]["requests"] == 200
    tags = registry.get_version(MODEL, "1", store).tags
    assert any(k.startswith("flywheel.audit.") and k.endswith(".rollback") for k in tags)


def test_the_watcher_keeps_healthy_traffic(store: Store) -> None:
    promoted_at = int(_promote_fresh(store))
    _traffic(store, "1", 200, 4, promoted_at - 30_000)
    _traffic(store, "2", 200, 6, promoted_at + 1)  # 3%: not worse beyond the 5% margin
    verdict = rollback.watch_once(_watching(store), MODEL)
    assert verdict.decision == rollback.KEEP and not verdict.acted, verdict
    assert registry.resolve(MODEL, "Production", store).version == "2"


def test_too_little_traffic_or_an_unreadable_registry_is_inconclusive(store: Store, tmp_path: Path) -> None:
    promoted_at = int(_promote_fresh(store))
    _traffic(store, "2", 20, 20, promoted_at + 1)  # all failed, but only 20 requests
    verdict = rollback.watch_once(_watching(store), MODEL)
    assert verdict.decision == rollback.INCONCLUSIVE and "too little traffic" in verdict.reason
    gone = replace(store, tracking_uri=f"sqlite:///{tmp_path / 'missing' / 'no.db'}")
    broken = rollback.watch_once(gone, MODEL)
    assert broken.decision == rollback.INCONCLUSIVE and not broken.acted
    assert registry.resolve(MODEL, "Production", store).version == "2"


def test_two_racing_watchers_roll_back_once(store: Store) -> None:
    promoted_at = int(_promote_fresh(store))
    _traffic(store, "1", 200, 2, promoted_at - 20_000)
    _traffic(store, "2", 200, 80, promoted_at + 1)
    before = sum(e.action == "rollback" for e in audit.timeline(store, MODEL))
    # two hosts: two Store objects (their own MLflow clients) on the same backend
    hosts = [Store(store.tracking_uri, store.experiment_id, _watching(store).settings) for _ in range(2)]
    barrier = threading.Barrier(2)
    verdicts: list[rollback.Verdict] = []

    def host(s: Store, name: str) -> None:
        barrier.wait()
        verdicts.append(rollback.watch_once(s, MODEL, watcher=name))

    threads = [threading.Thread(target=host, args=(s, f"host{i}")) for i, s in enumerate(hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(v.acted for v in verdicts) == 1, verdicts
    assert {v.decision for v in verdicts if not v.acted} <= {rollback.STALE, rollback.KEEP}
    assert registry.resolve(MODEL, "Production", store).version == "1"
    assert sum(e.action == "rollback" for e in audit.timeline(store, MODEL)) == before + 1


def test_judge_thumbs_down_with_significance_only() -> None:
    settings = replace(get_settings(), watch_min_requests=50, watch_min_ratings=30, watch_margin=0.05)
    old = LiveFigures("1", 300, 3, 5.0, 9.0, thumbs_up=80, thumbs_down=20)
    bad = LiveFigures("2", 300, 3, 5.0, 9.0, thumbs_up=40, thumbs_down=60)
    fine = LiveFigures("2", 300, 3, 5.0, 9.0, thumbs_up=78, thumbs_down=22)
    few = LiveFigures("2", 300, 3, 5.0, 9.0, thumbs_up=2, thumbs_down=8)
    assert rollback.judge(bad, old, settings)[0] == rollback.ROLLBACK
    assert "thumbs-down" in rollback.judge(bad, old, settings)[1]
    assert rollback.judge(fine, old, settings)[0] == rollback.KEEP
    assert rollback.judge(few, old, settings)[0] == rollback.KEEP  # 10 ratings: not compared
    assert rollback.judge(None, old, settings)[0] == rollback.INCONCLUSIVE
    # no errors anywhere is no evidence of anything; a clear difference is bounded below
    assert rollback.worse_beyond((0, 300), (0, 300), 0.05) == 0.0
    assert 0.15 < rollback.worse_beyond((60, 200), (4, 200), 0.05) < 0.28


def test_manual_rollback_once_and_its_refusals(store: Store) -> None:
    _promote_fresh(store)
    with pytest.raises(RollbackError, match="not 1"):
        rollback.rollback(store, MODEL, expected="1")
    info = rollback.rollback(store, MODEL, expected="2", actor="ann", reason="complaints")
    assert info.version == "1" and info.stage == "Production"
    assert registry.get_version(MODEL, "2", store).stage == "Archived"
    with pytest.raises(RollbackError):
        rollback.rollback(store, MODEL, expected="2")  # a second click: Production moved
    entry = next(e for e in audit.timeline(store, MODEL) if e.action == "rollback")
    assert (entry.actor, entry.reason, entry.version) == ("ann", "complaints", "1")
    with pytest.raises(ModelNotFound):
        rollback.rollback(store, "no-such-model")


def test_a_promotion_rolled_back_is_never_rolled_back_twice(store: Store) -> None:
    _promote_fresh(store)
    twin = Store(store.tracking_uri, store.experiment_id, store.settings)
    rollback.rollback(store, MODEL)
    registry.promote(MODEL, "2", "Production", store)  # a new promotion: may be rolled back again
    rollback.rollback(twin, MODEL)
    assert registry.resolve(MODEL, "Production", store).version == "1"


@pytest.mark.slow  # three fresh interpreters importing MLflow: ~30 s on 2 cores
def test_cli_rollback_and_audit(store: Store) -> None:
    _promote_fresh(store)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "flywheel"]
    done = subprocess.run(
        [*cmd, "rollback", MODEL, "--reason", "bad jokes", "--by", "cli-user"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "version 1 is Production again" in done.stdout
    assert registry.resolve(MODEL, "Production", store).version == "1"
    again = subprocess.run(
        [*cmd, "rollback", MODEL, "--expected", "2"], env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 1 and "Production is version 1" in again.stderr
    shown = subprocess.run(
        [*cmd, "audit", MODEL, "--limit", "5"], env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0 and "rollback" in shown.stdout and "cli-user: bad jokes" in shown.stdout


def test_api_rollback_needs_the_admin_key_and_happens_once(
    tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    import httpx

    from flywheel.http.client import APIError, Client
    from flywheel.http.server import start_background, stop_background

    own = make_store(tmp_path / "home", FLYWHEEL_ADMIN_KEY="a-key")
    for answer in ("old", "new"):
        registry.register_program(_program(answer), MODEL, store=own)
    registry.promote(MODEL, "1", "Production", own)
    registry.promote(MODEL, "2", "Production", own)
    url = start_background(port=0)
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            path = f"/models/{MODEL}/rollback"
            json_type = {"Content-Type": "application/json"}  # every write carries it, also without a body
            assert http.post(path, headers=json_type).status_code == 401
            assert http.post(path, headers={"X-API-Key": "wrong", **json_type}).status_code == 403
            admin = {"X-API-Key": "a-key", **json_type}
            stale = http.post(path, json={"expected_version": "1"}, headers=admin)
            assert stale.status_code == 409 and "not 1" in stale.json()["detail"]
            assert http.post(path, json={"bogus": 1}, headers=admin).status_code == 422
            assert http.post("/models/nope/rollback", headers=admin).status_code == 404
            done = http.post(path, json={"expected_version": "2", "reason": "p99 doubled"}, headers=admin)
            assert done.status_code == 200, done.text
            assert (
                done.json()["version"]["version"] == "1" and done.json()["version"]["stage"] == "Production"
            )
            again = http.post(path, json={"expected_version": "2"}, headers=admin)
            assert again.status_code == 409
            trail = http.get(f"/models/{MODEL}/audit").json()["entries"]
            assert trail[0]["action"] == "rollback" and trail[0]["reason"] == "p99 doubled"
            assert trail[0]["actor"] == "api" and trail[0]["evidence"]["rolled_back"] == "2"
        # the Python client: promote again, roll back with it, read the trail
        registry.promote(MODEL, "2", "Production", own)
        with Client(url, api_key="a-key") as client:
            assert client.rollback(MODEL, expected_version="2", reason="again")["version"]["version"] == "1"
            with pytest.raises(APIError) as refused:
                client.rollback(MODEL, expected_version="2")
            assert refused.value.status_code == 409
            assert client.audit(MODEL, limit=1)[0]["actor"] == "client"
    finally:
        stop_background()
    assert registry.resolve(MODEL, "Production", own).version == "1"


def test_watchers_in_two_serving_runtimes_roll_back_once_by_themselves(store: Store) -> None:
    promoted_at = int(_promote_fresh(store))
    _traffic(store, "1", 150, 3, promoted_at - 10_000)
    _traffic(store, "2", 150, 75, promoted_at + 1)
    before = sum(e.action == "rollback" for e in audit.timeline(store, MODEL))
    watching = _settings_store(_watching(store), watch_enabled=True, watch_interval=0.2)
    hosts = [
        Runtime(store=Store(store.tracking_uri, store.experiment_id, watching.settings)).start()
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 60
        while registry.resolve(MODEL, "Production", store).version != "1" and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # both kept looking after the rollback
    finally:
        for runtime in hosts:
            runtime.close()
    assert registry.resolve(MODEL, "Production", store).version == "1"
    assert sum(e.action == "rollback" for e in audit.timeline(store, MODEL)) == before + 1
    verdicts = [r._watcher.last[MODEL] for r in hosts]  # the watcher records its last verdict
    assert all(v.judged == "1" and v.decision == rollback.KEEP for v in verdicts), verdicts


@pytest.mark.backends("sqlite", "postgres")
def test_a_claim_is_taken_once_across_hosts_on_every_backend(fresh_store: Store) -> None:
    hosts = [
        Store(fresh_store.tracking_uri, fresh_store.experiment_id, fresh_store.settings) for _ in range(4)
    ]
    barrier = threading.Barrier(len(hosts))
    taken: list[bool] = []

    def take(s: Store) -> None:
        barrier.wait()
        taken.append(s.claim("rollback/race/2/123"))

    threads = [threading.Thread(target=take, args=(s,)) for s in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(taken) == [False, False, False, True]
    assert fresh_store.claim("rollback/race/2/124") and not fresh_store.claim("rollback/race/2/124")
    # claims never show up among the experiments a person browses
    names = [e.name for e in fresh_store.client.search_experiments()]
    assert not [n for n in names if "claims/" in n]
