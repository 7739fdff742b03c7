"""DSPy metrics: how an answer is scored against the one a reviewer approved or corrected.

Used by compile (the optimizer's metric and the dev score) and by the gate's
mlflow.genai scorers, so both judge an answer the same way.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dspy

from flywheel.dataset import example_key, normalize

METRICS = ("exact_match", "f1", "judge")
Metric = Callable[..., Any]


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


UNPARSEABLE, FAILED = "unparseable", "failed"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def lm_failure(exc: BaseException) -> BaseException | None:
    """The LM's own error (DSPy's LMError: unreachable, auth, rate limit, timeout...) in the chain, if any."""
    from dspy.utils.exceptions import LMError

    return next((e for e in _chain(exc) if isinstance(e, (LMError, ConnectionError, TimeoutError))), None)


def failure_kind(exc: BaseException) -> str:
    """UNPARSEABLE when the LM answered but its answer did not parse (DSPy's AdapterParseError):
    that is the program's answer, and a wrong one. FAILED for anything else (the LM was
    unreachable, refused, timed out, or the program raised): no answer exists to score, so the
    row must not count as a wrong answer. An LM error anywhere in the chain is a failure."""
    from dspy.utils.exceptions import AdapterParseError

    if lm_failure(exc) is None and any(isinstance(e, AdapterParseError) for e in _chain(exc)):
        return UNPARSEABLE
    return FAILED


def describe_failure(exc: BaseException) -> str:
    """One line for a person: whether the LM failed (and how) or the program itself raised."""
    lm = lm_failure(exc)
    detail = lm or exc
    text = " ".join(str(detail).split())[:300]
    what = "the LM failed" if lm is not None else "the program raised"
    return f"{what} ({type(detail).__name__}: {text})"


def score(
    program: dspy.Module,
    examples: Sequence[dspy.Example],
    metric: Metric,
    lm: dspy.BaseLM,
    tick: Callable[[], None],
) -> float | None:
    """Mean metric on `examples`. An unparseable answer scores 0 (a wrong answer); any other
    failure (the LM is down, the program or metric raised) raises EvaluationFailed at once,
    since a score with missing rows would say nothing and the next rows would fail the same way."""
    from flywheel.errors import EvaluationFailed

    if not examples:
        return None
    total = 0.0
    with dspy.context(lm=lm, callbacks=[]):
        for i, example in enumerate(examples):
            tick()
            try:
                value = metric(example, program(**example.inputs()))
            except Exception as exc:
                if failure_kind(exc) == FAILED:
                    raise EvaluationFailed(
                        f"row {i + 1} of {len(examples)}: {describe_failure(exc)}"
                    ) from exc
                value = 0.0  # an unparseable answer is a wrong answer, not a failure
            total += float(getattr(value, "score", value))
    return round(total / len(examples), 6)
