"""Any dspy.Module is served: forward-only classes, pipelines, ReAct, typed fields; honest errors.

On the offline LM, in process and over HTTP (the background server); the OpenAI-protocol
runs are in test_openai_protocol.py, the `flywheel serve` processes at the end (slow).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dspy
import httpx
import programs_zoo as zoo
import pytest

from flywheel import errors, registry
from flywheel.http.server import start_background, stop_background
from flywheel.loader import Loader
from flywheel.programs import program_fields, runs_async
from flywheel.runtime import get_runtime
from flywheel.store import Store
from flywheel.tracing import TAG_CHARS

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "capital": (zoo.capital_qa, {}),
    "pipeline": (zoo.summarize_pipeline, {}),
    "agent": (zoo.capital_agent, {"output_fields": ["answer", "trajectory"]}),
    "facts": (zoo.typed_facts, {}),
    "typed-input": (zoo.TypedInput, {}),
    "crashes": (zoo.Crashes, {}),
    "slow": (lambda: zoo.SlowSync(1.5), {}),
}


@pytest.fixture(scope="module")
def zoo_store(tmp_path_factory: pytest.TempPathFactory, make_module_store: Callable[..., Store]) -> Store:
    store = make_module_store(tmp_path_factory.mktemp("zoo") / "home", DEFAULT_MODEL_STAGE="None")
    for name, (build, kwargs) in MODELS.items():
        registry.register_program(build(), name, store=store, **kwargs)
    return store


@pytest.fixture(scope="module")
def url(zoo_store: Store) -> Iterator[str]:
    yield start_background(port=0)
    stop_background()


def _trace(trace_id: str):  # noqa: ANN202
    runtime = get_runtime()
    assert runtime.outbox.flush(), runtime.outbox.last_error
    return runtime.store.client.get_trace(trace_id)


def test_which_programs_run_natively_async() -> None:
    assert runs_async(dspy.Predict("a -> b")) and runs_async(dspy.ChainOfThought("a -> b"))
    assert runs_async(zoo.capital_agent())
    assert not runs_async(zoo.CapitalQA()) and not runs_async(zoo.SummarizePipeline())

    class OverridesForward(dspy.Predict):  # inherits aforward, which would bypass this forward
        def forward(self, **kwargs):  # noqa: ANN003, ANN201
            return super().forward(**kwargs)

    assert not runs_async(OverridesForward("a -> b"))


def test_fields_come_from_forward_or_the_signature() -> None:
    assert program_fields(zoo.capital_qa()) == (["country"], ["capital"])
    assert program_fields(zoo.summarize_pipeline()) == (["text"], ["summary"])
    assert program_fields(zoo.capital_agent()) == (["question"], ["answer"])  # not `trajectory`
    assert program_fields(zoo.TypedInput()) == (["query", "times"], ["capital"])


def test_forward_only_program_served_in_process_with_the_runtime_lm(zoo_store: Store) -> None:
    assert dspy.settings.lm is None  # nothing global: the pool thread must get the request's context
    answer = get_runtime().predict("capital", {"country": "kenya"})
    assert answer.result == {"capital": "Nairobi"}
    trace = _trace(answer.trace_id)
    assert trace.info.state.value == "OK"
    assert trace.info.tags["flywheel.lm_cache"] == "miss"
    assert trace.info.trace_metadata["flywheel.lm_calls"] == "1"


def test_forward_only_program_served_over_http_concurrently(url: str) -> None:
    countries = ["France", "Japan", "Kenya"] * 8

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post("/predict", json={"model": "capital", "inputs": {"country": c}})
                    for c in countries
                )
            )

    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * len(countries)
    expected = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi"}
    assert [r.json()["result"]["capital"] for r in answers] == [expected[c] for c in countries]


def test_multi_step_pipeline(url: str) -> None:
    r = httpx.post(
        f"{url}/predict",
        json={"model": "pipeline", "inputs": {"text": "Rain and strong wind tonight in the north"}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["result"] == {"summary": "Storm coming north."}
    trace = _trace(r.json()["trace_id"])
    assert trace.info.trace_metadata["flywheel.lm_calls"] == "2"  # both steps, under the request's LM


def test_react_with_a_tool(url: str) -> None:
    r = httpx.post(
        f"{url}/predict",
        json={"model": "agent", "inputs": {"question": "What is the capital of France?"}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["answer"] == "Paris"
    trajectory = result["trajectory"]
    assert trajectory["tool_name_0"] == "lookup_capital" and trajectory["observation_0"] == "Paris"


def test_typed_outputs_are_json_when_served_exported_and_in_csv(url: str) -> None:
    r = httpx.post(f"{url}/predict", json={"model": "facts", "inputs": {"country": "France"}}, timeout=60)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result == zoo.FRANCE
    assert isinstance(result["coastal"], bool) and isinstance(result["neighbours"], int)
    assert isinstance(result["area_km2"], float) and isinstance(result["languages"], list)
    trace_id = r.json()["trace_id"]
    assert (
        httpx.post(f"{url}/feedback", json={"trace_id": trace_id, "rating": "thumbs_up"}).status_code == 200
    )

    rows = httpx.get(f"{url}/export", params={"model": "facts"}, timeout=60).json()["rows"]
    row = next(r for r in rows if r["trace_id"] == trace_id)
    assert {k: row[k] for k in zoo.FRANCE} == zoo.FRANCE

    text = httpx.get(f"{url}/export", params={"model": "facts", "format": "csv"}, timeout=60).text
    cells = next(c for c in csv.DictReader(io.StringIO(text)) if c["trace_id"] == trace_id)
    assert cells["country"] == "France"  # text stays text
    typed = {k: v for k, v in zoo.FRANCE.items() if not isinstance(v, str)}
    assert {k: json.loads(cells[k]) for k in typed} == typed  # the rest is JSON text
    assert cells["continent"] == "Europe"


def test_typed_inputs_are_converted_and_checked(url: str) -> None:
    def post(inputs: dict) -> httpx.Response:
        return httpx.post(f"{url}/predict", json={"model": "typed-input", "inputs": inputs}, timeout=60)

    r = post({"query": {"country": "France"}})
    assert r.status_code == 200 and r.json()["result"] == {"capital": "Paris"}
    assert post({"query": {"country": "France"}, "times": "2"}).json()["result"] == {"capital": "Paris Paris"}
    bad = post({"query": {"detail": "long"}})
    assert bad.status_code == 422 and "'query'" in bad.json()["detail"] and "Query" in bad.json()["detail"]


def test_the_programs_own_exception_is_500_traced_and_logged(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="flywheel.server"):
        r = httpx.post(f"{url}/predict", json={"model": "crashes", "inputs": {"country": "Peru"}}, timeout=60)
    assert r.status_code == 500, r.text
    assert r.json()["detail"] == "program error: ValueError: no capital parser for 'Peru'"
    record = next(rec for rec in caplog.records if "crashes" in rec.getMessage())
    logged = record.getMessage()
    assert "Traceback (most recent call last)" in logged and "in forward" in logged
    assert logged.rstrip().endswith("ValueError: no capital parser for 'Peru'")
    trace_id = record.getMessage().split("trace ")[1].split(")")[0]
    trace = _trace(trace_id)
    assert trace.info.state.value == "ERROR"
    assert trace.info.tags["flywheel.error"].startswith("program error: ValueError")
    (span,) = [s for s in trace.data.spans if s.parent_id is None]
    assert span.name == "Crashes.forward" and span.status.status_code.value == "ERROR"
    steps = [s for s in trace.data.spans if s.parent_id is not None]  # what ran before the raise
    assert "Predict.forward" in {s.name for s in steps}
    assert all(s.status.status_code.value == "OK" for s in steps)
    (event,) = [e for e in span.events if e.name == "exception"]
    assert event.attributes["exception.type"] == "ValueError"
    stack = event.attributes["exception.stacktrace"]
    assert "in forward" in stack and stack.rstrip().endswith("ValueError: no capital parser for 'Peru'")


def test_a_sync_program_past_the_timeout_is_504_and_the_pool_stays_bounded(zoo_store: Store) -> None:
    runtime = get_runtime()
    original = runtime.settings
    assert runtime.settings.program_threads == 8
    threads_before = {t.ident for t in threading.enumerate() if t.name.startswith("flywheel-program")}

    async def burst(n: int) -> list[BaseException | object]:
        calls = [runtime.apredict("slow", {"country": f"c{i}"}, timeout=0.3) for i in range(n)]
        return await asyncio.gather(*calls, return_exceptions=True)

    runtime.load("slow")  # loaded before the clock starts
    started = time.monotonic()
    outcomes = asyncio.run(burst(12))  # more than the pool's 8 threads
    elapsed = time.monotonic() - started
    assert all(isinstance(o, errors.PredictTimeout) for o in outcomes), outcomes
    assert elapsed < 1.2, "each request is answered at its own timeout, not when its thread frees (1.5 s)"
    pool = [t for t in threading.enumerate() if t.name.startswith("flywheel-program")]
    assert len(pool) <= 8 and len({t.ident for t in pool} - threads_before) <= 8
    time.sleep(1.6)  # the abandoned calls finish; the queued ones were cancelled and never ran
    answer = runtime.predict("capital", {"country": "Japan"})
    assert answer.result == {"capital": "Tokyo"}
    assert runtime.settings is original
    assert runtime.outbox.flush()
    infos, _ = runtime.store.tracking.search_traces(
        locations=[runtime.store.experiment_id],
        filter_string="tags.`flywheel.model` = 'slow'",
        max_results=100,
    )
    assert len(infos) == 12 and {i.state.value for i in infos} == {"ERROR"}


def test_a_one_megabyte_input_is_served_traced_within_limits_and_exported(url: str, zoo_store: Store) -> None:
    big = "lorem ipsum dolor sit amet " * (1_048_576 // 27 + 1)
    big = big[:1_048_576]
    r = httpx.post(f"{url}/predict", json={"model": "capital", "inputs": {"country": big}}, timeout=120)
    assert r.status_code == 200, r.text[:300]
    trace_id = r.json()["trace_id"]
    assert (
        httpx.post(f"{url}/feedback", json={"trace_id": trace_id, "rating": "thumbs_up"}).status_code == 200
    )
    trace = _trace(trace_id)
    assert trace.info.tags["flywheel.truncated"] == "inputs"
    assert "… [truncated, 1048576 chars]" in json.loads(trace.info.tags["flywheel.inputs"])["country"]
    db = zoo_store.tracking_uri.removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:
        tags = con.execute(
            "SELECT key, length(value) FROM trace_tags WHERE request_id=?", (trace_id,)
        ).fetchall()
        meta = con.execute(
            "SELECT key, length(value) FROM trace_request_metadata WHERE request_id=?", (trace_id,)
        ).fetchall()
    assert tags and max(n for _, n in tags) <= TAG_CHARS, tags
    assert meta and max(n for _, n in meta) <= TAG_CHARS, meta

    rows = httpx.get(f"{url}/export", params={"model": "capital", "format": "json"}, timeout=120).json()[
        "rows"
    ]
    row = next(r for r in rows if r["trace_id"] == trace_id)
    assert row["country"] == big and row["capital"] == r.json()["result"]["capital"]
    csv.field_size_limit(sys.maxsize)  # a reader of 1 MB cells must allow them
    text = httpx.get(f"{url}/export", params={"model": "capital", "format": "csv"}, timeout=120).text
    cells = next(c for c in csv.DictReader(io.StringIO(text)) if c["trace_id"] == trace_id)
    assert cells["country"] == big


_USER_MODULE = """
import dspy


