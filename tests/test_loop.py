"""The whole loop on the demo: simulated reviewers -> export -> compile -> gate -> a better Production."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import dspy
import mlflow
import pytest

from flywheel import registry
from flywheel.compile import Cancelled
from flywheel.dataset import example_key
from flywheel.demo.data import ticket_splits
from flywheel.demo.seed import ROUTER_MODEL, router_program, seed_demo
from flywheel.demo.simulate import heldout_accuracy, plot_scores, plot_seeds, run_simulation, simulate_reviews
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
def test_turns_promote_only_on_evidence_from_a_growing_held_out_set(store: Store) -> None:
    start = _router(store, k=0)  # no demos: routes everything to billing, a clear win to beat
    runtime = get_runtime()
    start_accuracy = heldout_accuracy(start, runtime)

    # a first turn on a little feedback: too few held-out rows to tell, so Production stays
    simulate_reviews(10, seed=4, runtime=runtime)
    first = loop(ROUTER_MODEL, progress=False, runtime=runtime, dev_fraction=0.5)
    assert first.verdict == "inconclusive" and not first.promoted and first.gate is not None
    assert first.gate.rows < 10 and f"only {first.gate.rows} rows" in first.gate.reason
    assert first.gate.rows_needed is not None and first.gate.rows_needed >= 10
    assert "more held-out rows would decide it" in first.summary()
    assert registry.resolve(ROUTER_MODEL, "Production", store).version == start
    first_heldout = first.compiled.data.split.heldout_keys

    # the whole pool rated, another split seed: the earlier held-out rows stay held out and are
    # never trained on; the gate evaluates on all of them plus the new ones. Every training row
    # becomes a demo (k=64), since the offline LM answers from its demos.
    traffic = simulate_reviews(42, seed=5, runtime=runtime)
    assert traffic.thumbs_down > 0
    turn = loop(
        ROUTER_MODEL, progress=False, runtime=runtime, dev_fraction=0.5, seed=7, optimizer_params={"k": 64}
    )
    split = turn.compiled.data.split
    train_keys = {example_key(e, ["ticket"]) for e in split.train}
    dev_keys = {example_key(e, ["ticket"]) for e in split.dev}
    assert first_heldout <= dev_keys and not first_heldout & train_keys
    assert turn.gate.rows == len(dev_keys) >= 10

    assert turn.baseline_version == start
    assert turn.verdict == "promote" and turn.gate.passed and turn.gate.promoted_to == "Production"
    production = registry.resolve(ROUTER_MODEL, "Production", store)
    assert production.version == turn.candidate_version
    assert heldout_accuracy(production.version, runtime) > start_accuracy + 0.15
    assert production.tags["parent_version"] == start and production.tags["gate.verdict"] == "promote"
    assert float(production.tags["gate.p_value"]) < 0.05
    assert production.tags["lineage.count"] == str(turn.compiled.train_size)
    assert production.tags["heldout.size"] == str(len(split.heldout_keys))
    assert registry.get_version(ROUTER_MODEL, start, store).stage == "Archived"
    assert "promoted to Production" in turn.summary()
    # serving traces are the reviewers' traffic only; evaluation predictions went elsewhere
    with store.fluent():
        served = mlflow.search_traces(locations=[store.experiment_id], return_type="list")
        assert len(served) == 52
        evaluation = mlflow.get_experiment_by_name(EVAL_EXPERIMENT)
        assert evaluation is not None
        assert mlflow.search_traces(locations=[evaluation.experiment_id], return_type="list")


@pytest.mark.parametrize("lm_kind", ["raising", "unreachable"])
def test_a_turn_with_the_lm_down_keeps_production_and_is_inconclusive(
    store: Store, lm_kind: str, failing_lm: Callable[..., dspy.LM]
) -> None:
    before = _router(store)
    simulate_reviews(8, seed=2)  # served on the working offline LM
    if lm_kind == "raising":
        down = failing_lm()
    else:  # a real provider client at a port nothing listens on (no retries, to stay quick)
        down = dspy.LM("openai/x", api_base="http://127.0.0.1:9", api_key="none", num_retries=0)
    turn = loop(ROUTER_MODEL, progress=False, lm=down)

    assert turn.verdict == "inconclusive" and not turn.promoted
    assert turn.compiled is None and turn.gate is None and turn.candidate_version is None
    assert "the LM failed" in turn.failure and "nothing was registered" in turn.failure
    assert "inconclusive" in turn.summary() and f"Production v{before} unchanged" in turn.summary()
    assert [v.version for v in registry.list_versions(ROUTER_MODEL, store)] == [before]
    assert registry.resolve(ROUTER_MODEL, "Production", store).version == before


@pytest.mark.slow
@pytest.mark.backends("sqlite")
def test_simulation_never_lowers_production_and_plots(store: Store, tmp_path: Path) -> None:
    seed_demo(store, progress=lambda line: None)
    records = run_simulation(turns=2, traffic=24, dev_fraction=0.5, seed=1, report=None)
    assert [r.turn for r in records] == [0, 1, 2]
    assert all(b.heldout >= a.heldout for a, b in zip(records, records[1:], strict=False))
    assert all(r.candidate_version and r.verdict for r in records[1:])
    assert all(r.promoted == (r.verdict == "promote") for r in records[1:])
    path = tmp_path / "scores.png"
    plot_scores(records, path)
    assert path.stat().st_size > 10_000
    both = tmp_path / "seeds.png"
    plot_seeds({1: records, 2: records}, both, note="test")
    assert both.stat().st_size > 10_000
