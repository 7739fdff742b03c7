"""The FastAPI app: thin routes over serving, feedback, export and the registry.

`create_app(runtime)` serves a runtime its caller owns (the background server of
a notebook, a test) and never closes it; `create_app()` (and the module's `app`,
what `flywheel serve` and `uvicorn flywheel.http.api:app` run) builds its own
runtime at startup and closes it at shutdown. Errors are mapped by class: every
`FlywheelError` carries its HTTP status; one with `retry_after` (503 `Unavailable`, 429
`TooManyPending`) adds `Retry-After`.
Every response names the worker process that answered (`X-Flywheel-Worker: <pid>`).

Before any route runs, pure ASGI middleware answers, in this order: a Host header
the API does not answer to (400, against DNS rebinding: `TrustedHosts`); a write
(POST, PUT, PATCH, DELETE) without `Content-Type: application/json` (415: a browser
cannot send one from another site's page without a CORS preflight, which this API
never grants: `JsonWrites`); a body over MAX_REQUEST_BYTES (413) or slower than
BODY_READ_TIMEOUT (408: `BodyLimit`); more than API_LIMIT_CONCURRENCY requests at
work in this process (503, `/health` exempt: `Concurrency`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flywheel import audit, canary, export, feedback, heap, limits, registry, rollback, serving, streaming
from flywheel.config import Settings
from flywheel.counters import prometheus
from flywheel.errors import FlywheelError
from flywheel.runtime import Runtime

WORKER_HEADER = b"x-flywheel-worker"


class _Checked(BaseModel):
    """Rejects (422) what must never be queued or run: text UTF-8 cannot encode, nesting deeper
    than `limits.MAX_DEPTH`, a version number the registry cannot hold."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _hostile(self) -> _Checked:
        fields = {k: getattr(self, k) for k in type(self).model_fields}
        found = limits.problem(fields, "body") or limits.version_problem(fields.get("version"))
        if found:
            raise ValueError(found)
        return self


class PredictRequest(_Checked):
    model: str = Field(min_length=1, examples=["joke-generator"])
    inputs: dict[str, Any] = Field(examples=[{"topic": "cat"}])
    version: str | None = Field(default=None, examples=[None])
    stage: str | None = Field(default=None, examples=["Production"])
    alias: str | None = Field(default=None, examples=[None])
    user_id: str | None = Field(
        default=None, max_length=1000, description="routes a canary stickily (when no routing_key)"
    )
    routing_key: str | None = Field(
        default=None, max_length=1000, description="the same key always gets the same version of a canary"
    )


class PredictResponse(BaseModel):
    result: dict[str, Any]
    trace_id: str
    model_version: str
    latency_ms: float


class Audited(_Checked):
    """Who asks and why: both go into the audit trail (`actor` defaults to `api`)."""

    actor: str | None = Field(default=None, max_length=200)
    reason: str | None = Field(default=None, max_length=4000)


class RollbackRequest(Audited):
    expected_version: str | None = Field(
        default=None, description="roll back only while this version is Production (else 409)"
    )


class CanaryRequest(Audited):
    ref: str | None = Field(default=None, min_length=1, max_length=250, examples=["canary"])
    share: float = Field(ge=0.0, le=1.0, examples=[0.1])


class ShadowRequest(Audited):
    ref: str | None = Field(default=None, min_length=1, max_length=250, examples=["candidate"])


class PreferenceRequest(_Checked):
    trace_a: str = Field(min_length=1)
    trace_b: str = Field(min_length=1)
    preferred: Literal["A", "B", "tie"]
    comment: str | None = None
    user_id: str | None = None


class FeedbackRequest(_Checked):
    trace_id: str = Field(min_length=1)
    rating: Literal["thumbs_up", "thumbs_down"]
    corrected_output: dict[str, Any] | str | None = None
    comment: str | None = None
    user_id: str | None = None


class FeedbackResponse(BaseModel):
    status: Literal["success", "pending"] = Field(
        description="`success` (200): the trace is known and the feedback is on disk; `pending` (202): "
        "the trace id is well-formed and younger than FEEDBACK_WAIT but not known yet, the feedback is on "
        "disk and lands once the trace does (or is dead-lettered after FEEDBACK_WAIT)"
    )
    trace_id: str
    rating: str
    user_id: str
    corrected_output: dict[str, Any] | None
    comment: str | None
    queued: bool = Field(description="true until the feedback is written to MLflow (it is durable already)")
    feedback_id: str = Field(description="stored as metadata `flywheel.feedback_id` on each assessment")


