"""How a prediction becomes an MLflow trace.

flywheel does not use MLflow's asynchronous exporter (it silently drops traces
under bursts). A prediction becomes a `TraceRecord`, a plain JSON-able record
with a trace id chosen up front, so the id can be returned with the answer at
once. The record goes to the durable outbox, and the outbox writes it to MLflow
in batches as a complete trace: one root span whose inputs and outputs are the
program's fields, tags naming the model and version, and the logged model id
in the trace metadata (so each trace links to the right logged model even
when several versions are loaded in one process). A tracking server takes the
traces in bulk as spans only (`_write_rest`), which carries no metadata: there
the root span's `flywheel.model_id` attribute names the logged model.

Sizes every backend accepts: MLflow stores tag and metadata values in
8,000-character columns (PostgreSQL enforces it) and its own conversions cut
tags at 4,096. Every tag flywheel writes stays within TAG_CHARS: the inputs
and outputs tags hold the whole JSON when it fits, else a preview (each
long field cut, and tagged `flywheel.truncated`). The root span always holds
the complete inputs and outputs; `complete_calls` reads them back for the
truncated traces a caller needs (export, the review queue).

A failed prediction is a trace with state ERROR: the message in a tag, the
exception's type, message and traceback as the span's `exception` event, each
redacted when the record is made (a provider's error that quotes the key it was
sent is stored with the key masked).
Cache use is tagged: `flywheel.lm_cache` is `hit` when every LM call was
answered by DSPy's cache, `partial` when some were, `miss` when none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from flywheel import span_rows
from flywheel.config import secret_values
from flywheel.limits import redact

if TYPE_CHECKING:
    from flywheel.outbox import Item
    from flywheel.store import Store

MODEL_TAG = "flywheel.model"
MODEL_KEY_TAG = "flywheel.model_key"  # a hash of the name: user text never enters a filter string
VERSION_TAG = "flywheel.model_version"
INPUTS_TAG = "flywheel.inputs"
OUTPUTS_TAG = "flywheel.outputs"
TRUNCATED_TAG = "flywheel.truncated"
ERROR_TAG = "flywheel.error"
CACHE_TAG = "flywheel.lm_cache"
ROUTE_TAG = "flywheel.route"  # stable, canary, explicit or shadow: how the request chose its version
SHADOW_OF_TAG = "flywheel.shadow_of"  # a shadow trace: the Production trace it ran beside
SHADOW_KEY_TAG = "flywheel.shadow_key"  # a shadow trace's model key, in place of MODEL_KEY_TAG
LM_CALLS_KEY = "flywheel.lm_calls"
CACHED_CALLS_KEY = "flywheel.cached_calls"
SPAN_NAME = "predict"
TAG_CHARS = 2000  # well below MLflow's 4,096 (its own conversion) and 8,000 (the column)
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
    truncated: tuple[str, ...] = ()  # "inputs" and/or "outputs": the tags hold a preview only


def served_call(info: Any) -> ServedCall | None:
    """The prediction a TraceInfo records, or None for a trace flywheel did not write.

    Read from tags only: where `truncated` names a part, that part is a preview (each long
    field cut); `complete_calls` reads the complete values from the root span.
    """
    tags = info.tags or {}
    if MODEL_TAG not in tags:
        return None
    truncated = tuple(p for p in (tags.get(TRUNCATED_TAG) or "").split(",") if p)
    return ServedCall(
        tags[MODEL_TAG],
        tags.get(VERSION_TAG, ""),
        _loads(tags.get(INPUTS_TAG)),
        _loads(tags.get(OUTPUTS_TAG)),
        truncated,
    )


def _loads(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:  # a tag some other writer cut mid-JSON
        return {}
    return value if isinstance(value, dict) else {}


def complete_calls(store: Any, infos: list[Any]) -> dict[str, ServedCall]:
    """trace id -> the complete ServedCall, for the given TraceInfos whose tags were truncated.

    Reads the root span's inputs and outputs of those traces only (one batch where the store
    has one), so the cost grows with the truncated rows a caller returns, not with every trace.
    """
    wanted = {}
    for info in infos:
        call = served_call(info)
        if call is not None and call.truncated:
            wanted[info.trace_id] = call
    if not wanted:
        return {}
    ids = list(wanted)
    try:
        traces = store.batch_get_traces(ids)
    except (NotImplementedError, AttributeError):
        traces = [store.get_trace(i) for i in ids]
    out: dict[str, ServedCall] = {}
    for trace in traces:
        call = wanted.get(trace.info.trace_id)
        root = next((s for s in trace.data.spans if s.parent_id is None), None)
        if call is None or root is None:
            continue
        inputs = root.inputs if isinstance(root.inputs, dict) else call.inputs
        outputs = root.outputs if isinstance(root.outputs, dict) else call.outputs
        out[trace.info.trace_id] = ServedCall(call.model, call.version, inputs, outputs)
    return out


def preview_json(values: dict[str, Any] | None, limit: int = TAG_CHARS) -> tuple[str, bool]:
    """(JSON text of at most `limit` chars, whether anything was cut): whole when it fits, else
    each field longer than its share cut to a string ending with how long it was."""
    text = json.dumps(values, default=str, ensure_ascii=False)
    if len(text) <= limit:
        return text, False
    share = max(16, limit // max(1, len(values or {})) - 64)
    while True:
        preview = {}
        for key, value in (values or {}).items():
            item = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
            if len(item) > share:
                preview[key[:200]] = f"{item[:share]}… [truncated, {len(item)} chars]"
            else:
                preview[key[:200]] = value
        text = json.dumps(preview, default=str, ensure_ascii=False)
        if len(text) <= limit or share <= 16:
            return text[:limit], True
        share = max(16, share // 2)


def shadow_filter(model: str, of: str | None = None) -> str:
    """An MLflow trace filter for one model's shadow traces (of one Production trace when given)."""
    flt = f"tags.`{SHADOW_KEY_TAG}` = '{model_key(model)}'"
    if of is not None:
        if not is_trace_id(of):
            raise ValueError(f"not a trace id: {of!r}")
        flt += f" AND tags.`{SHADOW_OF_TAG}` = '{of}'"
    return flt


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
    error_type: str | None = None
    error_traceback: str | None = None
    lm_calls: int | None = None
    cached_calls: int | None = None
    usage: dict[str, Any] | None = None
    route: str | None = None
    shadow_of: str | None = None
    spans: list[dict[str, Any]] | None = None  # the DSPy call tree (calltree.CallTree.spans)

    def __post_init__(self) -> None:
        """The error, its traceback and each call's error message redacted (`limits.redact`, the
        known secret values and the shapes of credentials), before the record is queued in the
        outbox or written as spans: whoever built it, a quoted key never reaches a file.

        The call tree as values: a record an older flywheel queued holds JSON texts (parsed
        here), an outbox payload holds each prompt once (`restore_prompts`)."""
        if self.spans and isinstance(self.spans[0].get("inputs"), str):
            object.__setattr__(self, "spans", [_span_values(s) for s in self.spans])
        elif self.spans and any(
            isinstance(s.get("inputs"), dict) and PROMPT_REF in s["inputs"] for s in self.spans
        ):
            object.__setattr__(self, "spans", restore_prompts(self.spans))
        if (
            self.error is None
            and self.error_traceback is None
            and not any(s.get("error") for s in self.spans or ())
        ):
            return
        secrets = secret_values()
        for name in ("error", "error_traceback"):
            if (text := getattr(self, name)) is not None:
                object.__setattr__(self, name, redact(text, secrets))
        if self.spans:  # copies: the call tree's own records are left as they are
            spans = [
                {**s, "error": _redacted_error(s["error"], secrets)} if s.get("error") else s
                for s in self.spans
            ]
            object.__setattr__(self, "spans", spans)

    @property
    def name(self) -> str:
        """The trace's name: its root span's, the program's `<Module>.forward` as autolog names it."""
        return self.spans[0]["name"] if self.spans else SPAN_NAME

    @classmethod
    def ok(
        cls,
        trace_id: str,
        info: Any,
        inputs: dict[str, Any],
        outputs: dict[str, Any],
        start_ns: int,
        end_ns: int,
        **extra: Any,
    ) -> TraceRecord:
        return cls(
            trace_id, info.name, info.version, info.model_id, inputs, outputs, start_ns, end_ns, **extra
        )

    @classmethod
    def failed(
        cls, trace_id: str, info: Any, inputs: dict[str, Any], start_ns: int, error: str, **extra: Any
    ) -> TraceRecord:
        import time

        return cls(
            trace_id,
            info.name,
            info.version,
            info.model_id,
            inputs,
            None,
            start_ns,
            time.time_ns(),
            error,
            **extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """The outbox payload: plain JSON types, with `model` and `version` at the top level.

        Shallow (the call tree's span records are shared, not deep-copied as `asdict` would:
        that copy cost more CPU than the rest of the record); whoever changes a span record
        copies it first (`Runtime._trace_payload`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def tags(self) -> dict[str, str]:
        """Trace tags, each within TAG_CHARS: export reads inputs and outputs from here, and from
        the root span only for the traces whose tags are marked truncated."""
        inputs, cut_inputs = preview_json(self.inputs)
        # a shadow trace carries its model key under another name: every query for the model's
        # traffic (export, review queue, gate, live figures) filters on MODEL_KEY_TAG and so
        # never sees it, and no future query can forget to leave it out
        key_tag = SHADOW_KEY_TAG if self.shadow_of else MODEL_KEY_TAG
        tags = {
            MODEL_TAG: self.model[:TAG_CHARS],
            key_tag: model_key(self.model),
            VERSION_TAG: self.version,
            INPUTS_TAG: inputs,
            "mlflow.traceName": self.name[:TAG_CHARS],
        }
        if self.route:
            tags[ROUTE_TAG] = self.route
        if self.shadow_of:
            tags[SHADOW_OF_TAG] = self.shadow_of
        truncated = ["inputs"] if cut_inputs else []
        if self.outputs is not None:
            tags[OUTPUTS_TAG], cut_outputs = preview_json(self.outputs)
            truncated += ["outputs"] if cut_outputs else []
        if truncated:
            tags[TRUNCATED_TAG] = ",".join(truncated)
        if self.error:
            tags[ERROR_TAG] = self.error[:TAG_CHARS]
        if self.lm_calls:
            cached = self.cached_calls or 0
            tags[CACHE_TAG] = "hit" if cached >= self.lm_calls else "partial" if cached else "miss"
        return tags

    def previews(self) -> tuple[str, str]:
        """(request preview, response preview) of the trace, as start_trace stores them."""
        request = json.dumps(self.inputs, default=str)
        response = json.dumps(self.outputs, default=str) if self.outputs is not None else ""
        return request[:_PREVIEW], (response or self.error or "")[:_PREVIEW]

    def metadata(self) -> dict[str, str]:
        """The trace's metadata: MLflow's schema version, previews, logged model and token usage,
        and flywheel's LM call counts."""
        from mlflow.tracing.constant import TRACE_SCHEMA_VERSION, TRACE_SCHEMA_VERSION_KEY, TraceMetadataKey

        request = json.dumps(self.inputs, default=str)
        response = json.dumps(self.outputs, default=str) if self.outputs is not None else ""
        metadata = {
            TRACE_SCHEMA_VERSION_KEY: str(TRACE_SCHEMA_VERSION),
            TraceMetadataKey.INPUTS: request[:_PREVIEW],
            TraceMetadataKey.OUTPUTS: response[:_PREVIEW],
        }
        if self.model_id:
            metadata[TraceMetadataKey.MODEL_ID] = self.model_id
        if self.lm_calls is not None:
            metadata[LM_CALLS_KEY] = str(self.lm_calls)
            metadata[CACHED_CALLS_KEY] = str(self.cached_calls or 0)
        if tokens := token_usage((self.usage or {}).values()):
            metadata[TraceMetadataKey.TOKEN_USAGE] = json.dumps(tokens)
        return metadata

    def to_mlflow(self, experiment_id: str, *, tags_on_root: bool = False) -> tuple[Any, list[Any]]:
        """(TraceInfo, spans) as MLflow's objects, for its public path (start_trace + log_spans):
        the reference the direct rows and OTLP requests (span_rows) are compared with.
        `tags_on_root`: the root also carries each tag as `mlflow.traceTag.<key>` (see
        span_rows.spans)."""
        from mlflow.entities import TraceInfo, TraceLocation, TraceState

        request, response = self.previews()
        info = TraceInfo(
            trace_id=self.trace_id,
            trace_location=TraceLocation.from_experiment_id(experiment_id),
            request_time=self.start_ns // 1_000_000,
            execution_duration=max(0, (self.end_ns - self.start_ns) // 1_000_000),
            state=TraceState.ERROR if self.error else TraceState.OK,
            request_preview=request,
            response_preview=response,
            trace_metadata=self.metadata(),
            tags=self.tags(),
        )
        trace_number = int(self.trace_id[3:], 16)
        spans = [_span(trace_number, data) for data in span_rows.spans(self, tags_on_root=tags_on_root)]
        return info, spans


def _span_values(span: dict[str, Any]) -> dict[str, Any]:
    """A call-tree span record of an older flywheel (JSON texts) as values."""
    return {
        **span,
        "inputs": _parsed(span.get("inputs")),
        "outputs": _parsed(span.get("outputs")),
        "attributes": {k: _parsed(v) for k, v in (span.get("attributes") or {}).items()},
    }


def _parsed(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text


PROMPT_REF = span_rows.PROMPT_REF


def share_prompts(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The call tree with each prompt once: an LM call's `messages` that are the very list its
    adapter's `format` returned become a reference to that span (copies; the records are kept)."""
    formatted = {}
    out = spans
    for i, span in enumerate(spans):
        inputs = span["inputs"]
        if span["name"].endswith(".format") and isinstance(span["outputs"], list):
            formatted[id(span["outputs"])] = i
        elif span["type"] in span_rows.LM_KINDS and isinstance(inputs, dict):
            source = formatted.get(id(inputs.get("messages")))
            if source is not None and spans[source]["outputs"] is inputs["messages"]:
                if out is spans:
                    out = list(spans)
                shared = {k: v for k, v in inputs.items() if k != "messages"}
                out[i] = {**span, "inputs": {PROMPT_REF: source, **shared}}
    return out


def restore_prompts(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`share_prompts` undone: each LM call's `messages` back, first among its inputs as recorded."""
    out = list(spans)
    for i, span in enumerate(out):
        inputs = span["inputs"]
        if isinstance(inputs, dict) and PROMPT_REF in inputs:
            rest = {k: v for k, v in inputs.items() if k != PROMPT_REF}
            out[i] = {**span, "inputs": {"messages": out[inputs[PROMPT_REF]]["outputs"], **rest}}
    return out


def _redacted_error(error: dict[str, Any], secrets: set[str]) -> dict[str, Any]:
    return {**error, "message": redact(str(error.get("message") or ""), secrets)}


def _span(trace_number: int, data: span_rows.SpanData) -> Any:
    """A span_rows span as MLflow's Span over an OTel ReadableSpan (MLflow's public path)."""
    from mlflow.entities import Span
    from mlflow.tracing.utils import build_otel_context
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import Status, StatusCode

    parent = None if data.parent_id is None else build_otel_context(trace_number, data.parent_id)
    return Span(
        ReadableSpan(
            name=data.name,
            context=build_otel_context(trace_number, data.span_id),
            parent=parent,
            start_time=data.start_ns,
            end_time=data.end_ns,
            attributes={k: v for k, v in data.attributes.items() if k != span_rows.LLM_COST},
            status=Status(StatusCode.OK) if data.error is None else Status(StatusCode.ERROR, data.error),
            events=[Event(e["name"], e["attributes"], timestamp=e["time_unix_nano"]) for e in data.events],
            resource=Resource.get_empty(),
        )
    )


def token_usage(entries: Iterable[Any]) -> dict[str, int] | None:
    """MLflow's token usage keys (input/output/total) summed over LM usage entries (LiteLLM's or
    DSPy's prompt/completion/total, or input/output); None when every count is zero. One call's
    usage for its LM span, every LM's for the root and the trace's metadata."""
    tokens = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        given_in = int(entry.get("prompt_tokens") or entry.get("input_tokens") or 0)
        given_out = int(entry.get("completion_tokens") or entry.get("output_tokens") or 0)
        tokens["input_tokens"] += given_in
        tokens["output_tokens"] += given_out
        tokens["total_tokens"] += int(entry.get("total_tokens") or 0) or given_in + given_out
    return tokens if any(tokens.values()) else None


def prepare_delivery() -> None:
    """Load what delivering traces needs that is heavy (MLflow's trace tables and helpers,
    LiteLLM's price map) once: a deliverer process calls it when it starts, so no request path
    ever does. Idempotent, and cheap the second time."""
    span_rows.prepare()


def write_traces(store: Any, experiment_id: str, records: list[TraceRecord]) -> list[str]:
    """Write complete traces to the tracking store (sqlite, PostgreSQL or a tracking server).

    Idempotent: a trace already stored (a replay after a crash) is not written
    twice, so the outbox delivers each trace exactly once. SQL stores take one
    batched transaction; a tracking server takes `log_spans` requests only (`_write_rest`);
    anything else, or any error on the SQL path, MLflow's public path.
    """
    from flywheel import trace_sql

    if trace_sql.supports(store):
        try:
            done = trace_sql.existing_ids(store, [r.trace_id for r in records])
            todo = [r for r in records if r.trace_id not in done]
            if todo:
                trace_sql.write_records(store, experiment_id, todo)
            return [r.trace_id for r in todo]
        except Exception as exc:  # internals moved: fall back, slower but public
            _log.warning("batched trace write failed (%s); using MLflow's public path", exc)
    if _is_rest(store):
        return _write_rest(store, experiment_id, records)
    return _write_public(store, experiment_id, records)


PUBLIC_CHUNK = 50
"""Traces per `log_spans` request: a tracking server under load answered a 500-trace request
after MLflow's 10 s client timeout, so the whole batch was retried again and again
(benchmarks/scale_bench.py); small requests keep each one short."""

REST_IN_FLIGHT = 2
"""`log_spans` requests one delivering process keeps in flight to a tracking server, so the
server's workers and its database work on several at once (benchmarks/delivery_bench.py). Every
API worker process delivers, so a server sees hosts x workers x this many: more queued at a
loaded server waits past any timeout, and a timed-out request is work the server did for nothing."""

DELIVERY_TIMEOUT = 120.0
"""Seconds a `log_spans` request may take before the delivery gives up on it. Nobody waits on a
delivery (the trace is durable in the outbox), so it is far longer than MLflow's client timeout
(10 s, apply_mlflow_client_settings), and it is not retried at once: a server that is slow
because it is loaded would only get the same work twice."""


class PartialWrite(Exception):
    """Some of a delivery's requests stored their traces and some failed."""

    def __init__(self, stored: list[str], error: BaseException) -> None:
        super().__init__(f"{len(stored)} traces stored, the rest failed: {error}")
        self.stored = stored


def _is_rest(store: Any) -> bool:
    from mlflow.store.tracking.rest_store import RestStore

    return isinstance(store, RestStore)


def _write_public(store: Any, experiment_id: str, records: list[TraceRecord]) -> list[str]:
    """MLflow's public path, as its own exporter writes: `start_trace` per trace (tags and
    metadata), then the spans. The reference the SQL path is compared with."""
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
        store.log_spans(experiment_id, spans)


def _write_rest(
    store: Any, experiment_id: str, records: list[TraceRecord], in_flight: int = REST_IN_FLIGHT
) -> list[str]:
    """A tracking server's bulk path: `log_spans` requests of PUBLIC_CHUNK traces, `in_flight`
    at a time, and no `start_trace`. The server creates each trace from its spans: state, times,
    previews and token usage from the root span, and the tags from the root's
    `mlflow.traceTag.<key>` attributes (what MLflow's own OTLP exporter sends). Each request's
    protobuf is built straight from the span data (span_rows.otlp_request): the bytes MLflow's
    `Span.to_otel_proto()` makes of `to_mlflow(tags_on_root=True)`, without an OTel or MLflow
    span object per span (tests/test_span_format.py holds the two equal). A replay
    upserts the same span ids, so it stores nothing twice. When some requests fail,
    PartialWrite names the traces the others stored.

    What this path cannot carry is trace metadata: MLflow has no batched way to set it, and a
    `start_trace` per trace cost the server more than the prediction cost the host. So on a
    tracking server a trace has no `mlflow.modelId` (the MLflow UI lists no traces under a
    logged model); the root span's `flywheel.model_id`, `flywheel.lm_calls` and
    `flywheel.cached_calls` attributes hold what the metadata would."""
    from concurrent.futures import ThreadPoolExecutor

    chunks: list[tuple[list[str], bytes]] = []
    for start in range(0, len(records), PUBLIC_CHUNK):
        chunk = records[start : start + PUBLIC_CHUNK]
        chunks.append(([r.trace_id for r in chunk], span_rows.otlp_request(chunk)))
    stored: list[str] = []
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max(1, min(in_flight, len(chunks))), thread_name_prefix="flywheel-spans") as pool:
        futures = [(ids, pool.submit(_post_spans, store, experiment_id, body)) for ids, body in chunks]
        for ids, future in futures:
            try:
                future.result()
                stored += ids
            except Exception as exc:
                errors.append(exc)
    if errors and not stored:
        raise errors[0]
    if errors:
        raise PartialWrite(stored, errors[0])
    return stored


def _post_spans(store: Any, experiment_id: str, body: bytes) -> None:
    """One OTLP/HTTP export to the tracking server's `/v1/traces` (what `RestStore.log_spans`
    sends; `body` from span_rows.otlp_request), with DELIVERY_TIMEOUT and no retry in place of
    MLflow's client settings."""
    from mlflow.tracing.utils.otlp import MLFLOW_EXPERIMENT_ID_HEADER, OTLP_TRACES_PATH
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    response = http_request(
        host_creds=store.get_host_creds(),
        endpoint=OTLP_TRACES_PATH,
        method="POST",
        data=body,
        extra_headers={"Content-Type": "application/x-protobuf", MLFLOW_EXPERIMENT_ID_HEADER: experiment_id},
        timeout=DELIVERY_TIMEOUT,
        max_retries=0,
    )
    verify_rest_response(response, OTLP_TRACES_PATH)


def deliver(store: Store, items: list[Item]) -> list[int]:
    """The outbox's deliverer for kind "trace": write the batch, return the outbox ids now stored.
    With FLYWHEEL_TRACE_DATABASE_URI set, the batch is COPYed into that PostgreSQL database
    (trace_copy); any error there (an untested schema included) raises, and the items wait."""
    records = [TraceRecord(**item.payload) for item in items]
    database = store.settings.flywheel_trace_database_uri
    if database:
        from flywheel import trace_copy

        trace_copy.write(database, store.experiment_id, records, store.settings.flywheel_experiment)
        return [item.id for item in items]
    try:
        write_traces(store.tracking, store.experiment_id, records)
    except PartialWrite as partial:  # the rest are retried later, like any item not stored
        _log.warning("outbox: %s", partial)
        stored = set(partial.stored)
        return [item.id for item in items if item.trace_id in stored]
    return [item.id for item in items]
