"""The project's LM choice, with a built-in offline model that needs no network and no key.

`OfflineLM` is NOT a language model. It is a retrieval model over the few-shot demos that DSPy's
adapter puts in the prompt: for each request it finds the demo (a user/assistant message pair
before the final user message) whose input-field text is most similar to the request's input
fields (TF-IDF-weighted cosine over lowercase words and character 4-grams, computed across the
demos of that one prompt; ties go to the demo earliest in the prompt) and answers with that
demo's output values. It never generates text. Field names and types are read from the system
message and the format from the prompt text (ChatAdapter ``[[ ## field ## ]]`` sections, or a
JSON object for JSONAdapter), so it works for any signature and ignores dspy.settings.
It exists so that optimisation is visible offline: more and better demos give better answers.
Asked to stream (`dspy.streamify`), it sends the same text a few words per delta, as a provider
would, so a streamed field arrives in several chunks.

Fallbacks, used when the prompt has no demos or the chosen demo lacks a field (e.g. ``reasoning``
for ChainOfThought when demos were labelled without it), derived from the field's type as the
system prompt describes it:

- str: "No demos to answer from." (no demos) or "The most similar demo has no value for this
  field." (demo without it); ``reasoning`` with a demo: "Answered from demo i of n, the most
  similar to the input (cosine similarity 0.42)."
- Literal[...] / Enum: the first allowed option; bool: False; int: 0; float: 0.0
- list: []; dict: {}; pydantic and other JSON-schema types: a minimal object built from the
  schema DSPy shows (required properties filled with these same defaults), "{}" if none is shown.
"""

from __future__ import annotations

import ast
import importlib
import json
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import dspy
from dspy.clients.engines.base import validate_request
from dspy.lm15 import (
    Message,
    Request,
    Response,
    StreamDeltaEvent,
    TextDelta,
    TextPart,
    Usage,
    response_to_events,
)

from flywheel import limits
from flywheel.config import secret_values

OFFLINE_MODEL = "flywheel/offline"

NO_DEMOS = "No demos to answer from."
NO_FIELD = "The most similar demo has no value for this field."
_MISSING = ("Not supplied for this particular example.", "Not supplied for this conversation")
_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_FIELD = re.compile(r"^\d+\. `(\w+)` \((.*?)\):", re.M)
_NOTE = re.compile(r"^\{(\w+)\} +# note: the value you produce (.*)$")
_JSON_LINE = re.compile(r'^"\w+": (".*")\s*,?$')
_WORDS_PER_DELTA = 3  # how the offline LM streams: a few words per text delta, like a provider
_PIECE = re.compile(r"\s*\S+\s*|\s+")
_SECRET_PARTS = ("key", "token", "secret", "password", "authorization", "header", "credential")


def _fields(block: str) -> dict[str, str]:
    return {name: type_name for name, type_name in _FIELD.findall(block)}


def _sections(text: str) -> dict[str, str]:
    """Split `[[ ## name ## ]]` sections like ChatAdapter.parse does (first occurrence wins)."""
    found: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.splitlines():
        match = _HEADER.match(line.strip())
        if match:
            rest = line.strip()[match.end() :].strip()
            found.append((match.group(1), [rest] if rest else []))
        else:
            found[-1][1].append(line)
    out: dict[str, str] = {}
    for name, lines in found:
        if name is not None and name not in out:
            out[name] = "\n".join(lines).strip()
    return out


def _notes(system: str) -> dict[str, str]:
    """Per-field type notes ("must be True or False", JSON schema, ...) from either adapter."""
    notes: dict[str, str] = {}
    for line in system.splitlines():
        text = line.strip()
        if json_line := _JSON_LINE.match(text):  # JSONAdapter shows the structure as JSON
            try:
                text = json.loads(json_line.group(1))
            except ValueError:
                continue
        if match := _NOTE.match(text):
            notes[match.group(1)] = match.group(2)
    return notes


def _from_schema(schema: dict[str, Any], defs: dict[str, Any]) -> Any:
    if "$ref" in schema:
        return _from_schema(defs.get(schema["$ref"].rsplit("/", 1)[-1], {}), defs)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _from_schema(schema[key][0], defs)
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        props = schema.get("properties", {})
        return {k: _from_schema(props[k], defs) for k in schema.get("required", []) if k in props}
    simple = {"array": [], "string": "", "integer": 0, "number": 0.0, "boolean": False}
    return simple.get(kind)


