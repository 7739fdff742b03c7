"""Feedback on a prediction -> MLflow assessments on its trace (source HUMAN, the reviewer's id).

`submit` validates and commits the feedback to the durable outbox before it
answers, so an acknowledged rating survives a killed server and an MLflow
outage. `deliver` (called by the outbox) writes it as assessments named
`user_rating`, `corrected_output` and `comment`. A reviewer who rates the
same trace again overrides their earlier assessment (MLflow's override chain:
the new one points at the old one, which becomes invalid) instead of piling
up duplicates. Each submission carries its own id, so a replay never writes
it twice.

Which trace: one this host served is known locally (queued in the outbox, or
recorded there as delivered) and is accepted at once by any worker, MLflow up or
down. An unknown id is looked up in MLflow; when MLflow does not have it, a
well-formed id younger than FEEDBACK_WAIT (trace ids carry their creation time)
is accepted as *pending* (202): kept durably and delivered once its trace
appears, or dead-lettered by the outbox at the id's time + FEEDBACK_WAIT. An
older or malformed unknown id is TraceNotFound (404). When MLflow cannot be
asked, a young id is pending and any other is Unavailable (503), never a 404.
A correction is checked against the output fields this host knows (its memory,
its last-known-good disk, the queued trace), else the registry's; a pending one
is checked when its trace arrives. Pending feedback is capped: at most
FEEDBACK_PENDING_PER_CLIENT items per client (the user id given, else the caller's
address) and FEEDBACK_PENDING_MAX_BYTES of payload in all wait in the outbox; beyond
that it is TooManyPending (429 with Retry-After) and nothing is stored.

Who: end users and reviewers are two name spaces. Every assessment carries its role in
the metadata `flywheel.role`: `end_user` (the API, the workbench: the default),
`reviewer` (a review queue's session, `review.ReviewQueue.rate`) or `adjudicator`
(`review.Adjudication`, source id `adjudicator:<name>`). An end user "alice" and a
reviewer "alice" are two sources: neither overrides the other's answer, and only
reviewers' answers count toward agreement and the export's `majority` (flywheel.agreement).
An assessment without the marker (written before it existed, or in MLflow's own review
UI) is a reviewer's, or an adjudicator's when its source id starts `adjudicator:`.
User ids are stored NFKC-normalised without format characters (zero-width and the like),
and an id that then reads `adjudicator` followed by a non-alphanumeric is refused (422)
unless it is an adjudication: no lookalike of an adjudicator (`adjudicator：boss`).
"""

from __future__ import annotations

import json
import time
import unicodedata
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flywheel import limits
from flywheel.errors import FeedbackError, TooManyPending, TraceNotFound, Unavailable
from flywheel.outbox import Cap, Item, Outcome, OverCap
from flywheel.store import Store, is_missing
from flywheel.tracing import is_trace_id, served_call, trace_time

if TYPE_CHECKING:
    from flywheel.runtime import Runtime

RATINGS = ("thumbs_up", "thumbs_down")
RATING, CORRECTION, COMMENT = "user_rating", "corrected_output", "comment"
PREFERENCE = "pairwise_preference"  # on both traces of an A/B pair: which one the reviewer preferred
PREFERENCES = ("A", "B", "tie")
FEEDBACK_ID = "flywheel.feedback_id"
ANONYMOUS = "anonymous"
ADJUDICATOR = "adjudicator:"  # source id prefix of an adjudicator's decision (review.Adjudication)
ROLE = "flywheel.role"  # assessment metadata: who wrote it (see the module's docstring)
END_USER, REVIEWER, ADJUDICATOR_ROLE = "end_user", "reviewer", "adjudicator"
ROLES = (END_USER, REVIEWER, ADJUDICATOR_ROLE)


def clean_name(name: str | None) -> str:
    """A user or reviewer id as stored: NFKC-normalised, format characters (Unicode category
    Cf: zero-width spaces and joiners, bidi marks) removed, outer whitespace stripped."""
    text = unicodedata.normalize("NFKC", name or "")
    return "".join(c for c in text if unicodedata.category(c) != "Cf").strip()


def reserved(name: str | None) -> bool:
    """Whether a (cleaned) id reads as an adjudicator's: `adjudicator` then anything but a
    letter or digit (`adjudicator:`, `adjudicator boss`, ...)."""
    word = ADJUDICATOR[:-1]
    folded = clean_name(name).casefold()
    return folded.startswith(word) and not folded[len(word) : len(word) + 1].isalnum()


def check_name(name: str | None, what: str = "user_id") -> str:
    """`name` cleaned (`clean_name`); FeedbackError (422) when it reads as an adjudicator's."""
    cleaned = clean_name(name)
    if reserved(cleaned):
        raise FeedbackError(
            f"{what} {name!r}: ids that read {ADJUDICATOR!r} (after Unicode normalisation) are "
            "reserved for adjudicators' decisions"
        )
    return cleaned


