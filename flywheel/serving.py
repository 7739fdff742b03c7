"""predict(model, inputs, ref) -> Prediction: the one serving path for the API, notebooks and widgets.

The program is resolved through the registry's cache (a promotion is seen
within FLYWHEEL_RESOLVE_TTL), run under `dspy.context` with the server's LM
(never global settings), and every answer becomes an MLflow trace whose id is
returned at once; the trace itself is written durably by the outbox.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import dspy

from flywheel import registry
from flywheel.runtime import Runtime, get_runtime
from flywheel.tracing import TraceRecord, new_trace_id


class InputError(ValueError):
    """The request's inputs do not match the program's input fields."""


class PredictTimeout(TimeoutError):
    pass


class LMFailure(RuntimeError):
    """The language model (or the program around it) failed; the message is the provider's."""


@dataclass(frozen=True)
class Prediction:
    result: dict[str, Any]
    trace_id: str
    model: str
    model_version: str
    latency_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "trace_id": self.trace_id,
            "model_version": self.model_version,
            "latency_ms": self.latency_ms,
        }


def check_inputs(info: registry.VersionInfo, inputs: Any) -> dict[str, Any]:
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


def output_values(info: registry.VersionInfo, output: Any) -> dict[str, Any]:
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


async def apredict(
    model: str,
    inputs: Any,
    ref: str | int | None = None,
    *,
    timeout: float | None = None,
    runtime: Runtime | None = None,
) -> Prediction:
    """Run the version `ref` names (a number, stage or alias; default DEFAULT_MODEL_STAGE)."""
    runtime = runtime or get_runtime()
    loaded = registry.peek(model, ref, runtime.store) or await asyncio.to_thread(
        registry.load, model, ref, runtime.store
    )
    check_inputs(loaded.info, inputs)
    trace_id = new_trace_id()
    started_ns = time.time_ns()
    t0 = time.perf_counter()
    limit = timeout if timeout is not None else runtime.settings.request_timeout
    try:
        with dspy.context(lm=runtime.lm, callbacks=[], track_usage=False):
            output = await asyncio.wait_for(loaded.program.acall(**inputs), timeout=limit)
    except TimeoutError:
        runtime.record_trace(
            TraceRecord.failed(trace_id, loaded.info, inputs, started_ns, f"timed out after {limit:g}s")
        )
        raise PredictTimeout(f"the prediction took longer than {limit:g}s (REQUEST_TIMEOUT)") from None
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        runtime.record_trace(TraceRecord.failed(trace_id, loaded.info, inputs, started_ns, message))
        raise LMFailure(f"the language model call failed: {message}") from None
    result = output_values(loaded.info, output)
    latency_ms = round((time.perf_counter() - t0) * 1000, 2)
    runtime.record_trace(TraceRecord.ok(trace_id, loaded.info, inputs, result, started_ns, time.time_ns()))
    return Prediction(result, trace_id, loaded.info.name, loaded.info.version, latency_ms)


def predict(
    model: str,
    inputs: Any,
    ref: str | int | None = None,
    *,
    timeout: float | None = None,
    runtime: Runtime | None = None,
) -> Prediction:
    """Synchronous predict for notebooks and widgets (runs the same async path)."""
    call = apredict(model, inputs, ref, timeout=timeout, runtime=runtime)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(call)
    # inside a running loop (a kernel cell): run on a private loop in a worker thread
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, call).result()
