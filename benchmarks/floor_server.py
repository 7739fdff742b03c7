"""The floor the serving benchmark measures flywheel against: the same program, nothing else.

    .venv/bin/python -m benchmarks.floor_server --port 8001 --workers 4

A bare FastAPI app served by uvicorn with the same number of worker processes as
`flywheel serve`, listening the same way (a socket per worker: flywheel.http.balance;
`--shared-socket` for uvicorn's one shared socket). Each worker loads the registered
program the way flywheel does (`loader.Loader(store).load(model)`: the default stage resolved in the registry,
the version's files checked and unpickled), builds the LM the way flywheel does
(`lm.configured_lm` from FLYWHEEL_LM, the response cache as LM_CACHE_SERVING says)
and answers POST /predict (flywheel's body: `{"model": ..., "inputs": {...}}`) by
running the program under `dspy.context(lm=...)`. No tracing, no outbox, no
canary, no limits, no key checks: what is left is DSPy, the LM's wait and HTTP,
so flywheel's throughput over this one's is what all of flywheel's work costs.

Every answer names its worker (`X-Flywheel-Worker: <pid>`), as flywheel's do, so the
benchmark warms it up and counts each worker's share the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import dspy
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from flywheel.config import get_settings
from flywheel.http import balance
from flywheel.lm import configured_lm, with_cache
from flywheel.loader import LoadedProgram, Loader
from flywheel.programs import convert_inputs, output_values, runs_async
from flywheel.store import connect

_WORKER = {"X-Flywheel-Worker": str(os.getpid())}
_served: dict[str, LoadedProgram] = {}
_lm: list[dspy.BaseLM] = []


class PredictBody(BaseModel):
    model: str
    inputs: dict[str, Any]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    _WORKER["X-Flywheel-Worker"] = str(os.getpid())  # this worker's pid, not the importer's
    settings = get_settings()
    _lm.append(with_cache(configured_lm(settings), settings.lm_cache_serving))
    yield


def _program(model: str) -> LoadedProgram:
    loaded = _served.get(model)
    if loaded is None:  # loaded once per worker, from the registry, as flywheel's loader does
        loaded = _served[model] = Loader(connect()).load(model)
    return loaded


app = FastAPI(title="flywheel benchmark floor", lifespan=_lifespan)


@app.post("/predict")
async def predict(body: PredictBody) -> JSONResponse:
    try:
        loaded = _served.get(body.model) or await asyncio.to_thread(_program, body.model)
    except Exception as exc:  # never a silent zero: the benchmark counts it as an error
        raise HTTPException(503, f"cannot load {body.model}: {type(exc).__name__}: {exc}") from None
    program = loaded.program
    arguments = convert_inputs(program, body.inputs)
    with dspy.context(lm=_lm[0]):
        if runs_async(program):
            output = await program.acall(**arguments)
        else:  # a forward-only program runs in a thread, under this context (to_thread copies it)
            output = await asyncio.to_thread(program, **arguments)
    return JSONResponse({"result": output_values(loaded.info, output)}, headers=_WORKER)


@app.get("/health")
async def health() -> JSONResponse:
    return JSONResponse({"status": "healthy"}, headers=_WORKER)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--shared-socket",
        action="store_true",
        help="uvicorn's one shared socket instead of a socket per worker, as flywheel serve listens",
    )
    args = parser.parse_args()
    options = {
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "access_log": False,
        "log_level": "warning",
        "timeout_worker_healthcheck": get_settings().worker_healthcheck_timeout,
    }
    if not args.shared_socket and balance.applies(get_settings(), args.host, args.port, args.workers):
        balance.run("benchmarks.floor_server:app", **options)  # the workers listen as flywheel's do
    else:
        uvicorn.run("benchmarks.floor_server:app", **options)


if __name__ == "__main__":
    main()
