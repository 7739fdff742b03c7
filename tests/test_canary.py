"""Canary and shadow traffic through the one serving path, on a real MLflow store with the offline LM."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from flywheel import audit, canary, export, registry, serving
from flywheel.errors import InputError, ModelNotFound
from flywheel.review import ReviewQueue, create_queue
from flywheel.runtime import Runtime, get_runtime
from flywheel.store import Store
from flywheel.tracing import SHADOW_OF_TAG, model_filter, shadow_filter

pytestmark = pytest.mark.backends("sqlite", "postgres")

MODEL = "joke-generator"  # the demo: v2 in Production, v1 the older one


async def _many(runtime: Runtime, n: int, keys: list[str | None]) -> list[serving.Prediction]:
    out: list[serving.Prediction] = []
    for start in range(0, n, 200):  # concurrent requests share the outbox's group commits
        batch = [
            serving.apredict(runtime, MODEL, {"topic": f"cat {i}"}, routing_key=keys[i % len(keys)])
            for i in range(start, min(n, start + 200))
        ]
        out += await asyncio.gather(*batch)
    return out


@pytest.fixture
def canary_on(demo_store_rw: Store) -> Store:
    registry.set_alias(MODEL, "canary", "1", demo_store_rw, actor="ann", reason="try v1 again")
    canary.set_canary(demo_store_rw, MODEL, "canary", 0.10, actor="ann", reason="10% canary")
    yield demo_store_rw
    canary.set_canary(demo_store_rw, MODEL, None, 0.0, actor="ann", reason="end")


# sqlite only: 2,000 traced predictions through the tracking server take minutes, and the split is a
# hash of the key; the plan's round trip through PostgreSQL is the other tests' business
@pytest.mark.backends("sqlite")
def test_a_ten_percent_canary_gets_seven_to_thirteen_percent(canary_on: Store) -> None:
    runtime = get_runtime()
    answers = asyncio.run(_many(runtime, 2000, [None]))
    on_canary = [a for a in answers if a.route == canary.CANARY]
    share = len(on_canary) / len(answers)
    print(f"canary share: {len(on_canary)} of {len(answers)} = {share:.3f}")
    assert 0.07 <= share <= 0.13, share
    # the response says which version answered, and the route agrees with it
    assert {a.model_version for a in on_canary} == {"1"}
    assert {a.model_version for a in answers if a.route == canary.STABLE} == {"2"}
    assert runtime.outbox.flush()
    info = runtime.store.tracking.get_trace_info(on_canary[0].trace_id)
    assert info.tags["flywheel.route"] == "canary" and info.tags["flywheel.model_version"] == "1"


def test_the_same_key_always_gets_the_same_version(canary_on: Store) -> None:
    runtime = get_runtime()
    keys: list[str | None] = [f"user-{i}" for i in range(200)]
    first = asyncio.run(_many(runtime, 400, keys))  # each key twice
    by_key: dict[str, set[str]] = {}
    for i, answer in enumerate(first):
        by_key.setdefault(str(keys[i % len(keys)]), set()).add(answer.model_version)
    assert all(len(v) == 1 for v in by_key.values()), "a key was served by two versions"
    assert {next(iter(v)) for v in by_key.values()} == {"1", "2"}  # both sides have keys
    # and the side follows the key's fixed point, not the order of requests
    for key, versions in by_key.items():
        expected = "1" if canary.key_point(MODEL, key) < 0.10 else "2"
        assert versions == {expected}


def test_an_explicit_reference_bypasses_the_canary(canary_on: Store) -> None:
    runtime = get_runtime()
    plan = runtime.traffic.get(MODEL)
    assert plan.canary_ref == "canary" and plan.share == 0.10
    # keys that the canary would take: an explicit reference is still served as asked
    canary_keys = [k for k in (f"k{i}" for i in range(500)) if canary.key_point(MODEL, k) < 0.10][:20]
    assert canary_keys
    for key in canary_keys:
        for ref, version in (("Production", "2"), ("2", "2"), ("champion", "2")):
            answer = runtime.predict(MODEL, {"topic": "dog"}, ref, routing_key=key)
            assert (answer.model_version, answer.route) == (version, canary.EXPLICIT)
        assert runtime.predict(MODEL, {"topic": "dog"}, routing_key=key).model_version == "1"


def test_a_canary_change_is_audited_and_bad_plans_are_refused(canary_on: Store) -> None:
    entries = audit.timeline(canary_on, MODEL)
    change = next(e for e in entries if e.action == "canary")
    assert change.actor == "ann" and change.reason == "10% canary"
    assert change.evidence["share"] == 0.10 and change.evidence["resolves_to"] == "1"
    alias = next(e for e in entries if e.action == "alias")
    assert alias.version == "1" and alias.evidence["alias"] == "canary"
    assert canary_on.client.get_run(change.run_id).data.tags["flywheel.audit.action"] == "canary"
    with pytest.raises(InputError):
        canary.set_canary(canary_on, MODEL, "canary", 1.5)
    with pytest.raises(ModelNotFound):
        canary.set_canary(canary_on, MODEL, "no-such-alias", 0.5)
    assert canary.plan_of(canary_on, MODEL).share == 0.10  # a refused change changes nothing


def test_a_mangled_plan_tag_means_no_canary() -> None:
    assert canary.TrafficPlan.from_tags({canary.CANARY_TAG: "{not json"}).share == 0.0
    assert canary.TrafficPlan.from_tags({canary.CANARY_TAG: '{"ref": "c", "share": "nan"}'}).share == 0.0
    assert canary.TrafficPlan.from_tags({canary.CANARY_TAG: '{"ref": "c", "share": 0.2}'}).share == 0.2
    assert canary.choose(canary.TrafficPlan("c", 0.0), MODEL, "k") == canary.STABLE


def test_shadow_traces_are_linked_tagged_and_absent_from_export_queue_and_figures(
    demo_store_rw: Store,
) -> None:
    store = demo_store_rw
    canary.set_shadow(store, MODEL, "1", actor="bo", reason="compare v1 on live inputs")
    runtime = get_runtime()
    try:
        answers = [runtime.predict(MODEL, {"topic": f"shadow {i}"}) for i in range(5)]
    finally:
        canary.set_shadow(store, MODEL, None, actor="bo", reason="done")
    assert all(a.model_version == "2" for a in answers)  # the shadow's answer is never returned
    assert runtime.outbox.flush()
    shadows, _ = store.tracking.search_traces(
        locations=[store.experiment_id], filter_string=shadow_filter(MODEL), max_results=100
    )
    linked = {s.tags[SHADOW_OF_TAG]: s for s in shadows}
    assert set(linked) >= {a.trace_id for a in answers}
    one = linked[answers[0].trace_id]
    assert one.tags["flywheel.route"] == "shadow" and one.tags["flywheel.model_version"] == "1"
    shadow_ids = {s.trace_id for s in shadows}
    # rate a shadow and its Production trace: only the Production one is exported
    for trace_id in (one.trace_id, answers[0].trace_id):
        runtime.submit_feedback(trace_id, "thumbs_up", user_id="bo")
    assert runtime.outbox.flush()
    rows = export.export_rows(runtime, MODEL, rating="any")
    exported = {r["trace_id"] for r in rows}
    assert answers[0].trace_id in exported and not exported & shadow_ids
    # the review queue and the live figures read the model's traces by the same filter
    all_model, token = [], None
    while True:  # pages of 500: what a tracking server answers at most
        page, token = store.tracking.search_traces(
            locations=[store.experiment_id],
            filter_string=model_filter(MODEL),
            max_results=500,
            page_token=token,
        )
        all_model += page
        if not token or not page:
            break
    assert not {i.trace_id for i in all_model} & shadow_ids
    create_queue(store, MODEL, ["cy"], k=1, backlog=True)  # every unrated trace of the model
    queue = ReviewQueue(runtime, MODEL, reviewer="cy")
    try:
        # every item the queue can ever show (its reviewer's pending items), and the first few it shows
        candidates = set(queue._candidates())
        assert {a.trace_id for a in answers[1:]} <= candidates and not candidates & shadow_ids
        item = queue.next()
        for _ in range(5):
            assert item is not None and item.trace_id not in shadow_ids
            item = queue.skip()
    finally:
        queue.close()
    figures = canary.live_figures(store, MODEL)
    assert sum(f.requests for f in figures.values()) == len(all_model)


def test_live_figures_count_errors_latency_and_ratings(demo_store_rw: Store) -> None:
    runtime = get_runtime()
    answers = [runtime.predict("support-router", {"ticket": f"refund {i}"}) for i in range(6)]
    for answer, rating in zip(answers, ["thumbs_up"] * 4 + ["thumbs_down"] * 2, strict=True):
        runtime.submit_feedback(answer.trace_id, rating, user_id="dee")
    assert runtime.outbox.flush()
    figures = canary.live_figures(demo_store_rw, "support-router")
    version = answers[0].model_version
    mine = figures[version]
    assert mine.requests >= 6 and mine.thumbs_up >= 4 and mine.thumbs_down >= 2
    assert mine.p50_ms is not None and mine.p99_ms is not None and mine.p50_ms <= mine.p99_ms
    low, high = mine.up_interval()
    assert 0 <= low < mine.up_rate < high <= 1
    report = canary.live_report(runtime, "support-router")
    assert any(v["version"] == version and v["thumbs_up_interval"] for v in report["versions"])


def test_the_api_sets_the_plan_routes_by_key_and_reports_live_figures(demo_store_rw: Store) -> None:
    import httpx

    from flywheel.http.server import start_background, stop_background

    url = start_background(port=0)
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            path = f"/models/{MODEL}/canary"
            assert http.put(path, json={"ref": "canary", "share": 2}).status_code == 422
            assert http.put(path, json={"ref": "nope", "share": 0.5}).status_code == 404
            assert http.put("/models/nope/canary", json={"ref": "1", "share": 0.5}).status_code == 404
            plan = http.put(path, json={"ref": "1", "share": 0.5, "actor": "eve", "reason": "half"})
            assert plan.status_code == 200 and plan.json()["plan"]["share"] == 0.5
            key = next(k for k in (f"u{i}" for i in range(100)) if canary.key_point(MODEL, k) < 0.5)
            body = {"model": MODEL, "inputs": {"topic": "cat"}, "user_id": key}
            answers = [http.post("/predict", json=body) for _ in range(5)]
            assert {(a.json()["model_version"], a.headers["x-flywheel-route"]) for a in answers} == {
                ("1", "canary")
            }
            pinned = http.post("/predict", json={**body, "version": "2"})
            assert (pinned.json()["model_version"], pinned.headers["x-flywheel-route"]) == ("2", "explicit")
            assert set(pinned.json()) == {"result", "trace_id", "model_version", "latency_ms"}  # the SPEC's
            live = http.get(f"/models/{MODEL}/live").json()
            assert live["plan"] == {"canary": "1", "share": 0.5, "shadow": None}
            assert any(v["version"] == "1" and v["requests"] >= 5 for v in live["versions"])
            assert http.get("/models/nope/live").status_code == 404
            assert http.get(f"/models/{MODEL}/live", params={"since_ms": -1}).status_code == 422
            trail = http.get(f"/models/{MODEL}/audit", params={"limit": 1}).json()["entries"]
            assert trail[0]["action"] == "canary" and trail[0]["actor"] == "eve"
            assert http.put(path, json={"ref": None, "share": 0}).json()["plan"]["canary"] is None
            # shadow on, then a pairwise preference on the answered and the shadow trace
            assert http.put(f"/models/{MODEL}/shadow", json={"ref": "1"}).status_code == 200
            answered = http.post("/predict", json={"model": MODEL, "inputs": {"topic": "owls"}}).json()
            runtime = get_runtime()
            assert runtime.outbox.flush()
            shadow_id = None
            for _ in range(50):  # the shadow runs after the answer
                found, _ = runtime.store.tracking.search_traces(
                    locations=[runtime.store.experiment_id],
                    filter_string=shadow_filter(MODEL, answered["trace_id"]),
                    max_results=5,
                )
                if found:
                    shadow_id = found[0].trace_id
                    break
                runtime.outbox.flush()

                time.sleep(0.2)
            assert shadow_id is not None
            http.put(f"/models/{MODEL}/shadow", json={"ref": None})
            pair = {"trace_a": answered["trace_id"], "trace_b": shadow_id, "preferred": "B", "user_id": "fay"}
            assert http.post("/feedback/preference", json=pair).status_code == 200
            same = {**pair, "trace_b": answered["trace_id"]}
            assert http.post("/feedback/preference", json=same).status_code == 422
            unknown = {**pair, "trace_b": "tr-" + "0" * 32}
            assert http.post("/feedback/preference", json=unknown).status_code == 404
            assert http.post("/feedback/preference", json={**pair, "preferred": "C"}).status_code == 422
    finally:
        stop_background()
    assert runtime.outbox.flush()
    for trace_id, side, won in ((answered["trace_id"], "A", False), (shadow_id, "B", True)):
        info = runtime.store.tracking.get_trace_info(trace_id)
        pref = [a for a in info.assessments if a.name == "pairwise_preference"]
        assert len(pref) == 1
        value = pref[0].value if isinstance(pref[0].value, dict) else json.loads(pref[0].value)
        assert value["side"] == side and value["won"] is won and value["preferred"] == "B"
        assert not [a for a in info.assessments if a.name == "user_rating"]  # no rating written


def test_the_pairwise_panel_records_a_preference_on_both_traces(demo_store_rw: Store) -> None:
    from flywheel.ui.widgets import pairwise_panel

    runtime = get_runtime()
    canary.set_shadow(demo_store_rw, MODEL, "1", actor="gus")
    try:
        served = [runtime.predict(MODEL, {"topic": t}) for t in ("ants", "bees")]
    finally:
        canary.set_shadow(demo_store_rw, MODEL, None, actor="gus")
    assert runtime.outbox.flush()
    pairs = canary.shadow_pairs(runtime, MODEL, "gus", limit=100)
    assert {p.a_trace for p in pairs} >= {s.trace_id for s in served}
    assert all(p.a_version == "2" and p.b_version == "1" for p in pairs)
    panel = pairwise_panel(model=MODEL, reviewer="gus", runtime=runtime)
    compared = []
    while panel.current is not None and len(compared) < 100:
        pair = panel.current
        assert pair.a_trace in panel.card.value and pair.b_trace in panel.card.value
        panel.buttons["fw-prefer-b"].click()  # the handler the button (and key B) runs
        compared.append(pair)
    assert len(compared) == len(pairs) and "No shadow answers waiting" in panel.card.value
    assert runtime.outbox.flush()
    for pair in compared[:2]:
        for trace_id, won in ((pair.a_trace, False), (pair.b_trace, True)):
            info = runtime.store.tracking.get_trace_info(trace_id)
            (pref,) = [a for a in info.assessments if a.name == "pairwise_preference"]
            value = pref.value if isinstance(pref.value, dict) else json.loads(pref.value)
            assert value["won"] is won and pref.source.source_id == "gus"
    assert canary.shadow_pairs(runtime, MODEL, "gus") == []  # nothing twice for the same reviewer
    assert canary.shadow_pairs(runtime, MODEL, "hal")  # another reviewer still has them


def test_a_plan_is_read_once_per_ttl_and_a_local_change_at_once(demo_store_rw: Store) -> None:
    plans = canary.TrafficPlans(demo_store_rw, ttl=3600)
    assert plans.peek(MODEL) is None  # never read: the caller reads it (in a thread)
    assert plans.get(MODEL).share == 0.0 and plans.peek(MODEL) == canary.TrafficPlan()
    canary.set_canary(demo_store_rw, MODEL, "1", 0.3)
    try:
        assert plans.peek(MODEL) is None  # changed in this process: not served stale
        assert plans.get(MODEL).share == 0.3
        # a stale plan is served at once and refreshed behind the request
        stale = canary.TrafficPlans(demo_store_rw, ttl=0)
        stale._seen[MODEL] = (0.0, registry.generation(demo_store_rw, MODEL), canary.TrafficPlan())
        assert stale.peek(MODEL) == canary.TrafficPlan()
        deadline = time.monotonic() + 10
        while stale._seen[MODEL][2].share != 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stale._seen[MODEL][2].share == 0.3
    finally:
        canary.set_canary(demo_store_rw, MODEL, None, 0)
