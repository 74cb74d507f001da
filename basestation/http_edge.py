"""The HTTP edge of `basestation serve`: what stands between a socket and a route.

- `EdgeApp` (ASGI): the api key (not asked on open paths and under open prefixes), the body read whole under a size limit and a deadline (413 and
  408 before any parsing), and response counters keyed by route.
- `protocol_class`: uvicorn's h11 protocol with a header deadline and a connection cap, which
  uvicorn lacks (its keep-alive timer starts only after a first response).
The limits and their reasons are in `http_limits`.
"""

from __future__ import annotations

import asyncio
import hmac
import resource
import time

import h11
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from basestation import http_limits as L
from basestation.openai_api import ApiError

BODY_METHODS = ("POST", "PUT", "PATCH")


def _error(error: ApiError, close: bool = False) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status,
                        headers={"Connection": "close"} if close else None)


class EdgeApp:
    """Wraps the routes' app; counts every response in `responses[(route, status)]`."""

    def __init__(self, app, routes: tuple[str, ...], limits: L.HttpLimits,
                 api_key: str | None, open_paths: tuple[str, ...],
                 responses: dict[tuple[str, int], int], open_prefixes: tuple[str, ...] = ()):
        self.app, self.routes, self.limits = app, routes, limits
        self.api_key, self.open_paths, self.open_prefixes = api_key, open_paths, open_prefixes
        self.responses = responses

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key and not self._open(scope["path"]) and not self._authorized(scope):
                await _error(ApiError(
                    401, "Incorrect API key provided (send Authorization: Bearer KEY)",
                    code="invalid_api_key"))(scope, receive, counting_send)
            elif scope["method"] in BODY_METHODS:
                try:
                    body = await self._read_body(scope, receive)
                except ApiError as e:  # the rest of the body is never read: close
                    await _error(e, close=True)(scope, receive, counting_send)
                else:
                    await self.app(scope, _replay(body, receive), counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            path = scope["path"]
            # the dashboard's files: one label, whatever the name (junk names cannot grow it)
            label = next((p + "*" for p in self.open_prefixes if path.startswith(p)), None) \
                or L.route_label(path, self.routes)
            key = (label, status.get("code", 0))
            self.responses[key] = self.responses.get(key, 0) + 1

    def _open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode())

    async def _read_body(self, scope, receive) -> bytes:
        """The whole body. Raises ApiError: 413 past max_body_bytes (declared or received), 408
        past its deadline. A client that left gives what came (its answer goes nowhere)."""
        limits = self.limits
        declared = L.declared_length(scope["headers"])
        if declared is not None and declared > limits.max_body_bytes:
            raise L.too_large(limits)
        chunks, received, started_s = [], 0, time.monotonic()
        while True:
            timeout_s = L.body_deadline_s(started_s, received, limits) - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(timeout_s, 0.0))
            except asyncio.TimeoutError:
                raise L.too_slow() from None
            if message["type"] != "http.request":  # http.disconnect
                return b"".join(chunks)
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limits.max_body_bytes:
                raise L.too_large(limits)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive that gives the body read already, then the connection's own messages."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def protocol_class(limits: L.HttpLimits, max_connections: int) -> type:
    """uvicorn's h11 protocol, closing a connection whose request line and headers are not in
    within header_timeout_s (of its opening, or of its last response), and any connection past
    `max_connections`."""

    class DeadlineH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.abort()
                return
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request's headers get the same deadline

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return DeadlineH11Protocol


def raise_fd_limit() -> int:
    """Lift this process's soft descriptor limit to its hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