def _fallback(type_name: str, note: str | None) -> Any:
    """A fixed value of the field's type that DSPy's parser accepts."""
    if type_name.startswith("Literal["):
        try:
            return ast.literal_eval(f"[{type_name[8:-1]}]")[0]
        except (ValueError, SyntaxError, IndexError):
            pass
    if note is None:
        defaults = {"int": 0, "float": 0.0, "bool": False}
        base = type_name.split("[", 1)[0].lower()
        return defaults.get(type_name, [] if base in ("list", "tuple", "set") else {})
    if note.startswith(("must exactly match", "must be one of")):
        return note.split("one of: ", 1)[1].split("; ")[0]
    if note == "must be True or False":
        return False
    if note.startswith("must be a single "):
        return 0.0 if "float" in note else 0
    if note.startswith("must adhere to the JSON schema: "):
        try:
            schema = json.loads(note.split(": ", 1)[1])
            value = _from_schema(schema, schema.get("$defs", {}))
            return {} if value is None else value
        except ValueError:
            pass
    return {}


def _features(text: str) -> Counter[str]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    feats = Counter(words)
    for word in words:
        padded = f" {word} "
        feats.update("#" + padded[i : i + 4] for i in range(len(padded) - 3))
    return feats


def _most_similar(query: str, docs: list[str]) -> tuple[int, float]:
    """TF-IDF cosine over this prompt's demos; the earliest demo wins ties."""
    vectors = [_features(doc) for doc in docs]
    df = Counter(term for vec in vectors for term in vec)
    n = len(docs)

    def weigh(vec: Counter[str]) -> dict[str, float]:
        return {t: c * (math.log((1 + n) / (1 + df.get(t, 0))) + 1) for t, c in vec.items()}

    q = weigh(_features(query))
    q_norm = math.sqrt(sum(w * w for w in q.values())) or 1.0
    best, best_score = 0, -1.0
    for i, vec in enumerate(vectors):
        d = weigh(vec)
        d_norm = math.sqrt(sum(w * w for w in d.values())) or 1.0
        score = round(sum(w * d.get(t, 0.0) for t, w in q.items()) / (q_norm * d_norm), 9)
        if score > best_score:
            best, best_score = i, score
    return best, best_score


def _answer(system: str, turns: list[tuple[str, str]]) -> str:
    """Build the whole completion text for one prompt; a pure function, so thread-safe."""
    head, _, tail = system.partition("Your output fields are:")
    inputs = list(_fields(head))
    outputs = _fields(tail.split("All interactions will be structured", 1)[0])
    last = turns[-1][1] if turns and turns[-1][0] == "user" else ""
    is_json = "Respond with a JSON object" in last or "Outputs will be a JSON object" in system
    if not outputs:  # no system message: read the names from the final request instead
        names = re.findall(r"`(\w+)`" if is_json else r"`\[\[ ## (\w+) ## \]\]`", last)
        outputs = {name: "str" for name in names if name != "completed"}
    if not outputs:
        return NO_DEMOS
    notes = _notes(system)

    def input_text(content: str) -> str:
        sections = _sections(content)
        return "\n".join(v for k, v in sections.items() if not inputs or k in inputs)

    demos: list[dict[str, Any]] = []
    docs: list[str] = []
    for (role, content), (next_role, reply) in zip(turns[:-1], turns[1:-1], strict=False):
        if role != "user" or next_role != "assistant":
            continue
        try:
            values = json.loads(reply) if reply.lstrip().startswith("{") else _sections(reply)
        except ValueError:
            values = _sections(reply)
        if isinstance(values, dict):
            demos.append(values)
            docs.append(input_text(content))
    cut = last.rfind("\n\nRespond with ")  # the output reminder that ends the final request
    query = input_text(last[:cut] if cut >= 0 else last)
    best, score = _most_similar(query, docs) if demos else (-1, 0.0)
    answer: dict[str, Any] = {}
    for name, type_name in outputs.items():
        value = demos[best].get(name) if demos else None
        if isinstance(value, str) and value.strip().startswith(_MISSING):
            value = None
        if value is None and name == "reasoning" and demos:
            value = (
                f"Answered from demo {best + 1} of {len(demos)}, the most similar to the input "
                f"(cosine similarity {score:.2f})."
            )
        elif value is None and type_name == "str":
            value = NO_FIELD if demos else NO_DEMOS
        elif value is None:
            value = _fallback(type_name, notes.get(name))
        answer[name] = value
    if is_json:
        return json.dumps(answer, indent=2, ensure_ascii=False)
    parts = [f"[[ ## {k} ## ]]\n{v if isinstance(v, str) else json.dumps(v)}" for k, v in answer.items()]
    return "\n\n".join([*parts, "[[ ## completed ## ]]"])


