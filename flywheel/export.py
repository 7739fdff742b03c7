"""Rated traces of one model -> training rows (corrections applied) -> DataFrame / CSV / JSON / Examples.

Export reads trace *infos* (tags and assessments): serving stores each
prediction's input and output fields as trace tags. A tag too long for every
backend holds a preview only and is marked truncated (see tracing); for those
rows alone, and only for the rows returned, the complete values are read from
the trace's root span. It asks MLflow only for traces that carry a
`user_rating`, and pages by timestamp (keyset) rather than by offset, so the
cost grows with the rated traces it returns, not with every trace ever served.

Values keep their JSON types (lists, objects, numbers, booleans from typed
programs); a CSV cell holds a non-text value as JSON text. JSON and JSONL write a
number JSON cannot hold (NaN, Infinity: refused by the API, but an older store may
have one) as null (`finite`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

from flywheel import registry
from flywheel.agreement import DEFAULT_POLICY, decide
from flywheel.errors import ExportError
from flywheel.feedback import COMMENT, CORRECTION, RATING, assessment_value, role_of
from flywheel.tracing import ServedCall, complete_calls, model_filter, served_call

if TYPE_CHECKING:
    import dspy
    import pandas as pd

    from flywheel.runtime import Runtime

RATING_FILTERS = ("thumbs_up", "thumbs_down", "any")
FORMATS = ("csv", "json", "jsonl")
PAGE = 5000  # local SQL stores; a tracking server accepts at most REST_PAGE per request
REST_PAGE = 500
RULE = "decision_rule"  # which rule of EXPORT_POLICY produced the row (flywheel.agreement)
META_COLUMNS = ("trace_id", "model_version", "rating", "comment", RULE)
CORRECTED = "corrected"


def _bounds(start: date | None, end: date | None) -> tuple[int | None, int | None]:
    if end is not None and end >= date.max:  # the day after it cannot be represented
        raise ExportError(f"end_date must be before {date.max.isoformat()}")
    lo = int(datetime.combine(start, time.min, UTC).timestamp() * 1000) if start else None
    hi = int(datetime.combine(end + timedelta(days=1), time.min, UTC).timestamp() * 1000) if end else None
    if lo is not None and hi is not None and lo >= hi:
        raise ExportError("start_date must be on or before end_date")
    return lo, hi


def rated_trace_infos(
    runtime: Runtime, model: str, start: date | None = None, end: date | None = None
) -> Iterator[Any]:
    """TraceInfos of `model` with at least one rating, newest first, without spans."""
    from flywheel.trace_sql import supports

    store = runtime.store.tracking
    page = PAGE if supports(store) else REST_PAGE
    lo, hi = _bounds(start, end)
    base = f"{model_filter(model)} AND feedback.`{RATING}` IS NOT NULL"
    if lo is not None:
        base += f" AND trace.timestamp_ms >= {lo}"
    seen: set[str] = set()
    upper = hi
    while True:
        flt = base if upper is None else f"{base} AND trace.timestamp_ms < {upper + 1}"
        infos, _ = store.search_traces(
            locations=[runtime.store.experiment_id],
            filter_string=flt,
            max_results=page,
            order_by=["timestamp_ms DESC"],
        )
        fresh = [i for i in infos if i.trace_id not in seen]
        for info in fresh:
            seen.add(info.trace_id)
            if hi is None or info.request_time < hi:
                yield info
        if len(infos) < page or not fresh:
            return
        upper = min(i.request_time for i in infos)  # keyset: ties re-read, then skipped


def _latest(
    assessments: list[Any], name: str, reviewer: str | None = None, role: str | None = None
) -> Any | None:
    """The newest valid assessment `name`, of `reviewer` in `role` only when given (an end user
    and a reviewer may share an id: one's correction never goes with the other's rating)."""
    valid = [
        a
        for a in assessments
        if a.name == name
        and a.valid is not False
        and (reviewer is None or _reviewer(a) == reviewer)
        and (role is None or role_of(a) == role)
    ]
    return max(valid, key=lambda a: a.create_time_ms or 0, default=None)


def _reviewer(assessment: Any) -> str | None:
    source = assessment.source
    return source.source_id if source is not None else None


def row_from_trace(
    info: Any, call: ServedCall | None = None, policy: tuple[str, ...] = DEFAULT_POLICY
) -> dict[str, Any] | None:
    """One training row: input fields, output fields (correction wins), then provenance.

    The export policy (`agreement.decide`: adjudicated > majority > single > latest, as
    EXPORT_POLICY orders them) picks the rating, and the row's correction and comment are those
    of the same source (id and role), never of a reviewer who disagreed; `decision_rule` names the rule. None
    when no rule of the policy applies. `call` is the complete prediction when the tags were
    truncated (tracing.complete_calls).
    """
    call = call or served_call(info)
    assessments = list(info.assessments or [])
    decision = decide(assessments, policy)
    if call is None or decision is None:
        return None
    reviewer = decision.source
    inputs, outputs = call.inputs, call.outputs
    correction = _latest(assessments, CORRECTION, reviewer, decision.role)
    if correction is not None and isinstance(value := assessment_value(correction), dict):
        outputs = {**outputs, **value}
    comment = _latest(assessments, COMMENT, reviewer, decision.role)
    return {
        **inputs,
        **outputs,
        "trace_id": info.trace_id,
        "model_version": call.version,
        "rating": assessment_value(decision.rating),
        "comment": assessment_value(comment) if comment is not None else None,
        RULE: decision.rule,
        CORRECTED: correction is not None,
    }


READERS = ("auto", "mlflow", "sql")


def export_rows(
    runtime: Runtime,
    model: str,
    *,
    rating: str = "any",
    start_date: date | None = None,
    end_date: date | None = None,
    limit: int | None = None,
    with_corrected: bool = False,
    reader: str = "auto",
) -> list[dict[str, Any]]:
    """Rows for `model` (ModelNotFound when it is not registered); [] when nothing matches.

    `with_corrected` adds a last column saying whether a reviewer's correction replaced
    the served output (the loop learns from a thumbs down only when one did). `reader`: where
    the rated traces come from, `mlflow` (MLflow's `search_traces`, pages), `sql` (one query on
    the store's tables, or FLYWHEEL_EXPORT_DATABASE_URI's: flywheel.export_sql) or `auto` (`sql`
    when it can, else `mlflow`). Both give the same rows.
    """
    from flywheel import export_sql

    if rating not in RATING_FILTERS:
        raise ExportError(f"rating must be one of {', '.join(RATING_FILTERS)}")
    if limit is not None and limit < 1:
        raise ExportError("limit must be a positive number")
    if reader not in READERS:
        raise ExportError(f"reader must be one of {', '.join(READERS)}")
    if reader == "auto":
        reader = "sql" if export_sql.configured(runtime) else "mlflow"
    elif reader == "sql" and not export_sql.configured(runtime):
        raise ExportError(
            "reader 'sql' needs a sqlite or PostgreSQL tracking store in this process, "
            "or FLYWHEEL_EXPORT_DATABASE_URI"
        )
    info_versions = registry.list_versions(model, runtime.store)  # 404 for an unknown model
    lo, hi = _bounds(start_date, end_date)
    runtime.outbox.deliver_available()  # include what was just rated, without stalling
    policy = runtime.settings.export_rules
    if reader == "sql":
        traces = export_sql.rated_traces(runtime, model, lo, hi)
    else:
        traces = rated_trace_infos(runtime, model, start_date, end_date)
    chosen: list[tuple[Any, dict[str, Any]]] = []
    with closing(traces):  # a stream left early closes its cursor
        for info in traces:
            row = row_from_trace(info, policy=policy)
            if row is None or (rating != "any" and row["rating"] != rating):
                continue
            chosen.append((info, row))
            if limit is not None and len(chosen) >= limit:
                break
    # only truncated rows read spans; their rows are made again from the complete values
    complete = complete_calls(runtime.store.tracking, [info for info, _ in chosen])
    rows: list[dict[str, Any]] = []
    for info, first in chosen:
        call = complete.get(info.trace_id)
        row = first if call is None else row_from_trace(info, call, policy)
        if row is None:
            continue
        if not with_corrected:
            del row[CORRECTED]
        rows.append(row)
    return [_ordered(r, info_versions) for r in rows]


def _ordered(row: dict[str, Any], versions: list[registry.VersionInfo]) -> dict[str, Any]:
    version = next(
        (v for v in versions if v.version == row["model_version"]), versions[0] if versions else None
    )
    fields = (version.input_fields + version.output_fields) if version else []
    meta = [*META_COLUMNS, CORRECTED]
    keys = [k for k in fields if k in row] + [k for k in row if k not in fields and k not in meta]
    return {k: row[k] for k in [*keys, *meta] if k in row}


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    writer = csv.DictWriter(out, fieldnames=columns or list(META_COLUMNS))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(finite(v)) for k, v in row.items()})
    return out.getvalue()


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A CSV cell: text as it is, no value as an empty cell, anything else (numbers, booleans,
    lists, objects) as JSON text, so a reader gets the typed value back with json.loads.

    Text a spreadsheet would run as a formula gets a leading ' (OWASP CSV injection); numbers
    stay numbers (-3 is not a formula). JSON and JSONL exports keep every value verbatim.
    """
    if value is None:
        return value
    if not isinstance(value, str):
        return (
            value
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else json.dumps(value, ensure_ascii=False, default=str)
        )
    if value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def finite(value: Any) -> Any:
    """`value` with every number JSON cannot hold (NaN, Infinity, -Infinity) as null.

    The API refuses such numbers (limits.problem), but a store written before it did, or by
    other code, may hold them; JSON and JSONL exports stay valid JSON instead of failing, and a
    CSV cell is empty (as for any missing value) rather than `nan`, which readers take for text.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(finite(rows), ensure_ascii=False, allow_nan=False, default=str)


def to_jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(
        json.dumps(finite(r), ensure_ascii=False, allow_nan=False, default=str) + "\n" for r in rows
    )


def to_dataframe(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(rows)


def to_examples(rows: list[dict[str, Any]], input_fields: list[str]) -> list[dspy.Example]:
    """dspy.Examples ready for a compile: the input fields marked as inputs, provenance dropped."""
    import dspy

    examples = []
    for row in rows:
        data = {k: v for k, v in row.items() if k not in META_COLUMNS}
        examples.append(dspy.Example(**data).with_inputs(*input_fields))
    return examples


def safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "export"
