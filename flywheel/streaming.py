"""astream(runtime, model, inputs, ref) -> events: the streaming twin of `serving.apredict`.

The same version is chosen (reference, canary, shadow), the same inputs are checked, the
program runs under the server's LM and a per-request `calltree.CallTree` (never global
DSPy settings), and the answer becomes the same trace. On the way, `dspy.streamify` hands
over each output field's text as the LM writes it:

    {"event": "chunk", "field": "joke", "chunk": "My cat sits"}      (any number of these)
    {"event": "result", "result": {...}, "trace_id": "tr-...", "model_version": "2", "latency_ms": 12.3}
    {"event": "error", "status": 502, "detail": "...", "trace_id": "tr-..."}   (instead of the result)

Errors known before the program runs (unknown model 404, bad inputs 422, MLflow down 503)
are raised by `open_stream` (and by `astream` before its first event), exactly as
`apredict` raises them. A failure of the program itself (502 LM, 504 REQUEST_TIMEOUT, 500
program error) is traced with state ERROR exactly as `apredict` traces it (`serving._fail`)
and ends the stream with an `error` event; so does a trace that cannot be committed (503,
`trace_id` null). The result event comes only once its trace is committed to the outbox.

Which fields stream: each `str` output field that exactly one predictor of the program
produces (a `StreamListener` on that predictor, so pipelines of several predictors stream
too). A chunk is that predictor's text as the LM writes it; the `result` event is the
program's answer and the authority: a field no predictor (or several) produces, a typed
field, or a field the program rewrites after its predictor, is only in the result.

The streamify wrapper and its listeners are built per request, inside the request's
`dspy.context`, because streamify captures the callbacks in force when it is built.
REQUEST_TIMEOUT covers the whole run. A program with its own `aforward` runs on the event
loop. A forward-only program runs in an AnyIO worker thread (DSPy's sync streaming sends
its chunks back to the loop through AnyIO, which only such a thread can do), at most
PROGRAM_THREADS of them at once per event loop (a separate bound from `serving`'s program
pool); the thread gets a copy of the request's context, so its `dspy.context` and recorder
are the request's. A timed-out thread is abandoned (it no longer counts against the bound)
and stops at its next chunk, whose stream is closed by then.

The program runs in its own task: a client that leaves mid-stream does not stop it, and
its trace is written as usual (its answer just reaches nobody).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import dspy
from dspy.streaming import StatusMessageProvider, StreamListener, StreamResponse

from flywheel import canary, serving
from flywheel.calltree import CallTree
from flywheel.errors import FlywheelError
from flywheel.programs import check_inputs, convert_inputs, output_values, runs_async
from flywheel.tracing import TraceRecord, new_trace_id

if TYPE_CHECKING:
    import anyio

    from flywheel.loader import LoadedProgram
    from flywheel.runtime import Runtime

CHUNK, RESULT, ERROR = "chunk", "result", "error"

_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = (
    weakref.WeakKeyDictionary()
)


class _Quiet(StatusMessageProvider):
    """No status messages: flywheel streams fields only (DSPy's tool messages would be sent
    from a loop of their own)."""

    def tool_start_status_message(self, instance: Any, inputs: dict[str, Any]) -> None:
        return None

    def tool_end_status_message(self, outputs: Any) -> None:
        return None


def listeners(program: dspy.Module, fields: list[str]) -> list[StreamListener]:
    """One listener per `str` field of `fields` that exactly one predictor of `program` outputs."""
    named = program.named_predictors()
    found = []
    for name in fields:
        owners = [(path, p) for path, p in named if name in p.signature.output_fields]
        if len(owners) == 1 and owners[0][1].signature.output_fields[name].annotation is str:
            path, predictor = owners[0]
            found.append(StreamListener(name, predict=predictor, predict_name=path))
    return found


def _limiter(threads: int) -> anyio.CapacityLimiter:
    import anyio

    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        limiter = _limiters[loop] = anyio.CapacityLimiter(threads)
    return limiter


def _runner(program: dspy.Module, threads: int, outputs: list[Any]) -> Callable[..., Any]:
    """What streamify runs: the program (its aforward on the loop, or forward in an AnyIO worker
    thread), its real answer kept in `outputs` and a Prediction returned (streamify waits for one)."""
    if runs_async(program):

        async def run(**kwargs: Any) -> dspy.Prediction:
            outputs.append(await program.acall(**kwargs))
            return dspy.Prediction()

    else:

        async def run(**kwargs: Any) -> dspy.Prediction:
            import anyio

            call = partial(program, **kwargs)  # anyio runs it under a copy of this task's context
            limiter = _limiter(threads)
            outputs.append(await anyio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=limiter))
            return dspy.Prediction()

    run.named_predictors = program.named_predictors  # type: ignore[attr-defined]  # for streamify
    return run


@dataclass
class Stream:
    """A prediction ready to stream: its program is loaded and its inputs checked."""

    runtime: Runtime
    model: str
    loaded: LoadedProgram
    inputs: dict[str, Any]
    arguments: dict[str, Any]
    limit: float
    route: str = canary.EXPLICIT
    plan: canary.TrafficPlan | None = None
    trace_id: str = field(default_factory=new_trace_id)
    error: FlywheelError | None = None  # why it failed, once it has
    prediction: serving.Prediction | None = None  # the answer, once it is committed

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Chunk events, then one result or error event (iterate once: each call runs the program)."""
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.runtime.spawn(self._produce(events.put_nowait))
        while True:
            event = await events.get()
            yield event
            if event["event"] != CHUNK:
                return

    async def _produce(self, emit: Callable[[dict[str, Any]], None]) -> None:
        runtime, loaded = self.runtime, self.loaded
        started_ns = time.time_ns()
        t0 = time.perf_counter()
        recorder = CallTree()
        traced = True
        try:
            try:
                outputs: list[Any] = []
                async with asyncio.timeout(self.limit):
                    await self._run(recorder, outputs, emit)
                result = output_values(loaded.info, outputs[-1])
            except Exception as exc:
                error = serving.classify(exc, self.limit)
                serving._fail(
                    runtime, loaded, self.trace_id, self.inputs, started_ns, exc, error, recorder, self.route
                )
                raise error from None
            latency_ms = round((time.perf_counter() - t0) * 1000, 2)
            spans = recorder.spans()
            record = TraceRecord.ok(
                self.trace_id,
                loaded.info,
                self.inputs,
                result,
                started_ns,
                time.time_ns(),
                route=self.route,
                spans=spans,
                **recorder.summary(),
            )
            traced = False  # a commit that fails leaves no trace behind
            await runtime.commit_trace(record)
        except FlywheelError as error:
            self.error = error
            trace_id = self.trace_id if traced else None
            emit({"event": ERROR, "status": error.status, "detail": str(error), "trace_id": trace_id})
            return
        except BaseException as exc:  # cancelled (its loop is closing): nobody waits for more
            self.error = FlywheelError(f"the stream was stopped: {type(exc).__name__}")
            emit({"event": ERROR, "status": 500, "detail": str(self.error), "trace_id": None})
            raise
        info = loaded.info
        self.prediction = serving.Prediction(
            result, self.trace_id, info.name, info.version, latency_ms, self.route, spans
        )
        if self.plan is not None and self.plan.shadow_ref and self.route == canary.STABLE:
            shadow = serving._shadow(
                runtime, self.model, self.plan.shadow_ref, self.inputs, self.trace_id, self.limit
            )
            runtime.spawn(shadow)
        emit({"event": RESULT, **self.prediction.to_dict()})

    async def _run(
        self, recorder: CallTree, outputs: list[Any], emit: Callable[[dict[str, Any]], None]
    ) -> None:
        """Stream the program under the server's LM and this request's recorder. streamify is
        built inside the context: it keeps the callbacks in force when it is built."""
        program = self.loaded.program
        threads = self.runtime.settings.program_threads
        with dspy.context(
            lm=self.runtime.serving_lm(), callbacks=[recorder], usage_tracker=recorder, track_usage=False
        ):
            streamer = dspy.streamify(
                _runner(program, threads, outputs),  # type: ignore[arg-type]
                status_message_provider=_Quiet(),
                stream_listeners=listeners(program, self.loaded.info.output_fields),
                include_final_prediction_in_output_stream=True,
                async_streaming=True,
            )
            async for value in streamer(**self.arguments):
                if isinstance(value, StreamResponse) and isinstance(value.chunk, str) and value.chunk:
                    emit({"event": CHUNK, "field": value.signature_field_name, "chunk": value.chunk})