def _respond(request: Request) -> Response:
    validate_request(request)
    system = request.system or ""
    if not isinstance(system, str):
        system = "".join(getattr(part, "text", "") or "" for part in system)
    turns = [(m.role, m.text or "") for m in request.messages]
    text = _answer(system, turns)
    usage = Usage(input_tokens=0, output_tokens=0, total_tokens=0)
    message = Message.assistant([TextPart(text)])
    return Response(id=None, model=OFFLINE_MODEL, message=message, finish_reason="stop", usage=usage)


def deltas(text: str, words: int = _WORDS_PER_DELTA) -> list[str]:
    """`text` cut into pieces of `words` words each (whitespace kept), which join back to `text`."""
    pieces = _PIECE.findall(text)
    return ["".join(pieces[i : i + words]) for i in range(0, len(pieces), words)] or [text]


def _events(request: Request) -> Iterator[Any]:
    """The answer as stream events: start, the text as several deltas of a few words, end.

    DSPy's native engine path sends each text delta to the stream listeners of `dspy.streamify`
    (as one chunk), so a streamed field arrives in pieces, as from a provider."""
    for event in response_to_events(_respond(request)):
        if event.type == "delta" and event.delta.type == "text":
            index = event.delta.part_index
            for piece in deltas(event.delta.text):
                yield StreamDeltaEvent(delta=TextDelta(text=piece, part_index=index))
        else:
            yield event


class RetrievalEngine:
    """Stateless dspy engine for OfflineLM; safe to share across threads, copies and pickles."""

    def complete(self, request: Request) -> Response:
        return _respond(request)

    def stream(self, request: Request) -> Iterator[Any]:
        return _events(request)

    def close(self) -> None:
        pass

    def dump_state(self) -> dict[str, Any]:
        return {}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> RetrievalEngine:
        return cls()


