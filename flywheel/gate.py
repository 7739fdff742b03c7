"""Evaluation of versions with `mlflow.genai.evaluate`, and the promotion gate (statistics in paired.py).

Evaluation runs (and the traces their predictions emit) live in their own
experiment, EVAL_EXPERIMENT, so they never mix with production traces: export
and the reviewers' dashboards only ever see what users were served.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy
import mlflow

from flywheel import paired, registry
from flywheel.config import ConfigError, Settings, canonical_stage
from flywheel.dataset import example_key
from flywheel.errors import InvalidStage, ModelNotFound
from flywheel.lm import configured_lm, with_cache
from flywheel.loader import load_program
from flywheel.programs import convert_inputs, output_values
from flywheel.scoring import FAILED, describe_failure, failure_kind, field_exact, field_f1
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
    Rows are deduplicated by their inputs (the first wins), so each input is one pair in the
    gate's paired comparison, identified by its `example_key`.
    """
    records: dict[str, dict[str, Any]] = {}
    for row in rows:
        data = row.toDict() if isinstance(row, dspy.Example) else dict(row)
        expected = {f: data.get(f) for f in output_fields}
        if any(v in (None, "") for v in expected.values()):
            continue
        inputs = {f: data.get(f) for f in input_fields}
        record: dict[str, Any] = {"inputs": inputs, "expectations": expected}
        if data.get("trace_id"):
            record["tags"] = {"flywheel.source_trace": str(data["trace_id"])}
        records.setdefault(example_key(inputs, input_fields), record)
    return list(records.values())


FAILED_OUTPUT = "flywheel.failed"  # predict_fn's output when the row got no answer (the LM failed...)
UNPARSEABLE_OUTPUT = "flywheel.unparseable"  # ...and when the answer did not parse (scored 0)


class RowFailed(RuntimeError):
    """Raised by the scorers on a failed row, so MLflow records an error there, not a 0."""


@dataclass
class RowScores:
    """Per-row results of one evaluation, keyed by example_key: filled by the scorers as they run."""

    values: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> key -> score
    failures: dict[str, str] = field(default_factory=dict)  # key -> why the row got no answer
    unparseable: set[str] = field(default_factory=set)

    def get(self, metric: str, key: str) -> float | None:
        """The row's score, or None when it failed (or was never scored)."""
        return None if key in self.failures else self.values.get(metric, {}).get(key)


def feedback_scorers(
    output_fields: Sequence[str], input_fields: Sequence[str] = (), sink: RowScores | None = None
) -> list[Any]:
    """`agreement` (field-level token F1 with the approved/corrected output) and strict `exact_match`.

    An unparseable answer scores 0; a failed row (FAILED_OUTPUT) raises RowFailed, which MLflow
    records as the scorer's error on that row and leaves out of the mean. With a `sink`, every
    row's score (by example_key of its inputs) is kept there for the paired comparison.
    """
    from mlflow.genai.scorers import scorer

    fields, inputs_fields = list(output_fields), list(input_fields)
    sink = sink if sink is not None else RowScores()

    def scored(name: str, inputs: Any, outputs: Any, value: Any) -> Any:
        key = example_key(inputs or {}, inputs_fields or sorted(inputs or {}))
        outputs = outputs if isinstance(outputs, Mapping) else {}
        if FAILED_OUTPUT in outputs:
            sink.failures[key] = str(outputs[FAILED_OUTPUT])
            raise RowFailed(f"no answer: {outputs[FAILED_OUTPUT]}")
        if UNPARSEABLE_OUTPUT in outputs:
            sink.unparseable.add(key)
            value = type(value)(0)
        sink.values.setdefault(name, {})[key] = float(value)
        return value

    @scorer(name="agreement")
    def agreement(inputs: Any, outputs: Any, expectations: dict[str, Any]) -> float:
        return scored("agreement", inputs, outputs, field_f1(expectations, outputs or {}, fields))

    @scorer(name="exact_match")
    def exact_match(inputs: Any, outputs: Any, expectations: dict[str, Any]) -> bool:
        return scored("exact_match", inputs, outputs, bool(field_exact(expectations, outputs or {}, fields)))

    return [agreement, exact_match]


