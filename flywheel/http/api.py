"""The FastAPI app: thin routes over serving, feedback, export and the registry.

`create_app(runtime)` serves a runtime its caller owns (the background server of
a notebook, a test) and never closes it; `create_app()` (and the module's `app`,
what `flywheel serve` and `uvicorn flywheel.http.api:app` run) builds its own
runtime at startup and closes it at shutdown. Errors are mapped by class: every
`FlywheelError` carries its HTTP status; `Unavailable` (503) adds `Retry-After`.
Every response names the worker process that answered (`X-Flywheel-Worker: <pid>`).
"""

from __future__ import annotations

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
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from flywheel import export, feedback, registry, serving
from flywheel.counters import prometheus
from flywheel.errors import FlywheelError, Unavailable
from flywheel.runtime import Runtime

WORKER_HEADER = b"x-flywheel-worker"


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, examples=["joke-generator"])
    inputs: dict[str, Any] = Field(examples=[{"topic": "cat"}])
    version: str | None = Field(default=None, examples=[None])
    stage: str | None = Field(default=None, examples=["Production"])
    alias: str | None = Field(default=None, examples=[None])


class PredictResponse(BaseModel):
    result: dict[str, Any]
    trace_id: str
    model_version: str
    latency_ms: float


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
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


class StageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1)
    stage: str = Field(min_length=1)


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


def _key_check(kind: Literal["predict", "feedback", "admin"]) -> Any:
    def check(runtime: RuntimeDep, x_api_key: Annotated[str | None, Header()] = None) -> None:
        settings = runtime.settings
        wanted = {
            "predict": settings.flywheel_predict_key,
            "feedback": settings.flywheel_feedback_key,
            "admin": settings.flywheel_admin_key,
        }[kind]
        if not wanted:
            return
        if x_api_key is None:
            raise HTTPException(401, f"this endpoint needs the {kind} API key in the X-API-Key header")
        if not secrets.compare_digest(x_api_key, wanted):
            raise HTTPException(403, f"the X-API-Key header does not hold the {kind} API key")

    return Depends(check)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        problems.append(f"{where or 'body'}: {error.get('msg')}")
    return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)


async def _flywheel_error(request: Request, exc: Exception) -> JSONResponse:
    status = exc.status if isinstance(exc, FlywheelError) else 500
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Unavailable) else None
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


_ERROR = {
    "description": "an error, in words",
    "content": {"application/json": {"example": {"detail": "..."}}},
}
_UNAVAILABLE = {
    "description": "MLflow is unreachable and this host cannot answer from durable local state; "
    "retry after the `Retry-After` header's seconds",
    "headers": {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}},
    "content": {"application/json": {"example": {"detail": "..."}}},
}


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # never a bare traceback; the details go to the server log
    _runtime(request).log.exception("unexpected error on %s", request.url.path)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


def create_app(runtime: Runtime | None = None) -> FastAPI:
    """The API over `runtime` (left running when the app stops), or over one it builds and owns."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if runtime is not None:
            app.state.runtime = runtime.start()  # idempotent; its owner closes it
            yield
            return
        own = Runtime().start()
        app.state.runtime = own
        try:
            yield
        finally:
            await run_in_threadpool(own.close)

    app = FastAPI(
        title="flywheel",
        summary="Serve registered DSPy programs, collect feedback, export training data.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(FlywheelError, _flywheel_error)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(router)
    app.add_middleware(_WorkerHeader)
    return app


router = APIRouter()


@router.post(
    "/predict",
    response_model=PredictResponse,
    dependencies=[_key_check("predict")],
    responses={
        200: {"description": "answered; its trace is committed to this host's outbox"},
        404: _ERROR | {"description": "unknown model, version, stage or alias"},
        422: _ERROR | {"description": "missing, extra or empty input field"},
        503: _UNAVAILABLE,
    },
)
async def predict(body: PredictRequest, runtime: RuntimeDep) -> PredictResponse:
    refs = [r for r in (body.version, body.stage, body.alias) if r]
    if len(refs) > 1:
        raise HTTPException(422, "give at most one of version, stage or alias")
    started = time.perf_counter()
    try:
        prediction = await serving.apredict(runtime, body.model, body.inputs, refs[0] if refs else None)
    except Exception:
        runtime.counters.record(body.model, 0, error=True)
        raise
    runtime.counters.record(body.model, (time.perf_counter() - started) * 1000, error=False)
    # already the PredictResponse shape: skip a second validation pass on the hot path
    return JSONResponse(prediction.to_dict())  # type: ignore[return-value]


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
        404: _ERROR | {"description": "Trace not found: unknown and older than FEEDBACK_WAIT, or malformed"},
        422: _ERROR | {"description": "bad rating, or a correction naming fields not output"},
        503: _UNAVAILABLE,
    },
)
async def post_feedback(body: FeedbackRequest, runtime: RuntimeDep) -> FeedbackResponse:
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
    )
    if receipt.pending:
        pending = FeedbackResponse(status="pending", **receipt.to_dict())
        return JSONResponse(pending.model_dump(), status_code=202)  # type: ignore[return-value]
    return FeedbackResponse(status="success", **receipt.to_dict())


@router.get("/export", dependencies=[_key_check("admin")])
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
    return JSONResponse({"model": model, "count": len(rows), "rows": rows})


@router.get("/models")
async def get_models(runtime: RuntimeDep) -> dict[str, Any]:
    models = await run_in_threadpool(registry.list_models, runtime.store)
    return {"models": [m.to_dict() for m in models]}


@router.get("/models/{name}/versions")
async def get_versions(name: str, runtime: RuntimeDep) -> dict[str, Any]:
    versions = await run_in_threadpool(registry.list_versions, name, runtime.store)
    return {"model": name, "versions": [v.to_dict() for v in versions]}


@router.post("/models/{name}/stage", dependencies=[_key_check("admin")])
async def set_stage(name: str, body: StageRequest, runtime: RuntimeDep) -> dict[str, Any]:
    info = await run_in_threadpool(runtime.promote, name, body.version, body.stage)
    return {"status": "success", "model": name, "version": info.to_dict()}


@router.get("/health")
async def health(runtime: RuntimeDep) -> dict[str, Any]:
    return runtime.health()


@router.get("/metrics", response_model=None)
async def metrics(
    request: Request, runtime: RuntimeDep, format: Literal["json", "prometheus"] | None = None
) -> dict[str, Any] | PlainTextResponse:
    report = await run_in_threadpool(runtime.counters.report)
    wants_text = format == "prometheus" or (
        format is None and "text/plain" in request.headers.get("accept", "")
    )
    if wants_text:
        extra = runtime.metrics_extra()
        return PlainTextResponse(prometheus(report, extra), media_type="text/plain; version=0.0.4")
    return report


app = create_app()