def shout(text):
    return text.strip().title()


class ShopAssistant(dspy.Module):
    def __init__(self):
        super().__init__()
        self.answer = dspy.ChainOfThought("product -> aisle")

    def forward(self, product):
        return self.answer(product=shout(product))


def build():
    program = ShopAssistant()
    program.answer.predict.demos = [
        dspy.Example(product="Milk", aisle="dairy"),
        dspy.Example(product="Apples", aisle="fruit"),
    ]
    return program
"""


def test_a_class_from_the_users_module_file_loads_where_that_file_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zoo_store: Store
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "shop_programs.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(project))
    import shop_programs  # noqa: PLC0415  # the researcher's own file

    version = registry.register_program(shop_programs.build(), "shop", store=zoo_store)
    monkeypatch.delitem(sys.modules, "shop_programs")
    sys.path.remove(str(project))
    (project / "shop_programs.py").unlink()  # nowhere to import it from any more
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = Loader(zoo_store).load("shop", version.version)
    assert type(loaded.program).__name__ == "ShopAssistant"
    answer = get_runtime().predict("shop", {"product": "  fresh milk "}, version.version)
    assert answer.result == {"aisle": "dairy"}


# --- real processes ---------------------------------------------------------------------------

_NOTEBOOK = """
import dspy
import flywheel
import shop_programs  # the researcher's module file, beside this "notebook"


