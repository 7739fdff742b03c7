"""Evaluation of versions with `mlflow.genai.evaluate`, and the promotion gate.

Evaluation runs (and the traces their predictions emit) live in their own
experiment, EVAL_EXPERIMENT, so they never mix with production traces: export
and the reviewers' dashboards only ever see what users were served.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dspy
import mlflow

from flywheel import registry
from flywheel.config import ConfigError, canonical_stage
from flywheel.errors import InvalidStage, ModelNotFound
from flywheel.lm import configured_lm, with_cache
from flywheel.loader import load_program
from flywheel.programs import convert_inputs, output_values
from flywheel.scoring import field_exact, field_f1
from flywheel.store import Store, connect, ensure_experiment, quiet

EVAL_EXPERIMENT = "flywheel-evaluation"
SCORERS = ("agreement", "exact_match")



def eval_records(
    rows: Sequence[Mapping[str, Any] | dspy.Example],
    input_fields: Sequence[str],
    output_fields: Sequence[str],
) -> list[dict[str, Any]]:
    """mlflow.genai rows: inputs, and as expectations the output a reviewer approved or corrected.

    Rows with no answer (e.g. thumbs down without a correction) cannot be scored and are left out.
    """
    records = []
    for row in rows:
        data = row.toDict() if isinstance(row, dspy.Example) else dict(row)
        expected = {f: data.get(f) for f in output_fields}
        if any(v in (None, "") for v in expected.values()):
            continue
        record: dict[str, Any] = {"inputs": {f: data.get(f) for f in input_fields}, "expectations": expected}
        if data.get("trace_id"):
            record["tags"] = {"flywheel.source_trace": str(data["trace_id"])}
        records.append(record)
    return records


def feedback_scorers(output_fields: Sequence[str]) -> list[Any]:
    """`agreement` (field-level token F1 with the approved/corrected output) and strict `exact_match`."""
    from mlflow.genai.scorers import scorer

    fields = list(output_fields)

    @scorer(name="agreement")
    def agreement(outputs: Any, expectations: dict[str, Any]) -> float:
        return field_f1(expectations, outputs or {}, fields)

    @scorer(name="exact_match")
    def exact_match(outputs: Any, expectations: dict[str, Any]) -> bool:
        return bool(field_exact(expectations, outputs or {}, fields))

    return [agreement, exact_match]


@dataclass(frozen=True)
class VersionScore:
    version: str
    metrics: dict[str, float]
    run_id: str


_CHATTY = (  # MLflow prints a banner and three INFO lines per evaluation
    "mlflow.tracking.fluent",
    "mlflow.genai.utils.data_validation",
    "mlflow.models.evaluation.utils.trace",
)


def evaluate_version(
    name: str,
    ref: str | int,
    records: list[dict[str, Any]],
    *,
    lm: dspy.BaseLM | None = None,
    store: Store | None = None,
    nested: bool = False,
) -> VersionScore:
    """Run one version over `records` with mlflow.genai.evaluate, in EVAL_EXPERIMENT.

    The evaluation run is active while the predictions run, so their traces land in
    the run's (evaluation) experiment, never in flywheel's serving experiment.
    """
    store = store or connect()
    lm = with_cache(lm or configured_lm(store.settings), store.settings.lm_cache_compile)
    info = registry.resolve(name, ref, store)
    program = load_program(store, info)

    @mlflow.trace(name=f"{name}-v{info.version}")
    def predict_fn(**inputs: Any) -> dict[str, Any]:
        with dspy.context(lm=lm):
            try:
                output = program(**convert_inputs(program, inputs))
            except Exception as exc:  # an unparseable answer scores 0 rather than failing the run
                return {"error": f"{type(exc).__name__}: {exc}"}
        return output_values(info, output)

    experiment_id = ensure_experiment(store.settings, EVAL_EXPERIMENT)
    with (
        store.fluent(),  # the run, the traces of the predictions and the assessments go to this store
        mlflow.start_run(experiment_id=experiment_id, run_name=f"eval-{name}-v{info.version}", nested=nested),
    ):
        mlflow.set_tags({"flywheel.model": name, "flywheel.model_version": info.version})
        with quiet(*_CHATTY), contextlib.redirect_stdout(io.StringIO()):
            result = mlflow.genai.evaluate(
                data=records,
                predict_fn=predict_fn,
                scorers=feedback_scorers(info.output_fields),
                model_id=info.model_id,
            )
    metrics = {k.removesuffix("/mean"): float(v) for k, v in result.metrics.items() if k.endswith("/mean")}
    return VersionScore(info.version, metrics, result.run_id)


# --- the promotion gate -------------------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    name: str
    candidate_version: str
    baseline_version: str | None
    metric: str
    candidate_score: float
    baseline_score: float | None
    margin: float
    passed: bool
    promoted_to: str | None
    rows: int
    run_id: str
    candidate_metrics: dict[str, float]
    baseline_metrics: dict[str, float]

    @property
    def result(self) -> str:
        return "passed" if self.passed else "failed"


def passes(candidate: float, baseline: float | None, margin: float = 0.0) -> bool:
    """The gate's rule: no baseline, or candidate >= baseline + margin (rounded, so ties are ties)."""
    return baseline is None or round(candidate, 6) >= round(baseline + margin, 6)


