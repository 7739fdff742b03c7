"""Metrics from feedback, mlflow.genai evaluation in its own experiment, and the paired promotion gate."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlflow
import numpy as np
import pytest
from scipy import stats

from flywheel import audit, registry
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
        {"ticket": " T1 ", "category": "account", "trace_id": "tr-3", "rating": "thumbs_up"},  # same input
    ]
    records = eval_records(rows, ["ticket"], ["category"])
    assert records == [
        {
            "inputs": {"ticket": "t1"},
            "expectations": {"category": "billing"},
            "tags": {"flywheel.source_trace": "tr-1"},
        }
    ]


def test_the_gate_rule_is_a_paired_test_on_per_row_scores() -> None:
    wins = [1.0] * 8 + [1.0] * 6
    assert passes(wins, [0.0] * 8 + [1.0] * 6)  # eight wins, no loss: McNemar p = 1/256
    assert not passes([1.0] * 3, [0.0] * 3)  # too few rows to tell
    assert not passes([0.6] * 12, [0.6] * 12)  # a tie is not a pass (the old gate promoted ties)
    assert passes([0.6] * 12, [0.5] * 12, margin=0.05) and not passes([0.6] * 12, [0.5] * 12, margin=0.2)
    assert passes([0.48] * 12, [0.5] * 12, margin=0.05, non_inferiority=True)  # tolerates a small loss
    assert not passes(wins[:-1] + [None], [0.0] * 8 + [1.0] * 6)  # a failed row: inconclusive
    assert passes([0.5], None)  # nothing in Production to protect


def _register(store: Store, k: int, stage: str | None = None) -> str:
    version = registry.register_program(router_program(k), ROUTER_MODEL, lm=make_lm(), store=store).version
    if stage:
        registry.promote(ROUTER_MODEL, version, stage, store)
    return version


def _pairs(run_id: str, store: Store) -> tuple[list[float | None], list[float | None]]:
    with store.fluent():  # a runs:/ URI resolves through MLflow's process-wide tracking URI
        pairs = mlflow.artifacts.load_dict(f"runs:/{run_id}/gate/pairs.json")["pairs"]
    return [p["candidate"] for p in pairs], [p["baseline"] for p in pairs]


@pytest.mark.slow  # two mlflow.genai evaluations of 21 rows
def test_the_gate_records_scipys_statistics_and_promotes_a_clear_win(store: Store) -> None:
    heldout = ticket_splits()[1]  # 21 tickets: 4 demos route 10 right, 16 demos 20
    production = _register(store, 4, "Production")
    better = _register(store, 16)
    verdict = gate(ROUTER_MODEL, better, heldout, store=store)

    assert verdict.verdict == "promote" and verdict.passed and verdict.promoted_to == "Production"
    assert registry.resolve(ROUTER_MODEL, "Production", store).version == better
    c = verdict.comparison
    assert c.method == "mcnemar-exact" and c.rows == 21 and c.failed_rows == 0 and c.wins > c.losses
    cand, base = _pairs(verdict.run_id, store)
    assert len(cand) == 21 and None not in cand and None not in base
    wins = sum(x > y for x, y in zip(cand, base, strict=True))
    losses = sum(x < y for x, y in zip(cand, base, strict=True))
    p_value = stats.binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue
    interval = stats.bootstrap(
        (np.array(cand), np.array(base)),
        lambda x, y, axis=-1: (x - y).mean(axis=axis),
        paired=True,
        vectorized=True,
        confidence_level=0.9,
        n_resamples=9999,
        method="BCa",
        rng=np.random.default_rng(0),
    ).confidence_interval
    tags = registry.get_version(ROUTER_MODEL, better, store).tags
    run = store.client.get_run(verdict.run_id)
    for recorded in (float(tags["gate.p_value"]), run.data.metrics["p_value"], c.p_better):
        assert recorded == p_value
    assert (float(tags["gate.ci_low"]), float(tags["gate.ci_high"])) == (interval.low, interval.high)
    assert (run.data.metrics["ci_low"], run.data.metrics["ci_high"]) == (interval.low, interval.high)
    assert (tags["gate.wins"], tags["gate.losses"], tags["gate.rows"]) == (str(wins), str(losses), "21")
    assert run.data.metrics["wins"] == wins and run.data.metrics["failed_rows"] == 0
    assert tags["gate.verdict"] == tags["gate.result"] == "promote"
    assert tags["gate.baseline_version"] == production and tags["gate.rows_needed"] == "none"
    assert run.data.params["method"] == "mcnemar-exact" and run.data.params["alpha"] == "0.05"
    assert run.data.params["mode"] == "superiority" and run.data.tags["gate.verdict"] == "promote"
    # the promotion's audit entry names the gate, its run and its interval
    entry = next(
        e for e in audit.timeline(store, ROUTER_MODEL) if e.action == "promote" and e.version == better
    )
    assert entry.actor == "gate" and entry.evidence["gate_run_id"] == verdict.run_id
    assert (
        entry.evidence["interval"] == [interval.low, interval.high]
        and entry.evidence["previous"] == production
    )


@pytest.mark.slow
def test_a_row_the_lm_fails_on_makes_the_gate_inconclusive(store: Store, failing_lm: Callable) -> None:
    heldout = ticket_splits()[1]
    production = _register(store, 4, "Production")
    better = _register(store, 16)  # would be promoted (see above) if every row were answered
    lm = failing_lm(heldout[0]["ticket"])
    verdict = gate(ROUTER_MODEL, better, heldout, store=store, lm=lm)

    assert verdict.verdict == "inconclusive" and not verdict.passed and verdict.promoted_to is None
    assert verdict.failed_rows == 1 and verdict.rows == 20 and "1 of 21 rows failed" in verdict.reason
    assert registry.resolve(ROUTER_MODEL, "Production", store).version == production
    tags = registry.get_version(ROUTER_MODEL, better, store).tags
    assert tags["gate.verdict"] == "inconclusive" and tags["gate.failed_rows"] == "1"
    cand, base = _pairs(verdict.run_id, store)
    assert cand.count(None) == 1 and base.count(None) == 1  # no answer is not a wrong answer (0)
    with store.fluent():
        pairs = mlflow.artifacts.load_dict(f"runs:/{verdict.run_id}/gate/pairs.json")["pairs"]
        failed = next(p for p in pairs if p["candidate"] is None)
        error = failed["candidate_error"]
        assert "the LM failed" in error and "connection refused" in error
        evaluation = mlflow.get_experiment_by_name(EVAL_EXPERIMENT)
        children = mlflow.search_runs(
            [evaluation.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{verdict.run_id}'",
            output_format="list",
        )
    assert [r.data.metrics["failed_rows"] for r in children] == [1.0, 1.0]


@pytest.mark.slow
def test_gate_promotes_refuses_waits_and_keeps_evaluation_out_of_serving(store: Store) -> None:
    heldout = ticket_splits()[1]  # 21 rows: no demos 9 right < four demos 10 < sixteen demos 20
    assert accuracy(router_program(0), heldout) < accuracy(router_program(4), heldout)
    assert accuracy(router_program(4), heldout) + 0.3 < accuracy(router_program(16), heldout)
    first = _register(store, 4)  # nothing in Production yet: promoted, with no baseline to protect
    verdict = gate(ROUTER_MODEL, first, heldout, store=store)
    assert verdict.passed and verdict.baseline_version is None and verdict.promoted_to == "Production"
    assert verdict.comparison.method == "no-baseline"

    runtime = get_runtime()  # real serving traffic, to show evaluation never mixes into it
    for row in heldout[:2]:
        predict(ROUTER_MODEL, {"ticket": row["ticket"]}, runtime=runtime)
    runtime.outbox.flush()

    worse = _register(store, 0)  # no demos: always the first category; one row worse than `first`
    verdict = gate(ROUTER_MODEL, worse, heldout, store=store)
    assert verdict.verdict == "inconclusive" and verdict.promoted_to is None  # one loss is no evidence
    assert verdict.candidate_score < verdict.baseline_score and verdict.baseline_version == first
    assert verdict.candidate_metrics["exact_match"] == pytest.approx(verdict.candidate_score, abs=1e-5)
    tags = registry.get_version(ROUTER_MODEL, worse, store).tags
    assert tags["gate.result"] == "inconclusive" and tags["gate.baseline_version"] == first
    assert float(tags["gate.candidate_score"]) == pytest.approx(verdict.candidate_score, abs=1e-6)
    assert float(tags["gate.baseline_score"]) == pytest.approx(verdict.baseline_score, abs=1e-6)
    assert registry.resolve(ROUTER_MODEL, "Production", store).version == first

    better = _register(store, 16)
    verdict = gate(ROUTER_MODEL, better, heldout, margin=0.1, store=store)  # a margin: the interval decides
    assert verdict.passed and verdict.comparison.method == "paired-bootstrap"
    assert verdict.comparison.ci_low > 0.1 and verdict.margin == 0.1
    assert verdict.promoted_to == "Production"
    assert registry.resolve(ROUTER_MODEL, "Production", store).version == better
    assert registry.get_version(ROUTER_MODEL, first, store).stage == "Archived"
    assert registry.get_version(ROUTER_MODEL, better, store).tags["gate.result"] == "promote"

    regress = _register(store, 2)
    verdict = gate(ROUTER_MODEL, regress, heldout, store=store)
    assert verdict.verdict == "refuse" and verdict.comparison.p_worse < 0.05
    few = gate(ROUTER_MODEL, _register(store, 42), heldout[:6], store=store)
    assert few.verdict == "inconclusive" and "only 6 rows" in few.reason and few.rows_needed >= 10
    assert registry.resolve(ROUTER_MODEL, "Production", store).version == better

    with store.fluent():  # MLflow's fluent API, pointed at this test's store
        evaluation = mlflow.get_experiment_by_name(EVAL_EXPERIMENT)
        assert evaluation is not None and evaluation.experiment_id != store.experiment_id
        serving_traces = mlflow.search_traces(locations=[store.experiment_id], return_type="list")
        assert len(serving_traces) == 2  # only the two real predictions
        eval_traces = mlflow.search_traces(locations=[evaluation.experiment_id], return_type="list")
        # Evaluation traces land in the evaluation experiment. Their exact count is MLflow's harness's
        # business: under load it drops some ("Failed to log trace and assessments"), so only
        # their presence is asserted; the serving count above is the claim that matters.
        assert eval_traces
        gate_run = mlflow.get_run(verdict.run_id)
        assert gate_run.info.experiment_id == evaluation.experiment_id
        children = mlflow.search_runs(
            [evaluation.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{verdict.run_id}'",
            output_format="list",
        )
        assert sorted(r.data.tags["flywheel.model_version"] for r in children) == sorted([regress, better])
        gate_runs_in_serving = mlflow.search_runs(
            [store.experiment_id], filter_string="tags.`gate.verdict` = 'promote'", output_format="list"
        )
        assert not gate_runs_in_serving