def role_of(assessment: Any) -> str:
    """The role an assessment was written in: its `flywheel.role`, else (no marker: older
    data, MLflow's own review UI) an adjudicator's by its source id, else a reviewer's."""
    role = (assessment.metadata or {}).get(ROLE)
    if role in ROLES:
        return str(role)
    source = assessment.source.source_id if assessment.source is not None else None
    return ADJUDICATOR_ROLE if str(source or "").startswith(ADJUDICATOR) else REVIEWER


@dataclass(frozen=True)
class Receipt:
    trace_id: str
    rating: str
    user_id: str
    corrected_output: dict[str, Any] | None
    comment: str | None
    queued: bool
    feedback_id: str = ""
    pending: bool = False  # its trace is not known yet: accepted durably, lands when the trace does
    role: str = END_USER

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "rating": self.rating,
            "user_id": self.user_id,
            "corrected_output": self.corrected_output,
            "comment": self.comment,
            "queued": self.queued,
            "feedback_id": self.feedback_id,
        }


def _local_trace(runtime: Runtime, trace_id: str) -> tuple[str, str, list[str] | None] | None:
    """(model, version, output fields if the record says) of a trace this host's outbox knows."""
    pending = runtime.outbox.pending_trace(trace_id)
    if pending is not None:
        outputs = pending.get("outputs")
        return pending["model"], pending["version"], list(outputs) if isinstance(outputs, dict) else None
    delivered = runtime.outbox.delivered_model(trace_id)
    if delivered is not None:  # known without asking MLflow, which may be down
        return delivered[0], delivered[1], None
    return None


