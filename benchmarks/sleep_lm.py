"""The benchmark's stand-in LM: it only waits a fixed latency, then gives a fixed well-formed answer.

`FLYWHEEL_LM=py:benchmarks.sleep_lm:SleepLM` selects it; FLYWHEEL_BENCH_LATENCY
is not read here (config.py is the only reader): the latency is a constructor
argument, 100 ms by default.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage

from flywheel.lm import AsyncRetrievalEngine, RetrievalEngine

LATENCY = 0.1


_FIELD = re.compile(r"\[\[ ## (\w+) ## \]\]")


def _answer(request: Any) -> Any:
    """A fixed, well-formed answer naming the fields the final message asks for: no real work."""
    last = request.messages[-1].text or ""
    asked = last[last.rfind("Respond with") :]
    fields = [f for f in dict.fromkeys(_FIELD.findall(asked)) if f != "completed"] or ["answer"]
    text = "".join(f"[[ ## {f} ## ]]\nstand-in answer\n\n" for f in fields) + "[[ ## completed ## ]]"
    prompt = sum(len((m.text or "").split()) for m in request.messages) + len(
        str(request.system or "").split()
    )
    answer = len(text.split())
    # counted like a tokenizer would roughly count words: the trace shows usage as a real LM's does
    usage = Usage(input_tokens=prompt, output_tokens=answer, total_tokens=prompt + answer)
    return Response(
        id=None,
        model="flywheel/sleep",
        message=Message.assistant([TextPart(text)]),
        finish_reason="stop",
        usage=usage,
    )


class _SleepEngine(RetrievalEngine):
    def __init__(self, latency: float = LATENCY) -> None:
        self.latency = latency

    def complete(self, request: Any) -> Any:
        time.sleep(self.latency)
        return _answer(request)


class _AsyncSleepEngine(AsyncRetrievalEngine):
    def __init__(self, latency: float = LATENCY) -> None:
        self.latency = latency

    async def complete(self, request: Any) -> Any:  # type: ignore[override]
        await asyncio.sleep(self.latency)
        return _answer(request)


class SleepLM(dspy.LM):
    def __init__(self, latency: float = LATENCY) -> None:
        super().__init__(
            "flywheel/sleep",
            engine=_SleepEngine(latency),
            async_engine=_AsyncSleepEngine(latency),
            cache=False,
        )
