"""A small Python client for the flywheel API, sync (`Client`) and async (`AsyncClient`).

Both build the same requests (`_Requests`), so they cannot drift apart; an
error status raises `APIError` carrying the server's message. `stream()` reads
POST /predict/stream's Server-Sent Events as dicts (`_Events` parses them for both).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import httpx


class APIError(RuntimeError):
    def __init__(self, status_code: int, detail: str, trace_id: str | None = None) -> None:
        self.status_code, self.detail = status_code, detail
        self.trace_id = trace_id  # the failed prediction's ERROR trace (a stream's error event)
        super().__init__(f"{status_code}: {detail}")


class _Events:
    """Server-Sent Events, fed line by line, out as the dicts their `data:` lines hold."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.data: list[str] = []

    def feed(self, line: str) -> dict[str, Any] | None:
        """The event a blank line completes, else None (comments and unknown lines are skipped)."""
        if line == "":
            name, data = self.name, "\n".join(self.data)
            self.name, self.data = None, []
            if not data:
                return None
            event: dict[str, Any] = json.loads(data)
            if name:
                event.setdefault("event", name)
            return event
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self.name = value
        elif field == "data":
            self.data.append(value)
        return None


def _raise_on_error(event: dict[str, Any]) -> dict[str, Any]:
    if event.get("event") == "error":
        raise APIError(int(event.get("status") or 500), str(event.get("detail")), event.get("trace_id"))
    return event


def _ended_early() -> APIError:
    return APIError(502, "the stream ended before its result event")


