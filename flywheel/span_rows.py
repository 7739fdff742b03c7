"""A trace record's spans as MLflow stores them, built straight from the call tree.

MLflow's own way from a record to its tables goes through three object models: OTel
`ReadableSpan`s, MLflow `Span`s wrapping them, then `translate_span_when_storing`, which
re-parses every attribute, runs a dozen schema translators and looks the model's price up in
LiteLLM, before `TraceJSONEncoder` writes each span's `content`. That cost about 2 ms of a
deliverer's CPU per trace. Here the same rows come from the record's plain values:

- `spans(record)`: each span's name, ids, times, status, events and attributes (JSON texts,
  the values MLflow's span holds), with token usage and cost computed once per LM call;
- `content(...)`, `topmost(...)`: a span row's `content` and the trace's usage and cost, from
  which trace_sql writes MLflow's rows (trace_info with its analytics columns, tags, metadata,
  spans), what `start_trace` + `log_spans` store.

What MLflow's storing translation does to flywheel's spans is reproduced, not called: the
attributes a flywheel span carries are a known set that no OTel schema translator matches,
so what is left is the double-dump clean-up (`sanitize_attributes`), the model name read from
a span's inputs or outputs, and the cost (MLflow's own `calculate_cost_by_model_and_token_usage`,
skipped for a model LiteLLM has no price for, which is known after its first LM call).
tests/test_span_format.py compares every column and every `content` field with what MLflow's
own path stores for the same records, on sqlite and through a tracking server on PostgreSQL:
an MLflow release that changes the format fails it.

`prepare()` loads what is heavy (MLflow's tables and helpers, LiteLLM's price map) once; a
deliverer calls it when it starts, and no request path ever does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flywheel.tracing import TraceRecord

PREVIEW_CHARS = 1000
ROOT_NAME = "predict"  # a record without a call tree (tracing.SPAN_NAME)
# mlflow.tracing.constant.SpanAttributeKey / TraceMetadataKey values (checked by the golden test)
REQUEST_ID = "mlflow.traceRequestId"
SPAN_TYPE = "mlflow.spanType"
INPUTS = "mlflow.spanInputs"
OUTPUTS = "mlflow.spanOutputs"
CHAT_USAGE = "mlflow.chat.tokenUsage"
LLM_COST = "mlflow.llm.cost"
MODEL = "mlflow.llm.model"
MODEL_PROVIDER = "mlflow.llm.provider"
TRACE_TAG_PREFIX = "mlflow.traceTag."
LM_KINDS = ("CHAT_MODEL", "LLM")
PROMPT_REF = "$flywheel.prompt"  # an LM span's messages: the output of the span at this index


@dataclass
class SpanData:
    """One span as MLflow's Span holds it: attribute values are JSON texts."""

    name: str
    span_id: int
    parent_id: int | None
    start_ns: int
    end_ns: int
    span_type: str
    attributes: dict[str, str]
    error: str | None = None  # the status message of an ERROR span; None: OK
    events: list[dict[str, Any]] = field(default_factory=list)
    cost: dict[str, float] | None = None
    usage: dict[str, int] | None = None
    model: str | None = None
    provider: str | None = None


# --- loading what is heavy, once ------------------------------------------------------------

_prepared = False
_prepare_lock = threading.Lock()


def prepare() -> None:
    """Load MLflow's trace tables and helpers and LiteLLM's price map; idempotent, and a flag
    test the second time. A deliverer calls it at start (tracing.prepare_delivery)."""
    global _prepared
    if _prepared:
        return
    with _prepare_lock:
        if _prepared:
            return
        from flywheel.store import sql_trace_schema

        sql_trace_schema()
        try:
            import litellm

            _ = litellm.model_cost  # the price map, read once by `import litellm`
        except ImportError:  # MLflow's own price table then
            pass
        _prepared = True


# --- the record's spans ----------------------------------------------------------------------


_reprs: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()


def _signature_repr(signature: type) -> str:
    """A DSPy signature's repr, once per signature class: the adapter's format and parse spans
    name it in every request, and building it cost a tenth of a millisecond each time."""
    text = _reprs.get(signature)
    if text is None:
        text = _reprs[signature] = repr(signature)
    return text


