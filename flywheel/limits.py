"""Hostile-input limits: what a request may hold, and how much of it flywheel stores.

`problem(value)` checks a decoded JSON value before anything is queued or run
(nesting depth, text that UTF-8 cannot encode, numbers JSON cannot hold: NaN,
Infinity, and 1e999, which Python's json reads as infinity); `version_problem` checks a
version number against what the model registry can hold; `stored` is the one
place that cuts what is written to trace tags and the outbox down to size,
leaving a marker; `redact` and `redact_uri` take secrets out of a text before it is
shown, logged or stored. Kept free of heavy imports: the API's request models use it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

MAX_DEPTH = 32  # levels of objects/arrays below a request body (the body is level 0, its fields 1)
MAX_VERSION = 2**31 - 1  # MLflow keeps model version numbers in a 32-bit integer column
TRUNCATED = "…[truncated by flywheel]"


def problem(value: Any, where: str = "body", depth: int = 0) -> str | None:
    """Why `value` may not be accepted (None when it may): too deep, text UTF-8 cannot encode, or a
    number that is not finite (JSON has no NaN or Infinity; a store or export could not write it)."""
    if depth > MAX_DEPTH:
        return f"{where}: nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, str):
        return _text_problem(value, where)
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where}: {value} is not a finite number (NaN, Infinity and 1e999 are not accepted)"
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


# --- secrets in text ---------------------------------------------------------------------------

MASK = "***"
MIN_SECRET_CHARS = 6  # a shorter known value is not searched for (it would mask ordinary words)
_USERINFO = re.compile(r"(?<![\w.-])([\w.~%+-]+):([^\s/@'\"]+)@(?=[\w.\[-])")  # user:password@host
_TOKEN_USERINFO = re.compile(r"(://)[^\s/@:'\"]+@(?=[\w.\[-])")  # scheme://token@host
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[\w.~+/=-]{8,}")
_KEYLIKE = re.compile(r"\b(sk|pk|rk)-[\w-]{12,}")
_NAMED = re.compile(  # password=..., api_key: ..., "token": "...", OPENAI_API_KEY=...
    r"(?i)\b([\w-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key))"
    r"([\"']?\s*[=:]\s*[\"']?)(?!\*\*\*)([^\s&'\",;]+)"
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without secrets: each of `secrets` (values known to be secret, such as the keys in
    the environment, wherever they appear; values under MIN_SECRET_CHARS are skipped), a URL's
    user:password (user:***@) or token (***@), an Authorization credential (Bearer ***), an
    `sk-...` style key, and the value after a secret-named parameter (password=***)."""
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _USERINFO.sub(rf"\1:{MASK}@", text)
    text = _TOKEN_USERINFO.sub(rf"\1{MASK}@", text)
    text = _BEARER.sub(rf"\1 {MASK}", text)
    text = _KEYLIKE.sub(rf"\1-{MASK}", text)
    return _NAMED.sub(rf"\1\2{MASK}", text)


def redact_uri(uri: str) -> str:
    """A URI fit to print or write down: user:password@ -> user:***@, token@ -> ***@, and a
    secret-named query parameter's value masked (postgresql://h/db?password=***)."""
    from urllib.parse import urlsplit

    try:
        netloc = urlsplit(uri).netloc
    except ValueError:
        return redact(uri)
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        uri = uri.replace(netloc, f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}", 1)
    return redact(uri)


def uri_secrets(uri: str | None) -> list[str]:
    """The secrets a URI carries in its userinfo (the password, or a lone token), as written and
    decoded, for `redact` to find wherever a client quotes them."""
    from urllib.parse import unquote, urlsplit

    if not uri or "@" not in uri:
        return []
    try:
        netloc = urlsplit(uri).netloc
    except ValueError:
        return []
    if "@" not in netloc:
        return []
    userinfo = netloc.rsplit("@", 1)[0]
    secret = userinfo.partition(":")[2] if ":" in userinfo else userinfo
    return [s for s in {secret, unquote(secret)} if s]
