"""The whole loop on the demo: simulated reviewers -> export -> compile -> gate -> a better Production."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from flywheel import registry
from flywheel.compile import Cancelled
from flywheel.demo.data import ticket_splits
from flywheel.demo.seed import ROUTER_MODEL, router_program, seed_demo
from flywheel.demo.simulate import heldout_accuracy, plot_scores, run_simulation, simulate_reviews
from flywheel.errors import LoopError
from flywheel.gate import EVAL_EXPERIMENT
from flywheel.lm import make_lm
from flywheel.loop import training_rows
from flywheel.runtime import get_runtime, loop, predict, reset_runtime
from flywheel.runtime import submit_feedback as submit
from flywheel.store import Store

pytestmark = pytest.mark.backends("sqlite", "postgres")


@pytest.fixture
def store(fresh_store: Store) -> Iterator[Store]:
    reset_runtime()
    yield fresh_store
    reset_runtime()


def _router(store: Store, k: int = 4) -> str:
    info = registry.register_program(router_program(k), ROUTER_MODEL, lm=make_lm(), store=store)
    return registry.promote(ROUTER_MODEL, info.version, "Production", store).version


def test_training_rows_keep_thumbs_down_only_with_a_correction(store: Store) -> None:
    _router(store)
    runtime = get_runtime()
    pool, _ = ticket_splits()
    served = [predict(ROUTER_MODEL, {"ticket": row["ticket"]}, runtime=runtime) for row in pool[:3]]
    submit(served[0].trace_id, "thumbs_up", runtime=runtime)
    submit(served[1].trace_id, "thumbs_down", corrected_output={"category": "shipping"}, runtime=runtime)
    submit(served[2].trace_id, "thumbs_down", comment="wrong, not sure what is right", runtime=runtime)
    rows, exported = training_rows(runtime, ROUTER_MODEL)
    assert exported == 3
    assert {r["trace_id"] for r in rows} == {served[0].trace_id, served[1].trace_id}
    assert next(r for r in rows if r["trace_id"] == served[1].trace_id)["category"] == "shipping"


def test_loop_needs_feedback_and_can_be_cancelled(store: Store) -> None:
    before = _router(store)
    with pytest.raises(LoopError, match="rate at least two"):
        loop(ROUTER_MODEL, progress=False)
    simulate_reviews(6, seed=2)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        loop(ROUTER_MODEL, progress=False, cancel=stop)
    assert [v.version for v in registry.list_versions(ROUTER_MODEL, store)] == [before]


@pytest.mark.backends("sqlite")  # the loop stays light on PostgreSQL: the two tests above
def test_one_turn_improves_heldout_accuracy_of_production(store: Store) -> None:
    seed_demo(store, progress=lambda line: None)
    runtime = get_runtime()
    start = registry.resolve(ROUTER_MODEL, "Production", store).version
    start_accuracy = heldout_accuracy(start, runtime)
    traffic = simulate_reviews(20, seed=4, runtime=runtime)
    assert traffic.predictions == 20 and traffic.thumbs_down > 0

    turn = loop(ROUTER_MODEL, progress=False, runtime=runtime)

    assert turn.baseline_version == start and turn.rows_used == 20
    assert turn.promoted and turn.gate.passed and turn.gate.promoted_to == "Production"
    production = registry.resolve(ROUTER_MODEL, "Production", store)
    assert production.version == turn.candidate_version
    assert heldout_accuracy(production.version, runtime) > start_accuracy + 0.2
    assert production.tags["parent_version"] == start and production.tags["gate.result"] == "passed"
    assert production.tags["lineage.count"] == str(turn.compiled.train_size)
    assert registry.get_version(ROUTER_MODEL, start, store).stage == "Archived"
    assert "promoted to Production" in turn.summary()
    # serving traces are the reviewers' traffic only; evaluation predictions went elsewhere
    with store.fluent():
        served = mlflow.search_traces(locations=[store.experiment_id], return_type="list")
        assert len(served) == 20
        evaluation = mlflow.get_experiment_by_name(EVAL_EXPERIMENT)
        assert evaluation is not None
        assert mlflow.search_traces(locations=[evaluation.experiment_id], return_type="list")


@pytest.mark.slow
@pytest.mark.backends("sqlite")
def test_simulation_rises_over_turns_and_plots(store: Store, tmp_path: Path) -> None:
    seed_demo(store, progress=lambda line: None)
    records = run_simulation(turns=3, traffic=16, report=None)
    assert [r.turn for r in records] == [0, 1, 2, 3]
    assert records[-1].heldout > records[0].heldout
    assert all(r.candidate_version for r in records[1:])
    path = tmp_path / "scores.png"
    plot_scores(records, path)
    assert path.stat().st_size > 10_000