def _default(value: Any) -> Any:
    """JSON for what json cannot write: DSPy's signatures and examples, pydantic models, sets and
    tuples; anything else its str. (DSPy is looked up, not imported: without it loaded, no DSPy
    object exists.)"""
    dspy = sys.modules.get("dspy")
    if dspy is not None:
        if isinstance(value, type) and issubclass(value, dspy.Signature):
            return _signature_repr(value)
        if isinstance(value, dspy.Example):
            return value.toDict()
    if hasattr(value, "model_dump"):
        try:
            return value.model_dump(mode="json")
        except Exception:
            return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def to_json(value: Any) -> str:
    """JSON text for a span's inputs, outputs or attribute (anything else becomes its str)."""
    try:
        return json.dumps(value, default=_default, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return json.dumps(str(value), ensure_ascii=False)


def payload_text(payload: dict[str, Any]) -> str:
    """An outbox payload as JSON text, once: the call tree's values written in place, so nothing in
    it is JSON within JSON. A span value json cannot write (a cycle) is written as `to_json` does."""
    try:
        return json.dumps(payload, default=_default, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        spans = [
            {
                **s,
                "inputs": json.loads(to_json(s["inputs"])),
                "outputs": json.loads(to_json(s["outputs"])),
                "attributes": {k: json.loads(to_json(v)) for k, v in s["attributes"].items()},
            }
            for s in payload.get("spans") or []
        ]
        return json.dumps({**payload, "spans": spans}, default=str, ensure_ascii=False)


def span_id(trace_id: str, index: int) -> int:
    """Span ids from the trace id, so a replayed trace has the same spans: the root's from the
    id's random half (its first half is the time, shared within a millisecond), a child's hashed."""
    if index == 0:
        return int(trace_id[19:], 16) or 1
    digest = hashlib.blake2b(f"{trace_id}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1


def spans(record: TraceRecord, *, tags_on_root: bool = False, cost: bool = True) -> list[SpanData]:
    """The record's spans: the root (the program's forward, holding the request's complete inputs
    and outputs and flywheel's attributes) and the call tree under it. `tags_on_root`: the root
    also carries each tag as `mlflow.traceTag.<key>` (how a tracking server tags a trace it
    creates from spans). `cost=False`: no LM call's cost (a tracking server prices the spans it
    stores itself, so what goes to one leaves it out)."""
    tree = record.spans or []
    root = tree[0] if tree else None
    request = json.dumps(record.inputs, default=str)
    response = json.dumps(record.outputs, default=str) if record.outputs is not None else ""
    dump_id = json.dumps(record.trace_id)
    attributes = {k: to_json(v) for k, v in (root["attributes"] if root else {}).items()}
    attributes.update(
        {
            REQUEST_ID: dump_id,
            SPAN_TYPE: json.dumps(root["type"] if root else "CHAIN"),
            INPUTS: request,
            OUTPUTS: response or "null",
            "flywheel.model": json.dumps(record.model),
            "flywheel.model_version": json.dumps(record.version),
        }
    )
    if record.model_id:
        attributes["flywheel.model_id"] = json.dumps(record.model_id)
    if record.lm_calls is not None:
        attributes["flywheel.lm_calls"] = json.dumps(record.lm_calls)
        attributes["flywheel.cached_calls"] = json.dumps(record.cached_calls or 0)
    if tags_on_root:
        attributes.update({f"{TRACE_TAG_PREFIX}{k}": json.dumps(v) for k, v in record.tags().items()})
    events = []
    if record.error:
        events.append(
            {
                "name": "exception",
                "time_unix_nano": max(record.end_ns, record.start_ns),
                "attributes": {
                    "exception.type": record.error_type or "Exception",
                    "exception.message": record.error,
                    "exception.stacktrace": record.error_traceback or "",
                },
            }
        )
    start = min([record.start_ns] + [s["start_ns"] for s in tree[:1]])
    end = max([record.end_ns, start] + [s["end_ns"] for s in tree[:1]])
    ids = [span_id(record.trace_id, i) for i in range(max(1, len(tree)))]
    out = [
        SpanData(
            ROOT_NAME if root is None else root["name"],
            ids[0],
            None,
            start,
            end,
            root["type"] if root else "CHAIN",
            attributes,
            record.error[:PREVIEW_CHARS] if record.error else None,
            events,
        )
    ]
    for i, span in enumerate(tree[1:], start=1):
        child = {k: to_json(v) for k, v in span["attributes"].items()}
        child[REQUEST_ID] = dump_id
        child[SPAN_TYPE] = json.dumps(span["type"])
        child[INPUTS] = to_json(span["inputs"])
        child[OUTPUTS] = to_json(span["outputs"])
        data = SpanData(
            span["name"],
            ids[i],
            ids[span["parent"] or 0],
            span["start_ns"],
            max(span["end_ns"], span["start_ns"]),
            span["type"],
            child,
        )
        if failure := span.get("error"):
            data.error = failure["message"][:PREVIEW_CHARS]
            data.events.append(
                {
                    "name": "exception",
                    "time_unix_nano": span["end_ns"],
                    "attributes": {
                        "exception.type": failure["type"],
                        "exception.message": failure["message"],
                    },
                }
            )
        out.append(data)
    for data, span in zip(out, tree or [None], strict=False):
        _translate(data, span, cost)
    return out


def _translate(data: SpanData, span: dict[str, Any] | None, priced: bool = True) -> None:
    """What MLflow's `translate_span_when_storing` adds to a flywheel span: the model (from its
    attribute, else an inputs' or outputs' `model` field) and the cost of its token usage."""
    attributes = span["attributes"] if span else {}
    usage = attributes.get(CHAT_USAGE)
    data.usage = usage if isinstance(usage, dict) else None
    model = attributes.get(MODEL)
    if model is None and span is not None:
        for part in (span["inputs"], span["outputs"]):
            if isinstance(part, dict) and part.get("model"):
                model = part["model"] if isinstance(part["model"], str) else None
                break
        if model is not None:
            data.attributes[MODEL] = json.dumps(model)
    provider = attributes.get(MODEL_PROVIDER)
    data.model = model if isinstance(model, str) else None
    data.provider = provider if isinstance(provider, str) else None
    if priced and data.usage and data.model and LLM_COST not in data.attributes:
        if cost := lm_cost(data.model, data.usage, data.provider):
            data.cost = cost
            data.attributes[LLM_COST] = json.dumps(cost)


_unpriced: set[tuple[str, str | None]] = set()


def lm_cost(model: str, usage: dict[str, int], provider: str | None) -> dict[str, float] | None:
    """MLflow's cost of one LM call (`calculate_cost_by_model_and_token_usage`, LiteLLM's prices):
    one lookup per LM call of a priced model, none after the first for a model without a price."""
    if (model, provider) in _unpriced:
        return None
    from flywheel.store import sql_trace_schema

    cost = sql_trace_schema().calculate_cost_by_model_and_token_usage(model, usage, provider)
    if cost is None and (usage.get("input_tokens") or usage.get("output_tokens")):
        _unpriced.add((model, provider))
    return cost


def sanitized(attributes: dict[str, str]) -> dict[str, str]:
    """MLflow's `sanitize_attributes`: an attribute that is the JSON of a string which is itself
    JSON of a string, object or list is stored as that inner string (one layer of dumping off)."""
    out = dict(attributes)
    for key, text in attributes.items():
        if not text.startswith('"'):  # not the JSON of a string (all flywheel's texts are JSON)
            continue
        inner = json.loads(text)
        if isinstance(inner, str) and inner.strip()[:1] in ('"', "[", "{"):
            try:
                if isinstance(json.loads(inner), str | dict | list):
                    out[key] = inner
            except ValueError:
                pass
    return out


# --- MLflow's SQL rows -----------------------------------------------------------------------


def _b64(number: int, size: int) -> str:
    return base64.b64encode(number.to_bytes(size, "big")).decode()


def hex_id(number: int) -> str:
    return f"{number:016x}"


def content(trace_number: int, data: SpanData) -> str:
    """A span row's `content`: `Span.to_dict()` after the storing translation, as MLflow dumps it."""
    return json.dumps(
        {
            "trace_id": _b64(trace_number, 16),
            "span_id": _b64(data.span_id, 8),
            "parent_span_id": None if data.parent_id is None else _b64(data.parent_id, 8),
            "name": data.name,
            "start_time_unix_nano": data.start_ns,
            "end_time_unix_nano": data.end_ns,
            "events": data.events,
            "status": {
                "code": "STATUS_CODE_ERROR" if data.error is not None else "STATUS_CODE_OK",
                "message": data.error or "",
            },
            "attributes": sanitized(data.attributes),
            "links": [],
        },
        ensure_ascii=False,
    )


def topmost(data: list[SpanData], part: str) -> dict[str, Any] | None:
    """The trace's token usage ("usage") or cost ("cost") as MLflow's SQL store aggregates them
    from spans (its own tree-aware helpers: a span under another that has one is not counted)."""
    from flywheel.store import sql_trace_schema

    m = sql_trace_schema()
    nodes = [
        m.SpanAggregationNode(
            hex_id(d.span_id), None if d.parent_id is None else hex_id(d.parent_id), getattr(d, part)
        )
        for d in data
    ]
    if part == "usage":
        return m.aggregate_usage_from_span_nodes(nodes)
    return m.aggregate_cost_from_span_nodes(nodes)


# --- OTLP, what a tracking server takes --------------------------------------------------------


def otlp_request(records: list[TraceRecord]) -> bytes:
    """An OTLP/HTTP export request (`ExportTraceServiceRequest`, serialised) of the records' spans,
    tags on the root: the bytes `RestStore.log_spans` posts for the MLflow Spans of
    `TraceRecord.to_mlflow(tags_on_root=True)`, built from the span data without them (no OTel
    ReadableSpan, no MLflow Span). Each attribute goes as MLflow's `Span.to_otel_proto()` sends
    it: its JSON text parsed, as a typed AnyValue (objects as key-value lists, lists as arrays,
    null unset); no cost (the server prices the LM spans it stores)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for record in records:
        trace = int(record.trace_id[3:], 16).to_bytes(16, "big")
        for data in spans(record, tags_on_root=True, cost=False):
            _otlp_span(scope.spans.add(), trace, data)
    return request.SerializeToString()


_OK, _ERROR = 1, 2  # opentelemetry.proto.trace.v1.Status.StatusCode


def _otlp_span(message: Any, trace: bytes, data: SpanData) -> None:
    """One span as `Span.to_otel_proto()` fills it (mlflow/entities/span.py)."""
    message.trace_id = trace
    message.span_id = data.span_id.to_bytes(8, "big")
    message.name = data.name
    message.start_time_unix_nano = data.start_ns
    if data.end_ns:
        message.end_time_unix_nano = data.end_ns
    if data.parent_id is not None:
        message.parent_span_id = data.parent_id.to_bytes(8, "big")
    message.status.code = _OK if data.error is None else _ERROR
    if data.error:
        message.status.message = data.error
    add = message.attributes.add
    for key, text in data.attributes.items():
        if key == LLM_COST:
            continue
        attribute = add()
        attribute.key = key
        _any_value(attribute.value, _attribute_value(text))
    for event in data.events:
        otlp_event = message.events.add()
        otlp_event.name = event["name"]
        otlp_event.time_unix_nano = event["time_unix_nano"]
        for key, value in event["attributes"].items():
            attribute = otlp_event.attributes.add()
            attribute.key = key
            _any_value(attribute.value, value)


def _attribute_value(text: str) -> Any:
    """An attribute as MLflow's Span reads it back (`_SpanAttributesRegistry.get`): its JSON
    parsed, an empty text as None, a text that is not JSON as is. (A JSON string without a
    backslash has no escapes: its characters are the value, no parsing needed.)"""
    if not text:
        return None
    if len(text) > 1 and text[0] == text[-1] == '"' and "\\" not in text:
        return text[1:-1]
    try:
        return json.loads(text)
    except ValueError:
        return text


def _any_value(message: Any, value: Any) -> None:
    """MLflow's `_set_otel_proto_anyvalue`, without its copy of every nested list and object:
    the same message, built in place (JSON's own types first, by exact type)."""
    kind = type(value)
    if kind is str:
        _set_string(message, "string_value", value)
    elif kind is dict:
        pairs = message.kvlist_value
        pairs.SetInParent()  # set even when empty
        add = pairs.values.add
        for key, item in value.items():
            pair = add()
            _set_string(pair, "key", key if type(key) is str else str(key))
            _any_value(pair.value, item)
    elif kind is list or kind is tuple:
        array = message.array_value
        array.SetInParent()
        add = array.values.add
        for item in value:
            _any_value(add(), item)
    elif kind is int:
        message.int_value = value
    elif kind is bool:
        message.bool_value = value
    elif kind is float:
        message.double_value = value
    elif value is None:
        return
    elif isinstance(value, bool):  # subclasses, in MLflow's order
        message.bool_value = value
    elif isinstance(value, str):
        _set_string(message, "string_value", value)
    elif isinstance(value, int):
        message.int_value = value
    elif isinstance(value, float):
        message.double_value = value
    elif isinstance(value, bytes):
        message.bytes_value = value
    elif isinstance(value, list | tuple | dict):
        _any_value(message, dict(value) if isinstance(value, dict) else list(value))
    else:
        _set_string(message, "string_value", str(value))


def _set_string(message: Any, name: str, text: str) -> None:
    """A string field; a text protobuf refuses (a lone surrogate) as MLflow's
    `_sanitize_otel_string` makes it: each such character replaced."""
    try:
        setattr(message, name, text)
    except (UnicodeError, ValueError):
        setattr(message, name, text.encode("utf-8", errors="replace").decode("utf-8"))
