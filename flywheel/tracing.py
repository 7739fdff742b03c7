"""How a prediction becomes an MLflow trace.

flywheel does not use MLflow's asynchronous exporter (it silently drops traces
under bursts). A prediction becomes a `TraceRecord`, a plain JSON-able record
with a trace id chosen up front, so the id can be returned with the answer at
once. The record goes to the durable outbox, and the outbox writes it to MLflow
in batches as a complete trace: one root span whose inputs and outputs are the
program's fields, tags naming the model and version, and the logged model id
in the trace metadata (so each trace links to the right logged model even
when several versions are loaded in one process).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flywheel.outbox import Item
    from flywheel.store import Store

MODEL_TAG = "flywheel.model"
MODEL_KEY_TAG = "flywheel.model_key"  # a hash of the name: user text never enters a filter string
VERSION_TAG = "flywheel.model_version"
INPUTS_TAG = "flywheel.inputs"
OUTPUTS_TAG = "flywheel.outputs"
TRUNCATED_TAG = "flywheel.truncated"  # names the field tags cut short: read those from the root span
TAG_CHARS = 4000
"""The longest inputs/outputs tag flywheel stores: MLflow's REST client cuts trace tags at 4,096
characters without saying so, and PostgreSQL's tag column holds 8,000 (sqlite has no limit)."""
TRUNCATION_MARK = "...[truncated]"
SPAN_NAME = "predict"
_PREVIEW = 1000
_log = logging.getLogger("flywheel.tracing")


def model_key(model: str) -> str:
    return hashlib.sha256(model.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class ServedCall:
    """What a flywheel trace's tags say about the prediction (read without span bodies)."""

    model: str
    version: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]


def served_call(info: Any, tracking: Any = None) -> ServedCall | None:
    """The prediction a TraceInfo records, or None for a trace flywheel did not write.

    Fields too long for a tag (TRUNCATED_TAG names them) are read from the trace's root span
    through `tracking` (the tracking store); without it they come back as {}.
    """
    tags = info.tags or {}
    if MODEL_TAG not in tags:
        return None
    cut = set(filter(None, tags.get(TRUNCATED_TAG, "").split(",")))
    fields = {
        tag: {} if tag in cut else json.loads(tags.get(tag) or "{}") for tag in (INPUTS_TAG, OUTPUTS_TAG)
    }
    if cut and tracking is not None:
        root = next(s for s in tracking.get_trace(info.trace_id).data.spans if s.parent_id is None)
        full = {INPUTS_TAG: root.inputs, OUTPUTS_TAG: root.outputs}
        fields.update({tag: full[tag] or {} for tag in cut if tag in full})
    return ServedCall(tags[MODEL_TAG], tags.get(VERSION_TAG, ""), fields[INPUTS_TAG], fields[OUTPUTS_TAG])


def _tag_value(value: Any) -> tuple[str, bool]:
    """A field's JSON for its tag, cut to TAG_CHARS (marked) when longer; and whether it was cut."""
    text = json.dumps(value, default=str)
    if len(text) <= TAG_CHARS:
        return text, False
    return text[: TAG_CHARS - len(TRUNCATION_MARK)] + TRUNCATION_MARK, True


def model_filter(model: str, version: str | int | None = None) -> str:
    """An MLflow trace filter for one model's predictions: the name enters as a hash (MLflow's
    filter syntax cannot escape quotes) and the version as a number."""
    flt = f"tags.`{MODEL_KEY_TAG}` = '{model_key(model)}'"
    return flt if version is None else f"{flt} AND tags.`{VERSION_TAG}` = '{int(version)}'"


def new_trace_id() -> str:
    return "tr-" + uuid.uuid4().hex


