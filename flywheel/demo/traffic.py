"""`flywheel demo`'s second half: traffic waiting for review, so the rating page has work.

For each demo program: two label schemas of its own (a categorical and a pass/fail, through
`review.define_label`, so MLflow's label-schema API lists them), a few real predictions through
flywheel's serving path (real traces, served by the offline LM), and a review queue whose
reviewers are `DEMO_REVIEWERS` (each answers every item: k = 2).

Idempotent: a model that already has `PER_MODEL` unrated demo predictions gets no more, and the
schemas and queues are created once (a second run finds them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flywheel import review
from flywheel.demo.data import ticket_splits
from flywheel.demo.seed import JOKE_MODEL, ROUTER_MODEL
from flywheel.runtime import Runtime
from flywheel.store import Store
from flywheel.tracing import model_filter

DEMO_REVIEWERS = ("alice", "bob")
PER_MODEL = 6
JOKE_TOPICS = ("cats", "coffee", "mondays", "pizza", "robots", "trains", "rain", "chess")

# the two questions of each demo program besides thumbs, correction and comment
DEMO_LABELS: dict[str, list[dict[str, object]]] = {
    JOKE_MODEL: [
        {
            "label": "tone",
            "kind": review.CATEGORICAL,
            "options": ["witty", "silly", "dry", "off-topic"],
            "instruction": "What kind of joke is it?",
        },
        {"label": "family_friendly", "kind": review.PASS_FAIL, "instruction": "Fine for all ages?"},
    ],
    ROUTER_MODEL: [
        {
            "label": "urgency",
            "kind": review.CATEGORICAL,
            "options": ["low", "normal", "high"],
            "instruction": "How soon does the customer need an answer?",
        },
        {
            "label": "clear_ticket",
            "kind": review.PASS_FAIL,
            "instruction": "Is the ticket clear enough to route?",
        },
    ],
}


@dataclass(frozen=True)
class TrafficSummary:
    predictions: dict[str, int]
    labels: list[str]
    queues: list[str]


def _inputs(model: str) -> list[dict[str, str]]:
    if model == JOKE_MODEL:
        return [{"topic": t} for t in JOKE_TOPICS]
    pool, _ = ticket_splits()
    return [{"ticket": r["ticket"]} for r in pool[-len(JOKE_TOPICS) :]]


def unrated(store: Store, model: str, cap: int = 200) -> list[str]:
    """Trace ids of `model`'s OK predictions nobody has rated yet."""
    infos, _ = store.tracking.search_traces(
        locations=[store.experiment_id],
        filter_string=f"{model_filter(model)} AND trace.status = 'OK'",
        max_results=cap,
    )
    return [i.trace_id for i in infos if not i.assessments]


def seed_traffic(
    store: Store, progress: Callable[[str], None] = print, per_model: int = PER_MODEL
) -> TrafficSummary:
    """Label schemas, predictions waiting for review and a review queue for both demo programs."""
    labels = [
        review.define_label(store, model, **spec).name  # type: ignore[arg-type]
        for model, specs in DEMO_LABELS.items()
        for spec in specs
    ]
    made: dict[str, int] = {}
    with Runtime(store=store).start() as runtime:
        for model in DEMO_LABELS:
            need = max(0, per_model - len(unrated(store, model)))
            for inputs in _inputs(model)[:need]:
                runtime.predict(model, inputs)
            made[model] = need
        if not runtime.outbox.flush(timeout=60):
            progress("  (some traces are still on their way to MLflow)")
    queues = []
    for model in DEMO_LABELS:
        queue = review.create_queue(store, model, DEMO_REVIEWERS, k=len(DEMO_REVIEWERS), blind=False)
        review.assign(store, queue)
        queues.append(queue.name)
        progress(
            f"  {model}: {made[model]} new predictions; {len(unrated(store, model))} wait for review "
            f"in queue {queue.name} (reviewers {', '.join(DEMO_REVIEWERS)})"
        )
    return TrafficSummary(made, labels, queues)
