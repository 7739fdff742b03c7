"""predict(model, inputs, ref) -> Prediction: the one serving path for the API, notebooks and widgets.

The program is resolved through the registry's cache (a promotion is seen
within FLYWHEEL_RESOLVE_TTL), run under `dspy.context` with the server's LM
(never global settings), and every answer becomes an MLflow trace whose id is
returned with the answer, once the trace is committed to the durable outbox.

Any dspy.Module is served. One with its own `aforward` (Predict, ChainOfThought,
ReAct, or a class of yours that defines it) runs on the event loop. One with
only a `forward` (a class written as the DSPy docs teach) runs in the runtime's
program pool: PROGRAM_THREADS threads per process, each call under a copy of the
request's context, so its `dspy.context` (the server's LM, the per-request
recorder) is the one the request set.

A call that passes REQUEST_TIMEOUT is answered 504 at that moment, whatever
runs it. A native `aforward` is cancelled. A sync `forward` cannot be
interrupted by Python: its thread goes on until the program returns (its LM
calls are bounded by FLYWHEEL_LM_TIMEOUT and FLYWHEEL_LM_RETRIES), and its
answer is thrown away, never traced as a success. The pool never grows past
PROGRAM_THREADS: while every thread is taken, further forward-only requests
wait in its queue, and one still waiting when its own REQUEST_TIMEOUT passes
is answered 504 and removed from the queue without ever running.

Errors are mapped honestly: the LM client's error (the provider's answer,
an unreachable provider, an answer the adapter cannot parse) is 502 with the
provider's message; a timeout is 504; an exception raised by the program's
own code is 500 "program error: ...". Each is traced with state ERROR, the
exception's type, message and traceback, and logged with its traceback; a
credential a client quotes in its error (a URL's password, a bearer key, the
value of a known key such as OPENAI_API_KEY: `lm.redact`) is redacted from all
three, and from every span of the call tree.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import dspy

from flywheel import canary
from flywheel.calltree import CallTree
from flywheel.errors import (
    FlywheelError,
    LMFailure,
    ModelNotFound,
    PredictTimeout,
    ProgramError,
    UntrustedVersion,
)
from flywheel.lm import redact
from flywheel.programs import check_inputs, convert_inputs, output_values, runs_async
from flywheel.tracing import TraceRecord, new_trace_id

if TYPE_CHECKING:
    from flywheel.loader import LoadedProgram
    from flywheel.runtime import Runtime

log = logging.getLogger("flywheel.serving")
_TRACEBACK_CHARS = 20_000


@dataclass(frozen=True)
class Prediction:
    result: dict[str, Any]
    trace_id: str
    model: str
    model_version: str
    latency_ms: float
    route: str = canary.EXPLICIT  # stable, canary or explicit: why this version answered
    spans: list[dict[str, Any]] = field(default_factory=list, repr=False)  # the DSPy call tree

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "trace_id": self.trace_id,
            "model_version": self.model_version,
            "latency_ms": self.latency_ms,
        }  # the SPEC's shape; the API sends `route` as the X-Flywheel-Route header


def classify(exc: BaseException, limit: float) -> FlywheelError:
    """The FlywheelError a failed program call is answered with (see the module docstring)."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    from dspy.utils.exceptions import AdapterParseError, LMError, LMTimeoutError

    if isinstance(exc, TimeoutError) or any(isinstance(e, LMTimeoutError) for e in chain):
        detail = "" if isinstance(exc, TimeoutError) else f": {_message(exc)}"
        return PredictTimeout(f"the prediction took longer than {limit:g}s (REQUEST_TIMEOUT){detail}")
    if any(isinstance(e, (LMError, AdapterParseError)) for e in chain):
        return LMFailure(f"the language model call failed: {_message(exc)}")
    try:  # LiteLLM's own errors, when a program calls LiteLLM directly
        import litellm

        if any(isinstance(e, litellm.exceptions.APIError | litellm.exceptions.OpenAIError) for e in chain):
            return LMFailure(f"the language model call failed: {_message(exc)}")
    except (ImportError, AttributeError, TypeError):
        pass
    return ProgramError(f"program error: {_message(exc)}")


