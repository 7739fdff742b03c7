"""Review for a team, on MLflow's own label schemas and review queues.

Label schemas. Every question a reviewer answers is an MLflow label schema in flywheel's
experiment, and every answer is an MLflow assessment (a `Feedback`, source HUMAN with the
reviewer's id) named like its schema, so the MLflow UI shows both. Schemas are unique per
experiment and all models share flywheel's experiment, so the naming rule is:

- `user_rating`, `corrected_output` and `comment` are shared by every model (the SPEC's
  assessments, written by `feedback.submit` exactly as before);
- a model's own questions are named `<model>:<label>` (`joke-generator:funny`), so two
  models have different questions, and the assessment carries that name too.

Kinds: thumbs (`thumbs_up` / `thumbs_down`, a categorical schema with those two options),
pass/fail (a bool), categorical, numeric (a float within bounds), free text, and the
corrected output (the shared `corrected_output`). The kind is read back from the schema.

Queues. A flywheel queue is an MLflow *custom* review queue named `<model>/<name>` whose
items are the model's traces, whose users are its reviewers (MLflow allows up to 10) and
whose schemas are its questions. Its k (reviewers per item) and blind flag sit in an
experiment tag `flywheel.review_queue.<queue id>`.

Assignment. MLflow's status is one per (queue, item): the first reviewer to finish closes
the item for everyone, and a status write has no compare-and-set. So nobody *takes* items at
review time: each item is assigned up front to exactly k of the queue's reviewers, chosen by
rendezvous hashing of (queue id, trace id, reviewer), and put into those reviewers' MLflow
user queues (`get_or_create_user_queue`). The choice is a pure function of what is in
MLflow, so any host may top a queue up at any moment (adding is idempotent in MLflow) and
two hosts doing it at once write the same thing: an item is never in more than k user
queues, never twice in one, and with k = 1 only one reviewer is ever shown it. A reviewer's
worklist is their user queue's pending items that belong to the queue; finishing one sets
*their* user-queue item complete (a status per reviewer), and once all k are complete the
custom queue's item is set complete too. Nothing is kept on the host: no lease file.

A reviewer who opens the same queue in two tabs sees the same item in both; rating it twice
overrides their own earlier answer (the override chain of `feedback`), so it still counts once.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from flywheel import agreement, feedback
from flywheel.calltree import Step
from flywheel.calltree import steps as calltree_steps
from flywheel.config import ROUTING_RULES
from flywheel.errors import ReviewError
from flywheel.feedback import ADJUDICATOR, COMMENT, CORRECTION, FEEDBACK_ID, RATING, RATINGS
from flywheel.store import Store
from flywheel.tracing import complete_calls, model_filter, served_call, trace_time

if TYPE_CHECKING:
    from flywheel.runtime import Runtime

PAGE = 100
ITEM_PAGE = 1000
UNDO_WAIT = 5.0
COUNT_CAP = 5000  # progress counts stop here ("5000+")
TOP_UP_EVERY = 20.0  # seconds between two look-ups of new traces by one session
QUEUE_TAG = "flywheel.review_queue."  # + queue id: {"model", "k", "blind"}
MAX_REVIEWERS = 10  # MLflow's limit of assigned users per queue

THUMBS, PASS_FAIL, CATEGORICAL, NUMERIC, TEXT = "thumbs", "pass_fail", "categorical", "numeric", "text"
CORRECTED = "corrected_output"
KINDS = (THUMBS, PASS_FAIL, CATEGORICAL, NUMERIC, TEXT)
BUILTIN = (RATING, CORRECTION, COMMENT)


@dataclass(frozen=True)
class Label:
    """One question: an MLflow label schema as flywheel reads it."""

    name: str  # the schema's name and the assessments' name
    kind: str
    options: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    instruction: str | None = None
    schema_id: str = ""

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN

    @property
    def title(self) -> str:
        return self.name.split(":", 1)[1] if ":" in self.name and not self.builtin else self.name

    def check(self, value: Any) -> Any:
        """The value as stored, or ReviewError naming the question."""
        if self.kind in (THUMBS, CATEGORICAL):
            if value not in self.options:
                raise ReviewError(f"{self.title}: choose one of {', '.join(self.options)}, not {value!r}")
            return value
        if self.kind == PASS_FAIL:
            if isinstance(value, str) and value.lower() in ("pass", "fail", "true", "false"):
                return value.lower() in ("pass", "true")
            if not isinstance(value, bool):
                raise ReviewError(f"{self.title}: answer pass or fail, not {value!r}")
            return value
        if self.kind == NUMERIC:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ReviewError(f"{self.title}: {value!r} is not a number") from None
            if not math.isfinite(number) or (
                (self.minimum is not None and number < self.minimum)
                or (self.maximum is not None and number > self.maximum)
            ):
                raise ReviewError(f"{self.title}: {number:g} is outside {self.minimum} to {self.maximum}")
            return number
        if not isinstance(value, str):
            raise ReviewError(f"{self.title}: a text answer is expected")
        return value


def schema_name(model: str, label: str) -> str:
    """The naming rule: a model's own question `label` is the schema (and assessment) `model:label`."""
    label = (label or "").strip()
    if not label or ":" in label or label in BUILTIN:
        raise ReviewError(f"a label needs a name without ':' other than {', '.join(BUILTIN)}; got {label!r}")
    if not model or ":" in model:
        raise ReviewError(f"model name {model!r} cannot name a label schema")
    return f"{model}:{label}"


