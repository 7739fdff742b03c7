"""The demo seed: what a newcomer sees, idempotent, and a task where demos measurably help."""

from __future__ import annotations

import pytest

from flywheel import registry
from flywheel.demo.data import CATEGORIES, JOKES, ticket_splits, tickets
from flywheel.demo.seed import JOKE_MODEL, ROUTER_MODEL, accuracy, router_program, seed_demo
from flywheel.store import Store


def test_seed_registers_both_programs_with_one_production_version(demo_store: Store) -> None:
    jokes = registry.list_versions(JOKE_MODEL, demo_store)
    assert len(jokes) >= 2
    assert [v.stage for v in jokes].count("Production") == 1
    production = registry.resolve(JOKE_MODEL, "Production", demo_store)
    assert "champion" in production.aliases
    assert registry.resolve(JOKE_MODEL, "champion", demo_store).version == production.version
    router = registry.resolve(ROUTER_MODEL, "Production", demo_store)
    assert router.input_fields == ["ticket"] and router.output_fields == ["category"]
    assert router.score is not None and 0 < router.score < 1


def test_seed_is_idempotent(demo_store: Store) -> None:
    before = {m.name: m.latest_version for m in registry.list_models(demo_store)}
    summary = seed_demo(demo_store, progress=lambda line: None)
    assert summary.created == [] and len(summary.skipped) == 3
    assert {m.name: m.latest_version for m in registry.list_models(demo_store)} == before


def test_demo_data_is_deterministic_and_split_without_leakage() -> None:
    assert tickets() == tickets()
    pool, heldout = ticket_splits()
    assert len(pool) > 40 and len(heldout) > 20
    assert not {r["ticket"] for r in pool} & {r["ticket"] for r in heldout}
    assert {r["category"] for r in heldout} == set(CATEGORIES)
    assert len({topic for topic, _ in JOKES}) == len(JOKES)


def test_a_program_with_more_demos_beats_one_without_on_the_demo_task() -> None:
    _, heldout = ticket_splits()
    none, few, many = (accuracy(router_program(k), heldout) for k in (0, 4, 40))
    assert none == sum(r["category"] == CATEGORIES[0] for r in heldout) / len(heldout)
    assert none < few < many
    assert many >= 0.8


def test_flywheel_demo_leaves_traffic_waiting_for_review(
    fresh_store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """`flywheel demo` (the command) seeds, and leaves unrated predictions of both programs in
    review queues with two label schemas each, listed by MLflow's own label-schema API."""
    import mlflow
    import mlflow.genai.label_schemas as label_schemas

    from flywheel import review
    from flywheel.cli import main
    from flywheel.demo.traffic import DEMO_LABELS, DEMO_REVIEWERS, PER_MODEL, unrated

    assert main(["demo"]) == 0
    assert "wait for review" in capsys.readouterr().out
    for model in (JOKE_MODEL, ROUTER_MODEL):
        waiting = unrated(fresh_store, model)
        assert len(waiting) >= PER_MODEL
        queue = review.get_queue(fresh_store, model)
        assert queue is not None and set(queue.reviewers) == set(DEMO_REVIEWERS)
        items = {i.item_id for i in review.queue_items(fresh_store, queue.queue_id, status="pending")}
        assert set(waiting) <= items
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(fresh_store.tracking_uri)  # MLflow's own API, as a user would call it
    try:
        exp = fresh_store.experiment_id
        listed = {s.name for s in label_schemas.list_label_schemas(experiment_id=exp)}
        for model, specs in DEMO_LABELS.items():
            for spec in specs:
                name = f"{model}:{spec['label']}"
                assert name in listed
                got = label_schemas.get_label_schema(experiment_id=exp, name=name)
                kind = "InputCategorical" if spec["kind"] == review.CATEGORICAL else "InputPassFail"
                assert type(got.input).__name__ == kind
    finally:
        mlflow.set_tracking_uri(previous)
    # a second run adds nothing: the demo is idempotent
    before = {m: sorted(unrated(fresh_store, m)) for m in (JOKE_MODEL, ROUTER_MODEL)}
    assert main(["demo"]) == 0
    assert {m: sorted(unrated(fresh_store, m)) for m in (JOKE_MODEL, ROUTER_MODEL)} == before
