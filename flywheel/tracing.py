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
import os
import re
import time
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


def served_call(info: Any) -> ServedCall | None:
    """The prediction a TraceInfo records, or None for a trace flywheel did not write."""
    tags = info.tags or {}
    if MODEL_TAG not in tags:
        return None
    return ServedCall(
        tags[MODEL_TAG],
        tags.get(VERSION_TAG, ""),
        json.loads(tags.get(INPUTS_TAG) or "{}"),
        json.loads(tags.get(OUTPUTS_TAG) or "{}"),
    )


def model_filter(model: str, version: str | int | None = None) -> str:
    """An MLflow trace filter for one model's predictions: the name enters as a hash (MLflow's
    filter syntax cannot escape quotes) and the version as a number."""
    flt = f"tags.`{MODEL_KEY_TAG}` = '{model_key(model)}'"
    return flt if version is None else f"{flt} AND tags.`{VERSION_TAG}` = '{int(version)}'"


_TRACE_ID = re.compile(r"^tr-[0-9a-f]{32}$")
_FUTURE_SLACK = 60.0  # seconds a trace id's clock may run ahead of ours


def new_trace_id(at: float | None = None) -> str:
    """`tr-` and a UUIDv7 in 32 hex digits: 48 bits of Unix milliseconds, then random bits.

    The id carries its creation time (`trace_time`), so feedback for an id this host
    does not know yet can be told apart: young (its trace may still arrive) or stale.
    `at` (seconds) is for tests.
    """
    millis = int((time.time() if at is None else at) * 1000) & (2**48 - 1)
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis << 80) | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64 | (0b10 << 62) | (rand & (2**62 - 1))
    return f"tr-{value:032x}"


def is_trace_id(trace_id: str) -> bool:
    """Well-formed: `tr-` and 32 lowercase hex digits (flywheel's and MLflow's form)."""
    return bool(_TRACE_ID.match(trace_id))


def trace_time(trace_id: str) -> float | None:
    """When a time-ordered (UUIDv7) trace id was made, in Unix seconds; None for any other id
    (a random UUIDv4 id of an older flywheel, a malformed one, or one dated in the future)."""
    if not is_trace_id(trace_id):
        return None
    digits = trace_id[3:]
    if digits[12] != "7" or digits[16] not in "89ab":
        return None
    at = int(digits[:12], 16) / 1000
    return at if at <= time.time() + _FUTURE_SLACK else None


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
        """Trace tags: export reads inputs and outputs from here, never from span bodies."""
        tags = {
            MODEL_TAG: self.model,
            MODEL_KEY_TAG: model_key(self.model),
            VERSION_TAG: self.version,
            INPUTS_TAG: json.dumps(self.inputs, default=str),
            "mlflow.traceName": SPAN_NAME,
        }
        if self.outputs is not None:
            tags[OUTPUTS_TAG] = json.dumps(self.outputs, default=str)
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
            # the span id from the id's random half (its first half is the time, shared within a ms)
            context=build_otel_context(int(self.trace_id[3:], 16), int(self.trace_id[19:], 16) or 1),
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


def _write_public(store: Any, experiment_id: str, records: list[TraceRecord]) -> list[str]:
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
            getattr(type(store), "_get_server_version", None) and type(
                store
            )._get_server_version.cache_clear()
            store.log_spans(experiment_id, spans)
    return [r.trace_id for r in records]


def deliver(store: Store, items: list[Item]) -> list[int]:
    """The outbox's deliverer for kind "trace": write the batch, return the outbox ids now stored."""
    records = [TraceRecord(**item.payload) for item in items]
    write_traces(store.tracking, store.experiment_id, records)
    return [item.id for item in items]
