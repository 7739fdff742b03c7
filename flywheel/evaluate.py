"""Metrics from feedback, evaluation of versions with `mlflow.genai.evaluate`, and the promotion gate.

Evaluation runs (and the traces their predictions emit) live in their own
experiment, EVAL_EXPERIMENT, so they never mix with production traces: export
and the reviewers' dashboards only ever see what users were served.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dspy
import mlflow

from flywheel import registry
from flywheel.config import ConfigError, canonical_stage
from flywheel.dataset import example_key, normalize
from flywheel.errors import InvalidStage, ModelNotFound
from flywheel.lm import make_lm
from flywheel.serving import output_values
from flywheel.store import Store, connect, ensure_experiment, quiet

EVAL_EXPERIMENT = "flywheel-evaluation"
METRICS = ("exact_match", "f1", "judge")
SCORERS = ("agreement", "exact_match")
Metric = Callable[..., Any]


# --- DSPy metrics (compile) ---------------------------------------------------------------


def token_f1(expected: Any, actual: Any) -> float:
    """SQuAD-style token F1: partial credit for free text (jokes), 1.0 for an identical answer."""
    gold, pred = re.findall(r"\w+", normalize(expected)), re.findall(r"\w+", normalize(actual))
    if not gold or not pred:
        return float(gold == pred)
    common = sum((Counter(gold) & Counter(pred)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def field_exact(expected: Mapping[str, Any], actual: Mapping[str, Any] | Any, fields: Sequence[str]) -> float:
    return float(all(normalize(expected.get(f)) == normalize(_get(actual, f)) for f in fields))


def field_f1(expected: Mapping[str, Any], actual: Mapping[str, Any] | Any, fields: Sequence[str]) -> float:
    return sum(token_f1(expected.get(f), _get(actual, f)) for f in fields) / max(1, len(fields))


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


class JudgeOutput(dspy.Signature):
    """Decide whether the actual output is as good as the expected output for these inputs."""

    inputs: str = dspy.InputField()
    expected: str = dspy.InputField()
    actual: str = dspy.InputField()
    acceptable: bool = dspy.OutputField()


def make_metric(name: str, output_fields: Sequence[str], judge: dspy.Module | None = None) -> Metric:
    """A DSPy metric `(example, pred, trace=None, *_) -> float` comparing the output fields.

    "judge" asks a dspy.Predict judge running on the ambient LM (compile sets it with dspy.context).
    """
    fields = list(output_fields)
    if name == "exact_match":

        def exact_match(example: Any, pred: Any, trace: Any = None, *_: Any) -> float:
            return field_exact(example, pred, fields)

        return exact_match
    if name == "f1":

        def f1(example: Any, pred: Any, trace: Any = None, *_: Any) -> float:
            return field_f1(example, pred, fields)

        return f1
    if name == "judge":
        judge = judge or dspy.Predict(JudgeOutput)

        def judged(example: Any, pred: Any, trace: Any = None, *_: Any) -> float:
            verdict = judge(
                inputs=json.dumps(dict(example.inputs()), default=str),
                expected=json.dumps({f: example.get(f) for f in fields}, default=str),
                actual=json.dumps({f: _get(pred, f) for f in fields}, default=str),
            )
            return float(bool(verdict.acceptable))

        return judged
    raise ValueError(f"unknown metric {name!r}; use one of {', '.join(METRICS)} or pass a function")


def feedback_metric(
    base: Metric, output_fields: Sequence[str], comments: Mapping[str, str], input_fields: Sequence[str]
) -> Metric:
    """For GEPA: the base score plus text built from the expected answer and the reviewer's comment."""

    def with_feedback(
        gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
    ) -> dspy.Prediction:
        value = base(gold, pred, trace)
        points = float(getattr(value, "score", value))
        wrong = [f for f in output_fields if normalize(gold.get(f)) != normalize(_get(pred, f))]
        parts = [
            "Correct."
            if not wrong
            else "Wrong: " + "; ".join(f"expected {f}={gold.get(f)!r}, got {_get(pred, f)!r}" for f in wrong)
        ]
        if comment := comments.get(example_key(gold, input_fields)):
            parts.append(f"Reviewer comment: {comment}")
        return dspy.Prediction(score=points, feedback=" ".join(parts))

    return with_feedback


def score(
    program: dspy.Module,
    examples: Sequence[dspy.Example],
    metric: Metric,
    lm: dspy.BaseLM,
    tick: Callable[[], None],
) -> float | None:
    """Mean metric on `examples`; a prediction that fails to parse scores 0."""
    if not examples:
        return None
    total = 0.0
    with dspy.context(lm=lm, callbacks=[]):
        for example in examples:
            tick()
            try:
                value = metric(example, program(**example.inputs()))
            except Exception:  # an unparseable answer is a wrong answer, not a crash
                value = 0.0
            total += float(getattr(value, "score", value))
    return round(total / len(examples), 6)


# --- evaluation with mlflow.genai ---------------------------------------------------------


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
    lm = lm or make_lm(store.settings.flywheel_lm)
    loaded = registry.load(name, ref, store)
    info, program = loaded.info, loaded.program

    @mlflow.trace(name=f"{name}-v{info.version}")
    def predict_fn(**inputs: Any) -> dict[str, Any]:
        with dspy.context(lm=lm):
            try:
                output = program(**inputs)
            except Exception as exc:  # an unparseable answer scores 0 rather than failing the run
                return {"error": f"{type(exc).__name__}: {exc}"}
        return output_values(info, output)

    experiment_id = ensure_experiment(store.settings, EVAL_EXPERIMENT)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"eval-{name}-v{info.version}", nested=nested
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
    with mlflow.start_run(experiment_id=experiment_id, run_name=label) as run:
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