class AsyncRetrievalEngine(RetrievalEngine):
    """Async counterpart; the work is pure CPU and tiny, so it runs inline on the loop."""

    async def complete(self, request: Request) -> Response:  # type: ignore[override]
        return _respond(request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:  # type: ignore[override]
        for event in _events(request):
            yield event

    async def aclose(self) -> None:
        pass


class OfflineLM(dspy.LM):
    """A dspy.LM whose engine answers from the prompt's demos (see the module docstring)."""

    def __init__(self, model: str = OFFLINE_MODEL, **kwargs: Any) -> None:
        kwargs.pop("engine", None)
        kwargs.pop("async_engine", None)
        kwargs["cache"] = False  # answers are instant; a disk cache would only go stale
        super().__init__(model, engine=RetrievalEngine(), async_engine=AsyncRetrievalEngine(), **kwargs)


def make_lm(spec: str | None = None, **kwargs: Any) -> dspy.BaseLM:
    """None/""/"offline" -> OfflineLM (kwargs ignored); else a LiteLLM model string for dspy.LM.

    Keys come from the environment via LiteLLM, so none is ever passed here.
    """
    if spec is None or spec.strip().lower() in ("", "offline", OFFLINE_MODEL):
        return OfflineLM()
    if spec.startswith("py:"):  # py:package.module:factory, a custom LM of your own
        module, _, attr = spec[3:].partition(":")
        factory = getattr(importlib.import_module(module), attr or "make_lm")
        lm = factory(**kwargs)
        if not isinstance(lm, dspy.BaseLM):
            raise TypeError(f"{spec} returned {type(lm).__name__}, not a dspy.BaseLM")
        return lm
    return dspy.LM(spec.strip(), **kwargs)


def is_offline(spec: str | None) -> bool:
    return spec is None or spec.strip().lower() in ("", "offline", OFFLINE_MODEL)


def configured_lm(settings: Any) -> dspy.BaseLM:
    """The LM the settings name: FLYWHEEL_LM with FLYWHEEL_LM_API_BASE, FLYWHEEL_LM_ENGINE,
    FLYWHEEL_LM_RETRIES and FLYWHEEL_LM_TIMEOUT applied to a LiteLLM model string (the offline
    LM and `py:` factories take none of them). The key stays in the provider's environment
    variable."""
    spec = settings.flywheel_lm
    _remembered.update(secret_values(settings))  # `redact` masks them whichever settings are current
    if is_offline(spec) or spec.startswith("py:"):
        return make_lm(spec)
    kwargs: dict[str, Any] = {"num_retries": settings.flywheel_lm_retries}
    if settings.flywheel_lm_engine != "auto":
        kwargs["engine"] = settings.flywheel_lm_engine
    if base := settings.flywheel_lm_api_base:
        kwargs["api_base"] = strip_userinfo(base)
        if kwargs["api_base"] != base:  # http://user:password@host/v1: a gateway behind basic auth
            kwargs["extra_headers"] = {"Authorization": _basic_auth(base)}
            if settings.flywheel_lm_engine == "auto":
                kwargs["engine"] = "litellm"  # DSPy's native client sends no headers of the caller's
    if settings.flywheel_lm_timeout is not None:
        kwargs["timeout"] = settings.flywheel_lm_timeout
    return make_lm(spec, **kwargs)


def with_cache(lm: dspy.BaseLM, enabled: bool) -> dspy.BaseLM:
    """`lm`, or a copy of it, whose calls use DSPy's response cache exactly when `enabled`.

    Serving (LM_CACHE_SERVING) and compile/evaluation (LM_CACHE_COMPILE) each decide for
    themselves, whatever the LM object was built with. A copy shares the LM's connections.
    """
    if not hasattr(lm, "cache") or bool(lm.cache) == enabled or isinstance(lm, OfflineLM):
        return lm
    return lm.copy(cache=enabled)


def _is_secret(name: object) -> bool:
    lowered = str(name).lower()
    if lowered.endswith("tokens"):  # max_tokens, max_completion_tokens: limits, not credentials
        return False
    return any(part in lowered for part in _SECRET_PARTS)


def _basic_auth(url: str) -> str:
    """The Basic credential of the user:password in a URL (as an HTTP client would send it)."""
    import base64
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def strip_userinfo(url: Any) -> Any:
    """http://user:secret@host/v1 -> http://host/v1 (a password in a URL is a secret too)."""
    if not isinstance(url, str) or "@" not in url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if not parts.netloc or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


_remembered: set[str] = set()  # the secrets of settings an LM was configured from (configured_lm)


def redact(text: str) -> str:
    """`text` (an error message, a traceback) without the secrets a client may quote in it: the
    known secret values (`config.secret_values`: the settings' keys, the provider keys in the
    environment, the password of FLYWHEEL_LM_API_BASE and MLFLOW_TRACKING_URI, also of settings
    an LM was configured from), and by their shape a URL's user:password, an Authorization
    header's credential, an `sk-...` style key (`limits.redact`). The one redactor for what the
    API answers, logs and traces."""
    return limits.redact(text, secret_values() | _remembered)


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(strip_userinfo(v)) for k, v in value.items() if not _is_secret(k)}
    return value


def safe_params(params: dict[str, Any]) -> dict[str, Any]:
    """LM parameters fit to write down (a trace, a log): no key, header or secret-named entry,
    and no user:password inside a URL."""
    return _scrub(params)


def persistable_lm(lm: dspy.BaseLM | None) -> dspy.BaseLM | None:
    """An equivalent LM that cannot write a key when pickled into a model artifact."""
    if lm is None or isinstance(lm, OfflineLM):
        return lm
    if isinstance(lm, dspy.LM) and isinstance(lm.engine, str):
        return dspy.LM.load_state(_scrub(lm.dump_state()))
    clean = lm.copy()  # other BaseLMs (e.g. DummyLM, custom engines): drop secret kwargs
    clean.kwargs = _scrub(dict(clean.kwargs))
    return clean