def _mlflow_trace(runtime: Runtime, trace_id: str) -> tuple[str, str] | None:
    """(model, version) from MLflow; None when MLflow has no such trace, TraceNotFound when it
    has one flywheel did not write, Unavailable when MLflow does not answer."""
    try:
        call = served_call(runtime.store.tracking.get_trace_info(trace_id))
    except Exception as exc:
        if is_missing(exc):
            return None
        raise Unavailable(
            f"trace {trace_id!r} is not known on this host and MLflow cannot be asked "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if call is None:
        raise TraceNotFound(trace_id)  # a trace, but not a flywheel prediction
    return call.model, call.version


def _young(runtime: Runtime, trace_id: str, now: float) -> float | None:
    """The creation time of an id young enough that its trace may still arrive, else None."""
    created = trace_time(trace_id)
    if created is None or now - created >= runtime.settings.feedback_wait:
        return None
    return created


def normalize_correction(corrected: dict[str, Any] | str | None, outputs: list[str]) -> dict[str, Any] | None:
    if corrected is None:
        return None
    if isinstance(corrected, str):
        if len(outputs) != 1:
            raise FeedbackError(
                f"corrected_output must be an object with fields {', '.join(outputs)} for this program"
            )
        corrected = {outputs[0]: corrected}
    if not isinstance(corrected, dict) or not corrected:
        raise FeedbackError("corrected_output must name at least one output field")
    unknown = [k for k in corrected if k not in outputs]
    if unknown:
        raise FeedbackError(
            f"corrected_output names {', '.join(map(repr, unknown))}, which the program does not output "
            f"(outputs: {', '.join(outputs)})"
        )
    return corrected


def submit(
    runtime: Runtime,
    trace_id: str,
    rating: str,
    *,
    corrected_output: dict[str, Any] | str | None = None,
    comment: str | None = None,
    user_id: str | None = None,
    labels: dict[str, Any] | None = None,
    adjudication: bool = False,
    role: str = END_USER,
    client: str | None = None,
) -> Receipt:
    """Validate and durably queue feedback; returns once it cannot be lost.

    The receipt is `pending` when the trace is not known yet (the API's 202); pending feedback
    past its caps is TooManyPending. `labels`: answers to a review queue's own questions
    ({schema name: value}, checked by `review`), written as assessments of those names beside
    the rating. `role`: `end_user` (the default: the API, the workbench) or `reviewer` (a review
    queue's session). A user id reading `adjudicator:` is an adjudicator's decision: only
    `adjudication=True` (the admin-guarded review.Adjudication) may write one, so nobody can
    pass for an adjudicator through the API. `client`: the caller's address (the API's peer),
    whose pending feedback is capped when no user id is given.
    """
    if adjudication:
        user_id = clean_name(user_id)
        if not user_id.lower().startswith(ADJUDICATOR):
            raise FeedbackError(f"an adjudication needs a user id starting {ADJUDICATOR!r}")
        role = ADJUDICATOR_ROLE
    else:
        user_id = check_name(user_id)
        if role not in (END_USER, REVIEWER):
            raise FeedbackError(f"role must be {END_USER} or {REVIEWER}, not {role!r}")
    if rating not in RATINGS:
        raise FeedbackError(f"rating must be one of {', '.join(RATINGS)}, not {rating!r}")
    found = (
        limits.problem(corrected_output, "corrected_output")
        or limits.problem(comment, "comment")
        or limits.problem(labels, "labels")
    )
    if found:  # what the API refuses (NaN, Infinity, lone surrogates) is never stored in-process either
        raise FeedbackError(found)
    if not trace_id or not trace_id.strip():
        raise FeedbackError("trace_id is empty")
    trace_id = trace_id.strip()
    if not is_trace_id(trace_id):
        raise TraceNotFound(trace_id)
    now = time.time()
    wait = runtime.settings.feedback_wait
    local = _local_trace(runtime, trace_id)
    model = version = None
    local_outputs: list[str] | None = None
    if local is not None:
        model, version, local_outputs = local
    else:
        young = _young(runtime, trace_id, now)
        try:
            found = _mlflow_trace(runtime, trace_id)
        except Unavailable:
            if young is None:
                raise  # cannot tell: 503, never a 404 because MLflow is down
            found = None
        if found is None and young is None:
            raise TraceNotFound(trace_id)
        if found is not None:
            model, version = found
    pending = model is None
    if pending:
        # unknown yet: checked against the trace's fields when it arrives (deliver)
        correction = _shape_only(corrected_output)
        deadline = (trace_time(trace_id) or now) + wait
    else:
        correction = None
        if corrected_output is not None:
            fields = _output_fields(runtime, model, version, local_outputs)
            correction = normalize_correction(corrected_output, fields)
        deadline = now + wait
    limit = runtime.settings.max_field_chars, runtime.settings.max_trace_chars
    correction = limits.stored(correction, *limit)
    comment = limits.stored((comment or "").strip() or None, *limit)
    user = user_id or ANONYMOUS
    payload = {
        "feedback_id": uuid.uuid4().hex,
        "trace_id": trace_id,
        "user_id": user,
        "rating": rating,
        "corrected_output": correction,
        "comment": comment,
        "role": role,
    }
    if labels:
        payload["labels"] = {
            str(k): limits.stored(v, *limit) if isinstance(v, str) else v for k, v in labels.items()
        }
    cap = None
    if pending:
        payload["unchecked"] = True
        settings = runtime.settings
        who = f"user:{user}" if user_id else f"addr:{client}" if client else f"user:{ANONYMOUS}"
        cap = Cap(who, settings.feedback_pending_per_client, settings.feedback_pending_max_bytes)
    try:
        runtime.outbox.put_durable("feedback", trace_id, payload, deadline=deadline, cap=cap)
    except OverCap as exc:
        raise TooManyPending(
            f"too much feedback is waiting for traces not known yet ({exc}; "
            "FEEDBACK_PENDING_PER_CLIENT, FEEDBACK_PENDING_MAX_BYTES); nothing was stored, retry later",
            exc.retry_after,
        ) from None
    except Exception as exc:
        raise Unavailable(f"the feedback could not be committed to {runtime.outbox.path}: {exc}") from None
    shown = correction if isinstance(correction, dict) or correction is None else None
    return Receipt(trace_id, rating, user, shown, comment, True, payload["feedback_id"], pending, role)


def prefer(
    runtime: Runtime,
    trace_a: str,
    trace_b: str,
    preferred: str,
    *,
    comment: str | None = None,
    user_id: str | None = None,
) -> list[str]:
    """Record a pairwise preference (A, B or tie) as a `pairwise_preference` assessment on both
    traces, each naming its own side and the other trace; returns the two feedback ids.

    Both traces must be known (this host's outbox or MLflow): a preference is made by a person
    looking at both answers, so there is no "pending" case. No rating is written: a preference
    never enters the export or the gate.
    """
    if preferred not in PREFERENCES:
        raise FeedbackError(f"preferred must be one of {', '.join(PREFERENCES)}, not {preferred!r}")
    ids = [(t or "").strip() for t in (trace_a, trace_b)]
    if ids[0] == ids[1]:
        raise FeedbackError("trace_a and trace_b must be two different traces")
    for trace_id in ids:
        if not is_trace_id(trace_id) or (
            _local_trace(runtime, trace_id) is None and _mlflow_trace(runtime, trace_id) is None
        ):
            raise TraceNotFound(trace_id)
    user = check_name(user_id) or ANONYMOUS
    limit = runtime.settings.max_field_chars, runtime.settings.max_trace_chars
    note = limits.stored((comment or "").strip() or None, *limit)
    deadline = time.time() + runtime.settings.feedback_wait
    written = []
    for side, trace_id, other in (("A", ids[0], ids[1]), ("B", ids[1], ids[0])):
        value = {"preferred": preferred, "side": side, "other": other, "won": preferred == side}
        payload = {
            "feedback_id": uuid.uuid4().hex,
            "trace_id": trace_id,
            "user_id": user,
            "rating": None,
            "corrected_output": None,
            "comment": note,
            "preference": value,
            "role": END_USER,
        }
        try:
            runtime.outbox.put_durable("feedback", trace_id, payload, deadline=deadline)
        except Exception as exc:
            raise Unavailable(
                f"the preference could not be committed to {runtime.outbox.path}: {exc}"
            ) from None
        written.append(payload["feedback_id"])
    return written


def _output_fields(runtime: Runtime, model: str, version: str, local: list[str] | None) -> list[str]:
    """The version's output fields: this host's memory or disk, the queued trace, the registry."""
    try:
        return runtime.programs.output_fields(model, version)
    except Unavailable:
        if local:
            return local
        raise


def _shape_only(corrected: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
    """What can be checked of a correction before its program is known."""
    if corrected is None or isinstance(corrected, str):
        return corrected
    if not isinstance(corrected, dict) or not corrected:
        raise FeedbackError("corrected_output must name at least one output field")
    return corrected


def deliver(store: Store, items: list[Item]) -> Outcome:
    """Write queued feedback to MLflow; returns the outbox ids now stored (once each).

    Feedback whose trace is not in MLflow yet is left for a later pass (the outbox
    dead-letters it after its deadline); MLflow not answering raises, so nothing is
    dead-lettered during an outage. A pending correction that does not fit its trace's
    output fields is a dead letter at once.
    """
    from mlflow.entities import AssessmentSource, Feedback

    tracking = store.tracking
    done: list[int] = []
    dead: dict[int, str] = {}
    for item in items:
        p = item.payload
        try:
            info = tracking.get_trace_info(p["trace_id"])
        except Exception as exc:
            if is_missing(exc):
                continue  # its trace is not in MLflow yet: retried on a later pass
            raise
        if p.get("unchecked") and p.get("corrected_output") is not None:
            fields = _trace_fields(store, info)
            try:
                p = {**p, "corrected_output": normalize_correction(p["corrected_output"], fields)}
            except FeedbackError as exc:
                dead[item.id] = str(exc)
                continue
        existing = list(info.assessments or [])
        already = {a.name for a in existing if (a.metadata or {}).get(FEEDBACK_ID) == p["feedback_id"]}
        source = AssessmentSource(source_type="HUMAN", source_id=p["user_id"])
        role = p.get("role")  # None: queued before roles existed (read as a reviewer's, `role_of`)
        metadata = {FEEDBACK_ID: p["feedback_id"], **({ROLE: role} if role else {})}
        values = {
            RATING: p["rating"],
            CORRECTION: p["corrected_output"],
            COMMENT: p["comment"],
            PREFERENCE: p.get("preference"),
            **{k: v for k, v in (p.get("labels") or {}).items() if k not in (RATING, CORRECTION, COMMENT)},
        }
        for name, value in values.items():
            if value is None or name in already:
                continue
            previous = _latest_valid(existing, name, p["user_id"], role)
            assessment = Feedback(
                name=name,
                value=value,
                source=source,
                metadata=metadata,
                overrides=previous.assessment_id if previous else None,
            )
            assessment.trace_id = p["trace_id"]
            tracking.create_assessment(assessment)
        done.append(item.id)
    return Outcome(done, dead)


def _trace_fields(store: Store, info: Any) -> list[str]:
    """The output fields of the program a stored trace records (its outputs, else its version's)."""
    call = served_call(info)
    if call is None:
        return []
    if call.outputs:
        return list(call.outputs)
    from flywheel import registry

    try:
        return registry.get_version(call.model, call.version, store).output_fields
    except Exception:
        return []


def _latest_valid(assessments: list[Any], name: str, user: str, role: str | None) -> Any | None:
    """The newest valid assessment `name` of this user in this role (what a new one overrides)."""
    role = role or REVIEWER
    mine = [
        a
        for a in assessments
        if a.name == name
        and a.valid is not False
        and a.source is not None
        and str(a.source.source_type) in ("HUMAN", "AssessmentSourceType.HUMAN")
        and a.source.source_id == user
        and role_of(a) == role
    ]
    return max(mine, key=lambda a: a.create_time_ms or 0, default=None)


def assessment_value(assessment: Any) -> Any:
    value = assessment.value
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
