"""A local HTTP server speaking OpenAI's chat-completions protocol, for driving flywheel end to end.

It answers like flywheel's offline LM (from the demos in the prompt, `flywheel.lm._answer`),
so programs get parseable, deterministic answers, but every call crosses a real socket as
an OpenAI client sends it: `POST /v1/chat/completions` with a bearer key, a JSON answer
with usage figures, or Server-Sent Events when `stream` is true. It records what it was
sent, and can be told to be slow, to hang, or to answer 429 / 500 for a number of calls.

Only loopback, only for tests; `python tests/openai_stub.py PORT` runs it on its own.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KEY = "sk-stub-0123456789abcdef"


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def text(self) -> str:
        """Every message's text, joined (what the LM was shown)."""
        return "\n".join(_text(m.get("content")) for m in self.body.get("messages", []))


@dataclass
class Behaviour:
    latency: float = 0.0  # seconds before every answer
    failures: list[int] = field(default_factory=list)  # statuses for the next calls, in order
    retry_after: str | None = "0"  # Retry-After header on a 429
    key: str = KEY
    basic: tuple[str, str] | None = None  # also accept HTTP Basic (a user:password@ in api_base)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _credential(headers: dict[str, str]) -> str:
    """The key (Bearer) or user:password (Basic) a request's Authorization header carries."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value).decode()
        except ValueError:
            return value
    return value


def _tokens(text: str) -> int:
    return len(text.split())


def answer_text(messages: list[dict[str, Any]]) -> str:
    from flywheel.lm import _answer

    system = "".join(_text(m.get("content")) for m in messages if m.get("role") == "system")
    turns = [(m.get("role", ""), _text(m.get("content"))) for m in messages if m.get("role") != "system"]
    return _answer(system, turns)


class OpenAIStub:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.behaviour = Behaviour()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": []})
                else:
                    self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {}
                stub._handle(self, body)

            def _json(
                self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="openai-stub", daemon=True)

    @property
    def url(self) -> str:
        """The api_base an OpenAI client takes (ends in /v1)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> OpenAIStub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self, **behaviour: Any) -> None:
        with self._lock:
            self.seen.clear()
            self.behaviour = Behaviour(**behaviour)

    def calls(self) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.path.endswith("/chat/completions")]

    # --- one request ----------------------------------------------------------------------

    def _handle(self, handler: Any, body: dict[str, Any]) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        with self._lock:
            self.seen.append(Seen(handler.path, headers, body))
            behaviour = self.behaviour
            failure = behaviour.failures.pop(0) if behaviour.failures else None
        if not handler.path.rstrip("/").endswith("/chat/completions"):
            handler._json(
                404, {"error": {"message": f"no route {handler.path}", "type": "invalid_request_error"}}
            )
            return
        accepted = {f"Bearer {behaviour.key}"}
        if behaviour.basic:
            accepted.add("Basic " + base64.b64encode(":".join(behaviour.basic).encode()).decode())
        if headers.get("authorization") not in accepted:
            handler._json(
                401,
                {
                    "error": {  # quoting the credential sent, as OpenAI's 401 does
                        "message": f"Incorrect API key provided: {_credential(headers)}.",
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                },
            )
            return
        if behaviour.latency:
            time.sleep(behaviour.latency)
        if failure == 429:
            extra = {"Retry-After": behaviour.retry_after} if behaviour.retry_after is not None else {}
            handler._json(
                429,
                {
                    "error": {
                        "message": "Rate limit reached for stub-model: slow down (stub 429).",
                        "type": "rate_limit_error",
                        "code": "rate_limit_exceeded",
                    }
                },
                extra,
            )
            return
        if failure is not None:
            handler._json(
                failure,
                {
                    "error": {
                        "message": f"The stub server had an error while processing your request ({failure}).",
                        "type": "server_error",
                    }
                },
            )
            return
        messages = body.get("messages", [])
        text = answer_text(messages)
        prompt_tokens = sum(_tokens(_text(m.get("content"))) for m in messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": _tokens(text),
            "total_tokens": prompt_tokens + _tokens(text),
        }
        ident = "chatcmpl-" + uuid.uuid4().hex[:20]
        model = body.get("model", "stub")
        if body.get("stream"):
            self._stream(handler, ident, model, text, usage, body)
            return
        handler._json(
            200,
            {
                "id": ident,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                ],
                "usage": usage,
            },
        )

    def _stream(
        self, handler: Any, ident: str, model: str, text: str, usage: dict[str, int], body: dict[str, Any]
    ) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Connection", "close")
        handler.end_headers()
        base = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

        def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            handler.wfile.write(f"data: {data}\n\n".encode())
            handler.wfile.flush()

        send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        pieces = [text[i : i + 16] for i in range(0, len(text), 16)] or [""]
        for piece in pieces:
            send({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            send({**base, "choices": [], "usage": usage})
        send("[DONE]")
        handler.close_connection = True


if __name__ == "__main__":
    stub = OpenAIStub(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0).start()
    print(stub.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stub.stop()