class StageRequest(_Checked):
    version: str = Field(min_length=1)
    stage: str = Field(min_length=1)


class ErrorResponse(BaseModel):
    """Every error the API answers (4xx, 5xx, also 422 validation errors): one line for a person."""

    detail: str = Field(examples=["inputs: Field required"])


_WHY = {
    400: "the body could not be read as the declared content type, or the Host header names a host "
    "this API does not answer to (add it to API_ALLOWED_HOSTS)",
    401: "an API key is configured for this route and the X-API-Key header is missing",
    403: "the X-API-Key header holds the wrong key, or the route is switched off",
    404: "no such model, version, stage, alias or trace",
    408: "the request body did not arrive within BODY_READ_TIMEOUT seconds",
    409: "the registry is not in a state that allows it (e.g. nothing to roll back to, Production "
    "moved since it was judged, this promotion was already rolled back, or the version to serve was not "
    "registered by flywheel or its files changed since: refused before anything is loaded, and audited)",
    413: "the request body is larger than MAX_REQUEST_BYTES",
    415: "a POST, PUT, PATCH or DELETE without the header Content-Type: application/json (needed also "
    "without a body)",
    422: "the request is invalid (also: text UTF-8 cannot encode, nesting too deep, a version out of "
    "range, a number that is not finite: NaN, Infinity, 1e999)",
    502: "the language model (or the program around it) failed",
    503: "MLflow is unreachable and this host cannot answer from durable local state, or this server "
    "process is working on API_LIMIT_CONCURRENCY requests already (retry after the Retry-After "
    "header's seconds)",
    429: "too much feedback for traces not known yet is waiting (FEEDBACK_PENDING_PER_CLIENT, "
    "FEEDBACK_PENDING_MAX_BYTES); nothing was stored (retry after the Retry-After header's seconds)",
    504: "the prediction took longer than REQUEST_TIMEOUT",
}


_RETRY_AFTER = {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}
_DOORS = (400, 408, 413, 503)  # what the middleware below can answer on any route (not 503 on /health)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route can answer, all as ErrorResponse
    (with those every request can get from the middleware: Host, body read, concurrency)."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted({*statuses, *_DOORS}):
        responses[status] = {"model": ErrorResponse, "description": _WHY[status]}
        if status in (429, 503):
            responses[status]["headers"] = {"Retry-After": _RETRY_AFTER}
    return responses


async def _runtime(request: Request) -> Runtime:
    """The app's runtime. Dependencies here are `async def` and never block: FastAPI runs a plain
    `def` dependency in its thread pool, two hops per request for this one and the key check."""
    return request.app.state.runtime  # type: ignore[no-any-return]


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


KeyKind = Literal["predict", "feedback", "admin", "registry"]


def _key_refusal(settings: Settings, kind: KeyKind, x_api_key: str | None) -> HTTPException | None:
    """The 401 or 403 a request with this X-API-Key gets for a route of `kind`; None when it may pass."""
    if kind == "registry":  # read-only: the predict or the admin key, when REGISTRY_NEEDS_KEY
        keys = [settings.flywheel_predict_key, settings.flywheel_admin_key]
        wanted = [k for k in keys if k] if settings.registry_needs_key else []
        name = "predict or admin"
    else:
        key = {
            "predict": settings.flywheel_predict_key,
            "feedback": settings.flywheel_feedback_key,
            "admin": settings.flywheel_admin_key,
        }[kind]
        wanted, name = [key] if key else [], kind
    if not wanted:
        return None
    if x_api_key is None:
        return HTTPException(401, f"this endpoint needs the {name} API key in the X-API-Key header")
    # as bytes: compare_digest refuses a non-ASCII str, and a header is latin-1 on the wire
    given = x_api_key.encode("latin-1", "replace")
    if not any([secrets.compare_digest(given, w.encode("utf-8")) for w in wanted]):
        return HTTPException(403, f"the X-API-Key header does not hold the {name} API key")
    return None


def _key_check(kind: KeyKind) -> Any:
    async def check(runtime: RuntimeDep, x_api_key: Annotated[str | None, Header()] = None) -> None:
        refusal = _key_refusal(runtime.settings, kind, x_api_key)
        if refusal is not None:
            raise refusal

    return Depends(check)


