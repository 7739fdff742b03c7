"""Review for a team on MLflow's own label schemas and review queues (issue 14).

Real stores only: flywheel's sqlite store, MLflow's public `mlflow.genai.review_queues` and
`mlflow.genai.label_schemas` reading it back, and (for the race) separate host processes with
their own FLYWHEEL_HOMEs on one shared store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import flywheel
from flywheel import review, store
from flywheel.errors import ReviewError
from flywheel.runtime import Runtime, get_runtime, reset_runtime

JOKES, ROUTER = "joke-generator", "support-router"


@pytest.fixture(scope="module")
def rt(demo_store_rw: store.Store) -> Iterator[Runtime]:
    reset_runtime()
    yield get_runtime()
    reset_runtime()


def predictions(runtime: Runtime, model: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        inputs = {"topic": f"topic {i}"} if model == JOKES else {"ticket": f"my invoice {i} is wrong"}
        ids.append(flywheel.predict(model, inputs, runtime=runtime).trace_id)
    runtime.outbox.flush(timeout=10)
    return ids


def valid(runtime: Runtime, trace_id: str) -> list[Any]:
    runtime.outbox.flush(timeout=10)
    info = runtime.store.tracking.get_trace_info(trace_id)
    return [a for a in info.assessments or [] if a.valid is not False]


def test_label_schemas_are_mlflow_label_schemas_named_per_model(rt: Runtime) -> None:
    s = rt.store
    funny = review.define_label(s, JOKES, "funny", "numeric", minimum=1, maximum=5, instruction="1-5")
    review.define_label(s, JOKES, "safe", "pass_fail")
    review.define_label(s, ROUTER, "urgency", "categorical", options=["low", "high"])
    review.define_label(s, ROUTER, "notes", "text")
    review.define_label(s, ROUTER, "polite", "thumbs")
    again = review.define_label(s, JOKES, "funny", "numeric", minimum=1, maximum=5)  # idempotent
    assert again.schema_id == funny.schema_id and funny.name == "joke-generator:funny"

    kinds = {lab.name: lab.kind for lab in review.labels(s, JOKES)}
    assert kinds == {
        "user_rating": "thumbs",
        "corrected_output": "corrected_output",
        "comment": "text",
        "joke-generator:funny": "numeric",
        "joke-generator:safe": "pass_fail",
    }
    router = {lab.name: lab for lab in review.labels(s, ROUTER)}
    assert router["support-router:urgency"].options == ("low", "high")
    assert router["support-router:polite"].kind == "thumbs"
    assert "joke-generator:funny" not in router  # two models, two sets of questions

    import mlflow.genai.label_schemas as ls

    with s.fluent():
        names = {x.name: x for x in ls.list_label_schemas(s.experiment_id)}
        got = ls.get_label_schema(schema_id=funny.schema_id)
    assert {"user_rating", "corrected_output", "comment", "joke-generator:funny", "Feedback"} <= set(names)
    assert got.input.min_value == 1 and got.input.max_value == 5 and got.instruction == "1-5"
    with pytest.raises(ReviewError):
        review.define_label(s, JOKES, "x", "stars")
    with pytest.raises(ReviewError):
        review.define_label(s, JOKES, "user_rating", "thumbs")


def test_k2_queue_every_item_answered_by_exactly_two_reviewers_seen_by_mlflow(rt: Runtime) -> None:
    s = rt.store
    review.define_label(s, JOKES, "funny", "numeric", minimum=1, maximum=5)
    queue = review.create_queue(s, JOKES, ["Ann", "ben", "cid"], k=2, name="team")
    assert queue.reviewers == ("ann", "ben", "cid") and queue.k == 2
    ids = predictions(rt, JOKES, 6)
    sessions = {r: review.ReviewQueue(rt, JOKES, reviewer=r, queue="team") for r in ("ann", "ben", "cid")}
    answered: Counter[tuple[str, str]] = Counter()
    for who, q in sessions.items():
        item = q.next()
        while item is not None:
            assert item.model == JOKES
            answered[(item.trace_id, who)] += 1
            q.rate("thumbs_up" if who != "cid" else "thumbs_down", comment=f"by {who}", answers={"funny": 3})
            item = q.current
    ours = {t for t, _ in answered}
    assert set(ids) <= ours
    assert max(answered.values()) == 1  # nobody got an item twice
    per_item = Counter(t for t, _ in answered)
    assert set(per_item.values()) == {2}  # every item: exactly two reviewers

    for trace_id in ids:
        got = valid(rt, trace_id)
        ratings = [a for a in got if a.name == "user_rating"]
        assert len({a.source.source_id for a in ratings}) == 2 and len(ratings) == 2
        assert all(str(a.source.source_type).endswith("HUMAN") for a in ratings)
        funny = [a for a in got if a.name == "joke-generator:funny"]
        assert sorted(a.source.source_id for a in funny) == sorted(a.source.source_id for a in ratings)
        assert all(a.value == 3.0 for a in funny)

    import mlflow.genai.label_schemas as ls
    import mlflow.genai.review_queues as rq

    with s.fluent():
        mq = rq.get_review_queue(name=f"{JOKES}/team", experiment_id=s.experiment_id)
        items = {i.item_id: i for i in rq.list_review_queue_items(mq.queue_id, max_results=1000)}
        users = {u: rq.get_or_create_user_queue(u, experiment_id=s.experiment_id) for u in mq.users}
        user_items = {
            u: {i.item_id: i for i in rq.list_review_queue_items(q.queue_id, max_results=1000)}
            for u, q in users.items()
        }
        schema_names = {ls.get_label_schema(schema_id=x).name for x in mq.schema_ids}
    assert mq.queue_type == "custom" and sorted(mq.users) == ["ann", "ben", "cid"]
    assert {"user_rating", "corrected_output", "comment", "joke-generator:funny"} <= schema_names
    for trace_id in ids:
        assert items[trace_id].status == "complete"
        holders = [u for u in users if trace_id in user_items[u]]
        assert len(holders) == 2
        assert all(user_items[u][trace_id].status == "complete" for u in holders)
        assert all(user_items[u][trace_id].completed_by == u for u in holders)

    with pytest.raises(ReviewError):
        sessions["ann"].rate("thumbs_up")  # nothing shown
    outsider = review.ReviewQueue(rt, JOKES, reviewer="mallory", queue="team")
    assert outsider.next() is None and "not a reviewer" in (outsider.why_not() or "")


def test_undo_reopens_for_me_and_for_the_queue(rt: Runtime) -> None:
    s = rt.store
    review.create_queue(s, ROUTER, ["dana"], k=1, name="undo")
    predictions(rt, ROUTER, 2)
    q = review.ReviewQueue(rt, ROUTER, reviewer="dana", queue="undo")
    first = q.next()
    assert first is not None
    q.skip()
    assert q.current is not None and q.current.trace_id != first.trace_id
    q.undo()
    assert q.current == first
    q.rate("thumbs_down", comment="meh")
    queue = review.get_queue(s, ROUTER, "undo")
    assert queue is not None
    done = {i.item_id for i in review.queue_items(s, queue.queue_id, status="complete")}
    assert first.trace_id in done
    q.undo()
    assert q.current == first and not [a for a in valid(rt, first.trace_id) if a.name == "user_rating"]
    pending = {i.item_id for i in review.queue_items(s, queue.queue_id, status="pending")}
    assert first.trace_id in pending


_HOST = textwrap.dedent(
    """
    import json, sys, threading, time
    from flywheel import review
    from flywheel.runtime import Runtime
    from flywheel.config import load_settings
    reviewers, out, go = sys.argv[1].split(","), sys.argv[2], float(sys.argv[3])
    runtime = Runtime(load_settings())
    log = []
    lock = threading.Lock()
    def work(who):
        q = review.ReviewQueue(runtime, "support-router", reviewer=who, queue="race")
        while time.time() < go:
            time.sleep(0.01)
        item = q.next()
        while item is not None:
            shown = time.time()
            time.sleep(0.05)  # the reviewer reads the card
            q.rate("thumbs_up")
            with lock:
                log.append([who, item.trace_id, shown, time.time()])
            item = q.current
    threads = [threading.Thread(target=work, args=(w,)) for w in reviewers]
    [t.start() for t in threads]
    [t.join() for t in threads]
    runtime.close()
    json.dump(log, open(out, "w"))
    """
)


@pytest.mark.slow
def test_k1_two_hosts_racing_never_show_an_item_to_two_reviewers(rt: Runtime, tmp_path: Path) -> None:
    s = rt.store
    queue = review.create_queue(s, ROUTER, ["h1a", "h1b", "h2a", "h2b"], k=1, name="race")
    ids = predictions(rt, ROUTER, 12)
    go = time.time() + 12  # both hosts start their reviewers at the same moment
    procs = []
    for host, people in (("one", "h1a,h1b"), ("two", "h2a,h2b")):
        env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path / host), "MLFLOW_TRACKING_URI": s.tracking_uri}
        cmd = [sys.executable, "-c", _HOST, people, str(tmp_path / f"{host}.json"), str(go)]
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        assert p.wait(180) == 0
    log = [row for host in ("one", "two") for row in json.loads((tmp_path / f"{host}.json").read_text())]
    by_trace: dict[str, list[list[Any]]] = {}
    for row in log:
        by_trace.setdefault(row[1], []).append(row)
    assert set(ids) <= set(by_trace)
    assert all(len(rows) == 1 for rows in by_trace.values()), by_trace  # one reviewer per item, ever
    assert len({row[0] for row in log}) >= 3  # the hosts really worked side by side
    starts = sorted((row[2], row[3]) for row in log)
    assert any(b[0] < a[1] for a, b in zip(starts, starts[1:], strict=False))  # overlapping in time
    done = {i.item_id for i in review.queue_items(s, queue.queue_id, status="complete")}
    assert set(ids) <= done
