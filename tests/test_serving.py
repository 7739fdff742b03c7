"""serving.predict as notebooks and widgets call it: the same path as the API, no server needed."""

from __future__ import annotations

import asyncio

import pytest

from flywheel import errors, serving
from flywheel.errors import ModelNotFound
from flywheel.runtime import get_runtime, predict
from flywheel.store import Store

pytestmark = pytest.mark.backends("sqlite", "postgres")


def test_predict_by_every_reference_and_traced(demo_store_rw: Store) -> None:
    by_stage = predict("joke-generator", {"topic": "coffee"})
    assert by_stage.model_version == "2" and by_stage.result["joke"].startswith("Decaf")
    assert predict("joke-generator", {"topic": "coffee"}, "1").model_version == "1"
    assert predict("joke-generator", {"topic": "coffee"}, "champion").model_version == "2"
    runtime = get_runtime()
    assert runtime.outbox.flush()
    info = runtime.store.tracking.get_trace_info(by_stage.trace_id)
    assert info.tags["flywheel.inputs"] == '{"topic": "coffee"}'


def test_predict_inside_a_running_event_loop(demo_store_rw: Store) -> None:
    async def cell() -> serving.Prediction:  # a kernel cell runs inside a loop
        return predict("support-router", {"ticket": "I was charged twice"})

    answer = asyncio.run(cell())
    assert answer.result["category"] in {"billing", "technical", "account", "shipping"}


def test_input_errors_name_the_field(demo_store_rw: Store) -> None:
    with pytest.raises(errors.InputError, match="missing input field 'topic'"):
        predict("joke-generator", {"subject": "x"})
    with pytest.raises(errors.InputError, match="inputs must be an object"):
        predict("joke-generator", ["x"])
    with pytest.raises(ModelNotFound):
        predict("nope", {"topic": "x"})


def test_a_prediction_returns_only_once_its_trace_is_committed(demo_store_rw: Store) -> None:
    from flywheel.outbox import Outbox

    runtime = get_runtime()  # started: the outbox commits from its own thread
    other = Outbox(runtime.outbox.path)  # what another worker process sees: only the file
    for i in range(20):
        answer = predict("support-router", {"ticket": f"Where is parcel {i}?"})
        on_disk = other.pending_trace(answer.trace_id) or other.delivered_model(answer.trace_id)
        assert on_disk, f"prediction {i} answered before its trace was committed"