@dataclass(frozen=True)
class VersionScore:
    version: str
    metrics: dict[str, float]
    run_id: str
    rows: RowScores = field(default_factory=RowScores)

    @property
    def failed_rows(self) -> int:
        return len(self.rows.failures)


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
    the run's (evaluation) experiment, never in flywheel's serving experiment. A prediction
    that raises is told apart (scoring.failure_kind): an unparseable answer is a wrong answer
    (0); anything else (the LM unreachable, the program raising) is a failed row, with no
    score, counted in `rows.failures` and the run's `failed_rows` metric.
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
            except Exception as exc:
                marker = FAILED_OUTPUT if failure_kind(exc) == FAILED else UNPARSEABLE_OUTPUT
                return {marker: describe_failure(exc)}
        return output_values(info, output)

    sink = RowScores()
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
                scorers=feedback_scorers(info.output_fields, info.input_fields, sink),
                model_id=info.model_id,
            )
        mlflow.log_metrics({"failed_rows": len(sink.failures), "unparseable_rows": len(sink.unparseable)})
    metrics = {k.removesuffix("/mean"): float(v) for k, v in result.metrics.items() if k.endswith("/mean")}
    return VersionScore(info.version, metrics, result.run_id, sink)


# --- the promotion gate -------------------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    """What the gate decided and why. Scores are means over the rows both versions answered.

    verdict: "promote", "refuse" or "inconclusive" (see flywheel.paired); only "promote"
    moves the candidate. `comparison` holds the evidence (interval, p-values, discordant
    pairs, failed rows, rows a decision would need).
    """

    name: str
    candidate_version: str
    baseline_version: str | None
    metric: str
    candidate_score: float | None
    baseline_score: float | None
    margin: float
    verdict: str
    reason: str
    promoted_to: str | None
    rows: int
    run_id: str
    candidate_metrics: dict[str, float]
    baseline_metrics: dict[str, float]
    comparison: paired.Comparison

    @property
    def passed(self) -> bool:
        return self.verdict == paired.PROMOTE

    @property
    def result(self) -> str:
        return self.verdict

    @property
    def failed_rows(self) -> int:
        return self.comparison.failed_rows

    @property
    def rows_needed(self) -> int | None:
        return self.comparison.rows_needed

    @property
    def more_rows(self) -> int | None:
        return self.comparison.more_rows

    def summary(self) -> str:
        c = self.comparison
        base = (
            "none" if self.baseline_score is None else f"{self.baseline_score:.3f} (v{self.baseline_version})"
        )
        cand = "n/a" if self.candidate_score is None else f"{self.candidate_score:.3f}"
        text = f"{self.metric} {cand} vs {base} on {c.rows} paired rows: {self.verdict} ({self.reason})"
        if self.verdict == paired.INCONCLUSIVE and c.more_rows:
            text += f"; about {c.more_rows} more held-out rows would decide it"
        return text


def gate_rules(settings: Settings, **overrides: Any) -> paired.Rules:
    """The gate's rules from the GATE_* settings; a keyword that is not None overrides its setting."""
    values = {
        "alpha": settings.gate_alpha,
        "margin": settings.gate_margin,
        "min_rows": settings.gate_min_rows,
        "non_inferiority": settings.gate_non_inferiority,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return paired.Rules(**values)


def passes(
    candidate: Sequence[float | None],
    baseline: Sequence[float | None] | None,
    margin: float = 0.0,
    **rules: Any,
) -> bool:
    """The gate's rule on per-row scores of the same rows: True only for a `promote` verdict.

    `rules` are paired.Rules' fields (alpha, min_rows, non_inferiority, ...); None marks a failed row.
    """
    return paired.compare(candidate, baseline, paired.Rules(margin=margin, **rules)).verdict == paired.PROMOTE


def gate(
    name: str,
    candidate: str | int,
    data: Sequence[Mapping[str, Any] | dspy.Example],
    *,
    target_stage: str = "Production",
    baseline_ref: str = "Production",
    margin: float | None = None,
    alpha: float | None = None,
    min_rows: int | None = None,
    non_inferiority: bool | None = None,
    metric: str = "agreement",
    promote: bool = True,
    lm: dspy.BaseLM | None = None,
    store: Store | None = None,
) -> GateResult:
    """Evaluate `candidate` and the `baseline_ref` version on the same rows; promote only on evidence.

    Both versions answer every row; the per-row scores go to `paired.compare`, which says
    promote (significantly better, or in non-inferiority mode significantly not worse than
    the margin allows), refuse (significantly worse) or inconclusive (anything else: too few
    rows, a row that failed to evaluate, no significant difference). Only promote moves the
    candidate; inconclusive keeps Production. With no baseline the candidate is promoted
    unless a row failed. margin/alpha/min_rows/non_inferiority default to the GATE_* settings.

    The evidence is recorded twice: as `gate.*` tags on the candidate version, and as params,
    metrics and the per-row pairs (`gate/pairs.json`) in the gate's run in EVAL_EXPERIMENT.
    Not thread-safe (neither is mlflow.genai.evaluate): one gate at a time per process.
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
    rules = gate_rules(
        store.settings, margin=margin, alpha=alpha, min_rows=min_rows, non_inferiority=non_inferiority
    )
    info = registry.get_version(name, candidate, store)
    records = eval_records(data, info.input_fields, info.output_fields)
    if not records:
        raise ValueError(f"no rated rows with an answer to evaluate {name} on")
    try:
        baseline: registry.VersionInfo | None = registry.resolve(name, baseline_ref, store)
    except ModelNotFound:
        baseline = None
    keys = [example_key(r["inputs"], info.input_fields) for r in records]
    experiment_id = ensure_experiment(store.settings, EVAL_EXPERIMENT)
    label = f"gate-{name}-v{info.version}-vs-" + (f"v{baseline.version}" if baseline else "none")
    with store.fluent(), mlflow.start_run(experiment_id=experiment_id, run_name=label) as run:
        cand = evaluate_version(name, info.version, records, lm=lm, store=store, nested=True)
        base = (
            evaluate_version(name, baseline.version, records, lm=lm, store=store, nested=True)
            if baseline
            else None
        )
        cand_rows = [cand.rows.get(metric, k) for k in keys]
        base_rows = [base.rows.get(metric, k) for k in keys] if base else None
        comparison = paired.compare(cand_rows, base_rows, rules)
        _record_run(comparison, rules, metric, info, baseline, stage, records, keys, cand, base)
    tags = _evidence_tags(comparison, metric, baseline, stage, run.info.run_id, cand, base)
    for key, value in tags.items():
        store.client.set_model_version_tag(name, info.version, key, value)
    promoted = None
    if comparison.verdict == paired.PROMOTE and promote:
        registry.promote(
            name,
            info.version,
            stage,
            store,
            actor="gate",
            reason=comparison.reason,
            evidence={
                "gate_run_id": run.info.run_id,
                "metric": metric,
                "method": comparison.method,
                "interval": [comparison.ci_low, comparison.ci_high],
                "confidence": comparison.confidence,
                "p_better": comparison.p_better,
                "rows": comparison.rows,
            },
        )
        promoted = stage
    return GateResult(
        name=name,
        candidate_version=info.version,
        baseline_version=baseline.version if baseline else None,
        metric=metric,
        candidate_score=_round(comparison.candidate_mean),
        baseline_score=_round(comparison.baseline_mean),
        margin=rules.margin,
        verdict=comparison.verdict,
        reason=comparison.reason,
        promoted_to=promoted,
        rows=comparison.rows,
        run_id=run.info.run_id,
        candidate_metrics=cand.metrics,
        baseline_metrics=base.metrics if base else {},
        comparison=comparison,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def evidence_metrics(comparison: paired.Comparison) -> dict[str, float]:
    """The comparison's numbers as the gate run's metrics (None values are left out)."""
    c = comparison
    values = {
        "rows": c.rows,
        "failed_rows": c.failed_rows,
        "wins": c.wins,
        "losses": c.losses,
        "ties": c.ties,
        "candidate_score": c.candidate_mean,
        "baseline_score": c.baseline_mean,
        "difference": c.difference,
        "ci_low": c.ci_low,
        "ci_high": c.ci_high,
        "p_value": c.p_better,
        "p_value_worse": c.p_worse,
        "rows_needed": c.rows_needed,
    }
    return {k: float(v) for k, v in values.items() if v is not None}


def _record_run(
    comparison: paired.Comparison,
    rules: paired.Rules,
    metric: str,
    info: registry.VersionInfo,
    baseline: registry.VersionInfo | None,
    stage: str,
    records: list[dict[str, Any]],
    keys: list[str],
    cand: VersionScore,
    base: VersionScore | None,
) -> None:
    """The gate run's params (the rules), metrics (the evidence, also on the candidate's logged
    model), tags (the verdict) and the per-row pairs as an artifact, to re-check any verdict."""
    mlflow.log_params(
        {
            "metric": metric,
            "method": comparison.method,
            "mode": comparison.mode,
            "alpha": rules.alpha,
            "margin": rules.margin,
            "min_rows": rules.min_rows,
            "confidence": rules.confidence,
            "bootstrap_resamples": rules.resamples,
            "bootstrap_seed": rules.seed,
            "candidate_version": info.version,
            "baseline_version": baseline.version if baseline else "none",
            "target_stage": stage,
        }
    )
    mlflow.log_metrics(evidence_metrics(comparison), model_id=info.model_id)
    mlflow.set_tags(
        {
            "flywheel.model": info.name,
            "gate.verdict": comparison.verdict,
            "gate.reason": comparison.reason[:5000],
        }
    )
    pairs = [
        {
            "key": key,
            "source_trace": (record.get("tags") or {}).get("flywheel.source_trace"),
            "candidate": cand.rows.get(metric, key),
            "baseline": base.rows.get(metric, key) if base else None,
            "candidate_error": cand.rows.failures.get(key),
            "baseline_error": base.rows.failures.get(key) if base else None,
        }
        for key, record in zip(keys, records, strict=True)
    ]
    mlflow.log_dict({"metric": metric, "pairs": pairs}, "gate/pairs.json")


def _evidence_tags(
    comparison: paired.Comparison,
    metric: str,
    baseline: registry.VersionInfo | None,
    stage: str,
    run_id: str,
    cand: VersionScore,
    base: VersionScore | None,
) -> dict[str, str]:
    """`gate.*` tags for the candidate version; numbers at full precision (repr), "none" when absent."""

    def num(value: float | int | None) -> str:
        return "none" if value is None else repr(value)

    c = comparison
    return {
        "gate.verdict": c.verdict,
        "gate.result": c.verdict,
        "gate.reason": c.reason[:5000],
        "gate.method": c.method,
        "gate.mode": c.mode,
        "gate.metric": metric,
        "gate.candidate_score": num(c.candidate_mean),
        "gate.baseline_score": num(c.baseline_mean),
        "gate.difference": num(c.difference),
        "gate.baseline_version": baseline.version if baseline else "none",
        "gate.alpha": num(c.alpha),
        "gate.margin": num(c.margin),
        "gate.min_rows": num(c.min_rows),
        "gate.rows": num(c.rows),
        "gate.failed_rows": num(c.failed_rows),
        "gate.unparseable_rows": num(
            len(cand.rows.unparseable) + (len(base.rows.unparseable) if base else 0)
        ),
        "gate.wins": num(c.wins),
        "gate.losses": num(c.losses),
        "gate.ties": num(c.ties),
        "gate.confidence": num(c.confidence),
        "gate.ci_low": num(c.ci_low),
        "gate.ci_high": num(c.ci_high),
        "gate.p_value": num(c.p_better),
        "gate.p_value_worse": num(c.p_worse),
        "gate.rows_needed": num(c.rows_needed),
        "gate.target_stage": stage,
        "gate.run_id": run_id,
    }
