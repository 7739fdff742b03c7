"""A program's fields: what it takes, what it answers, and its answer in JSON types.

Shared by serving, evaluation and the widgets, so a request is checked and an
answer is rendered the same way everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dspy

from flywheel.errors import InputError

if TYPE_CHECKING:
    from flywheel.registry import VersionInfo


def program_fields(program: dspy.Module) -> tuple[list[str], list[str]]:
    """Input fields of the first predictor, output fields of the last (minus reasoning)."""
    predictors = program.predictors()
    if not predictors:
        raise ValueError("the program has no dspy.Predict inside; cannot tell its fields")
    inputs = list(predictors[0].signature.input_fields)
    outputs = [f for f in predictors[-1].signature.output_fields if f != "reasoning"]
    return inputs, outputs


def check_inputs(info: VersionInfo, inputs: Any) -> dict[str, Any]:
    if not isinstance(inputs, dict):
        raise InputError("inputs must be an object of input fields")
    expected = info.input_fields
    missing = [f for f in expected if f not in inputs]
    extra = [f for f in inputs if f not in expected]
    if missing:
        raise InputError(
            f"missing input field {', '.join(map(repr, missing))} for {info.name} "
            f"(expects {', '.join(expected)})"
        )
    if extra:
        raise InputError(
            f"unknown input field {', '.join(map(repr, extra))} for {info.name} "
            f"(expects {', '.join(expected)})"
        )
    for name, value in inputs.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            raise InputError(f"input field {name!r} is empty")
    return inputs


def output_values(info: VersionInfo, output: Any) -> dict[str, Any]:
    """A program's answer as the version's output fields, in JSON types (what is served and traced)."""
    values = output.toDict() if isinstance(output, dspy.Prediction) else dict(output)
    fields = info.output_fields or [k for k in values if k != "reasoning"]
    return {f: _jsonable(values.get(f)) for f in fields}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, (str, int, float, bool, type(None), list, dict)):
        return value
    return str(value)