def _type_name(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _message(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}")


class ProgramPool:
    """The bounded thread pool that runs forward-only programs (PROGRAM_THREADS threads)."""

    def __init__(self, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flywheel-program")

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in a pool thread under a copy of the caller's context (dspy.context included)."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, context.run, fn)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


async def run_program(runtime: Runtime, program: dspy.Module, inputs: dict[str, Any]) -> Any:
    """The program's answer to `inputs`: its aforward on this loop, or forward in the pool."""
    if runs_async(program):
        return await program.acall(**inputs)
    return await runtime.program_pool().run(partial(program, **inputs))


async def apredict(
    runtime: Runtime,
    model: str,
    inputs: Any,
    ref: str | int | None = None,
    *,
    timeout: float | None = None,
    routing_key: str | None = None,
) -> Prediction:
    """Run the version `ref` names (a number, stage or alias; default DEFAULT_MODEL_STAGE).

    Without `ref`, the model's traffic plan decides (canary.py): the canary's share goes to
    its reference (sticky by `routing_key`), and a shadow reference, when set, runs on the
    same inputs after the answer, traced and linked to this trace, its answer never returned.
    """
    loaded, route, plan = await _choose(runtime, model, ref, routing_key)
    check_inputs(loaded.info, inputs)
    arguments = convert_inputs(loaded.program, inputs)
    trace_id = new_trace_id()
    started_ns = time.time_ns()
    t0 = time.perf_counter()
    limit = timeout if timeout is not None else runtime.settings.request_timeout
    recorder = CallTree()
    try:
        result = await _run(runtime, loaded, arguments, limit, recorder)
    except Exception as exc:
        error = classify(exc, limit)
        _fail(runtime, loaded, trace_id, inputs, started_ns, exc, error, recorder, route)
        raise error from None
    latency_ms = round((time.perf_counter() - t0) * 1000, 2)
    spans = recorder.spans()
    record = TraceRecord.ok(
        trace_id,
        loaded.info,
        inputs,
        result,
        started_ns,
        time.time_ns(),
        route=route,
        spans=spans,
        **recorder.summary(),
    )
    await runtime.commit_trace(record)  # committed before the answer: a 200 means durable
    if plan is not None and plan.shadow_ref and route == canary.STABLE:
        runtime.spawn(_shadow(runtime, model, plan.shadow_ref, inputs, trace_id, limit))
    return Prediction(result, trace_id, loaded.info.name, loaded.info.version, latency_ms, route, spans)


async def _choose(
    runtime: Runtime, model: str, ref: str | int | None, routing_key: str | None
) -> tuple[LoadedProgram, str, canary.TrafficPlan | None]:
    """The program that answers, why (the route), and the model's traffic plan when `ref` is None."""
    route = canary.EXPLICIT
    plan = None
    if ref is None:
        plan = runtime.traffic.peek(model) or await asyncio.to_thread(runtime.traffic.get, model)
        route = canary.choose(plan, model, routing_key)
    if route == canary.CANARY and plan is not None:
        try:
            return await _load(runtime, model, plan.canary_ref), route, plan
        except ModelNotFound:  # the canary's alias was removed: its share is served as usual
            route = canary.STABLE
        except UntrustedVersion:  # the canary's alias was moved to a version flywheel refuses
            route = canary.STABLE  # (refused and audited by the loader): its share is served as usual
    return await _load(runtime, model, ref), route, plan


async def _load(runtime: Runtime, model: str, ref: str | int | None) -> LoadedProgram:
    return runtime.programs.peek(model, ref) or await asyncio.to_thread(runtime.programs.load, model, ref)


async def _shadow(
    runtime: Runtime, model: str, ref: str, inputs: dict[str, Any], of: str, limit: float
) -> None:
    """Run the shadow version on the request's inputs and trace it beside the Production trace.

    Nothing waits for it and nothing it does reaches the caller: a failure is its own ERROR
    trace (tagged shadow), or one log line when the shadow reference does not even load.
    """
    try:
        loaded = await _load(runtime, model, ref)
    except Exception as exc:
        runtime.log.warning("shadow %s@%s did not load: %s", model, ref, exc)
        return
    trace_id = new_trace_id()
    started_ns = time.time_ns()
    recorder = CallTree()
    try:
        result = await _run(runtime, loaded, convert_inputs(loaded.program, inputs), limit, recorder)
    except Exception as exc:
        error = classify(exc, limit)
        _fail(runtime, loaded, trace_id, inputs, started_ns, exc, error, recorder, canary.SHADOW, of)
        return
    runtime.record_trace(
        TraceRecord.ok(
            trace_id,
            loaded.info,
            inputs,
            result,
            started_ns,
            time.time_ns(),
            route=canary.SHADOW,
            shadow_of=of,
            spans=recorder.spans(),
            **recorder.summary(),
        )
    )


async def _run(
    runtime: Runtime, loaded: LoadedProgram, arguments: dict[str, Any], limit: float, recorder: CallTree
) -> dict[str, Any]:
    """The program's output values, run under the server's LM and this call's recorder (never
    global settings), cut off after `limit` seconds."""
    with dspy.context(
        lm=runtime.serving_lm(), callbacks=[recorder], usage_tracker=recorder, track_usage=False
    ):
        output = await asyncio.wait_for(run_program(runtime, loaded.program, arguments), timeout=limit)
    return output_values(loaded.info, output)


def _fail(
    runtime: Runtime,
    loaded: LoadedProgram,
    trace_id: str,
    inputs: dict[str, Any],
    started_ns: int,
    exc: BaseException,
    error: FlywheelError,
    recorder: CallTree,
    route: str | None = None,
    shadow_of: str | None = None,
) -> None:
    """Trace the failure (state ERROR, the exception and its traceback) and log the traceback."""
    stack = redact("".join(traceback.format_exception(exc)))[-_TRACEBACK_CHARS:]
    runtime.log.error(  # the traceback, with the secrets a client may quote in it redacted
        "predict %s v%s failed (%s, trace %s): %s\n%s",
        loaded.info.name,
        loaded.info.version,
        error.status,
        trace_id,
        error,
        stack.rstrip(),
    )
    runtime.record_trace(
        TraceRecord.failed(
            trace_id,
            loaded.info,
            inputs,
            started_ns,
            str(error),
            error_type=_type_name(type(exc)),
            error_traceback=stack,
            route=route,
            shadow_of=shadow_of,
            spans=recorder.spans(),
            **recorder.summary(),
        )
    )


def predict(
    runtime: Runtime,
    model: str,
    inputs: Any,
    ref: str | int | None = None,
    *,
    timeout: float | None = None,
    routing_key: str | None = None,
) -> Prediction:
    """Synchronous predict for notebooks and widgets (runs the same async path).

    A shadow run it started finishes before this returns: the private event loop it runs on
    ends with the call, and would otherwise cancel the shadow.
    """

    async def answered() -> Prediction:
        try:
            return await apredict(runtime, model, inputs, ref, timeout=timeout, routing_key=routing_key)
        finally:
            await runtime.settle()

    call = answered()
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(call)
    # inside a running loop (a kernel cell): run on a private loop in a worker thread
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, call).result()