def _settings(scope: Any) -> Settings:
    """The settings of the runtime the app serves (the defaults before it has started)."""
    runtime = getattr(scope["app"].state, "runtime", None)
    return runtime.settings if runtime is not None else Settings()


async def _refuse(
    scope: Any, send: Any, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    """Answer `status` with the API's error shape and close the connection (a body may be unread)."""
    response = JSONResponse(
        {"detail": detail}, status_code=status, headers={"Connection": "close", **(headers or {})}
    )

    async def nothing() -> Any:  # the response never reads the request
        return {"type": "http.disconnect"}

    await response(scope, nothing, send)


def _header(scope: Any, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_ANY_ADDRESS = ("", "0.0.0.0", "::")


def host_name(value: str) -> str:
    """The host of a Host header (or of an API_ALLOWED_HOSTS entry): lower case, without the port,
    the brackets of an IPv6 address or a final dot. `[::1]:8000` -> `::1`."""
    text = value.strip().lower()
    if text.startswith("["):
        text = text[1 : text.index("]")] if "]" in text else text
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    return text.rstrip(".")


@functools.lru_cache(maxsize=8)
def allowed_hosts(settings: Settings) -> tuple[str, ...]:
    """The names a Host header may hold: localhost, 127.0.0.1, ::1, API_HOST (unless it is the
    any-address 0.0.0.0 or ::) and API_ALLOWED_HOSTS (`*.example.com` for its subdomains, `*` for
    any). Besides these, the address a connection arrived at is always allowed (`TrustedHosts`)."""
    extra = [host_name(h) for h in settings.api_allowed_hosts.split(",") if h.strip()]
    bound = [] if settings.api_host.strip() in _ANY_ADDRESS else [host_name(settings.api_host)]
    return tuple(dict.fromkeys([*LOOPBACK_HOSTS, *bound, *extra]))


def host_allowed(host: str, allowed: tuple[str, ...], own_address: str | None = None) -> bool:
    if "*" in allowed or (own_address is not None and host == host_name(own_address)):
        return True
    return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in allowed)


class TrustedHosts:
    """ASGI middleware: a request whose Host header is not an allowed host is answered 400.

    A page of another site that re-points its own name at 127.0.0.1 (DNS rebinding) reaches
    the API with its own name in Host; only the names of `allowed_hosts` and the address the
    connection arrived at (a direct `http://10.0.0.5:8000`, a load balancer's health check by
    address) are answered. A request without a Host header (HTTP/1.0) is for that address too.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"host")
        server = scope.get("server")
        own = str(server[0]) if server else None
        if given is not None and not host_allowed(host_name(given), allowed_hosts(_settings(scope)), own):
            detail = (
                f"the Host header {given[:200]!r} is not a host this API answers to (a guard against DNS "
                "rebinding); a deployment reached by that name lists it in API_ALLOWED_HOSTS"
            )
            await _refuse(scope, send, 400, detail)
            return
        await self.app(scope, receive, send)


WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


class JsonWrites:
    """ASGI middleware: a POST, PUT, PATCH or DELETE without `Content-Type: application/json` is 415.

    A browser sends a cross-site request without asking first (a CORS preflight) only with a
    form or text content type, or none; with application/json it must ask, and this API never
    answers a preflight. So a page of another site cannot change anything, even with keys unset.
    A write without a body (a rollback) carries the header too.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in WRITE_METHODS:
            given = _header(scope, b"content-type")
            if (given or "").partition(";")[0].strip().lower() != "application/json":
                has = "none" if given is None else repr(given[:100])
                detail = (
                    f"{scope['method']} requests need the header Content-Type: application/json, "
                    f"also without a body (this one has {has})"
                )
                await _refuse(scope, send, 415, detail)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: reads the whole request body before the route runs. A body over
    MAX_REQUEST_BYTES is answered 413, one that has not arrived within BODY_READ_TIMEOUT
    seconds 408; either way the connection is closed.

    A declared Content-Length over the limit is refused before a byte is read; a chunked
    (or lying) body is counted as it arrives and refused the moment it passes the limit. A
    client that sends its body slowly, or declares more than it sends, holds a connection for
    BODY_READ_TIMEOUT at most and never counts against API_LIMIT_CONCURRENCY (`Concurrency`).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = _settings(scope)
        limit = settings.max_request_bytes
        message = f"the request body is larger than {limit} bytes (MAX_REQUEST_BYTES)"
        declared = (_header(scope, b"content-length") or "").strip()
        if declared.isdigit() and int(declared) > limit:
            await _refuse(scope, send, 413, message)
            return
        chunks: list[bytes] = []
        seen = 0
        try:
            async with asyncio.timeout(settings.body_read_timeout):
                while True:
                    event = await receive()
                    if event["type"] == "http.disconnect":
                        return  # the client left: nobody to answer
                    chunk = event.get("body", b"")
                    seen += len(chunk)
                    if seen > limit:
                        await _refuse(scope, send, 413, message)
                        return
                    chunks.append(chunk)
                    if not event.get("more_body", False):
                        break
        except TimeoutError:
            detail = (
                f"the request body did not arrive within {settings.body_read_timeout:g} s "
                f"(BODY_READ_TIMEOUT; {seen} bytes came)"
            )
            await _refuse(scope, send, 408, detail)
            return
        body: bytes | None = b"".join(chunks)

        async def replay() -> Any:
            nonlocal body
            if body is not None:
                event, body = {"type": "http.request", "body": body, "more_body": False}, None
                return event
            return await receive()  # after the body: wait for the client to leave

        await self.app(scope, replay, send)


class Concurrency:
    """ASGI middleware: at most API_LIMIT_CONCURRENCY requests at work at once in this process;
    one more is answered 503 with `Retry-After: 1`. It counts requests whose body has arrived
    (it sits inside `BodyLimit`), so slow senders cannot use the places up; `/health` is never
    counted nor refused, so a load balancer sees a busy process as busy, not dead.

    uvicorn's own `limit_concurrency` (API_MAX_CONNECTIONS) is only a much higher bound on open
    connections; beyond it uvicorn answers 503 to every request, `/health` too.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.active = 0  # one event loop per app: no lock needed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        limit = _settings(scope).api_limit_concurrency
        if self.active >= limit:
            detail = (
                f"this server process is working on {limit} requests already (API_LIMIT_CONCURRENCY); "
                "retry after 1 s"
            )
            response = JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "1"})
            await response(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        problems.append(f"{where or 'body'}: {error.get('msg')}")
    return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)


async def _flywheel_error(request: Request, exc: Exception) -> JSONResponse:
    status = exc.status if isinstance(exc, FlywheelError) else 500
    retry = exc.retry_after if isinstance(exc, FlywheelError) else None
    headers = {"Retry-After": str(retry)} if retry is not None else None
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


class _WorkerHeader:
    """Pure ASGI middleware (no per-request task): `X-Flywheel-Worker: <pid>` on every response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Any) -> None:
            if message["type"] == "http.response.start":
                pid = str(os.getpid()).encode()
                message["headers"] = [*message.get("headers", []), (WORKER_HEADER, pid)]
            await send(message)

        await self.app(scope, receive, named)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # never a bare traceback; the details go to the server log
    request.app.state.runtime.log.exception("unexpected error on %s", request.url.path)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


