"""`flywheel demo`: seed the store so a newcomer sees the whole product at once.

Idempotent: each demo version carries a `flywheel.demo_key` tag and is only
registered when no version with that key exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import dspy

from flywheel import registry
from flywheel.demo.data import JOKES, Category, ticket_splits
from flywheel.lm import configured_lm, make_lm
from flywheel.store import Store, connect

JOKE_MODEL = "joke-generator"
ROUTER_MODEL = "support-router"
DEMO_KEY_TAG = "flywheel.demo_key"
MODEL_DESCRIPTIONS = {
    JOKE_MODEL: "Writes a short joke about a topic (input `topic`, output `joke`).",
    ROUTER_MODEL: "Routes a support ticket to billing, technical, account or shipping.",
}


class RouteTicket(dspy.Signature):
    """Route a customer support ticket to the team that handles it."""

    ticket: str = dspy.InputField()
    category: Category = dspy.OutputField()


def joke_program(k: int) -> dspy.Module:
    program = dspy.Predict("topic -> joke")
    program.demos = [dspy.Example(topic=t, joke=j) for t, j in JOKES[:k]]
    return program


def router_program(k: int) -> dspy.Module:
    pool, _ = ticket_splits()
    program = dspy.Predict(RouteTicket)
    program.demos = [dspy.Example(**row) for row in pool[:k]]
    return program


def accuracy(program: dspy.Module, rows: list[dict[str, str]], lm: dspy.BaseLM | None = None) -> float:
    """Share of held-out tickets routed to the right category."""
    if not rows:
        return 0.0
    with dspy.context(lm=lm or make_lm()):
        hits = sum(program(ticket=r["ticket"]).category == r["category"] for r in rows)
    return hits / len(rows)


@dataclass(frozen=True)
class DemoVersion:
    model: str
    key: str
    build: Callable[[], dspy.Module]
    description: str
    stage: str
    tags: dict[str, str]
    alias: str | None = None


def _versions() -> list[DemoVersion]:
    return [
        DemoVersion(
            JOKE_MODEL,
            "joke-v1",
            lambda: joke_program(2),
            "Joke writer, two hand-picked demos.",
            "Production",
            {"optimizer": "LabeledFewShot", "dataset": "demo-jokes", "k": "2"},
        ),
        DemoVersion(
            JOKE_MODEL,
            "joke-v2",
            lambda: joke_program(len(JOKES)),
            "Joke writer, every demo joke.",
            "Production",
            {"optimizer": "LabeledFewShot", "dataset": "demo-jokes", "k": str(len(JOKES))},
            alias="champion",
        ),
        DemoVersion(
            ROUTER_MODEL,
            "router-v1",
            lambda: router_program(4),
            "Ticket router, four labeled demos (a weak start for the loop).",
            "Production",
            {"optimizer": "LabeledFewShot", "dataset": "demo-tickets", "k": "4"},
        ),
    ]


@dataclass(frozen=True)
class DemoSummary:
    created: list[registry.VersionInfo]
    skipped: list[str]


def seed_demo(store: Store | None = None, progress: Callable[[str], None] = print) -> DemoSummary:
    store = store or connect()
    lm = configured_lm(store.settings)
    _, heldout = ticket_splits()
    created: list[registry.VersionInfo] = []
    skipped: list[str] = []
    for spec in _versions():
        existing = _demo_keys(spec.model, store)
        if spec.key in existing:
            skipped.append(spec.key)
            progress(f"  {spec.model}: {spec.key} already registered (version {existing[spec.key]})")
            continue
        program = spec.build()
        tags = dict(spec.tags, **{DEMO_KEY_TAG: spec.key})
        if spec.model == ROUTER_MODEL:
            tags[registry.SCORE_TAG] = f"{accuracy(program, heldout, lm):.3f}"
        info = registry.register_program(
            program,
            spec.model,
            description=spec.description,
            tags=tags,
            lm=lm,
            store=store,
            model_description=MODEL_DESCRIPTIONS[spec.model],
        )
        info = registry.promote(spec.model, info.version, spec.stage, store)
        if spec.alias:
            info = registry.set_alias(spec.model, spec.alias, info.version, store)
        created.append(info)
        score = f", held-out accuracy {info.score:.0%}" if info.score is not None else ""
        progress(f"  {spec.model}: registered version {info.version} -> {info.stage}{score}")
    return DemoSummary(created, skipped)


def _demo_keys(model: str, store: Store) -> dict[str, str]:
    try:
        versions = registry.list_versions(model, store)
    except registry.ModelNotFound:
        return {}
    return {v.tags[DEMO_KEY_TAG]: v.version for v in versions if DEMO_KEY_TAG in v.tags}
