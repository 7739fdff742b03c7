"""flywheel through a real LM protocol: a local OpenAI chat-completions server (tests/openai_stub.py).

FLYWHEEL_LM=openai/<name> with FLYWHEEL_LM_API_BASE pointing at the stub, the key in
OPENAI_API_KEY: every LM call crosses a socket as an OpenAI client sends it, through
DSPy's own client (`auto`) and through LiteLLM. Checked: the LM sees the program's demos,
usage reaches the trace, 429/500 are retried then 502, a hang is 504, compile and the
gate run against it, the cache decision, and no secret ever lands in the store.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import dspy
import httpx
import programs_zoo as zoo
import pytest
from openai_stub import KEY, OpenAIStub

from flywheel import registry
from flywheel.compile import compile_program
from flywheel.gate import gate
from flywheel.http.server import start_background, stop_background
from flywheel.runtime import get_runtime
from flywheel.store import Store

ROWS = [
    {"country": "France", "capital": "Paris"},
    {"country": "Japan", "capital": "Tokyo"},
    {"country": "Kenya", "capital": "Nairobi"},
    {"country": "Peru", "capital": "Lima"},
    {"country": "Chile", "capital": "Santiago"},
    {"country": "Egypt", "capital": "Cairo"},
    {"country": "Italy", "capital": "Rome"},
    {"country": "Spain", "capital": "Madrid"},
]


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    server = OpenAIStub().start()
    yield server
    server.stop()


def _lm_env(stub: OpenAIStub, **extra: str) -> dict[str, str]:
    return {
        "FLYWHEEL_LM": f"openai/stub-{uuid.uuid4().hex[:8]}",  # a fresh name: no cache entry from before
        "FLYWHEEL_LM_API_BASE": stub.url,
        "FLYWHEEL_LM_RETRIES": "2",
        "OPENAI_API_KEY": KEY,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        **extra,
    }


@pytest.fixture(scope="module", params=["auto", "litellm"])
def served(
    request: pytest.FixtureRequest,
    stub: OpenAIStub,
    tmp_path_factory: pytest.TempPathFactory,
    make_module_store: Callable[..., Store],
) -> Iterator[str]:
    """A store on the stub with the zoo registered, served by the background server."""
    # one store per engine; make_module_store resets everything after the module
    home = tmp_path_factory.mktemp(f"proto-{request.param}") / "home"
    store = make_module_store(
        home, **_lm_env(stub, FLYWHEEL_LM_ENGINE=request.param, DEFAULT_MODEL_STAGE="None")
    )
    registry.register_program(zoo.capital_qa(), "capital", store=store)
    registry.register_program(zoo.summarize_pipeline(), "pipeline", store=store)
    registry.register_program(
        zoo.capital_agent(), "agent", store=store, output_fields=["answer", "trajectory"]
    )
    registry.register_program(zoo.typed_facts(), "facts", store=store)
    stub.reset()
    yield start_background(port=0)
    stop_background()


def _post(url: str, model: str, inputs: dict) -> httpx.Response:
    return httpx.post(f"{url}/predict", json={"model": model, "inputs": inputs}, timeout=60)


def _trace(trace_id: str):  # noqa: ANN202
    runtime = get_runtime()
    assert runtime.outbox.flush(), runtime.outbox.last_error
    return runtime.store.client.get_trace(trace_id)


def test_predict_shows_the_lm_the_programs_demos(served: str, stub: OpenAIStub) -> None:
    stub.reset()
    r = _post(served, "capital", {"country": "Kenya"})
    assert r.status_code == 200, r.text
    assert r.json()["result"] == {"capital": "Nairobi"}
    (call,) = stub.calls()
    assert call.headers["authorization"] == f"Bearer {KEY}"  # the key travels in the header
    assert call.body["model"].startswith("stub-")
    shown = call.text
    for demo in ("France", "Paris", "Japan", "Tokyo", "Nairobi"):
        assert demo in shown
    trace = _trace(r.json()["trace_id"])
    usage = json.loads(trace.info.trace_metadata["mlflow.trace.tokenUsage"])
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0  # the stub's usage figures
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert trace.info.tags["flywheel.lm_cache"] == "miss"
    # what the LM saw, in the trace: its span holds the messages with the demos, the answer,
    # the model and the call's token usage (LiteLLM's figures), as MLflow's UI reads them
    (lm,) = [s for s in trace.data.spans if s.span_type == "CHAT_MODEL"]
    messages = json.dumps(lm.inputs["messages"])
    for demo in ("France", "Paris", "Japan", "Tokyo"):
        assert demo in messages
    assert "Nairobi" in json.dumps(lm.outputs)
    assert lm.attributes["mlflow.llm.model"].startswith("openai/stub-")
    assert lm.attributes["mlflow.chat.tokenUsage"] == usage
    assert KEY not in json.dumps([s.to_dict() for s in trace.data.spans])


def test_pipeline_react_and_typed_outputs_over_the_protocol(served: str, stub: OpenAIStub) -> None:
    stub.reset()
    r = _post(served, "pipeline", {"text": "Rain and strong wind tonight in the north"})
    assert r.status_code == 200 and r.json()["result"] == {"summary": "Storm coming north."}, r.text
    assert len(stub.calls()) == 2
    r = _post(served, "agent", {"question": "What is the capital of France?"})
    assert r.status_code == 200, r.text
    assert r.json()["result"]["answer"] == "Paris"
    assert r.json()["result"]["trajectory"]["observation_0"] == "Paris"
    assert any("observation_0" in c.text and "Paris" in c.text for c in stub.calls())  # the tool's answer
    r = _post(served, "facts", {"country": "Japan"})
    assert r.status_code == 200 and r.json()["result"] == zoo.JAPAN, r.text


def test_429_and_500_are_retried_then_502_with_the_providers_message(served: str, stub: OpenAIStub) -> None:
    stub.reset(failures=[429, 500])
    r = _post(served, "capital", {"country": "Japan"})
    assert r.status_code == 200 and r.json()["result"] == {"capital": "Tokyo"}, r.text
    assert len(stub.calls()) == 3  # two failures, retried (FLYWHEEL_LM_RETRIES=2)

    stub.reset(failures=[500, 500, 500])
    r = _post(served, "capital", {"country": "Japan"})
    assert r.status_code == 502, r.text
    detail = r.json()["detail"]
    assert detail.startswith("the language model call failed")
    assert "The stub server had an error while processing your request (500)" in detail
    assert len(stub.calls()) == 3

    stub.reset(failures=[429, 429, 429])
    r = _post(served, "capital", {"country": "Japan"})
    assert r.status_code == 502 and "slow down (stub 429)" in r.json()["detail"], r.text
    runtime = get_runtime()
    assert runtime.outbox.flush()
    infos, _ = runtime.store.tracking.search_traces(
        locations=[runtime.store.experiment_id],
        filter_string="tags.`flywheel.model` = 'capital' AND trace.status = 'ERROR'",
        max_results=10,
    )
    assert len(infos) >= 2 and all("language model call failed" in i.tags["flywheel.error"] for i in infos)


def test_a_hanging_lm_is_504(served: str, stub: OpenAIStub) -> None:
    runtime = get_runtime()
    original = runtime.settings
    stub.reset(latency=4)
    try:
        runtime.settings = replace(original, request_timeout=0.5)
        for model, inputs in [("capital", {"country": "Japan"}), ("facts", {"country": "Japan"})]:
            r = _post(served, model, inputs)  # a forward-only program and a native async one
            assert r.status_code == 504 and "REQUEST_TIMEOUT" in r.json()["detail"], r.text
    finally:
        runtime.settings = original
        stub.reset()


def test_streaming_over_sse(stub: OpenAIStub) -> None:
    """The stub's SSE stream, read by DSPy's streaming through both clients."""
    stub.reset()
    program = zoo.capital_qa().qa
    for engine in ("auto", "litellm"):
        lm = dspy.LM(
            f"openai/stub-{uuid.uuid4().hex[:8]}", api_base=stub.url, api_key=KEY, cache=False, engine=engine
        )
        listener = dspy.streaming.StreamListener(signature_field_name="capital")
        stream = dspy.streamify(program, stream_listeners=[listener])

        async def read(lm: dspy.LM, stream: object) -> tuple[str, dspy.Prediction]:
            chunks, final = [], None
            with dspy.context(lm=lm):
                async for item in stream(country="Japan"):
                    if isinstance(item, dspy.streaming.StreamResponse):
                        chunks.append(item.chunk)
                    elif isinstance(item, dspy.Prediction):
                        final = item
            return "".join(chunks), final

        text, final = asyncio.run(read(lm, stream))
        assert final is not None and final.capital == "Tokyo" and "Tokyo" in text
        assert stub.calls()[-1].body["stream"] is True


def test_lm_cache_is_off_for_serving_and_on_when_asked(served: str, stub: OpenAIStub) -> None:
    runtime = get_runtime()
    original = runtime.settings
    stub.reset()
    for _ in range(2):
        assert _post(served, "capital", {"country": "Peru"}).status_code == 200
    assert len(stub.calls()) == 2  # default: every prediction asks the LM
    try:
        runtime.settings = replace(original, lm_cache_serving=True)
        first = _post(served, "capital", {"country": "Chile"}).json()
        second = _post(served, "capital", {"country": "Chile"}).json()
    finally:
        runtime.settings = original
    assert len(stub.calls()) == 3  # the second Chile came from DSPy's cache
    assert _trace(first["trace_id"]).info.tags["flywheel.lm_cache"] == "miss"
    hit = _trace(second["trace_id"])
    assert (
        hit.info.tags["flywheel.lm_cache"] == "hit"
        and hit.info.trace_metadata["flywheel.cached_calls"] == "1"
    )


def _files_containing(root: Path, secrets: list[str]) -> list[tuple[str, str]]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [(str(path), s) for s in secrets if s.encode() in data]
    return found


def test_compile_gate_and_serving_against_the_stub_store_no_secret(
    stub: OpenAIStub, tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    from flywheel.runtime import reset_runtime

    password, header = "pa55w0rd-7f3a9c", "hdr-secret-5d21e8"
    api_base = f"http://stubuser:{password}@127.0.0.1:{stub.port}/v1"  # a gateway behind basic auth
    store = make_store(tmp_path / "home", **_lm_env(stub, FLYWHEEL_LM_API_BASE=api_base))
    stub.reset(basic=("stubuser", password))
    try:
        compiled = compile_program(
            ROWS,
            "country -> capital",
            "capitals",
            optimizer="BootstrapFewShot",
            optimizer_params={"max_bootstrapped_demos": 2, "max_labeled_demos": 2},
            progress=False,
            store=store,
        )
        calls_first = len(stub.calls())
        assert calls_first > 0
        assert compiled.version.version == "1" and compiled.program.predictors()[0].demos
        assert any(c.headers["authorization"].startswith("Basic ") for c in stub.calls())

        again = compile_program(
            ROWS,
            "country -> capital",
            "capitals",
            optimizer="BootstrapFewShot",
            optimizer_params={"max_bootstrapped_demos": 2, "max_labeled_demos": 2},
            progress=False,
            store=store,
        )
        assert len(stub.calls()) - calls_first < calls_first  # LM_CACHE_COMPILE: the rerun hits the cache
        result = gate("capitals", again.version.version, ROWS, store=store)
        assert result.rows == len(ROWS) and result.passed
        assert len(stub.calls()) > calls_first

        runtime = get_runtime()
        answer = runtime.predict("capitals", {"country": "Japan"})
        assert answer.result["capital"]
        # a program registered with an LM that sends a secret header of its own
        headed = dspy.LM(
            runtime.settings.flywheel_lm,
            api_base=stub.url,
            cache=False,
            num_retries=0,
            extra_headers={"X-Org-Secret": header},
        )
        registry.register_program(zoo.capital_qa(), "headed", lm=headed, store=store)
        runtime.lm = headed
        runtime.predict("headed", {"country": "Kenya"}, "1")
        assert stub.calls()[-1].headers["x-org-secret"] == header
        assert runtime.outbox.flush()
        runtime.close()
    finally:
        reset_runtime()  # closed: whatever it queued is written before the files are searched
    assert _files_containing(store.settings.flywheel_home, [KEY, password, header]) == []


def test_error_messages_lose_the_credentials_a_client_quotes() -> None:
    from flywheel.lm import redact

    message = (
        "failed to connect to user:pa55w0rd@127.0.0.1:9: refused; http://u:p%40ss@host/v1 "
        f"Authorization: Bearer {KEY}"
    )
    cleaned = redact(message)
    assert "pa55w0rd" not in cleaned and "p%40ss" not in cleaned and KEY not in cleaned
    assert "127.0.0.1:9" in cleaned and "host/v1" in cleaned
    assert redact("no capital parser for 'Peru' at 12:30") == "no capital parser for 'Peru' at 12:30"


@pytest.mark.slow
def test_flywheel_serve_workers_on_the_stub(
    stub: OpenAIStub, tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    """`flywheel serve --workers 2` processes serve a forward-only program through the protocol."""
    import os
    import subprocess

    from processes import free_port as _port
    from processes import serve_command
    from processes import stop_group as _kill
    from processes import wait_until_up as _wait

    env = _lm_env(stub, DEFAULT_MODEL_STAGE="None")
    store = make_store(tmp_path / "home", **env)
    registry.register_program(zoo.capital_qa(), "capital", store=store)
    port = _port()
    url = f"http://127.0.0.1:{port}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.Popen(
        serve_command(port),
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait(f"{url}/health")
        stub.reset()
        for country, capital in [("Japan", "Tokyo"), ("Kenya", "Nairobi")] * 3:
            r = _post(url, "capital", {"country": country})
            assert r.status_code == 200 and r.json()["result"] == {"capital": capital}, r.text
        assert len(stub.calls()) == 6 and {c.headers["authorization"] for c in stub.calls()} == {
            f"Bearer {KEY}"
        }
        stub.reset(failures=[500, 500, 500])
        r = _post(url, "capital", {"country": "Japan"})
        assert r.status_code == 502 and "(500)" in r.json()["detail"], r.text
    finally:
        _kill(proc)
        stub.reset()