class CapitalQA(dspy.Module):  # defined in the notebook itself (__main__)
    def __init__(self):
        super().__init__()
        self.qa = dspy.ChainOfThought("country -> capital")

    def forward(self, country):
        return self.qa(country=country)


program = CapitalQA()
program.qa.predict.demos = [dspy.Example(country="France", capital="Paris")]
flywheel.register_program(program, "notebook-capital")
flywheel.register_program(shop_programs.build(), "file-shop")
"""


@pytest.mark.slow
def test_flywheel_serve_with_workers_serves_notebook_and_module_file_classes_from_elsewhere(
    tmp_path: Path, make_store: Callable[..., Store]
) -> None:
    from processes import free_port as _port
    from processes import serve_command
    from processes import stop_group as _kill
    from processes import wait_until_up as _wait

    store = make_store(tmp_path / "home", DEFAULT_MODEL_STAGE="None")
    project = tmp_path / "project"
    project.mkdir()
    (project / "shop_programs.py").write_text(_USER_MODULE)
    (project / "notebook.py").write_text(textwrap.dedent(_NOTEBOOK))
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLYWHEEL_HOME=str(store.settings.flywheel_home))
    done = subprocess.run(
        [sys.executable, "notebook.py"], cwd=project, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = _port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        serve_command(port),
        cwd=elsewhere,
        env={**env, "DEFAULT_MODEL_STAGE": "None"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait(f"{url}/health")
        for _ in range(4):  # both workers, whichever answers
            a = httpx.post(
                f"{url}/predict", json={"model": "notebook-capital", "inputs": {"country": "France"}}
            )
            assert a.status_code == 200 and a.json()["result"] == {"capital": "Paris"}, a.text
            b = httpx.post(f"{url}/predict", json={"model": "file-shop", "inputs": {"product": "apples"}})
            assert b.status_code == 200 and b.json()["result"] == {"aisle": "fruit"}, b.text
    finally:
        _kill(proc)
