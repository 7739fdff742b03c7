"""The DSPy call tree of one prediction, recorded with DSPy's callbacks, as spans for its trace.

Why not `mlflow.dspy.autolog()`: it sets a global callback, writes through MLflow's
asynchronous exporter (which drops traces under bursts) and costs tens of milliseconds of
CPU per call. `CallTree` is a per-request callback, installed with `dspy.context` and so
never touching global settings: it keeps plain references while the program runs (a name,
a clock reading, the inputs and outputs objects) and hands them over in `spans()`; they
become JSON once, with the whole outbox payload. The record then goes through the durable
outbox and the batch writer like every flywheel trace.

The tree has autolog's shape, so a trace reads the same in the MLflow UI whichever wrote it:
`<Module>.forward` for each module (CHAIN; LLM for a Predict, AGENT for ReAct, RETRIEVER for
a Retrieve), `<Adapter>.format` and `.parse` (PARSER), `<LM>.__call__` (CHAT_MODEL, with the
messages, the response, the model and its token usage) and `Tool.<name>` (TOOL). The parent
of each call is the DSPy call active when it started (DSPy's own ACTIVE_CALL_ID context
variable), so the tree is right for async programs and for programs that run steps in
threads. Token usage is written in MLflow's standard span attribute (`mlflow.chat.tokenUsage`)
on each LM span and, as autolog does, on the root; the trace's total goes in its metadata.

An LM's parameters are recorded without anything that looks like a credential (an API key,
headers, a password in a URL), as `lm.safe_params` decides; a call's error message (a provider
that quotes the key it was sent) is recorded as `lm.redact` leaves it, the redactor of the API's
502 body, so nothing raw reaches the outbox or the store.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.utils.callback import ACTIVE_CALL_ID, BaseCallback
from dspy.utils.usage_tracker import UsageTracker

from flywheel.lm import redact, safe_params
from flywheel.tracing import token_usage

CHAIN, LLM, CHAT_MODEL, PARSER, TOOL, AGENT, RETRIEVER = (
    "CHAIN",
    "LLM",
    "CHAT_MODEL",
    "PARSER",
    "TOOL",
    "AGENT",
    "RETRIEVER",
)
USAGE_ATTRIBUTE = "mlflow.chat.tokenUsage"  # mlflow.tracing.constant.SpanAttributeKey.CHAT_USAGE


@dataclass
class _Call:
    """One DSPy call while it runs: references only, serialised later by `CallTree.spans`."""

    name: str
    kind: str
    parent: str | None
    start_ns: int
    inputs: dict[str, Any]
    attributes: dict[str, Any] = field(default_factory=dict)
    end_ns: int | None = None
    outputs: Any = None
    error: BaseException | None = None
    usage: dict[str, int] | None = None


class CallTree(BaseCallback, UsageTracker):
    """Per request: the DSPy calls as a tree, how many LM calls the cache answered, token usage.

    DSPy reports usage to the context's usage tracker for every call the provider answered and
    never for a cache hit; the callback sees every call. The difference is the cached calls.
    """

    def __init__(self) -> None:
        UsageTracker.__init__(self)
        self.lm_calls = 0
        self.answered = 0
        self._calls: dict[str, _Call] = {}  # call id -> call, in start order
        self._lock = threading.Lock()  # a timed-out forward may still add calls while spans() reads

    # -- DSPy's callback hooks -------------------------------------------------------------

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self._start(call_id, f"{type(instance).__name__}.forward", _module_kind(instance), inputs)
        signature = getattr(instance, "signature", None) or getattr(
            getattr(instance, "predict", None), "signature", None
        )
        if signature is not None and hasattr(signature, "signature"):
            self._calls[call_id].attributes["signature"] = signature.signature

    def on_module_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        self._end(call_id, outputs, exception)

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.lm_calls += 1
        model = str(getattr(instance, "model", type(instance).__name__))
        model_type = getattr(instance, "model_type", None)
        call = self._start(
            call_id,
            f"{type(instance).__name__}.__call__",
            CHAT_MODEL if model_type == "chat" else LLM,
            inputs,
        )
        call.inputs = safe_params(call.inputs)  # a per-call api_key or headers never reach a trace
        attributes = safe_params(dict(getattr(instance, "kwargs", {}) or {}))
        attributes.update(
            model=model,
            model_type=model_type,
            cache=getattr(instance, "cache", None),
            **{"mlflow.message.format": "dspy", "mlflow.llm.model": model},
        )
        if "/" in model:
            attributes["mlflow.llm.provider"] = model.split("/", 1)[0]
        call.attributes = attributes

    def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        self._end(call_id, outputs, exception)

    def on_adapter_format_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self._start(call_id, f"{type(instance).__name__}.format", PARSER, inputs)

    def on_adapter_format_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        self._end(call_id, outputs, exception)

    def on_adapter_parse_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self._start(call_id, f"{type(instance).__name__}.parse", PARSER, inputs)

    def on_adapter_parse_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        self._end(call_id, outputs, exception)

    def on_tool_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        if getattr(instance, "name", None) == "finish":  # ReAct's end marker, not a tool call
            return
        call = self._start(call_id, f"Tool.{instance.name}", TOOL, inputs)
        call.inputs.pop("args", None)
        call.attributes = {"name": instance.name, "description": getattr(instance, "desc", None)}
        call.attributes["args"] = getattr(instance, "args", None)

    def on_tool_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        self._end(call_id, outputs, exception)

    # -- DSPy's usage tracker ---------------------------------------------------------------

    def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
        self.answered += 1
        super().add_usage(lm, usage_entry)
        call = self._calls.get(ACTIVE_CALL_ID.get() or "")  # the LM call reporting it
        if call is not None and call.kind in (CHAT_MODEL, LLM):
            call.usage = token_usage([usage_entry])

    # -- results ----------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        usage = {k: v for k, v in self.get_total_tokens().items() if v}
        return {
            "lm_calls": self.lm_calls,
            "cached_calls": max(0, self.lm_calls - self.answered),
            "usage": usage or None,
        }

    def spans(self) -> list[dict[str, Any]]:
        """The calls as span records, parents before children: `parent` is an index into the
        list, None for the root (the program's own forward). A call still open (a timed-out run)
        ends now, marked as not finished. Inputs, outputs and attributes are the call's own
        values, not copies: they are written as JSON once, with the whole outbox payload
        (`span_rows.payload_text`), where an LM call's prompt is also kept once."""
        with self._lock:
            calls = list(self._calls.items())
        index = {call_id: i for i, (call_id, _) in enumerate(calls)}
        now = time.time_ns()
        out: list[dict[str, Any]] = []
        for _, call in calls:
            parent = index.get(call.parent or "")
            if parent is None and out:
                parent = 0  # a second top-level call: kept, under the root
            attributes = dict(call.attributes)
            if call.usage:
                attributes[USAGE_ATTRIBUTE] = call.usage
            error = None
            if call.error is not None:
                error = {"type": _type_name(type(call.error)), "message": redact(str(call.error))}
            elif call.end_ns is None:
                error = {"type": "Unfinished", "message": "the call had not returned when the request ended"}
            out.append(
                {
                    "name": call.name,
                    "type": call.kind,
                    "parent": parent,
                    "start_ns": call.start_ns,
                    "end_ns": call.end_ns if call.end_ns is not None else now,
                    "inputs": call.inputs,
                    "outputs": _plain(call.outputs),
                    "attributes": {k: v for k, v in attributes.items() if v is not None},
                    "error": error,
                }
            )
        if out and (root_usage := token_usage(self.get_total_tokens().values())):
            out[0]["attributes"][USAGE_ATTRIBUTE] = root_usage
        return out

    def _start(self, call_id: str, name: str, kind: str, inputs: dict[str, Any]) -> _Call:
        call = _Call(name, kind, ACTIVE_CALL_ID.get(), time.time_ns(), _unpack(inputs))
        with self._lock:
            self._calls[call_id] = call
        return call

    def _end(self, call_id: str, outputs: Any, exception: BaseException | None) -> None:
        call = self._calls.get(call_id)
        if call is not None:
            call.end_ns = time.time_ns()
            call.outputs = outputs
            call.error = exception


def _module_kind(instance: Any) -> str:
    if isinstance(instance, dspy.Retrieve):
        return RETRIEVER
    if isinstance(instance, dspy.ReAct):
        return AGENT
    if isinstance(instance, dspy.Predict):
        return LLM
    return CHAIN


def _unpack(inputs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments as autolog records them: `kwargs` merged in, an empty `args` dropped."""
    merged = {k: v for k, v in inputs.items() if k != "kwargs"} | dict(inputs.get("kwargs") or {})
    if "args" in merged and not merged["args"]:
        merged.pop("args")
    return merged


def _plain(value: Any) -> Any:
    if isinstance(value, dspy.Prediction):
        return value.toDict()
    return value


def _type_name(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


@dataclass(frozen=True)
class Step:
    """One step of a prediction as people read it ("what the LM saw"): its place in the tree,
    its time and, for an LM call, the messages sent, the response and the tokens."""

    name: str
    kind: str
    depth: int
    duration_ms: float
    messages: list[dict[str, Any]] | None = None
    response: Any = None
    tokens: dict[str, int] | None = None
    error: str | None = None

    @property
    def is_lm(self) -> bool:
        return self.kind in (CHAT_MODEL, LLM) and self.messages is not None


def steps(spans: list[Any]) -> list[Step]:
    """The steps of a trace, in tree order (each after its parent), from MLflow spans (a stored
    trace) or from `CallTree.spans()` records (a prediction not yet delivered)."""
    rows = [_row(s, i) for i, s in enumerate(spans)]
    children: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        children.setdefault(row["parent"], []).append(row)
    ids = {row["id"] for row in rows}
    out: list[Step] = []

    def walk(parent: Any, depth: int) -> None:
        for row in sorted(children.get(parent, []), key=lambda r: r["start"]):
            out.append(
                Step(
                    row["name"],
                    row["kind"],
                    depth,
                    round((row["end"] - row["start"]) / 1e6, 1),
                    row["messages"],
                    row["response"],
                    row["tokens"],
                    row["error"],
                )
            )
            walk(row["id"], depth + 1)

    for root in [r for r in rows if r["parent"] not in ids]:
        children.setdefault("__roots__", []).append(root)
    walk("__roots__", 0)
    return out


def _row(span: Any, index: int) -> dict[str, Any]:
    if isinstance(span, dict):  # a CallTree record (values; JSON texts in an older one), parent by index
        text = isinstance(span.get("inputs"), str)
        inputs = _loads(span.get("inputs")) if text else span.get("inputs")
        attributes = {k: _loads(v) if text else v for k, v in (span.get("attributes") or {}).items()}
        error = span.get("error")
        return {
            "id": index,
            "parent": span.get("parent"),
            "name": span["name"],
            "kind": span["type"],
            "start": span["start_ns"],
            "end": span["end_ns"],
            "messages": inputs.get("messages") if isinstance(inputs, dict) else None,
            "response": _loads(span.get("outputs")) if text else span.get("outputs"),
            "tokens": attributes.get(USAGE_ATTRIBUTE),
            "error": f"{error['type']}: {error['message']}" if error else None,
        }
    inputs = span.inputs if isinstance(span.inputs, dict) else {}
    status = getattr(getattr(span, "status", None), "status_code", None)
    failed = str(getattr(status, "value", status)) == "ERROR"
    return {
        "id": span.span_id,
        "parent": span.parent_id,
        "name": span.name,
        "kind": str(span.span_type),
        "start": span.start_time_ns,
        "end": span.end_time_ns or span.start_time_ns,
        "messages": inputs.get("messages"),
        "response": span.outputs,
        "tokens": (span.attributes or {}).get(USAGE_ATTRIBUTE),
        "error": (getattr(span.status, "description", None) or "failed") if failed else None,
    }


def _loads(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text
