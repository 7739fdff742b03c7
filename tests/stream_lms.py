"""A stand-in LM for the streaming tests, chosen with FLYWHEEL_LM=py:stream_lms:stand_in (tests/ on
PYTHONPATH).

It answers like the offline LM (from the prompt's demos, a few words per stream delta), and
- waits STREAM_TEST_PACE seconds (default 0) before each delta, so a client or a browser can
  watch the text arrive over time;
- cannot reach its provider for a request whose last message contains `unreachable` (a connection
  error, as from a provider that is down); other requests are answered.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import dspy

from flywheel.lm import AsyncRetrievalEngine, RetrievalEngine

BAD = "unreachable"


def _pace() -> float:
    return float(os.environ.get("STREAM_TEST_PACE", "0"))


def _refuse(request: Any) -> None:
    if BAD in (request.messages[-1].text or ""):
        raise ConnectionError("connection refused (test)")


class StandInEngine(RetrievalEngine):
    def complete(self, request: Any) -> Any:
        _refuse(request)
        return super().complete(request)

    def stream(self, request: Any) -> Iterator[Any]:
        _refuse(request)
        for event in super().stream(request):
            if event.type == "delta":
                time.sleep(_pace())
            yield event


class AsyncStandInEngine(AsyncRetrievalEngine):
    async def complete(self, request: Any) -> Any:
        _refuse(request)
        return await super().complete(request)

    async def stream(self, request: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        _refuse(request)
        async for event in super().stream(request):
            if event.type == "delta":
                await asyncio.sleep(_pace())
            yield event


def stand_in(**kwargs: Any) -> dspy.LM:
    return dspy.LM(
        "flywheel/stand-in",
        engine=StandInEngine(),
        async_engine=AsyncStandInEngine(),
        cache=False,
        num_retries=0,
    )
