"""Tests for flywheel.lm: the offline retrieval LM, make_lm and persistable_lm (no mocks)."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import cloudpickle
import dspy
import pydantic
import pytest

from flywheel.lm import NO_DEMOS, NO_FIELD, OFFLINE_MODEL, OfflineLM, make_lm, persistable_lm

Category = Literal["billing", "technical", "account", "shipping"]

# (ticket, category); the first 12 are demos (3 per class), the last 12 are held out.
TICKETS: list[tuple[str, str]] = [
    ("I was charged twice for my subscription this month", "billing"),
    ("The app crashes with an error when I open settings", "technical"),
    ("I forgot my password and cannot log in to my account", "account"),
    ("My package has not arrived and tracking shows no delivery update", "shipping"),
    ("Please refund the extra charge on my credit card", "billing"),
    ("The website shows a 500 error page after the update", "technical"),
    ("How do I change the email address on my account", "account"),
    ("The delivery was sent to the wrong address", "shipping"),
    ("My invoice total is wrong, I was billed for two seats", "billing"),
    ("Uploading a file fails with a timeout error", "technical"),
    ("Please delete my account and my profile data", "account"),
    ("The courier lost my parcel, the package never shipped", "shipping"),
    # held out
    ("Why was my credit card charged again after I cancelled", "billing"),
    ("I need a refund for a double charge on my invoice", "billing"),
    ("Can I get a copy of my invoice for last month billing", "billing"),
    ("The app keeps crashing after the latest update", "technical"),
    ("I get an error message when uploading photos", "technical"),
    ("The page is blank and shows a server error", "technical"),
    ("I cannot log in, my password reset email never came", "account"),
    ("How can I change my username on my profile", "account"),
    ("Someone else accessed my account, please lock my account", "account"),
    ("Where is my package? The tracking number shows nothing", "shipping"),
    ("My order was delivered to the wrong address by the courier", "shipping"),
    ("The parcel arrived damaged, the delivery box was crushed", "shipping"),
]
TRAIN, HELD_OUT = TICKETS[:12], TICKETS[12:]
ADAPTERS = [dspy.ChatAdapter(), dspy.JSONAdapter()]


class Triage(dspy.Signature):
    """Classify a support ticket."""

    ticket: str = dspy.InputField()
    category: Category = dspy.OutputField()


class Point(pydantic.BaseModel):
    x: int
    label: str


class Everything(dspy.Signature):
    """Produce one output of every common type."""

    text: str = dspy.InputField()
    summary: str = dspy.OutputField()
    count: int = dspy.OutputField()
    ratio: float = dspy.OutputField()
    flag: bool = dspy.OutputField()
    tags: list[str] = dspy.OutputField()
    kind: Literal["alpha", "beta"] = dspy.OutputField()
    extra: dict[str, int] = dspy.OutputField()
    point: Point = dspy.OutputField()


FALLBACKS = {
    "summary": NO_DEMOS,
    "count": 0,
    "ratio": 0.0,
    "flag": False,
    "tags": [],
    "kind": "alpha",
    "extra": {},
    "point": Point(x=0, label=""),
}
DEMO_VALUES = [
    {
        "text": "the red fox jumps",
        "summary": "fox",
        "count": 3,
        "ratio": 0.5,
        "flag": True,
        "tags": ["animal", "red"],
        "kind": "beta",
        "extra": {"legs": 4},
        "point": Point(x=1, label="a"),
    },
    {
        "text": "a blue whale swims deep",
        "summary": "whale",
        "count": 7,
        "ratio": 2.5,
        "flag": False,
        "tags": ["sea"],
        "kind": "alpha",
        "extra": {},
        "point": Point(x=2, label="b"),
    },
]


@pytest.fixture
def lm() -> OfflineLM:
    return OfflineLM()


def triage(demos: int) -> dspy.Predict:
    trainset = [dspy.Example(ticket=t, category=c).with_inputs("ticket") for t, c in TRAIN]
    program = dspy.Predict(Triage)
    return dspy.LabeledFewShot(k=demos).compile(program, trainset=trainset) if demos else program


def accuracy(program: dspy.Predict) -> float:
    return sum(program(ticket=t).category == c for t, c in HELD_OUT) / len(HELD_OUT)


@pytest.mark.parametrize("adapter", ADAPTERS, ids=["chat", "json"])
def test_answers_from_most_similar_demo(lm: OfflineLM, adapter: dspy.Adapter) -> None:
    program = dspy.Predict("question -> answer")
    program.demos = [
        dspy.Example(question="What is the capital of France?", answer="Paris"),
        dspy.Example(question="How many legs does a spider have?", answer="eight"),
        dspy.Example(question="What colour is the sky on a clear day?", answer="blue"),
    ]
    with dspy.context(lm=lm, adapter=adapter):
        assert program(question="how many legs has a spider").answer == "eight"
        assert program(question="capital city of france").answer == "Paris"
        assert program(question="sky colour").answer == "blue"
    # one LM call per prediction: the output parsed first time, no adapter fallback
    assert len(lm.history) == 3
    raw = lm.history[-1]["outputs"][0]
    if isinstance(adapter, dspy.JSONAdapter):
        assert json.loads(raw) == {"answer": "blue"}
    else:
        assert raw.startswith("[[ ## answer ## ]]") and raw.endswith("[[ ## completed ## ]]")


@pytest.mark.parametrize("adapter", ADAPTERS, ids=["chat", "json"])
def test_no_demos_gives_documented_fallbacks(lm: OfflineLM, adapter: dspy.Adapter) -> None:
    with dspy.context(lm=lm, adapter=adapter):
        result = dspy.Predict(Everything)(text="anything at all")
    assert {name: result[name] for name in FALLBACKS} == FALLBACKS
    assert len(lm.history) == 1


@pytest.mark.parametrize("adapter", ADAPTERS, ids=["chat", "json"])
def test_every_output_type_is_copied_from_the_demo(lm: OfflineLM, adapter: dspy.Adapter) -> None:
    program = dspy.Predict(Everything)
    program.demos = [dspy.Example(**values) for values in DEMO_VALUES]
    with dspy.context(lm=lm, adapter=adapter):
        whale = program(text="whales swim in the deep sea")
        fox = program(text="a red fox")
    for result, expected in ((whale, DEMO_VALUES[1]), (fox, DEMO_VALUES[0])):
        assert {name: result[name] for name in FALLBACKS} == {k: expected[k] for k in FALLBACKS}
    assert len(lm.history) == 2


@pytest.mark.parametrize("adapter", ADAPTERS, ids=["chat", "json"])
def test_single_and_multiple_string_outputs(lm: OfflineLM, adapter: dspy.Adapter) -> None:
    single = dspy.Predict("topic -> joke")
    multi = dspy.Predict("topic, audience -> joke, punchline")
    multi.demos = [
        dspy.Example(topic="cats", audience="kids", joke="Why did the cat sit?", punchline="To purr."),
        dspy.Example(topic="tax", audience="adults", joke="What is certain?", punchline="Taxes."),
    ]
    with dspy.context(lm=lm, adapter=adapter):
        assert single(topic="dogs").joke == NO_DEMOS
        result = multi(topic="income tax", audience="accountants")
    assert (result.joke, result.punchline) == ("What is certain?", "Taxes.")


@pytest.mark.parametrize("adapter", ADAPTERS, ids=["chat", "json"])
def test_chain_of_thought(lm: OfflineLM, adapter: dspy.Adapter) -> None:
    cot = dspy.ChainOfThought("question -> answer: int")
    with dspy.context(lm=lm, adapter=adapter):
        empty = cot(question="What is 2 + 2?")
        assert (empty.reasoning, empty.answer) == (NO_DEMOS, 0)
        # demos labelled without reasoning: the answer comes from the demo, reasoning is honest
        cot.predict.demos = [
            dspy.Example(question="What is 2 + 2?", answer=4),
            dspy.Example(question="What is 10 times 3?", answer=30),
        ]
        result = cot(question="what is ten times three")
        assert result.answer == 30
        assert result.reasoning.startswith("Answered from demo 2 of 2")
        # a demo with reasoning is copied whole
        cot.predict.demos = [dspy.Example(question="What is 5 - 1?", reasoning="5 - 1 = 4.", answer=4)]
        assert (cot(question="5 - 1?").reasoning, cot(question="5 - 1?").answer) == (
            "5 - 1 = 4.",
            4,
        )


def test_demo_missing_a_field_uses_fallback(lm: OfflineLM) -> None:
    program = dspy.Predict("question -> answer, source")
    program.demos = [dspy.Example(question="What is the capital of France?", answer="Paris")]
    with dspy.context(lm=lm):
        result = program(question="capital of France")
    assert (result.answer, result.source) == ("Paris", NO_FIELD)


def test_more_demos_give_better_accuracy(lm: OfflineLM) -> None:
    with dspy.context(lm=lm):
        zero = triage(0)
        assert {zero(ticket=t).category for t, _ in HELD_OUT} == {"billing"}
        scores = {k: accuracy(triage(k)) for k in (0, 8, 12)}
    assert scores[0] == 0.25
    assert scores[8] > scores[0]
    assert scores[12] >= scores[8]
    assert scores[12] >= 0.75


def test_cloudpickle_round_trip(lm: OfflineLM) -> None:
    program = triage(12)
    restored = cloudpickle.loads(cloudpickle.dumps(lm))
    assert isinstance(restored, OfflineLM)
    assert restored.model == OFFLINE_MODEL and restored.cache is False
    with dspy.context(lm=restored):
        assert program(ticket="the app crashes on start").category == "technical"
    # the same holds for a pickled program + settings, as MLflow's dspy flavor stores them
    lm2, program2 = cloudpickle.loads(cloudpickle.dumps((lm, program)))
    with dspy.context(lm=lm2):
        assert program2(ticket="refund my double charge").category == "billing"


def test_dspy_state_round_trip(lm: OfflineLM) -> None:
    restored = dspy.BaseLM.load_state(lm.dump_state(), allow_custom_lm_class=True)
    assert isinstance(restored, OfflineLM)
    assert isinstance(lm.copy(temperature=0.5), OfflineLM)


def test_concurrent_threads_match_sequential(lm: OfflineLM) -> None:
    program = triage(12)
    tickets = [t for t, _ in HELD_OUT] * 4
    with dspy.context(lm=lm):
        sequential = [program(ticket=t).category for t in tickets]

    def run(ticket: str) -> str:
        with dspy.context(lm=lm):
            return program(ticket=ticket).category

    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(run, tickets))
    assert threaded == sequential


def test_async_matches_sync(lm: OfflineLM) -> None:
    program = triage(12)
    tickets = [t for t, _ in HELD_OUT]

    async def run_all() -> list[str]:
        with dspy.context(lm=lm):
            results = await asyncio.gather(*(program.acall(ticket=t) for t in tickets))
        return [r.category for r in results]

    with dspy.context(lm=lm):
        sequential = [program(ticket=t).category for t in tickets]
    assert asyncio.run(run_all()) == sequential


def test_direct_call_without_signature(lm: OfflineLM) -> None:
    assert lm("hello") == [NO_DEMOS]


def test_make_lm() -> None:
    for spec in (None, "", "offline", " Offline "):
        assert isinstance(make_lm(spec), OfflineLM)
    real = make_lm("openai/gpt-4o-mini")
    assert isinstance(real, dspy.LM) and not isinstance(real, OfflineLM)
    assert real.model == "openai/gpt-4o-mini"
    assert "api_key" not in real.kwargs
    local = make_lm("ollama_chat/llama3.2", api_base="http://localhost:11434")
    assert local.kwargs["api_base"] == "http://localhost:11434"


def test_persistable_lm_strips_secrets() -> None:
    lm = dspy.LM(
        "openai/gpt-4o-mini",
        api_key="sk-secret-123",
        api_base="http://x",
        extra_headers={"Authorization": "Bearer sk-secret-123"},
        access_token="sk-secret-123",
        temperature=0.3,
        max_tokens=500,
    )
    safe = persistable_lm(lm)
    assert isinstance(safe, dspy.LM) and safe is not lm
    assert b"sk-secret-123" not in cloudpickle.dumps(safe)
    assert safe.model == "openai/gpt-4o-mini"
    assert safe.kwargs["api_base"] == "http://x"
    assert (safe.kwargs["temperature"], safe.kwargs["max_tokens"]) == (0.3, 500)
    assert lm.kwargs["api_key"] == "sk-secret-123"  # the live LM is untouched
    reasoning = persistable_lm(dspy.LM("openai/o3-mini", temperature=1.0, max_tokens=16000))
    assert reasoning.kwargs["max_completion_tokens"] == 16000


def test_persistable_lm_passthrough(lm: OfflineLM) -> None:
    assert persistable_lm(None) is None
    assert persistable_lm(lm) is lm
