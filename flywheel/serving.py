"""predict(model, inputs, ref) -> Prediction: the one serving path for the API, notebooks and widgets.

The program is resolved through the registry's cache (a promotion is seen
within FLYWHEEL_RESOLVE_TTL), run under `dspy.context` with the server's LM
(never global settings), and every answer becomes an MLflow trace whose id is
returned with the answer, once the trace is committed to the durable outbox.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dspy

from flywheel.errors import LMFailure, PredictTimeout
from flywheel.programs import check_inputs, output_values
from flywheel.tracing import TraceRecord, new_trace_id

if TYPE_CHECKING:
    from flywheel.runtime import Runtime


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


async def apredict(
    runtime: Runtime,
    model: str,
    inputs: Any,
    ref: str | int | None = None,
    *,
    timeout: float | None = None,
) -> Prediction:
    """Run the version `ref` names (a number, stage or alias; default DEFAULT_MODEL_STAGE)."""
    loaded = runtime.programs.peek(model, ref) or await asyncio.to_thread(runtime.programs.load, model, ref)
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
    record = TraceRecord.ok(trace_id, loaded.info, inputs, result, started_ns, time.time_ns())
    await runtime.commit_trace(record)  # committed before the answer: a 200 means durable
    return Prediction(result, trace_id, loaded.info.name, loaded.info.version, latency_ms)


def predict(
    runtime: Runtime,
    model: str,
    inputs: Any,
    ref: str | int | None = None,
    *,
    timeout: float | None = None,
) -> Prediction:
    """Synchronous predict for notebooks and widgets (runs the same async path)."""
    call = apredict(runtime, model, inputs, ref, timeout=timeout)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(call)
    # inside a running loop (a kernel cell): run on a private loop in a worker thread
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, call).result()