def _mlflow_input(
    kind: str, options: Iterable[str] | None, minimum: float | None, maximum: float | None
) -> Any:
    from mlflow.genai.label_schemas import InputCategorical, InputNumeric, InputPassFail, InputText

    if kind == THUMBS:
        return InputCategorical(options=list(RATINGS))
    if kind == PASS_FAIL:
        return InputPassFail(positive_label="Pass", negative_label="Fail")
    if kind == CATEGORICAL:
        opts = [str(o) for o in options or []]
        if not opts:
            raise ReviewError("a categorical label needs options")
        return InputCategorical(options=opts)
    if kind == NUMERIC:
        return InputNumeric(min_value=minimum, max_value=maximum)
    if kind in (TEXT, CORRECTED):
        return InputText()
    raise ReviewError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")


def _label(schema: Any) -> Label:
    from mlflow.genai.label_schemas import InputCategorical, InputNumeric, InputPassFail

    spec = schema.input
    common = {"instruction": schema.instruction, "schema_id": schema.schema_id or ""}
    if schema.name == CORRECTION:
        return Label(schema.name, CORRECTED, **common)
    if isinstance(spec, InputCategorical):
        options = tuple(spec.options)
        kind = THUMBS if options == RATINGS else CATEGORICAL
        return Label(schema.name, kind, options, **common)
    if isinstance(spec, InputPassFail):
        return Label(schema.name, PASS_FAIL, (spec.positive_label, spec.negative_label), **common)
    if isinstance(spec, InputNumeric):
        return Label(schema.name, NUMERIC, (), spec.min_value, spec.max_value, **common)
    return Label(schema.name, TEXT, **common)


