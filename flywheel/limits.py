"""Hostile-input limits: what a request may hold, and how much of it flywheel stores.

`problem(value)` checks a decoded JSON value before anything is queued or run
(nesting depth, text that UTF-8 cannot encode); `version_problem` checks a
version number against what the model registry can hold; `stored` is the one
place that cuts what is written to trace tags and the outbox down to size,
leaving a marker. Kept free of heavy imports: the API's request models use it.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32  # levels of objects/arrays below a request body (the body is level 0, its fields 1)
MAX_VERSION = 2**31 - 1  # MLflow keeps model version numbers in a 32-bit integer column
TRUNCATED = "…[truncated by flywheel]"


def problem(value: Any, where: str = "body", depth: int = 0) -> str | None:
    """Why `value` may not be accepted (None when it may): too deep, or text UTF-8 cannot encode."""
    if depth > MAX_DEPTH:
        return f"{where}: nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, str):
        return _text_problem(value, where)
    if isinstance(value, dict):
        for key, item in value.items():
            found = _text_problem(str(key), f"{where} key") or problem(item, f"{where}.{key}", depth + 1)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = problem(item, f"{where}[{i}]", depth + 1)
            if found:
                return found
    return None


def _text_problem(text: str, where: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"{where}: text that cannot be encoded as UTF-8 (a lone surrogate)"
    return None


def version_problem(version: str | None) -> str | None:
    """None for a version number the registry can hold (or no version)."""
    if not version:
        return None
    text = version.strip()
    if not text.isascii() or not text.isdigit():
        return f"version {version!r} is not a version number"
    if not 1 <= int(text) <= MAX_VERSION:
        return f"version {version!r} is out of range (1 to {MAX_VERSION})"
    return None


def stored(value: Any, field_limit: int, total_limit: int | None = None) -> Any:
    """`value` cut down for storage: each text to `field_limit` characters, the whole (as JSON) to
    `total_limit`, each cut marked with TRUNCATED. A value within limits comes back as is; an
    object stays an object with the same keys (export reads the fields back by name).

    The one helper for everything written to trace tags and the outbox (inputs, outputs,
    errors, corrections, comments): whoever reads it sees from the marker that a text was cut.
    """
    cut = _fields(value, field_limit)
    if total_limit is None or _size(cut) <= total_limit:
        return cut
    if isinstance(cut, dict) and cut:
        share = max(len(TRUNCATED) + 1, (total_limit - _size({k: "" for k in cut})) // len(cut))
        cut = _fields(cut, share)
        if _size(cut) <= total_limit:
            return cut
        return {k: v if _size(v) <= share else TRUNCATED for k, v in cut.items()}
    if isinstance(cut, str):
        return _fields(cut, total_limit)
    return TRUNCATED


def _size(value: Any) -> int:
    return len(json.dumps(value, default=str))


def _fields(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return value if len(value) <= limit else value[: max(0, limit - len(TRUNCATED))] + TRUNCATED
    if isinstance(value, dict):
        return {k: _fields(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_fields(v, limit) for v in value]
    return value
