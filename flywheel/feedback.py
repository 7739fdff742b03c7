"""Feedback on a prediction -> MLflow assessments on its trace (source HUMAN, the reviewer's id).

`submit` validates and commits the feedback to the durable outbox before it
answers, so an acknowledged rating survives a killed server and an MLflow
outage. `deliver` (called by the outbox) writes it as assessments named
`user_rating`, `corrected_output` and `comment`. A reviewer who rates the
same trace again overrides their earlier assessment (MLflow's override chain:
the new one points at the old one, which becomes invalid) instead of piling
up duplicates. Each submission carries its own id, so a replay never writes
it twice.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flywheel import limits
from flywheel.errors import FeedbackError, TraceNotFound
from flywheel.outbox import Item
from flywheel.store import Store
from flywheel.tracing import served_call

if TYPE_CHECKING:
    from flywheel.runtime import Runtime

RATINGS = ("thumbs_up", "thumbs_down")
RATING, CORRECTION, COMMENT = "user_rating", "corrected_output", "comment"
FEEDBACK_ID = "flywheel.feedback_id"
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Receipt:
    trace_id: str
    rating: str
    user_id: str
    corrected_output: dict[str, Any] | None
    comment: str | None
    queued: bool
    feedback_id: str = ""

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


def trace_model(runtime: Runtime, trace_id: str) -> tuple[str, str]:
    """(model, version) of a trace, from the outbox when it is not in MLflow yet."""
    pending = runtime.outbox.pending_trace(trace_id)
    if pending is not None:
        return pending["model"], pending["version"]
    delivered = runtime.outbox.delivered_model(trace_id)
    if delivered is not None:  # known without asking MLflow, which may be down
        return delivered
    try:
        call = served_call(runtime.store.tracking.get_trace_info(trace_id))
    except Exception:
        raise TraceNotFound(trace_id) from None
    if call is None:
        raise TraceNotFound(trace_id)  # a trace, but not a flywheel prediction
    return call.model, call.version


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
) -> Receipt:
    """Validate and durably queue feedback; returns once it cannot be lost."""
    if rating not in RATINGS:
        raise FeedbackError(f"rating must be one of {', '.join(RATINGS)}, not {rating!r}")
    if not trace_id or not trace_id.strip():
        raise FeedbackError("trace_id is empty")
    model, version = trace_model(runtime, trace_id.strip())
    outputs = runtime.programs.output_fields(model, version)
    limit = runtime.settings.max_field_chars, runtime.settings.max_trace_chars
    correction = limits.stored(normalize_correction(corrected_output, outputs), *limit)
    comment = limits.stored((comment or "").strip() or None, *limit)
    user = (user_id or "").strip() or ANONYMOUS
    payload = {
        "feedback_id": uuid.uuid4().hex,
        "trace_id": trace_id.strip(),
        "user_id": user,
        "rating": rating,
        "corrected_output": correction,
        "comment": comment,
    }
    runtime.outbox.put_durable("feedback", payload["trace_id"], payload)
    return Receipt(payload["trace_id"], rating, user, correction, comment, True, payload["feedback_id"])


def deliver(store: Store, items: list[Item]) -> list[int]:
    """Write queued feedback to MLflow; returns the outbox ids now stored (once each)."""
    from mlflow.entities import AssessmentSource, Feedback

    tracking = store.tracking
    done: list[int] = []
    for item in items:
        p = item.payload
        try:
            info = tracking.get_trace_info(p["trace_id"])
        except Exception:
            continue  # its trace is not in MLflow yet: retried on the next pass
        existing = list(info.assessments or [])
        already = {a.name for a in existing if (a.metadata or {}).get(FEEDBACK_ID) == p["feedback_id"]}
        source = AssessmentSource(source_type="HUMAN", source_id=p["user_id"])
        values = {RATING: p["rating"], CORRECTION: p["corrected_output"], COMMENT: p["comment"]}
        for name, value in values.items():
            if value is None or name in already:
                continue
            previous = _latest_valid(existing, name, p["user_id"])
            assessment = Feedback(
                name=name,
                value=value,
                source=source,
                metadata={FEEDBACK_ID: p["feedback_id"]},
                overrides=previous.assessment_id if previous else None,
            )
            assessment.trace_id = p["trace_id"]
            tracking.create_assessment(assessment)
        done.append(item.id)
    return done


def _latest_valid(assessments: list[Any], name: str, user: str) -> Any | None:
    mine = [
        a
        for a in assessments
        if a.name == name
        and a.valid is not False
        and a.source is not None
        and str(a.source.source_type) in ("HUMAN", "AssessmentSourceType.HUMAN")
        and a.source.source_id == user
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
