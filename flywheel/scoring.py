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