async def open_stream(
    runtime: Runtime,
    model: str,
    inputs: Any,
    ref: str | int | None = None,
    *,
    timeout: float | None = None,
    routing_key: str | None = None,
) -> Stream:
    """Choose the version and check the inputs, raising what `apredict` raises before it runs
    the program (404, 422, 503); the program runs when the Stream's `events()` is iterated."""
    loaded, route, plan = await serving._choose(runtime, model, ref, routing_key)
    check_inputs(loaded.info, inputs)
    arguments = convert_inputs(loaded.program, inputs)
    limit = timeout if timeout is not None else runtime.settings.request_timeout
    return Stream(runtime, model, loaded, inputs, arguments, limit, route, plan)


async def astream(
    runtime: Runtime,
    model: str,
    inputs: Any,
    ref: str | int | None = None,
    *,
    timeout: float | None = None,
    routing_key: str | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """The events of one streamed prediction (see the module docstring); errors known before the
    program runs are raised, later ones end the stream with an `error` event."""
    stream = await open_stream(runtime, model, inputs, ref, timeout=timeout, routing_key=routing_key)
    async for event in stream.events():
        yield event


def stream(
    runtime: Runtime,
    model: str,
    inputs: Any,
    ref: str | int | None = None,
    *,
    timeout: float | None = None,
    routing_key: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Synchronous astream for notebooks and widgets: the same events as they come, from a private
    event loop in a thread of its own; a failure raises its FlywheelError (after the chunks that
    came before it) instead of yielding an `error` event, and the `result` event also holds the
    `serving.Prediction` (with its call tree) under "prediction". Like `serving.predict`, the iteration
    ends only once a shadow run it started has finished."""
    handoff: queue.Queue[Any] = queue.Queue()
    done = object()

    async def pump() -> None:
        try:
            opened = await open_stream(runtime, model, inputs, ref, timeout=timeout, routing_key=routing_key)
            async for event in opened.events():
                if event["event"] == RESULT:  # in process, the Prediction itself (its call tree too)
                    event = {**event, "prediction": opened.prediction}
                handoff.put(opened.error if event["event"] == ERROR else event)
        except BaseException as exc:
            handoff.put(exc)
        finally:
            try:
                await runtime.settle()
            finally:
                handoff.put(done)

    threading.Thread(target=asyncio.run, args=(pump(),), name="flywheel-stream", daemon=True).start()
    while (item := handoff.get()) is not done:
        if isinstance(item, BaseException):
            while handoff.get() is not done:  # let the private loop finish before raising
                pass
            raise item
        yield item