def _create_schema(
    store: Store,
    name: str,
    kind: str,
    *,
    options: Any = None,
    minimum: float | None = None,
    maximum: float | None = None,
    instruction: str | None = None,
) -> Label:
    """Create the schema, or return the one of that name (two hosts may create it at once)."""
    from mlflow.exceptions import MlflowException

    spec = _mlflow_input(kind, options, minimum, maximum)
    try:
        schema = store.tracking.create_label_schema(
            store.experiment_id, name=name, type="feedback", input=spec, instruction=instruction
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise ReviewError(f"label {name!r}: {exc.message}") from None
        schema = store.tracking.get_label_schema_by_name(store.experiment_id, name)
    return _label(schema)


_BUILTIN_SPECS = {
    RATING: (THUMBS, "Is the output right? thumbs_up or thumbs_down"),
    CORRECTION: (CORRECTED, "The right output (a JSON object of output fields), when it is wrong"),
    COMMENT: (TEXT, "Anything else worth saying"),
}


def builtin_labels(store: Store, schemas: list[Any]) -> list[Label]:
    """The three shared questions (`user_rating`, `corrected_output`, `comment`), made sure of.

    `schemas`: the experiment's label schemas, just listed (`_all_schemas`). Only a missing one
    is created: trying to create all three each time cost a failed insert and a read apiece
    (six requests to a tracking server) on every queue a reviewer opened."""
    known = {s.name: s for s in schemas}
    return [
        _label(known[name]) if name in known else _create_schema(store, name, kind, instruction=instruction)
        for name, (kind, instruction) in _BUILTIN_SPECS.items()
    ]


def define_label(
    store: Store,
    model: str,
    label: str,
    kind: str,
    *,
    options: Iterable[str] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    instruction: str | None = None,
) -> Label:
    """Define (or get) the question `label` of `model`: MLflow schema `model:label` of `kind`
    (thumbs, pass_fail, categorical, numeric, text)."""
    if kind not in KINDS:
        raise ReviewError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    return _create_schema(
        store,
        schema_name(model, label),
        kind,
        options=options,
        minimum=minimum,
        maximum=maximum,
        instruction=instruction,
    )


def _all_schemas(store: Store) -> list[Any]:
    found, token = [], None
    while True:
        page = store.tracking.list_label_schemas(store.experiment_id, max_results=100, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def labels(store: Store, model: str) -> list[Label]:
    """The questions a queue of `model` asks: the three shared ones, then the model's own."""
    schemas = _all_schemas(store)
    shared = {lab.name: lab for lab in builtin_labels(store, schemas)}
    own = sorted((_label(s) for s in schemas if s.name.startswith(f"{model}:")), key=lambda lab: lab.name)
    return [shared[n] for n in BUILTIN] + own


# --- queues -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Queue:
    queue_id: str
    name: str  # MLflow's name: <model>/<short name>
    model: str
    k: int
    reviewers: tuple[str, ...]
    schema_ids: tuple[str, ...] = ()
    blind: bool = True
    since_ms: int = 0  # traces from this time on are its items (topped up by any host)

    def assignees(self, trace_id: str) -> list[str]:
        """The k reviewers of an item: rendezvous hashing, the same answer on every host."""
        ranked = sorted(
            self.reviewers,
            key=lambda r: hashlib.sha256(f"{self.queue_id}\0{trace_id}\0{r}".encode()).hexdigest(),
        )
        return ranked[: self.k]


def queue_name(model: str, name: str = "default") -> str:
    return f"{model}/{name}"


def normalize_reviewer(reviewer: str) -> str:
    """MLflow stores assigned users lower-cased and stripped; so does flywheel, after Unicode
    normalisation without format characters (`feedback.clean_name`)."""
    return feedback.clean_name(reviewer).lower()


def create_queue(
    store: Store,
    model: str,
    reviewers: Iterable[str],
    *,
    k: int = 1,
    name: str = "default",
    label_names: Iterable[str] | None = None,
    blind: bool = True,
    backlog: bool = True,
) -> Queue:
    """Create (or update the reviewers and k of) the review queue `model/name`.

    Its questions are the model's labels at creation (or `label_names`); MLflow freezes a
    queue's questions once it has items. Its items are the model's traces from its creation on
    and, with `backlog`, the traces before it (assigned at once).
    """
    from mlflow.exceptions import MlflowException

    for r in reviewers:
        feedback.check_name(r, "reviewer")  # 422 for a name that reads as an adjudicator's
    people = tuple(dict.fromkeys(normalize_reviewer(r) for r in reviewers if normalize_reviewer(r)))
    if not people or len(people) > MAX_REVIEWERS:
        raise ReviewError(f"a queue needs 1 to {MAX_REVIEWERS} reviewers, not {len(people)}")
    if not 1 <= int(k) <= len(people):
        raise ReviewError(f"k must be between 1 and the number of reviewers ({len(people)}), not {k}")
    questions = labels(store, model)
    if label_names is not None:
        wanted = set(label_names) | {RATING}
        questions = [q for q in questions if q.name in wanted]
    full = queue_name(model, name)
    tracking = store.tracking
    try:
        q = tracking.create_review_queue(
            store.experiment_id,
            name=full,
            queue_type="custom",
            users=list(people),
            schema_ids=[lab.schema_id for lab in questions],
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise ReviewError(f"queue {full!r}: {exc.message}") from None
        q = tracking.get_review_queue_by_name(store.experiment_id, name=full)
        q = tracking.update_review_queue(q.queue_id, users=list(people))
    old = _as_queue(store, q)
    since = old.since_ms if old is not None else int(time.time() * 1000)
    conf = {"model": model, "k": int(k), "blind": blind, "since_ms": since}
    store.client.set_experiment_tag(store.experiment_id, QUEUE_TAG + q.queue_id, json.dumps(conf))
    queue = Queue(q.queue_id, q.name, model, int(k), tuple(q.users), tuple(q.schema_ids), blind, since)
    if backlog and old is None:
        assign(store, queue, _model_traces(store, model, COUNT_CAP))
    return queue


def _as_queue(store: Store, q: Any, tags: dict[str, str] | None = None) -> Queue | None:
    if tags is None:
        tags = store.client.get_experiment(store.experiment_id).tags
    raw = tags.get(QUEUE_TAG + q.queue_id)
    if raw is None:
        return None  # not a flywheel queue
    conf = json.loads(raw)
    return Queue(
        q.queue_id,
        q.name,
        conf["model"],
        int(conf["k"]),
        tuple(q.users),
        tuple(q.schema_ids),
        bool(conf.get("blind", True)),
        int(conf.get("since_ms", 0)),
    )


def get_queue(store: Store, model: str, name: str = "default") -> Queue | None:
    from mlflow.exceptions import MlflowException

    try:
        q = store.tracking.get_review_queue_by_name(store.experiment_id, name=queue_name(model, name))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return _as_queue(store, q)


def list_queues(store: Store, model: str | None = None, reviewer: str | None = None) -> list[Queue]:
    tags = store.client.get_experiment(store.experiment_id).tags
    found, token = [], None
    while True:
        page = store.tracking.list_review_queues(
            store.experiment_id,
            user=normalize_reviewer(reviewer) if reviewer else None,
            max_results=100,
            page_token=token,
        )
        for q in page:
            queue = _as_queue(store, q, tags)
            if queue is not None and (model is None or queue.model == model):
                found.append(queue)
        token = page.token
        if not token:
            return sorted(found, key=lambda x: x.name)


def queue_items(store: Store, queue_id: str, status: str | None = None, cap: int = COUNT_CAP) -> list[Any]:
    """A queue's items (MLflow's ReviewQueueItem), up to `cap`."""
    found: list[Any] = []
    token = None
    while len(found) < cap:
        page = store.tracking.list_review_queue_items(
            queue_id, status=status, max_results=ITEM_PAGE, page_token=token
        )
        found.extend(page)
        token = page.token
        if not token:
            break
    return found[:cap]


def user_queue_id(store: Store, reviewer: str) -> str:
    return store.tracking.get_or_create_user_queue(
        store.experiment_id, user=normalize_reviewer(reviewer)
    ).queue_id


def assign(store: Store, queue: Queue, trace_ids: Iterable[str] | None = None, cap: int = COUNT_CAP) -> int:
    """Put the model's OK traces (or `trace_ids`) into the queue and each into its k reviewers'
    user queues; returns how many were new to the queue. Safe from any host, at any time."""
    if trace_ids is None:
        trace_ids = _model_traces(store, queue.model, cap, queue.since_ms)
    ids = list(dict.fromkeys(trace_ids))
    known = {i.item_id for i in queue_items(store, queue.queue_id, cap=cap * 2)}
    new = [t for t in ids if t not in known]
    if not new:
        return 0
    per_user: dict[str, list[str]] = {}
    for trace_id in new:
        for reviewer in queue.assignees(trace_id):
            per_user.setdefault(reviewer, []).append(trace_id)
    # reviewers' queues first: an item in the shared queue is always already in its k user queues
    for reviewer, items in per_user.items():
        uq = user_queue_id(store, reviewer)
        for start in range(0, len(items), PAGE):
            store.tracking.add_items_to_review_queue(uq, item_ids=items[start : start + PAGE])
    for start in range(0, len(new), PAGE):
        store.tracking.add_items_to_review_queue(queue.queue_id, item_ids=new[start : start + PAGE])
    return len(new)


def _model_traces(store: Store, model: str, cap: int, since_ms: int = 0) -> list[str]:
    ids: list[str] = []
    token = None
    since = f" AND trace.timestamp_ms >= {int(since_ms)}" if since_ms else ""
    while len(ids) < cap:
        infos, token = store.tracking.search_traces(
            locations=[store.experiment_id],
            filter_string=f"{model_filter(model)} AND trace.status = 'OK'{since}",
            max_results=PAGE,
            order_by=["timestamp_ms ASC"],
            page_token=token,
        )
        ids.extend(i.trace_id for i in infos)
        if not token or not infos:
            break
    return ids[:cap]


def _status_in(store: Store, queue_id: str, trace_id: str) -> str:
    """An attached item's status (re-attaching is idempotent in MLflow and returns the row)."""
    row = store.tracking.add_items_to_review_queue(queue_id, item_ids=[trace_id])[0]
    return str(row.status)


def close_if_done(store: Store, queue: Queue, trace_id: str, by: str) -> bool:
    """Set the queue's item complete once each of its k reviewers has completed it."""
    done = all(
        _status_in(store, user_queue_id(store, r), trace_id) == "complete" for r in queue.assignees(trace_id)
    )
    if done:
        store.tracking.set_review_queue_item_status(
            queue.queue_id, item_id=trace_id, status="complete", completed_by=by
        )
    return done


# --- routing: the order a reviewer's items come in ---------------------------------------------
#
# REVIEW_ROUTING lists rules in order; an item goes where the first rule that picks it puts it:
#
# - `thumbs_down`: an end user gave it thumbs down: a valid HUMAN `user_rating` of thumbs_down
#   whose source is neither a reviewer of one of the model's queues nor an adjudicator (what
#   `/feedback` and `feedback.submit` write for the people using the model). Oldest first.
# - `low_judge`: a judge scored it low: a valid assessment from an LLM judge or an mlflow.genai
#   scorer (source LLM_JUDGE or CODE) whose value is below REVIEW_JUDGE_BELOW (a number), false,
#   or one of "no", "fail", "false", "thumbs_down". Lowest score first. flywheel itself writes no
#   judge assessments on served traces; a trace without one is simply not picked by this rule.
# - `stratified`: a seeded random sample per version: each version's items in an order fixed by
#   a hash of (REVIEW_SEED, queue id, trace id), the versions taking turns, so the first n items
#   hold about n / versions of each. The same items give the same order on every host and run.
#
# What no rule picks comes last, oldest first. Each item carries the reason it was picked.

THUMBS_DOWN_RULE, LOW_JUDGE_RULE, STRATIFIED_RULE = ROUTING_RULES
JUDGE_SOURCES = ("LLM_JUDGE", "CODE")
_LOW_WORDS = {"no", "fail", "false", "thumbs_down"}


@dataclass(frozen=True)
class Routed:
    trace_id: str
    rule: str  # a routing rule, or "" (no rule picked it: oldest first)
    reason: str  # shown on the card: "picked because: <reason>"


def _source_type(a: Any) -> str:
    return str(a.source.source_type).rsplit(".", 1)[-1] if a.source is not None else ""


def end_user_thumbs_down(info: Any, reviewers: Iterable[str]) -> bool:
    """An end user (not a queue's reviewer, not an adjudicator) gave the trace thumbs down."""
    people = set(reviewers)
    for a in info.assessments or []:
        if a.name != RATING or a.valid is False or _source_type(a) != "HUMAN":
            continue
        who = normalize_reviewer(a.source.source_id or "")
        if who in people or agreement.is_adjudicator(who):
            continue
        if feedback.assessment_value(a) == "thumbs_down":
            return True
    return False


def low_judge_score(info: Any, below: float) -> tuple[float, str] | None:
    """(score, "name = value") of the trace's lowest judge assessment under `below`, or None."""
    low: tuple[float, str] | None = None
    for a in info.assessments or []:
        if a.valid is False or _source_type(a) not in JUDGE_SOURCES:
            continue
        value = feedback.assessment_value(a)
        if isinstance(value, bool):
            score = None if value else float("-inf")
        elif isinstance(value, (int, float)):
            score = float(value) if math.isfinite(value) and value < below else None
        elif isinstance(value, str):
            score = float("-inf") if value.strip().lower() in _LOW_WORDS else None
        else:
            score = None
        if score is not None and (low is None or score < low[0]):
            low = (score, f"{a.name} = {value}")
    return low


def _infos(store: Store, model: str, trace_ids: list[str]) -> dict[str, Any]:
    """Trace infos (with assessments) of `trace_ids`: one search from the oldest of them on."""
    wanted = set(trace_ids)
    times = [trace_time(t) for t in trace_ids]
    known = [t for t in times if t is not None]
    since = ""
    if known and len(known) == len(times):
        since = f" AND trace.timestamp_ms >= {int(min(known) * 1000) - 60_000}"
    found: dict[str, Any] = {}
    token = None
    while wanted - found.keys():
        infos, token = store.tracking.search_traces(
            locations=[store.experiment_id],
            filter_string=f"{model_filter(model)}{since}",
            max_results=agreement.PAGE,
            order_by=["timestamp_ms ASC"],
            page_token=token,
        )
        found.update((i.trace_id, i) for i in infos if i.trace_id in wanted)
        if not token or not infos:
            break
    for t in wanted - found.keys():  # not found by the search (e.g. a clock far off): one by one
        found[t] = store.tracking.get_trace_info(t)
    return found


def _stratified(queue: Queue, by_version: dict[str, list[str]], seed: int) -> list[str]:
    def key(trace_id: str) -> str:
        return hashlib.sha256(f"{seed}\0{queue.queue_id}\0{trace_id}".encode()).hexdigest()

    def number(version: str) -> tuple[int, str]:
        return (int(version), "") if version.isdigit() else (-1, version)

    strata = [sorted(by_version[v], key=key) for v in sorted(by_version, key=number)]
    out: list[str] = []
    for turn in range(max((len(s) for s in strata), default=0)):
        out.extend(s[turn] for s in strata if turn < len(s))
    return out


def route(
    store: Store,
    queue: Queue,
    trace_ids: Iterable[str],
    rules: Iterable[str] = ROUTING_RULES,
    *,
    judge_below: float = 0.5,
    seed: int = 0,
) -> list[Routed]:
    """`trace_ids` (a reviewer's pending items) in the order the routing `rules` give, each with
    why it is there. A pure function of what is in MLflow (and the seed): same answer on any host."""
    ids = sorted(dict.fromkeys(trace_ids))  # UUIDv7 ids: oldest first
    if not ids:
        return []
    infos = _infos(store, queue.model, ids)
    reviewers = {r for q in list_queues(store, queue.model) for r in q.reviewers} | set(queue.reviewers)
    calls = {t: served_call(infos[t]) for t in ids}
    versions = {t: c.version for t, c in calls.items() if c is not None}
    left = [t for t in ids if t in versions]
    out: list[Routed] = []
    for rule in rules:
        if rule == THUMBS_DOWN_RULE:
            picked = [t for t in left if end_user_thumbs_down(infos[t], reviewers)]
            out.extend(Routed(t, rule, "an end user gave thumbs down") for t in picked)
        elif rule == LOW_JUDGE_RULE:
            scored = {t: low for t in left if (low := low_judge_score(infos[t], judge_below)) is not None}
            picked = sorted(scored, key=lambda t: scored[t][0])  # stable: oldest first among equals
            out.extend(Routed(t, rule, f"a judge scored it low ({scored[t][1]})") for t in picked)
        elif rule == STRATIFIED_RULE:
            by_version: dict[str, list[str]] = {}
            for t in left:
                by_version.setdefault(versions[t], []).append(t)
            picked = _stratified(queue, by_version, seed)
            out.extend(
                Routed(t, rule, f"random sample of v{versions[t]}, stratified by version") for t in picked
            )
        else:
            raise ReviewError(f"unknown routing rule {rule!r}; rules: {', '.join(ROUTING_RULES)}")
        done = set(picked)
        left = [t for t in left if t not in done]
    out.extend(Routed(t, "", "oldest first (no routing rule picked it)") for t in left)
    return out


# --- one reviewer's session -------------------------------------------------------------------


def check_answers(questions: list[Label], answers: dict[str, Any]) -> dict[str, Any]:
    """Answers to a queue's own questions (keyed by schema name or title) as stored: each value
    checked by its question, blanks left out; ReviewError for a question the queue lacks."""
    by_name = {lab.name: lab for lab in questions}
    by_title = {lab.title: lab for lab in questions}
    out = {}
    for key, value in answers.items():
        lab = by_name.get(key) or by_title.get(key)
        if lab is None:
            raise ReviewError(f"{key!r} is not a question of this queue")
        if value is None or value == "":
            continue
        out[lab.name] = lab.check(value)
    return out


@dataclass(frozen=True)
class QueueItem:
    trace_id: str
    model: str
    version: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    request_time: int
    reason: str = ""  # why routing put it here (see `route`); "" outside a reviewer's queue


@dataclass(frozen=True)
class Progress:
    rated: int  # items the queue's k reviewers all finished
    remaining: int  # items still waiting for this reviewer
    mine: int  # rated by this reviewer in this session
    capped: bool = False


@dataclass
class _Done:
    action: str
    item: QueueItem
    receipt: feedback.Receipt | None = None
    answers: dict[str, Any] = field(default_factory=dict)


class ReviewQueue:
    """One reviewer working one queue of a model (optionally one version), in routing order (`route`)."""

    def __init__(
        self,
        runtime: Runtime,
        model: str,
        version: str | None = None,
        reviewer: str = "",
        queue: str = "default",
    ) -> None:
        if version is not None and not str(version).isdigit():
            raise ReviewError(f"version must be a number, not {version!r}")
        self.runtime, self.model, self.version = runtime, model, version
        self.reviewer = normalize_reviewer(reviewer)
        self.queue_name = queue
        self.queue = get_queue(runtime.store, model, queue)
        self.labels = [] if self.queue is None else self._labels()
        self.current: QueueItem | None = None
        self.skipped: list[str] = []
        self.history: list[_Done] = []
        self.mine = 0
        self._topped_up = 0.0
        self._user_queue: str | None = None
        self.undone_answers: dict[str, Any] = {}
        self._route: dict[str, str] = {}
        self._routed_at = -math.inf

    def _labels(self) -> list[Label]:
        assert self.queue is not None
        ids = set(self.queue.schema_ids)
        return [lab for lab in labels(self.runtime.store, self.model) if lab.schema_id in ids]

    @property
    def extra_labels(self) -> list[Label]:
        """The queue's questions beyond thumbs, correction and comment."""
        return [lab for lab in self.labels if not lab.builtin]

    @property
    def assigned(self) -> bool:
        return self.queue is not None and self.reviewer in self.queue.reviewers

    def why_not(self) -> str | None:
        if self.queue is None:
            name = queue_name(self.model, self.queue_name)
            return f"there is no review queue {name!r} yet: an admin creates one"
        if not self.reviewer:
            return "no reviewer is signed in"
        if not self.assigned:
            people = ", ".join(self.queue.reviewers)
            return f"{self.reviewer!r} is not a reviewer of {self.queue.name!r} ({people})"
        return None

    def _uq(self) -> str:
        if self._user_queue is None:
            self._user_queue = user_queue_id(self.runtime.store, self.reviewer)
        return self._user_queue

    def top_up(self, force: bool = False) -> int:
        """Assign the model's new traces (any host may; see the module's docstring)."""
        now = time.monotonic()
        if self.queue is None or (not force and now - self._topped_up < TOP_UP_EVERY):
            return 0
        self._topped_up = now
        return assign(self.runtime.store, self.queue)

    def _candidates(self) -> list[str]:
        """My pending items of this queue, oldest first (trace ids are UUIDv7: time-ordered)."""
        assert self.queue is not None
        store = self.runtime.store
        open_ids = {i.item_id for i in queue_items(store, self.queue.queue_id, status="pending")}
        mine = {i.item_id for i in queue_items(store, self._uq(), status="pending")}
        return sorted(open_ids & mine)

    def next(self) -> QueueItem | None:
        self.runtime.outbox.deliver_available(max_batches=20)
        self.current = None
        if self.why_not() is not None:
            return None
        self.top_up()
        why = self.routed(self._candidates())
        order = [t for t in why if t not in self.skipped] + [t for t in self.skipped if t in why]
        tracking = self.runtime.store.tracking
        for trace_id in order:
            info = tracking.get_trace_info(trace_id)
            call = served_call(info)
            if call is None or (self.version is not None and call.version != str(self.version)):
                continue
            self.current = replace(_item(info, tracking), reason=why[trace_id])
            return self.current
        return None

    def routed(self, candidates: list[str]) -> dict[str, str]:
        """{trace id: reason} of `candidates` in routing order (REVIEW_ROUTING). The order is
        worked out again every TOP_UP_EVERY seconds or when a new item comes, not on each answer."""
        assert self.queue is not None
        fresh = time.monotonic() - self._routed_at < TOP_UP_EVERY
        if not (fresh and set(candidates) <= self._route.keys()):
            settings = self.runtime.settings
            self._route = {
                r.trace_id: r.reason
                for r in route(
                    self.runtime.store,
                    self.queue,
                    candidates,
                    settings.routing_rules,
                    judge_below=settings.review_judge_below,
                    seed=settings.review_seed,
                )
            }
            self._routed_at = time.monotonic()
        wanted = set(candidates)
        return {t: why for t, why in self._route.items() if t in wanted}

    def rate(
        self,
        rating: str,
        corrected_output: dict[str, Any] | None = None,
        comment: str | None = None,
        answers: dict[str, Any] | None = None,
    ) -> feedback.Receipt:
        """Answer the item shown (durable before it returns), mark it done for me, move on."""
        item = self._shown()
        checked = check_answers(self.extra_labels, answers or {})
        receipt = feedback.submit(
            self.runtime,
            item.trace_id,
            rating,
            corrected_output=corrected_output,
            comment=comment,
            user_id=self.reviewer,
            labels=checked,
            role=feedback.REVIEWER,  # counts toward agreement and the export's majority
        )
        self._finish(item.trace_id)
        self.history.append(_Done("rate", item, receipt, checked))
        self.mine += 1
        self.next()
        return receipt

    def _finish(self, trace_id: str) -> None:
        assert self.queue is not None
        store = self.runtime.store
        store.tracking.set_review_queue_item_status(
            self._uq(), item_id=trace_id, status="complete", completed_by=self.reviewer
        )
        if close_if_done(store, self.queue, trace_id, self.reviewer):
            self.runtime.outbox.deliver_available(max_batches=20)  # my answer, to compare it
            flag_disagreements(store, self.queue, [trace_id])

    def skip(self) -> QueueItem | None:
        item = self._shown()
        if item.trace_id in self.skipped:
            self.skipped.remove(item.trace_id)
        self.skipped.append(item.trace_id)
        self.history.append(_Done("skip", item))
        return self.next()

    def undo(self) -> tuple[QueueItem, feedback.Receipt | None]:
        """Take back the last answer (its assessments leave MLflow, the item reopens) or skip."""
        if not self.history:
            raise ReviewError("nothing to undo")
        done = self.history[-1]
        item, receipt = done.item, done.receipt
        if done.action == "rate" and receipt is not None:
            deadline = time.monotonic() + UNDO_WAIT
            while not retract(self.runtime, item.trace_id, receipt):
                if not self.runtime.outbox.deliver_available(max_batches=20):
                    raise ReviewError("MLflow is unreachable, so the rating cannot be taken back now")
                if time.monotonic() > deadline:
                    raise ReviewError("the rating is still on its way to MLflow; try undo again shortly")
                time.sleep(0.2)
            assert self.queue is not None
            tracking = self.runtime.store.tracking
            tracking.set_review_queue_item_status(self._uq(), item_id=item.trace_id, status="pending")
            tracking.set_review_queue_item_status(
                self.queue.queue_id, item_id=item.trace_id, status="pending"
            )
            self.mine -= 1
        elif item.trace_id in self.skipped:
            self.skipped.remove(item.trace_id)
        self.history.pop()
        self.undone_answers = done.answers
        self.current = item
        return item, receipt

    def progress(self) -> Progress:
        if self.why_not() is not None or self.queue is None:
            return Progress(0, 0, self.mine)
        store = self.runtime.store
        rated = len(queue_items(store, self.queue.queue_id, status="complete"))
        remaining = len(self._candidates())
        return Progress(rated, remaining, self.mine, COUNT_CAP in (rated, remaining))

    def close(self) -> None:
        self.current = None

    def _shown(self) -> QueueItem:
        if self.current is None:
            raise ReviewError("no item is shown; the queue is empty")
        return self.current


def _item(info: Any, tracking: Any = None) -> QueueItem:
    """The card for one trace: complete fields, read from the root span only where a tag was cut."""
    call = served_call(info)
    assert call is not None
    if call.truncated and tracking is not None:
        call = complete_calls(tracking, [info]).get(info.trace_id, call)
    return QueueItem(info.trace_id, call.model, call.version, call.inputs, call.outputs, info.request_time)


def steps(runtime: Runtime, trace_id: str) -> list[Step]:
    """A trace's call tree as people read it (the card's "what the LM saw"): spans only, so
    nothing another reviewer answered (assessments) is in it."""
    return calltree_steps(runtime.store.client.get_trace(trace_id).data.spans)


def retract(runtime: Runtime, trace_id: str, receipt: feedback.Receipt) -> int:
    """Delete the assessments one submission wrote (MLflow restores what they overrode); 0 if none yet."""
    tracking = runtime.store.tracking
    info = tracking.get_trace_info(trace_id)
    ours = [a for a in info.assessments or [] if (a.metadata or {}).get(FEEDBACK_ID) == receipt.feedback_id]
    for a in ours:
        tracking.delete_assessment(trace_id, a.assessment_id)
    return len(ours)


# --- adjudication -------------------------------------------------------------------------------
#
# An item whose k answers disagree on a compared question (thumbs, pass/fail, categorical,
# numeric; not free text or the correction) goes to the queue's adjudication queue: an MLflow
# custom review queue named `<model>/<name>/adjudication`, holding the trace. It is flagged the
# moment its last reviewer finishes (and by `flag_disagreements` for what was finished before).
# An adjudicator (an admin: the dashboards ask for FLYWHEEL_ADMIN_KEY when it is set) sees every
# answer and decides; the decision is an assessment like any answer, whose source id is
# `adjudicator:<name>`, and the item is set complete in the adjudication queue.

ADJUDICATION_SUFFIX = "/adjudication"


def compared_labels(store: Store, queue: Queue) -> list[Label]:
    """The queue's questions agreement is measured on: all but free text and the correction."""
    ids = set(queue.schema_ids)
    return [
        lab
        for lab in labels(store, queue.model)
        if lab.schema_id in ids and lab.kind not in (TEXT, CORRECTED)
    ]


def adjudication_queue_id(store: Store, queue: Queue) -> str:
    """The id of `queue`'s adjudication queue (created on first use, by any host)."""
    from mlflow.exceptions import MlflowException

    name = queue.name + ADJUDICATION_SUFFIX
    try:
        return store.tracking.get_review_queue_by_name(store.experiment_id, name=name).queue_id
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        q = store.tracking.create_review_queue(
            store.experiment_id, name=name, queue_type="custom", schema_ids=list(queue.schema_ids)
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        q = store.tracking.get_review_queue_by_name(store.experiment_id, name=name)
    return q.queue_id


def disagreement(store: Store, queue: Queue, trace_id: str) -> list[str]:
    """The compared questions on which the queue's reviewers answered `trace_id` differently."""
    names = [lab.name for lab in compared_labels(store, queue)]
    info = store.tracking.get_trace_info(trace_id)
    answers, _ = agreement.answers_from_infos([info], reviewers=queue.reviewers, labels=names)
    return sorted(
        name
        for name, by_item in answers.items()
        if len({agreement.answer_key(v) for v in by_item.get(trace_id, {}).values()}) > 1
    )


def flag_disagreements(store: Store, queue: Queue, trace_ids: Iterable[str] | None = None) -> list[str]:
    """Put the finished items (or `trace_ids`) whose answers disagree into the adjudication
    queue; returns them. Idempotent: adding an item twice is a no-op in MLflow."""
    if trace_ids is None:
        trace_ids = [i.item_id for i in queue_items(store, queue.queue_id, status="complete")]
    flagged = [t for t in trace_ids if disagreement(store, queue, t)]
    if flagged:
        adj = adjudication_queue_id(store, queue)
        for start in range(0, len(flagged), PAGE):
            store.tracking.add_items_to_review_queue(adj, item_ids=flagged[start : start + PAGE])
    return flagged


@dataclass(frozen=True)
class Answer:
    """One source's answers on a trace: the rating, correction, comment and the queue's questions."""

    source: str
    values: dict[str, Any]
    adjudicated: bool = False


@dataclass(frozen=True)
class AdjudicationItem:
    item: QueueItem
    answers: tuple[Answer, ...]  # every reviewer's (and any earlier decision), nothing hidden
    disagree_on: tuple[str, ...]


def all_answers(store: Store, trace_id: str) -> list[Answer]:
    """Every reviewer's and adjudicator's newest valid answers on a trace (what an adjudicator
    sees); end users' ratings are not reviewers' answers (feedback's name spaces)."""
    info = store.tracking.get_trace_info(trace_id)
    by_source: dict[str, dict[str, Any]] = {}
    roles = (feedback.REVIEWER, feedback.ADJUDICATOR_ROLE)
    for name in {a.name for a in info.assessments or []}:
        for who, a in agreement.newest_per_source(info.assessments or [], name, roles).items():
            by_source.setdefault(who, {})[name] = feedback.assessment_value(a)
    return [
        Answer(who, values, who.startswith(ADJUDICATOR))
        for who, values in sorted(by_source.items(), key=lambda kv: (kv[0].startswith(ADJUDICATOR), kv[0]))
    ]


class Adjudication:
    """An adjudicator working a queue's adjudication queue: every answer shown, one decision each.

    Callers guard it: the dashboards ask for the admin key when FLYWHEEL_ADMIN_KEY is set.
    """

    def __init__(
        self, runtime: Runtime, model: str, queue: str = "default", adjudicator: str = "admin"
    ) -> None:
        self.runtime, self.model = runtime, model
        self.name = normalize_reviewer(adjudicator) or "admin"
        self.source = ADJUDICATOR + self.name
        self.queue = get_queue(runtime.store, model, queue)
        if self.queue is None:
            raise ReviewError(f"there is no review queue {queue_name(model, queue)!r}")
        self.queue_id = adjudication_queue_id(runtime.store, self.queue)
        self.labels = [
            lab for lab in labels(runtime.store, model) if lab.schema_id in set(self.queue.schema_ids)
        ]
        self.current: AdjudicationItem | None = None
        self._swept = 0.0

    def sweep(self, force: bool = False) -> list[str]:
        """Flag the queue's finished items that disagree (an answer may have reached MLflow only
        after its item was finished, from another host's outbox)."""
        now = time.monotonic()
        if not force and now - self._swept < TOP_UP_EVERY:
            return []
        self._swept = now
        assert self.queue is not None
        return flag_disagreements(self.runtime.store, self.queue)

    def pending(self) -> list[str]:
        return sorted(i.item_id for i in queue_items(self.runtime.store, self.queue_id, status="pending"))

    def next(self) -> AdjudicationItem | None:
        """The oldest item waiting for a decision, with every answer."""
        self.runtime.outbox.deliver_available(max_batches=20)
        self.current = None
        self.sweep()
        for trace_id in self.pending():
            if self.open(trace_id) is not None:
                return self.current
        return None

    def open(self, trace_id: str) -> AdjudicationItem | None:
        """Show one waiting item (None when it is not waiting for a decision)."""
        assert self.queue is not None
        store = self.runtime.store
        if trace_id not in self.pending():
            return None
        info = store.tracking.get_trace_info(trace_id)
        if served_call(info) is None:
            return None
        self.current = AdjudicationItem(
            _item(info, store.tracking),
            tuple(all_answers(store, trace_id)),
            tuple(disagreement(store, self.queue, trace_id)),
        )
        return self.current

    def decide(
        self,
        rating: str,
        corrected_output: dict[str, Any] | None = None,
        comment: str | None = None,
        answers: dict[str, Any] | None = None,
    ) -> feedback.Receipt:
        """The decision on the item shown: assessments with source `adjudicator:<name>`; the item
        is complete in the adjudication queue once the decision is in MLflow."""
        if self.current is None:
            raise ReviewError("no item is shown; nothing waits for adjudication")
        checked = check_answers([lab for lab in self.labels if not lab.builtin], answers or {})
        trace_id = self.current.item.trace_id
        receipt = feedback.submit(
            self.runtime,
            trace_id,
            rating,
            corrected_output=corrected_output,
            comment=comment,
            user_id=self.source,
            labels=checked,
            adjudication=True,
        )
        self.runtime.outbox.flush(timeout=10)
        self.runtime.store.tracking.set_review_queue_item_status(
            self.queue_id, item_id=trace_id, status="complete", completed_by=self.source
        )
        self.next()
        return receipt


# --- progress per queue and reviewer ----------------------------------------------------------


@dataclass(frozen=True)
class ReviewerProgress:
    reviewer: str
    done: int  # items of the queue this reviewer completed
    remaining: int  # assigned to them and not done yet
    per_hour: float | None  # between their first and last completion; None before two
    kappa: float | None  # Cohen's kappa of their ratings against consensus, so far


@dataclass(frozen=True)
class QueueProgress:
    queue: str
    done: int  # items all k reviewers finished
    remaining: int
    per_hour: float | None
    kappa: float | None  # Fleiss' kappa of the ratings so far
    reviewers: tuple[ReviewerProgress, ...] = ()
    adjudication: int = 0  # items waiting for an adjudicator


def _per_hour(times: list[int]) -> float | None:
    times = sorted(t for t in times if t)
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / ((times[-1] - times[0]) / 3_600_000)


def queue_progress(runtime: Runtime, queue: Queue) -> QueueProgress:
    """Done, remaining, items per hour and agreement so far, for the queue and each reviewer."""
    store = runtime.store
    items = queue_items(store, queue.queue_id)
    ids = {i.item_id for i in items}
    done = [i for i in items if str(i.status) == "complete"]
    report = agreement.report(
        store,
        queue.model,
        queue=queue.name,
        reviewers=queue.reviewers,
        trace_ids=[i.item_id for i in done],
        labels=[RATING],
    )
    rating = report.labels.get(RATING)
    people = []
    for r in queue.reviewers:
        mine = [i for i in queue_items(store, user_queue_id(store, r)) if i.item_id in ids]
        finished = [i for i in mine if str(i.status) == "complete"]
        vs = rating.reviewer(r) if rating is not None else None
        people.append(
            ReviewerProgress(
                r,
                len(finished),
                len(mine) - len(finished),
                _per_hour([i.completed_time_ms for i in finished]),
                vs.kappa if vs is not None else None,
            )
        )
    try:
        from mlflow.exceptions import MlflowException

        adj = store.tracking.get_review_queue_by_name(
            store.experiment_id, name=queue.name + ADJUDICATION_SUFFIX
        )
        waiting = len(queue_items(store, adj.queue_id, status="pending"))
    except MlflowException:
        waiting = 0
    return QueueProgress(
        queue.name,
        len(done),
        len(items) - len(done),
        _per_hour([i.completed_time_ms for i in done]),
        rating.fleiss_kappa if rating is not None else None,
        tuple(people),
        waiting,
    )
