"""The demo seed: what a newcomer sees, idempotent, and a task where demos measurably help."""

from __future__ import annotations

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