@dataclass(frozen=True)
class TraceRecord:
    trace_id: str
    model: str
    version: str
    model_id: str | None
    inputs: dict[str, Any]
    outputs: dict[str, Any] | None
    start_ns: int
    end_ns: int
    error: str | None = None

    @classmethod
    def ok(
        cls,
        trace_id: str,
        info: Any,
        inputs: dict[str, Any],
        outputs: dict[str, Any],
        start_ns: int,
        end_ns: int,
    ) -> TraceRecord:
        return cls(trace_id, info.name, info.version, info.model_id, inputs, outputs, start_ns, end_ns)

    @classmethod
    def failed(
        cls, trace_id: str, info: Any, inputs: dict[str, Any], start_ns: int, error: str
    ) -> TraceRecord:
        import time

        return cls(
            trace_id, info.name, info.version, info.model_id, inputs, None, start_ns, time.time_ns(), error
        )

    def to_dict(self) -> dict[str, Any]:
        """The outbox payload: plain JSON types, with `model` and `version` at the top level."""
        return asdict(self)

    def tags(self) -> dict[str, str]:
        """Trace tags: export reads inputs and outputs from here, and from the span body only for
        a field longer than TAG_CHARS (cut, marked, and named in TRUNCATED_TAG)."""
        tags = {
            MODEL_TAG: self.model,
            MODEL_KEY_TAG: model_key(self.model),
            VERSION_TAG: self.version,
            "mlflow.traceName": SPAN_NAME,
        }
        cut = []
        for tag, value in ((INPUTS_TAG, self.inputs), (OUTPUTS_TAG, self.outputs)):
            if tag == OUTPUTS_TAG and value is None:
                continue
            tags[tag], truncated = _tag_value(value)
            if truncated:
                cut.append(tag)
        if cut:
            tags[TRUNCATED_TAG] = ",".join(cut)
        return tags

    def to_mlflow(self, experiment_id: str) -> tuple[Any, list[Any]]:
        """(TraceInfo, [root Span]) ready for the tracking store's start_trace + log_spans."""
        from mlflow.entities import Span, TraceInfo, TraceLocation, TraceState
        from mlflow.entities.span import SpanType
        from mlflow.tracing.constant import (
            TRACE_SCHEMA_VERSION,
            TRACE_SCHEMA_VERSION_KEY,
            SpanAttributeKey,
            TraceMetadataKey,
        )
        from mlflow.tracing.utils import build_otel_context
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import Status, StatusCode

        request = json.dumps(self.inputs, default=str)
        response = json.dumps(self.outputs, default=str) if self.outputs is not None else ""
        metadata = {
            TRACE_SCHEMA_VERSION_KEY: str(TRACE_SCHEMA_VERSION),
            TraceMetadataKey.INPUTS: request[:_PREVIEW],
            TraceMetadataKey.OUTPUTS: response[:_PREVIEW],
        }
        if self.model_id:
            metadata[TraceMetadataKey.MODEL_ID] = self.model_id
        info = TraceInfo(
            trace_id=self.trace_id,
            trace_location=TraceLocation.from_experiment_id(experiment_id),
            request_time=self.start_ns // 1_000_000,
            execution_duration=max(0, (self.end_ns - self.start_ns) // 1_000_000),
            state=TraceState.ERROR if self.error else TraceState.OK,
            request_preview=request[:_PREVIEW],
            response_preview=(response or self.error or "")[:_PREVIEW],
            trace_metadata=metadata,
            tags=self.tags(),
        )
        attributes = {
            SpanAttributeKey.REQUEST_ID: json.dumps(self.trace_id),
            SpanAttributeKey.SPAN_TYPE: json.dumps(SpanType.CHAIN),
            SpanAttributeKey.INPUTS: request,
            SpanAttributeKey.OUTPUTS: response or "null",
            "flywheel.model": json.dumps(self.model),
            "flywheel.model_version": json.dumps(self.version),
        }
        status = Status(StatusCode.ERROR, self.error) if self.error else Status(StatusCode.OK)
        otel = ReadableSpan(
            name=SPAN_NAME,
            context=build_otel_context(int(self.trace_id[3:], 16), int(self.trace_id[3:19], 16) or 1),
            parent=None,
            start_time=self.start_ns,
            end_time=max(self.end_ns, self.start_ns),
            attributes=attributes,
            status=status,
            resource=Resource.get_empty(),
        )
        return info, [Span(otel)]


def write_traces(store: Any, experiment_id: str, records: list[TraceRecord]) -> list[str]:
    """Write complete traces to the tracking store (sqlite, PostgreSQL or a tracking server).

    Idempotent: a trace already stored (a replay after a crash) is not written
    twice, so the outbox delivers each trace exactly once. SQL stores take one
    batched transaction; anything else, or any error there, the public path.
    """
    from flywheel import trace_sql

    if trace_sql.supports(store):
        try:
            done = trace_sql.existing_ids(store, [r.trace_id for r in records])
            todo = [r for r in records if r.trace_id not in done]
            if todo:
                trace_sql.write_batch(store, [r.to_mlflow(experiment_id) for r in todo])
            return [r.trace_id for r in todo]
        except Exception as exc:  # internals moved: fall back, slower but public
            _log.warning("batched trace write failed (%s); using MLflow's public path", exc)
    return _write_public(store, experiment_id, records)


PUBLIC_CHUNK = 50
"""Traces per `log_spans` request on the public path: a tracking server under load answered a
500-trace request after MLflow's 10 s client timeout, so the whole batch was retried again and
again (benchmarks/scale_bench.py); small requests keep each one short."""


def _write_public(store: Any, experiment_id: str, records: list[TraceRecord]) -> list[str]:
    for start in range(0, len(records), PUBLIC_CHUNK):
        _write_public_chunk(store, experiment_id, records[start : start + PUBLIC_CHUNK])
    return [r.trace_id for r in records]


def _write_public_chunk(store: Any, experiment_id: str, records: list[TraceRecord]) -> None:
    spans: list[Any] = []
    for record in records:
        info, record_spans = record.to_mlflow(experiment_id)
        store.start_trace(info)  # an upsert: replaying a stored trace changes nothing
        spans.extend(record_spans)
    if spans:
        try:
            store.log_spans(experiment_id, spans)
        except NotImplementedError:
            # MLflow's REST store caches a failed /version probe (e.g. made during an outage)
            # for the life of the process; forget it and ask the server again.
            from flywheel.store import forget_server_version

            forget_server_version(store)
            store.log_spans(experiment_id, spans)


def deliver(store: Store, items: list[Item]) -> list[int]:
    """The outbox's deliverer for kind "trace": write the batch, return the outbox ids now stored."""
    records = [TraceRecord(**item.payload) for item in items]
    write_traces(store.tracking, store.experiment_id, records)
    return [item.id for item in items]