def _decode(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise APIError(response.status_code, str(detail))
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return response.text


class _Requests:
    """(method, path, kwargs) for every endpoint."""

    @staticmethod
    def predict(
        model: str,
        inputs: dict[str, Any],
        version: str | None,
        stage: str | None,
        alias: str | None,
        routing_key: str | None = None,
    ) -> tuple[str, str, dict[str, Any]]:
        body: dict[str, Any] = {"model": model, "inputs": inputs}
        refs = {"version": version, "stage": stage, "alias": alias, "routing_key": routing_key}
        body.update({k: v for k, v in refs.items() if v})
        return "POST", "/predict", {"json": body}

    @staticmethod
    def stream(
        model: str,
        inputs: dict[str, Any],
        version: str | None,
        stage: str | None,
        alias: str | None,
        routing_key: str | None = None,
    ) -> tuple[str, str, dict[str, Any]]:
        _, _, kwargs = _Requests.predict(model, inputs, version, stage, alias, routing_key)
        return "POST", "/predict/stream", {**kwargs, "headers": {"Accept": "text/event-stream"}}

    @staticmethod
    def feedback(
        trace_id: str,
        rating: str,
        corrected_output: dict[str, Any] | str | None,
        comment: str | None,
        user_id: str | None,
    ) -> tuple[str, str, dict[str, Any]]:
        body = {
            "trace_id": trace_id,
            "rating": rating,
            "corrected_output": corrected_output,
            "comment": comment,
            "user_id": user_id,
        }
        return "POST", "/feedback", {"json": {k: v for k, v in body.items() if v is not None}}

    @staticmethod
    def export(model: str, rating: str, format: str, **filters: Any) -> tuple[str, str, dict[str, Any]]:
        params = {"model": model, "rating": rating, "format": format}
        params.update({k: str(v) for k, v in filters.items() if v is not None})
        return "GET", "/export", {"params": params}

    @staticmethod
    def promote(name: str, version: str | int, stage: str) -> tuple[str, str, dict[str, Any]]:
        return (
            "POST",
            f"/models/{quote(name, safe='')}/stage",
            {"json": {"version": str(version), "stage": stage}},
        )


class Client:
    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, kwargs: dict[str, Any]) -> Any:
        return _decode(self._http.request(method, path, **kwargs))

    def predict(
        self,
        model: str,
        inputs: dict[str, Any],
        *,
        version: str | None = None,
        stage: str | None = None,
        alias: str | None = None,
        routing_key: str | None = None,
    ) -> dict[str, Any]:
        return self._call(*_Requests.predict(model, inputs, version, stage, alias, routing_key))

    def stream(
        self,
        model: str,
        inputs: dict[str, Any],
        *,
        version: str | None = None,
        stage: str | None = None,
        alias: str | None = None,
        routing_key: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """POST /predict/stream: the events as they arrive, `{"event": "chunk", "field", "chunk"}`
        ... then `{"event": "result", "result", "trace_id", "model_version", "latency_ms"}`.

        An error answered before the stream (404, 422, 503, ...) raises APIError as `predict` does.
        An `error` event (the prediction failed after the stream began: 502, 504, 500, 503) raises
        APIError too, after the events before it were yielded; its `trace_id` names the ERROR
        trace. A stream that ends without a result raises APIError 502.
        """
        method, path, kwargs = _Requests.stream(model, inputs, version, stage, alias, routing_key)
        with self._http.stream(method, path, **kwargs) as response:
            if response.status_code >= 400:
                response.read()
                _decode(response)
            events = _Events()
            for line in response.iter_lines():
                event = events.feed(line)
                if event is not None:
                    yield _raise_on_error(event)
                    if event.get("event") == "result":
                        return
        raise _ended_early()

    def feedback(
        self,
        trace_id: str,
        rating: str,
        *,
        corrected_output: dict[str, Any] | str | None = None,
        comment: str | None = None,
        user_id: str | None = None,
    ) -> dict[str, Any]:
        return self._call(*_Requests.feedback(trace_id, rating, corrected_output, comment, user_id))

    def export(self, model: str, *, rating: str = "any", format: str = "json", **filters: Any) -> Any:
        return self._call(*_Requests.export(model, rating, format, **filters))

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/models", {})["models"]

    def versions(self, name: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/models/{quote(name, safe='')}/versions", {})["versions"]

    def promote(self, name: str, version: str | int, stage: str) -> dict[str, Any]:
        return self._call(*_Requests.promote(name, version, stage))

    def rollback(
        self, name: str, *, expected_version: str | None = None, reason: str | None = None
    ) -> dict[str, Any]:
        """The previous Production back in one step (admin key); APIError 409 when it cannot be."""
        body = {"expected_version": expected_version, "reason": reason, "actor": "client"}
        return self._call("POST", f"/models/{quote(name, safe='')}/rollback", {"json": body})

    def set_canary(
        self, name: str, ref: str | None, share: float, *, reason: str | None = None
    ) -> dict[str, Any]:
        body = {"ref": ref, "share": share, "reason": reason, "actor": "client"}
        return self._call("PUT", f"/models/{quote(name, safe='')}/canary", {"json": body})["plan"]

    def audit(self, name: str, limit: int = 200) -> list[dict[str, Any]]:
        return self._call("GET", f"/models/{quote(name, safe='')}/audit", {"params": {"limit": limit}})[
            "entries"
        ]

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health", {})

    def metrics(self) -> dict[str, Any]:
        return self._call("GET", "/metrics", {})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 60.0,
        max_connections: int = 100,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits)

    async def _call(self, method: str, path: str, kwargs: dict[str, Any]) -> Any:
        return _decode(await self._http.request(method, path, **kwargs))

    async def predict(
        self,
        model: str,
        inputs: dict[str, Any],
        *,
        version: str | None = None,
        stage: str | None = None,
        alias: str | None = None,
        routing_key: str | None = None,
    ) -> dict[str, Any]:
        return await self._call(*_Requests.predict(model, inputs, version, stage, alias, routing_key))

    async def stream(
        self,
        model: str,
        inputs: dict[str, Any],
        *,
        version: str | None = None,
        stage: str | None = None,
        alias: str | None = None,
        routing_key: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """`Client.stream`, as an async iterator (`async for event in client.stream(...)`); the
        same events and the same APIError for an error before the stream or an `error` event."""
        method, path, kwargs = _Requests.stream(model, inputs, version, stage, alias, routing_key)
        async with self._http.stream(method, path, **kwargs) as response:
            if response.status_code >= 400:
                await response.aread()
                _decode(response)
            events = _Events()
            async for line in response.aiter_lines():
                event = events.feed(line)
                if event is not None:
                    yield _raise_on_error(event)
                    if event.get("event") == "result":
                        return
        raise _ended_early()

    async def feedback(
        self,
        trace_id: str,
        rating: str,
        *,
        corrected_output: dict[str, Any] | str | None = None,
        comment: str | None = None,
        user_id: str | None = None,
    ) -> dict[str, Any]:
        return await self._call(*_Requests.feedback(trace_id, rating, corrected_output, comment, user_id))

    async def export(self, model: str, *, rating: str = "any", format: str = "json", **filters: Any) -> Any:
        return await self._call(*_Requests.export(model, rating, format, **filters))

    async def models(self) -> list[dict[str, Any]]:
        return (await self._call("GET", "/models", {}))["models"]

    async def versions(self, name: str) -> list[dict[str, Any]]:
        return (await self._call("GET", f"/models/{quote(name, safe='')}/versions", {}))["versions"]

    async def promote(self, name: str, version: str | int, stage: str) -> dict[str, Any]:
        return await self._call(*_Requests.promote(name, version, stage))

    async def health(self) -> dict[str, Any]:
        return await self._call("GET", "/health", {})

    async def metrics(self) -> dict[str, Any]:
        return await self._call("GET", "/metrics", {})

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
