"""A program's fields: what it takes, what it answers, and its answer in JSON types.

Shared by serving, evaluation and the widgets, so a request is checked and an
answer is rendered the same way everywhere. Any `dspy.Module` is a program: a
built-in module (Predict, ChainOfThought, ReAct, ...) or a class of your own
with only a `forward` (see `runs_async`).
"""

from __future__ import annotations

import inspect
import typing
from typing import TYPE_CHECKING, Any

import dspy

from flywheel import limits
from flywheel.errors import InputError

if TYPE_CHECKING:
    from flywheel.registry import VersionInfo


def _signature_of(program: dspy.Module) -> type[dspy.Signature] | None:
    """The signature a module declares as a whole (Predict, ReAct, ProgramOfThought, ...), if any."""
    signature = getattr(program, "signature", None)
    if isinstance(signature, type) and issubclass(signature, dspy.Signature):
        return signature
    return None


def _forward_parameters(program: dspy.Module) -> list[inspect.Parameter] | None:
    """The named parameters of a module's own `forward`, or None when it takes **kwargs only."""
    forward = getattr(type(program), "forward", None)
    if forward is None:
        return None
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return None
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named or None


def program_fields(program: dspy.Module) -> tuple[list[str], list[str]]:
    """(input fields, output fields) a request gives and an answer holds (never `reasoning`).

    A module with a signature of its own (Predict, ReAct, ...) answers with its signature's
    fields. A module of your own takes its `forward`'s named parameters and answers with the
    output fields of its last predictor; pass `input_fields`/`output_fields` to
    `register_program` when that guess is wrong (e.g. forward returns other keys).
    """
    signature = _signature_of(program)
    if signature is not None:
        return list(signature.input_fields), [f for f in signature.output_fields if f != "reasoning"]
    predictors = program.predictors()
    params = _forward_parameters(program)
    if not predictors:
        raise ValueError("the program has no dspy.Predict inside; cannot tell its fields")
    inputs = [p.name for p in params] if params else list(predictors[0].signature.input_fields)
    outputs = [f for f in predictors[-1].signature.output_fields if f != "reasoning"]
    return inputs, outputs


def optional_inputs(program: dspy.Module) -> list[str]:
    """Input fields a request may leave out: forward's parameters that have a default."""
    if _signature_of(program) is not None:
        return []
    return [p.name for p in _forward_parameters(program) or [] if p.default is not inspect.Parameter.empty]


def runs_async(program: dspy.Module) -> bool:
    """True when the program's own `aforward` is the one to call.

    A class that defines only `forward` (as the DSPy docs teach) has no `aforward`, and a
    subclass that overrides `forward` of a built-in module (which has one) must not have its
    `forward` bypassed by the inherited `aforward`: both run `forward` in a worker thread.
    """
    mro = type(program).__mro__

    def owner(name: str) -> int | None:
        return next((i for i, cls in enumerate(mro) if name in vars(cls)), None)

    has_async, has_sync = owner("aforward"), owner("forward")
    if has_async is None:
        return False
    return has_sync is None or has_async <= has_sync


INPUT_TYPES_ATTR = "_flywheel_input_types"


def input_types(program: dspy.Module, fields: list[str]) -> dict[str, Any]:
    """The declared type of each input field that is not plain text (for converting JSON inputs).

    Registration resolves them where the program's module is importable and keeps them on the
    program (INPUT_TYPES_ATTR), pickled with it: a server elsewhere could not resolve a string
    annotation (`from __future__ import annotations`) of a class it cannot import.
    """
    kept = getattr(program, INPUT_TYPES_ATTR, None)
    if isinstance(kept, dict):
        return {f: kept[f] for f in fields if f in kept}
    hints: dict[str, Any] = {}
    signature = _signature_of(program)
    if signature is not None:
        hints = {name: f.annotation for name, f in signature.input_fields.items()}
    else:
        forward = getattr(type(program), "forward", None)
        try:
            hints = typing.get_type_hints(forward) if forward is not None else {}
        except Exception:
            hints = {}
        predictors = program.predictors()
        if predictors:  # the first step's annotations fill in what forward does not say
            for name, f in predictors[0].signature.input_fields.items():
                hints.setdefault(name, f.annotation)
    return {f: hints[f] for f in fields if f in hints and hints[f] not in (str, Any, None)}


def check_inputs(info: VersionInfo, inputs: Any) -> dict[str, Any]:
    if not isinstance(inputs, dict):
        raise InputError("inputs must be an object of input fields")
    expected = info.input_fields
    optional = set(info.optional_inputs)
    missing = [f for f in expected if f not in inputs and f not in optional]
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
    found = limits.problem(inputs, "inputs")  # what the API refuses is refused in-process too
    if found:
        raise InputError(found)
    return inputs


def convert_inputs(program: dspy.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """JSON inputs as the types the program declares (a pydantic model from an object, an int
    from "3", ...); an input that does not fit its type is an InputError naming the field."""
    types = input_types(program, list(inputs))
    if not types:
        return inputs
    import pydantic

    converted = dict(inputs)
    for name, annotation in types.items():
        try:
            converted[name] = pydantic.TypeAdapter(annotation).validate_python(inputs[name])
        except pydantic.ValidationError as exc:
            problems = "; ".join(e["msg"] for e in exc.errors()[:3])
            raise InputError(
                f"input field {name!r} does not fit its type {_type_name(annotation)}: {problems}"
            ) from None
        except Exception:  # a type pydantic cannot build a validator for: pass the value as given
            continue
    return converted


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def output_values(info: VersionInfo, output: Any) -> dict[str, Any]:
    """A program's answer as the version's output fields, in JSON types (what is served and traced)."""
    fields = info.output_fields
    if isinstance(output, dspy.Prediction):
        values = output.toDict()
    elif isinstance(output, dict):
        values = dict(output)
    elif len(fields) == 1:  # a forward that returns the bare value of its one output field
        values = {fields[0]: output}
    elif hasattr(output, "__dict__"):
        values = {k: v for k, v in vars(output).items() if not k.startswith("_")}
    else:
        values = {}
    fields = fields or [k for k in values if k != "reasoning"]
    return {f: jsonable(values.get(f)) for f in fields}


def jsonable(value: Any) -> Any:
    """A value in JSON types: pydantic models, enums, tuples and sets, nested; str() for the rest."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    from pydantic_core import to_jsonable_python

    try:
        return to_jsonable_python(value, fallback=str)
    except Exception:
        return str(value)
