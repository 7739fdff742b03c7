"""Programs as researchers write them: custom Modules with only `forward`, pipelines, ReAct, typed fields.

Each builder returns a program with demos, so the offline LM (and the OpenAI stub, which
answers the same way) gives a known answer. This file is not an installed package: its
classes are pickled by value at registration, as a researcher's own module file is.
"""

from __future__ import annotations

import time
from typing import Literal

import dspy
import pydantic


class CapitalQA(dspy.Module):
    """Exactly as the DSPy docs teach: `__init__` builds a ChainOfThought, only `forward`."""

    def __init__(self) -> None:
        super().__init__()
        self.qa = dspy.ChainOfThought("country -> capital")

    def forward(self, country: str) -> dspy.Prediction:
        return self.qa(country=country)


def capital_qa() -> CapitalQA:
    program = CapitalQA()
    program.qa.predict.demos = [
        dspy.Example(country="France", reasoning="France's capital is Paris.", capital="Paris"),
        dspy.Example(country="Japan", reasoning="Japan's capital is Tokyo.", capital="Tokyo"),
        dspy.Example(country="Kenya", reasoning="Kenya's capital is Nairobi.", capital="Nairobi"),
    ]
    return program


def _keywords(text: str) -> list[str]:
    return sorted({w.strip(".,!?").lower() for w in text.split() if len(w) > 3})[:5]


class SummarizePipeline(dspy.Module):
    """Several predictors with plain Python between them (no aforward)."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict("text -> topic: Literal['weather', 'sport', 'food']")
        self.summarize = dspy.ChainOfThought("text, topic, keywords: list[str] -> summary")

    def forward(self, text: str) -> dspy.Prediction:
        topic = self.classify(text=text).topic
        keywords = _keywords(text)  # plain Python between the two steps
        if not keywords:
            keywords = ["none"]
        return self.summarize(text=text, topic=topic, keywords=keywords)


def summarize_pipeline() -> SummarizePipeline:
    program = SummarizePipeline()
    program.classify.demos = [
        dspy.Example(text="Heavy rain and wind tomorrow in the north", topic="weather"),
        dspy.Example(text="The home team won the final in extra time", topic="sport"),
    ]
    program.summarize.predict.demos = [
        dspy.Example(
            text="Heavy rain and wind tomorrow in the north",
            topic="weather",
            keywords=["heavy", "north", "rain", "tomorrow", "wind"],
            reasoning="A forecast.",
            summary="Storm coming north.",
        ),
        dspy.Example(
            text="The home team won the final in extra time",
            topic="sport",
            keywords=["extra", "final", "home", "team", "time"],
            reasoning="A match report.",
            summary="Home team wins final.",
        ),
    ]
    return program


def lookup_capital(country: str) -> str:
    """Look up the capital city of a country."""
    return {"france": "Paris", "japan": "Tokyo", "kenya": "Nairobi"}.get(country.strip().lower(), "unknown")


def capital_agent() -> dspy.ReAct:
    """ReAct with a tool; its trajectory is served too, so the tool's observations are visible."""
    agent = dspy.ReAct("question -> answer", tools=[lookup_capital], max_iters=3)
    agent.react.demos = [
        dspy.Example(
            question="What is the capital of France?",
            trajectory="",
            next_thought="I should look it up.",
            next_tool_name="lookup_capital",
            next_tool_args={"country": "France"},
        )
    ]
    agent.extract.predict.demos = [
        dspy.Example(
            question="What is the capital of France?",
            trajectory="observation Paris",
            reasoning="The tool said Paris.",
            answer="Paris",
        )
    ]
    return agent


class City(pydantic.BaseModel):
    name: str
    population_millions: float


class CityFacts(dspy.Signature):
    """Facts about a country's capital."""

    country: str = dspy.InputField()
    capital: City = dspy.OutputField()
    languages: list[str] = dspy.OutputField()
    continent: Literal["Europe", "Asia", "Africa"] = dspy.OutputField()
    coastal: bool = dspy.OutputField()
    neighbours: int = dspy.OutputField()
    area_km2: float = dspy.OutputField()


class TypedFacts(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.facts = dspy.Predict(CityFacts)

    def forward(self, country: str) -> dspy.Prediction:
        return self.facts(country=country)


FRANCE = {
    "capital": {"name": "Paris", "population_millions": 2.1},
    "languages": ["French"],
    "continent": "Europe",
    "coastal": True,
    "neighbours": 8,
    "area_km2": 551695.0,
}
JAPAN = {
    "capital": {"name": "Tokyo", "population_millions": 14.0},
    "languages": ["Japanese"],
    "continent": "Asia",
    "coastal": True,
    "neighbours": 0,
    "area_km2": 377975.0,
}


def typed_facts() -> TypedFacts:
    program = TypedFacts()
    program.facts.demos = [
        dspy.Example(country="France", **{**FRANCE, "capital": City(**FRANCE["capital"])}),
        dspy.Example(country="Japan", **{**JAPAN, "capital": City(**JAPAN["capital"])}),
    ]
    return program


class Query(pydantic.BaseModel):
    country: str
    detail: Literal["short", "long"] = "short"


class TypedInput(dspy.Module):
    """A pydantic input: the request's JSON object arrives as a `Query`, not a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.qa = dspy.Predict("country -> capital")
        self.qa.demos = [dspy.Example(country="France", capital="Paris")]

    def forward(self, query: Query, times: int = 1) -> dspy.Prediction:
        answer = self.qa(country=query.country).capital
        return dspy.Prediction(capital=" ".join([answer] * times))


class Crashes(dspy.Module):
    """The program's own bug: raises after the LM answered."""

    def __init__(self) -> None:
        super().__init__()
        self.qa = dspy.Predict("country -> capital")

    def forward(self, country: str) -> dspy.Prediction:
        answer = self.qa(country=country)
        raise ValueError(f"no capital parser for {country!r}")
        return answer  # pragma: no cover


class SlowSync(dspy.Module):
    """A forward that blocks (a slow tool, a sync client) for `seconds`."""

    def __init__(self, seconds: float = 2.0) -> None:
        super().__init__()
        self.seconds = seconds
        self.qa = dspy.Predict("country -> capital")

    def forward(self, country: str) -> dspy.Prediction:
        time.sleep(self.seconds)
        return self.qa(country=country)