_DESCRIPTION = """\
Every POST and PUT needs the header `Content-Type: application/json`, also when it sends no
body (`POST /models/{name}/rollback`); without it the answer is 415. A web page of another site
cannot send that header without a CORS preflight, which this API never grants, so it cannot
change anything here even with the API keys unset.

The `Host` header must name localhost, 127.0.0.1, ::1, API_HOST, the address the request
came to, or a host in API_ALLOWED_HOSTS (400 otherwise). Request bodies must arrive within
BODY_READ_TIMEOUT seconds (408) and hold at most MAX_REQUEST_BYTES (413). Numbers must be
finite: NaN, Infinity and 1e999 are 422. See docs/api.md.
"""


def create_app(runtime: Runtime | None = None) -> FastAPI:
    """The API over `runtime` (left running when the app stops), or over one it builds and owns."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if runtime is not None:
            app.state.runtime = runtime.start()  # idempotent; its owner closes it
            runtime._mlflow_answers()  # starts the MLflow probe now: the first /health has its answer
            yield
            return
        own = Runtime().start()
        app.state.runtime = own
        own._mlflow_answers()
        heap.settle()  # a serving process: what it has built by now lives as long as it does
        try:
            yield
        finally:
            await run_in_threadpool(own.close)

    app = FastAPI(
        title="flywheel",
        summary="Serve registered DSPy programs, collect feedback, export training data.",
        description=_DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
    )
    # the last added runs first: Host, then the content type of writes, the body, concurrency
    app.add_middleware(Concurrency)
    app.add_middleware(BodyLimit)
    app.add_middleware(JsonWrites)
    app.add_middleware(TrustedHosts)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(FlywheelError, _flywheel_error)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(router)
    app.add_middleware(_WorkerHeader)
    return app


router = APIRouter()


_ROUTE_HEADER = {
    "description": "`explicit`: the request named a version, stage or alias; `canary`: "
    "the model's canary share took it; `stable`: the default stage answered",
    "schema": {"type": "string", "enum": ["stable", "canary", "explicit"]},
}

_STREAM_EXAMPLE = (
    'event: chunk\ndata: {"event": "chunk", "field": "joke", "chunk": "My cat sits"}\n\n'
    'event: result\ndata: {"event": "result", "result": {"joke": "My cat sits on my keyboard."}, '
    '"trace_id": "tr-0194...", "model_version": "2", "latency_ms": 12.3}\n\n'
)


def _refs(body: PredictRequest) -> str | None:
    refs = [r for r in (body.version, body.stage, body.alias) if r]
    if len(refs) > 1:
        raise HTTPException(422, "give at most one of version, stage or alias")
    return refs[0] if refs else None


def _sse(event: dict[str, Any]) -> bytes:
    """One Server-Sent Event: its name, and the whole event as one line of JSON."""
    data = json.dumps(event, ensure_ascii=False, allow_nan=False, default=str)
    return f"event: {event['event']}\ndata: {data}\n\n".encode()


@router.post(
    "/predict",
    response_model=PredictResponse,
    dependencies=[_key_check("predict")],
    responses={
        200: {
            "description": "answered; its trace is committed to this host's outbox. `model_version` is "
            "the version that answered; the header says why",
            "headers": {"X-Flywheel-Route": _ROUTE_HEADER},
        },
        **_errors(400, 401, 403, 404, 409, 413, 415, 422, 502, 503, 504),
    },
)
async def predict(body: PredictRequest, runtime: RuntimeDep) -> PredictResponse:
    ref = _refs(body)
    started = time.perf_counter()
    key = body.routing_key or body.user_id
    try:
        prediction = await serving.apredict(runtime, body.model, body.inputs, ref, routing_key=key)
    except Exception:
        runtime.counters.record(body.model, 0, error=True)
        raise
    runtime.counters.record(body.model, (time.perf_counter() - started) * 1000, error=False)
    # already the PredictResponse shape: skip a second validation pass on the hot path
    headers = {"X-Flywheel-Route": prediction.route}
    return JSONResponse(prediction.to_dict(), headers=headers)  # type: ignore[return-value]


@router.post(
    "/predict/stream",
    response_class=StreamingResponse,
    dependencies=[_key_check("predict")],
    responses={
        200: {
            "description": "Server-Sent Events: `chunk` events (`field`, `chunk`: output-field text as "
            "the LM writes it), then one `result` event (`result`, `trace_id`, `model_version`, "
            "`latency_ms`, as POST /predict answers; sent once its trace is committed) or one `error` "
            "event (`status` 502, 504, 500 or 503, `detail`, `trace_id`) when the prediction fails "
            "after the stream began. Each `data:` line is the whole event as JSON",
            "content": {"text/event-stream": {"schema": {"type": "string"}, "example": _STREAM_EXAMPLE}},
            "headers": {"X-Flywheel-Route": _ROUTE_HEADER},
        },
        **_errors(400, 401, 403, 404, 409, 413, 415, 422, 503),
    },
)
async def predict_stream(body: PredictRequest, runtime: RuntimeDep) -> StreamingResponse:
    """POST /predict's body; the answer streams (see the 200 response). What is known before the
    program runs (unknown model, bad inputs, MLflow down) is an ordinary JSON error."""
    ref = _refs(body)
    started = time.perf_counter()
    try:
        opened = await streaming.open_stream(
            runtime, body.model, body.inputs, ref, routing_key=body.routing_key or body.user_id
        )
    except Exception:
        runtime.counters.record(body.model, 0, error=True)
        raise

    async def events() -> AsyncIterator[bytes]:
        async for event in opened.events():
            if event["event"] != streaming.CHUNK:
                failed = event["event"] == streaming.ERROR
                runtime.counters.record(body.model, (time.perf_counter() - started) * 1000, error=failed)
            yield _sse(event)

    headers = {"X-Flywheel-Route": opened.route, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@router.post(
    "/feedback",
    response_model=FeedbackResponse,
    dependencies=[_key_check("feedback")],
    responses={
        200: {"description": "the trace is known; the feedback is on disk and will reach MLflow"},
        202: {
            "model": FeedbackResponse,
            "description": "status `pending`: the trace id is well-formed and younger than FEEDBACK_WAIT "
            "but not known yet; the feedback is on disk, lands once the trace appears, or is "
            "dead-lettered after FEEDBACK_WAIT",
        },
        **_errors(400, 401, 403, 404, 413, 415, 422, 429, 503),
    },
)
async def post_feedback(body: FeedbackRequest, runtime: RuntimeDep, request: Request) -> FeedbackResponse:
    if not runtime.settings.feedback_enabled:
        raise HTTPException(403, "feedback is disabled on this server (FEEDBACK_ENABLED=false)")
    receipt = await run_in_threadpool(
        feedback.submit,
        runtime,
        body.trace_id,
        body.rating,
        corrected_output=body.corrected_output,
        comment=body.comment,
        user_id=body.user_id,
        client=request.client.host if request.client else None,  # caps pending feedback without a user_id
    )
    if receipt.pending:
        pending = FeedbackResponse(status="pending", **receipt.to_dict())
        return JSONResponse(pending.model_dump(), status_code=202)  # type: ignore[return-value]
    return FeedbackResponse(status="success", **receipt.to_dict())


@router.get(
    "/export",
    dependencies=[_key_check("admin")],
    response_class=Response,
    responses={
        200: {
            "description": "the rated rows: JSON by default, CSV or JSON Lines by `format`",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/csv": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        },
        **_errors(401, 403, 404, 422, 503),
    },
)
async def get_export(
    runtime: RuntimeDep,
    model: Annotated[str, Query(min_length=1)],
    rating: Literal["thumbs_up", "thumbs_down", "any"] = "any",
    format: Literal["csv", "json", "jsonl"] = "json",
    start_date: date | None = None,
    end_date: date | None = None,
    limit: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    rows = await run_in_threadpool(
        partial(
            export.export_rows,
            runtime,
            model,
            rating=rating,
            start_date=start_date,
            end_date=end_date,
            limit=limit,
        )
    )
    if format == "csv":
        filename = f"{export.safe_filename(model)}-{rating}.csv"
        return Response(
            export.to_csv(rows),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    if format == "jsonl":
        return Response(export.to_jsonl(rows), media_type="application/x-ndjson")
    return JSONResponse({"model": model, "count": len(rows), "rows": export.finite(rows)})


@router.get("/models", dependencies=[_key_check("registry")], responses=_errors(401, 403, 422, 503))
async def get_models(runtime: RuntimeDep) -> dict[str, Any]:
    models = await run_in_threadpool(registry.list_models, runtime.store)
    return {"models": [m.to_dict() for m in models]}


@router.get(
    "/models/{name}/versions",
    dependencies=[_key_check("registry")],
    responses=_errors(401, 403, 404, 422, 503),
)
async def get_versions(name: str, runtime: RuntimeDep) -> dict[str, Any]:
    versions = await run_in_threadpool(registry.list_versions, name, runtime.store)
    return {"model": name, "versions": [v.to_dict() for v in versions]}


@router.post(
    "/models/{name}/stage",
    dependencies=[_key_check("admin")],
    responses=_errors(400, 401, 403, 404, 413, 415, 422, 503),
)
async def set_stage(name: str, body: StageRequest, runtime: RuntimeDep) -> dict[str, Any]:
    info = await run_in_threadpool(
        partial(registry.promote, name, body.version, body.stage, runtime.store, actor="api")
    )
    return {"status": "success", "model": name, "version": info.to_dict()}


@router.post(
    "/models/{name}/rollback",
    dependencies=[_key_check("admin")],
    responses=_errors(400, 401, 403, 404, 409, 413, 415, 422, 503),
)
async def post_rollback(
    name: str, runtime: RuntimeDep, body: RollbackRequest | None = None
) -> dict[str, Any]:
    body = body or RollbackRequest()
    info = await run_in_threadpool(
        partial(
            rollback.rollback,
            runtime.store,
            name,
            expected=body.expected_version,
            actor=body.actor or "api",
            reason=body.reason or "",
        )
    )
    return {"status": "success", "model": name, "version": info.to_dict()}


@router.put(
    "/models/{name}/canary",
    dependencies=[_key_check("admin")],
    responses=_errors(400, 401, 403, 404, 413, 415, 422, 503),
)
async def put_canary(name: str, body: CanaryRequest, runtime: RuntimeDep) -> dict[str, Any]:
    plan = await run_in_threadpool(
        partial(
            canary.set_canary,
            runtime.store,
            name,
            body.ref,
            body.share,
            actor=body.actor or "api",
            reason=body.reason or "",
        )
    )
    return {"status": "success", "model": name, "plan": plan.to_dict()}


@router.put(
    "/models/{name}/shadow",
    dependencies=[_key_check("admin")],
    responses=_errors(400, 401, 403, 404, 413, 415, 422, 503),
)
async def put_shadow(name: str, body: ShadowRequest, runtime: RuntimeDep) -> dict[str, Any]:
    plan = await run_in_threadpool(
        partial(
            canary.set_shadow,
            runtime.store,
            name,
            body.ref,
            actor=body.actor or "api",
            reason=body.reason or "",
        )
    )
    return {"status": "success", "model": name, "plan": plan.to_dict()}


@router.get(
    "/models/{name}/live",
    dependencies=[_key_check("registry")],
    responses=_errors(401, 403, 404, 422, 503),
)
async def get_live(
    name: str, runtime: RuntimeDep, since_ms: Annotated[int | None, Query(ge=0, le=2**53)] = None
) -> dict[str, Any]:
    await run_in_threadpool(registry.model_tags, name, runtime.store)  # an unknown model is a 404
    return await run_in_threadpool(canary.live_report, runtime, name, since_ms)


@router.get(
    "/models/{name}/audit",
    dependencies=[_key_check("registry")],
    responses=_errors(401, 403, 404, 422, 503),
)
async def get_audit(
    name: str, runtime: RuntimeDep, limit: Annotated[int, Query(ge=1, le=1000)] = 200
) -> dict[str, Any]:
    await run_in_threadpool(registry.model_tags, name, runtime.store)
    entries = await run_in_threadpool(audit.timeline, runtime.store, name, limit)
    return {"model": name, "entries": [e.to_dict() for e in entries]}


@router.post(
    "/feedback/preference",
    dependencies=[_key_check("feedback")],
    responses=_errors(400, 401, 403, 404, 413, 415, 422, 503),
)
async def post_preference(body: PreferenceRequest, runtime: RuntimeDep) -> dict[str, Any]:
    if not runtime.settings.feedback_enabled:
        raise HTTPException(403, "feedback is disabled on this server (FEEDBACK_ENABLED=false)")
    ids = await run_in_threadpool(
        partial(
            feedback.prefer,
            runtime,
            body.trace_a,
            body.trace_b,
            body.preferred,
            comment=body.comment,
            user_id=body.user_id,
        )
    )
    return {"status": "success", "trace_a": body.trace_a, "trace_b": body.trace_b, "feedback_ids": ids}


@router.get("/health", responses=_errors(503))
async def health(runtime: RuntimeDep) -> dict[str, Any]:
    # in a thread: it counts the outbox's rows (sqlite); whether MLflow answers is read, never awaited
    return await run_in_threadpool(runtime.health)


@router.get(
    "/metrics",
    response_model=None,
    responses={
        200: {
            "description": "counters as JSON, or in the Prometheus text format (`format=prometheus`, "
            "or `Accept: text/plain`). With REGISTRY_NEEDS_KEY, the model names (`models_served`, "
            "`flywheel_model_served`) are left out unless X-API-Key holds the predict or admin key",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/plain; version=0.0.4": {"schema": {"type": "string"}},
            },
        },
        **_errors(422, 503),
    },
)
async def metrics(
    request: Request,
    runtime: RuntimeDep,
    format: Literal["json", "prometheus"] | None = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> dict[str, Any] | PlainTextResponse:
    report = await run_in_threadpool(runtime.counters.report)
    if _key_refusal(runtime.settings, "registry", x_api_key) is not None:
        del report["models_served"]  # model names are the registry's: the totals only
    wants_text = format == "prometheus" or (
        format is None and "text/plain" in request.headers.get("accept", "")
    )
    if wants_text:
        extra = await run_in_threadpool(runtime.metrics_extra)  # counts the outbox's rows (sqlite)
        return PlainTextResponse(prometheus(report, extra), media_type="text/plain; version=0.0.4")
    return report


app = create_app()
