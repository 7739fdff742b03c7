"""The FastAPI app: thin routes over serving, feedback, export and the registry."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from flywheel import export, feedback, registry, serving
from flywheel.config import get_settings
from flywheel.errors import InvalidStage, ModelNotFound
from flywheel.metrics import prometheus
from flywheel.runtime import Runtime, get_runtime


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
    status: Literal["success"]
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


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime = get_runtime()
    runtime.start()
    try:
        yield
    finally:
        runtime.stop()


app = FastAPI(
    title="flywheel",
    summary="Serve registered DSPy programs, collect feedback, export training data.",
    version="0.1.0",
    lifespan=lifespan,
)


def _key_check(kind: Literal["predict", "feedback", "admin"]) -> Any:
    def check(x_api_key: Annotated[str | None, Header()] = None) -> None:
        settings = get_settings()
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


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        problems.append(f"{where or 'body'}: {error.get('msg')}")
    return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)


@app.exception_handler(ModelNotFound)
async def _model_not_found(request: Request, exc: ModelNotFound) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # never a bare traceback; the details go to the server log
    get_runtime().log.exception("unexpected error on %s", request.url.path)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


_PREDICT_ERRORS: dict[type[Exception], int] = {
    serving.InputError: 422,
    ModelNotFound: 404,
    serving.PredictTimeout: 504,
    serving.LMFailure: 502,
}


@app.post("/predict", response_model=PredictResponse, dependencies=[_key_check("predict")])
async def predict(body: PredictRequest) -> PredictResponse:
    refs = [r for r in (body.version, body.stage, body.alias) if r]
    if len(refs) > 1:
        raise HTTPException(422, "give at most one of version, stage or alias")
    runtime = get_runtime()
    started = time.perf_counter()
    try:
        prediction = await serving.apredict(
            body.model, body.inputs, refs[0] if refs else None, runtime=runtime
        )
    except Exception as exc:
        runtime.metrics.record(body.model, 0, error=True)
        status = next((code for kind, code in _PREDICT_ERRORS.items() if isinstance(exc, kind)), None)
        if status is None:
            raise
        raise HTTPException(status, str(exc)) from None
    runtime.metrics.record(body.model, (time.perf_counter() - started) * 1000, error=False)
    # already the PredictResponse shape: skip a second validation pass on the hot path
    return JSONResponse(prediction.to_dict())  # type: ignore[return-value]


@app.post("/feedback", response_model=FeedbackResponse, dependencies=[_key_check("feedback")])
async def post_feedback(body: FeedbackRequest) -> FeedbackResponse:
    if not get_settings().feedback_enabled:
        raise HTTPException(403, "feedback is disabled on this server (FEEDBACK_ENABLED=false)")
    runtime = get_runtime()
    try:
        receipt = await run_in_threadpool(
            feedback.submit,
            body.trace_id,
            body.rating,
            corrected_output=body.corrected_output,
            comment=body.comment,
            user_id=body.user_id,
            runtime=runtime,
        )
    except feedback.TraceNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except feedback.FeedbackError as exc:
        raise HTTPException(422, str(exc)) from None
    return FeedbackResponse(status="success", **receipt.to_dict())


@app.get("/export", dependencies=[_key_check("admin")])
async def get_export(
    model: Annotated[str, Query(min_length=1)],
    rating: Literal["thumbs_up", "thumbs_down", "any"] = "any",
    format: Literal["csv", "json", "jsonl"] = "json",
    start_date: date | None = None,
    end_date: date | None = None,
    limit: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    runtime = get_runtime()
    try:
        rows = await run_in_threadpool(
            partial(
                export.export_rows,
                model,
                rating=rating,
                start_date=start_date,
                end_date=end_date,
                limit=limit,
                runtime=runtime,
            )
        )
    except export.ExportError as exc:
        raise HTTPException(422, str(exc)) from None
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


@app.get("/models")
async def get_models() -> dict[str, Any]:
    models = await run_in_threadpool(registry.list_models)
    return {"models": [m.to_dict() for m in models]}


@app.get("/models/{name}/versions")
async def get_versions(name: str) -> dict[str, Any]:
    versions = await run_in_threadpool(registry.list_versions, name)
    return {"model": name, "versions": [v.to_dict() for v in versions]}


@app.post("/models/{name}/stage", dependencies=[_key_check("admin")])
async def set_stage(name: str, body: StageRequest) -> dict[str, Any]:
    try:
        info = await run_in_threadpool(registry.promote, name, body.version, body.stage)
    except InvalidStage as exc:
        raise HTTPException(422, str(exc)) from None
    return {"status": "success", "model": name, "version": info.to_dict()}


@app.get("/health")
async def health() -> dict[str, Any]:
    return get_runtime().health()


@app.get("/metrics", response_model=None)
async def metrics(
    request: Request, format: Literal["json", "prometheus"] | None = None
) -> dict[str, Any] | PlainTextResponse:
    runtime: Runtime = get_runtime()
    report = await run_in_threadpool(runtime.metrics.report)
    wants_text = format == "prometheus" or (
        format is None and "text/plain" in request.headers.get("accept", "")
    )
    if wants_text:
        extra = {"outbox_backlog": runtime.outbox.backlog(), "loaded_models": len(registry.cached_versions())}
        return PlainTextResponse(prometheus(report, extra), media_type="text/plain; version=0.0.4")
    return report
