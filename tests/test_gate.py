"""Metrics from feedback, mlflow.genai evaluation in its own experiment, and the promotion gate."""

from __future__ import annotations

from collections.abc import Iterator

import mlflow
import pytest

from flywheel import registry
from flywheel.demo.data import ticket_splits
from flywheel.demo.seed import ROUTER_MODEL, accuracy, router_program
from flywheel.gate import EVAL_EXPERIMENT, eval_records, gate, passes
from flywheel.lm import make_lm
from flywheel.runtime import get_runtime, predict, reset_runtime
from flywheel.store import Store


@pytest.fixture
def store(fresh_store: Store) -> Iterator[Store]:
    reset_runtime()
    yield fresh_store
    reset_runtime()


def test_eval_records_use_the_approved_or_corrected_output_and_skip_rows_without_one() -> None:
    rows = [
        {"ticket": "t1", "category": "billing", "trace_id": "tr-1", "rating": "thumbs_up"},
        {"ticket": "t2", "category": None, "trace_id": "tr-2", "rating": "thumbs_down"},
    ]
    records = eval_records(rows, ["ticket"], ["category"])
    assert records == [
        {
            "inputs": {"ticket": "t1"},
            "expectations": {"category": "billing"},
            "tags": {"flywheel.source_trace": "tr-1"},
        }
    ]


def test_the_gate_rule_honours_the_margin() -> None:
    assert passes(0.5, None) and passes(0.5, 0.5) and not passes(0.49, 0.5)
    assert not passes(0.8, 0.75, margin=0.1) and passes(0.85, 0.75, margin=0.1)
    assert passes(0.72, 0.75, margin=-0.05)  # a negative margin tolerates a small regression
    assert passes(0.1 + 0.2, 0.3)  # float noise is not a regression


def _register(store: Store, k: int) -> str:
    return registry.register_program(router_program(k), ROUTER_MODEL, lm=make_lm(), store=store).version


@pytest.mark.slow
def test_gate_accepts_better_refuses_worse_and_keeps_evaluation_out_of_serving(store: Store) -> None:
    heldout = ticket_splits()[1][9:17]  # eight rows keep it quick; no demos < four demos < sixteen here
    assert accuracy(router_program(0), heldout) < accuracy(router_program(4), heldout)
    assert accuracy(router_program(4), heldout) + 0.3 < accuracy(router_program(16), heldout)
    first = _register(store, 4)  # nothing in Production yet: passes against no baseline
    verdict = gate(ROUTER_MODEL, first, heldout, store=store)
    assert verdict.passed and verdict.baseline_version is None and verdict.promoted_to == "Production"

    runtime = get_runtime()  # real serving traffic, to show evaluation never mixes into it
    for row in heldout[:2]:
        predict(ROUTER_MODEL, {"ticket": row["ticket"]}, runtime=runtime)
    runtime.outbox.flush()

    worse = _register(store, 0)  # no demos: always the first category
    verdict = gate(ROUTER_MODEL, worse, heldout, store=store)
    assert not verdict.passed and verdict.promoted_to is None
    assert verdict.candidate_score < verdict.baseline_score and verdict.baseline_version == first
    assert verdict.candidate_metrics["exact_match"] == pytest.approx(verdict.candidate_score, abs=1e-5)
    tags = registry.get_version(ROUTER_MODEL, worse, store).tags
    assert tags["gate.result"] == "failed" and tags["gate.baseline_version"] == first
    assert float(tags["gate.candidate_score"]) == pytest.approx(verdict.candidate_score, abs=1e-3)
    assert float(tags["gate.baseline_score"]) == pytest.approx(verdict.baseline_score, abs=1e-3)
    assert registry.resolve(ROUTER_MODEL, "Production", store).version == first

    better = _register(store, 16)
    verdict = gate(ROUTER_MODEL, better, heldout, margin=0.1, store=store)
    assert verdict.passed and verdict.candidate_score > verdict.baseline_score + 0.1
    assert verdict.margin == 0.1
    assert verdict.promoted_to == "Production"
    assert registry.resolve(ROUTER_MODEL, "Production", store).version == better
    assert registry.get_version(ROUTER_MODEL, first, store).stage == "Archived"
    assert registry.get_version(ROUTER_MODEL, better, store).tags["gate.result"] == "passed"

    with store.fluent():  # MLflow's fluent API, pointed at this test's store
        evaluation = mlflow.get_experiment_by_name(EVAL_EXPERIMENT)
        assert evaluation is not None and evaluation.experiment_id != store.experiment_id
        serving_traces = mlflow.search_traces(locations=[store.experiment_id], return_type="list")
        assert len(serving_traces) == 2  # only the two real predictions
        eval_traces = mlflow.search_traces(locations=[evaluation.experiment_id], return_type="list")
        assert len(eval_traces) >= 5 * len(heldout)  # 3 gates: 5 version evaluations over the held-out rows
        gate_run = mlflow.get_run(verdict.run_id)
        assert gate_run.info.experiment_id == evaluation.experiment_id
        children = mlflow.search_runs(
            [evaluation.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{verdict.run_id}'",
            output_format="list",
        )
        assert sorted(r.data.tags["flywheel.model_version"] for r in children) == sorted([better, first])
        gate_runs_in_serving = mlflow.search_runs(
            [store.experiment_id], filter_string="tags.`gate.result` = 'passed'", output_format="list"
        )
        assert not gate_runs_in_serving