def gate(
    name: str,
    candidate: str | int,
    data: Sequence[Mapping[str, Any] | dspy.Example],
    *,
    target_stage: str = "Production",
    baseline_ref: str = "Production",
    margin: float = 0.0,
    metric: str = "agreement",
    promote: bool = True,
    lm: dspy.BaseLM | None = None,
    store: Store | None = None,
) -> GateResult:
    """Evaluate `candidate` and the `baseline_ref` version on the same rows; promote when not worse.

    Passes when candidate >= baseline + margin (see `passes`: margin 0 means not worse, a
    positive margin asks for a real improvement, a negative one tolerates a small regression;
    with no baseline the candidate passes). The verdict and both scores become tags on the
    candidate. Not thread-safe (neither is mlflow.genai.evaluate): one gate at a time per process.
    """
    store = store or connect()
    try:
        stage = canonical_stage(target_stage)
    except ConfigError:
        raise InvalidStage(target_stage) from None
    if stage not in ("Staging", "Production"):
        raise InvalidStage(target_stage)
    if metric not in SCORERS:
        raise ValueError(f"unknown gate metric {metric!r}; use one of {', '.join(SCORERS)}")
    info = registry.get_version(name, candidate, store)
    records = eval_records(data, info.input_fields, info.output_fields)
    if not records:
        raise ValueError(f"no rated rows with an answer to evaluate {name} on")
    try:
        baseline: registry.VersionInfo | None = registry.resolve(name, baseline_ref, store)
    except ModelNotFound:
        baseline = None
    experiment_id = ensure_experiment(store.settings, EVAL_EXPERIMENT)
    label = f"gate-{name}-v{info.version}-vs-" + (f"v{baseline.version}" if baseline else "none")
    with store.fluent(), mlflow.start_run(experiment_id=experiment_id, run_name=label) as run:
        cand = evaluate_version(name, info.version, records, lm=lm, store=store, nested=True)
        base = (
            evaluate_version(name, baseline.version, records, lm=lm, store=store, nested=True)
            if baseline
            else None
        )
        cand_score = round(cand.metrics[metric], 6)
        base_score = round(base.metrics[metric], 6) if base else None
        passed = passes(cand_score, base_score, margin)
        verdict = "passed" if passed else "failed"
        # on the candidate's logged model as well as the run
        scores = {"candidate_score": cand_score, "baseline_score": base_score}
        mlflow.log_metrics({k: v for k, v in scores.items() if v is not None}, model_id=info.model_id)
        mlflow.set_tags({"flywheel.model": name, "gate.result": verdict})
    tags = {
        "gate.result": verdict,
        "gate.metric": metric,
        "gate.candidate_score": f"{cand_score:.3f}",
        "gate.baseline_score": "none" if base_score is None else f"{base_score:.3f}",
        "gate.baseline_version": baseline.version if baseline else "none",
        "gate.margin": str(margin),
        "gate.rows": str(len(records)),
        "gate.target_stage": stage,
        "gate.run_id": run.info.run_id,
    }
    for key, value in tags.items():
        store.client.set_model_version_tag(name, info.version, key, value)
    promoted = None
    if passed and promote:
        registry.promote(name, info.version, stage, store)
        promoted = stage
    return GateResult(
        name=name,
        candidate_version=info.version,
        baseline_version=baseline.version if baseline else None,
        metric=metric,
        candidate_score=cand_score,
        baseline_score=base_score,
        margin=margin,
        passed=passed,
        promoted_to=promoted,
        rows=len(records),
        run_id=run.info.run_id,
        candidate_metrics=cand.metrics,
        baseline_metrics=base.metrics if base else {},
    )
