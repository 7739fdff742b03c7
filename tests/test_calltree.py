"""Every flywheel trace carries the DSPy call tree, in the shape `mlflow.dspy.autolog()` writes.

The same programs (written as the DSPy docs teach: a forward-only class, a pipeline, ReAct
with a tool, a built-in Predict) run once under autolog and once through flywheel's serving
path; the span trees must agree in names, types and parents. The LM is the offline one here;
the OpenAI-protocol run (real LiteLLM client, demos in the messages, token usage) is in
test_openai_protocol.py, bursts and kill -9 in test_scale.py and test_durable.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy
import mlflow
import programs_zoo as zoo
import pytest
from dspy.utils.exceptions import LMError

from flywheel import registry, span_rows
from flywheel.calltree import CallTree
from flywheel.lm import OfflineLM
from flywheel.runtime import Runtime
from flywheel.serving import predict
from flywheel.store import Store

PROGRAMS: dict[str, tuple[Callable[[], dspy.Module], dict[str, Any], dict[str, Any]]] = {
    "capital": (zoo.capital_qa, {"country": "Kenya"}, {}),
    "pipeline": (zoo.summarize_pipeline, {"text": "Rain and wind in the north tomorrow"}, {}),
    "agent": (
        zoo.capital_agent,
        {"question": "What is the capital of Japan?"},
        {"output_fields": ["answer", "trajectory"]},
    ),
    "predict": (lambda: dspy.Predict("topic -> joke"), {"topic": "cats"}, {}),
}


def _shape(spans: list[Any]) -> list[tuple[tuple[str, ...], str]]:
    """Each span as (its path of names from the root, its type), in start order."""
    by_id = {s.span_id: s for s in spans}

    def path(span: Any) -> tuple[str, ...]:
        names = [span.name]
        while span.parent_id is not None:
            span = by_id[span.parent_id]
            names.append(span.name)
        return tuple(reversed(names))

    ordered = sorted(spans, key=lambda s: (s.start_time_ns, len(path(s))))
    return [(path(s), str(s.span_type)) for s in ordered]


def _autolog_trace(
    store: Store, program: dspy.Module, inputs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> Any:
    # autolog writes to the process's current experiment: named by the environment (put back
    # after the test), never by mlflow.set_experiment, whose choice would outlive this test
    experiment_id = store.client.create_experiment("autolog")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    with store.fluent():
        mlflow.dspy.autolog()
        try:
            with dspy.context(lm=OfflineLM()):
                program(**inputs)
            mlflow.flush_trace_async_logging()
            trace_id = mlflow.get_last_active_trace_id()
        finally:
            mlflow.dspy.autolog(disable=True)
        trace = mlflow.get_trace(trace_id)
    assert trace is not None and trace.data.spans and trace.info.experiment_id == experiment_id
    return trace


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_the_call_tree_has_autologs_names_types_and_parents(
    fresh_store: Store, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    build, inputs, fields = PROGRAMS[name]
    expected = _shape(_autolog_trace(fresh_store, build(), inputs, monkeypatch).data.spans)
    registry.register_program(build(), name, store=fresh_store, **fields)
    with Runtime() as runtime:
        answer = predict(runtime, name, inputs, 1)
        assert runtime.outbox.flush(), runtime.outbox.last_error
        trace = runtime.store.client.get_trace(answer.trace_id)
    assert _shape(trace.data.spans) == expected
    assert trace.info.tags["mlflow.traceName"] == expected[0][0][0]
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.inputs == inputs  # the root still holds the request's complete fields
    assert root.outputs == answer.result
    lm_spans = [s for s in trace.data.spans if s.span_type == "CHAT_MODEL"]
    assert lm_spans and all(s.attributes["mlflow.llm.model"] == "flywheel/offline" for s in lm_spans)
    assert all(s.inputs["messages"][0]["role"] == "system" for s in lm_spans)
    assert all(isinstance(s.outputs, list) and s.outputs for s in lm_spans)
    if name == "agent":
        assert "Tool.lookup_capital" in {s.name for s in trace.data.spans}


def test_child_spans_lie_within_their_parents_and_the_lm_span_lasts_the_lms_latency(
    tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    store = make_store(tmp_path / "home", FLYWHEEL_LM="py:benchmarks.sleep_lm:SleepLM")
    registry.register_program(zoo.capital_qa(), "capital", store=store)
    with Runtime() as runtime:
        answer = predict(runtime, "capital", {"country": "Kenya"}, 1)
        assert runtime.outbox.flush(), runtime.outbox.last_error
        trace = runtime.store.client.get_trace(answer.trace_id)
    spans = {s.span_id: s for s in trace.data.spans}
    assert len(spans) == 6
    for span in spans.values():
        assert span.end_time_ns >= span.start_time_ns
        if span.parent_id is not None:
            parent = spans[span.parent_id]
            assert parent.start_time_ns <= span.start_time_ns <= span.end_time_ns <= parent.end_time_ns
    (lm,) = [s for s in spans.values() if s.name == "SleepLM.__call__"]
    assert lm.end_time_ns - lm.start_time_ns >= 0.1 * 1e9  # SleepLM waits 100 ms
    usage = lm.attributes["mlflow.chat.tokenUsage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert (
        json.loads(trace.info.trace_metadata["mlflow.trace.tokenUsage"])["total_tokens"]
        == (usage["total_tokens"])
    )


def test_a_failing_step_is_the_error_span(fresh_store: Store, failing_lm: Callable[..., Any]) -> None:
    tree = CallTree()
    program = zoo.capital_qa()
    with dspy.context(lm=failing_lm(), callbacks=[tree], usage_tracker=tree):
        with pytest.raises(LMError, match="connection refused"):
            program(country="Kenya")
    spans = tree.spans()
    names = [s["name"] for s in spans]
    assert names[0] == "CapitalQA.forward" and "ChatAdapter.format" in names
    assert spans[0]["error"] is not None and spans[0]["parent"] is None
    failed_lm = [s for s in spans if s["type"] == "CHAT_MODEL"]
    assert failed_lm and all(s["error"] for s in failed_lm)


def test_no_credential_reaches_a_span() -> None:
    tree = CallTree()
    lm = dspy.LM(
        "openai/x",
        api_key="sk-secret-value-123456",
        api_base="http://user:pw-secret@127.0.0.1:9/v1",
        extra_headers={"Authorization": "Bearer tok-secret-987654"},
        num_retries=0,
        timeout=1,
    )
    with dspy.context(lm=lm, callbacks=[tree], usage_tracker=tree):
        with pytest.raises(Exception, match="(?i)connect"):  # noqa: B017  # whatever LiteLLM names it
            dspy.Predict("a -> b")(a="x")
    text = span_rows.to_json(tree.spans())  # as the outbox payload writes them
    assert "secret" not in text and "tok-" not in text
    (lm_span,) = [s for s in tree.spans() if s["type"] == "CHAT_MODEL"]
    assert lm_span["attributes"]["model"] == "openai/x"


def _missing_spans(runtime: Runtime, trace_ids: set[str], expected: list[Any]) -> list[str]:
    """The trace ids whose stored span tree differs from `expected` (a shape from _shape)."""
    client = runtime.store.client
    return [t for t in sorted(trace_ids) if _shape(client.get_trace(t).data.spans) != expected]


@pytest.mark.slow
def test_every_span_is_stored_after_a_200_per_second_burst_on_four_workers(fresh_store: Store) -> None:
    import asyncio
    import time

    import httpx
    from processes import free_port, serve_command, stop_group, wait_until_up
    from test_server import _spawn

    registry.register_program(zoo.capital_qa(), "capital", store=fresh_store)
    registry.promote("capital", "1", "Production", fresh_store)
    port = free_port()
    proc = _spawn(serve_command(port, workers=4))
    url = f"http://127.0.0.1:{port}"

    async def burst() -> set[str]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:

            async def one(i: int) -> str:
                await asyncio.sleep(i / 200)  # 200 requests a second, sent whether or not answered
                r = await client.post("/predict", json={"model": "capital", "inputs": {"country": f"c{i}"}})
                assert r.status_code == 200, r.text
                return r.json()["trace_id"]

            return set(await asyncio.gather(*(one(i) for i in range(400))))

    try:
        wait_until_up(f"{url}/health", timeout=180, proc=proc)
        started = time.monotonic()
        traces = asyncio.run(burst())
        print(f"400 requests answered in {time.monotonic() - started:.1f} s")
    finally:
        stop_group(proc)
    assert len(traces) == 400
    with Runtime() as runtime:  # what the stopped workers left in the outbox is delivered here
        assert runtime.outbox.flush(timeout=120), runtime.outbox.last_error
        first = runtime.store.client.get_trace(next(iter(traces)))
        expected = _shape(first.data.spans)
        assert [name for (name, *_), _ in expected][:1] == ["CapitalQA.forward"] and len(expected) == 6
        assert not _missing_spans(runtime, traces, expected)


def test_a_long_input_is_cut_in_every_span_as_in_the_root(
    tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    store = make_store(tmp_path / "home", MAX_FIELD_CHARS="1000")
    registry.register_program(zoo.capital_qa(), "capital", store=store)
    with Runtime() as runtime:
        answer = predict(runtime, "capital", {"country": "Kenya " * 2000}, 1)
        assert runtime.outbox.flush(), runtime.outbox.last_error
        trace = runtime.store.client.get_trace(answer.trace_id)
    (lm,) = [s for s in trace.data.spans if s.span_type == "CHAT_MODEL"]
    last = lm.inputs["messages"][-1]["content"]
    assert last.endswith("…[truncated by flywheel]") and len(last) == 1000
    for span in trace.data.spans:
        assert "Kenya " * 200 not in json.dumps(span.inputs)[1000:], span.name
