"""The dashboard's routes on `basestation serve` (issue 25): the page and its static files (no
key: they carry no data), the JSON snapshot `/v1/wdmoe/state` and the server-sent-events stream
`/v1/wdmoe/events` (both behind the api key, as every /v1 route).

The stream sends a `state` event at once and one every interval; the streams share one snapshot
(built and serialized at most once per SNAPSHOT_REUSE_S); a state request gets a fresh one. It ends
when the client goes (Starlette cancels it) or the server stops (`stopping()`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Callable

from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from basestation.live_tap import LiveTap

DASHBOARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                 ".png": "image/png"}
EVENT_INTERVAL_S = 1.0  # between two state events, unless ?interval_s= says
INTERVAL_RANGE_S = (0.25, 10.0)
STOP_LOOK_S = 0.25  # how often a stream looks whether the server is stopping
SNAPSHOT_REUSE_S = 0.2  # a stream's snapshot this young is sent again (many pages, one build)


def dashboard_file(name: str, folder: str = DASHBOARD_DIR) -> str | None:
    """The path of a dashboard file by its bare name, or None: only files in the folder itself,
    of a known type (no folders, no `..`, nothing hidden)."""
    if not name or "/" in name or "\\" in name or name.startswith(".") \
            or os.path.splitext(name)[1] not in CONTENT_TYPES:
        return None
    path = os.path.join(folder, name)
    return path if os.path.isfile(path) else None


def event_interval_s(query: str | None) -> float:
    """?interval_s= as seconds within INTERVAL_RANGE_S; raises ValueError with the reason."""
    if query is None:
        return EVENT_INTERVAL_S
    value = float(query)  # ValueError for junk
    low, high = INTERVAL_RANGE_S
    if not low <= value <= high:  # NaN fails too
        raise ValueError(f"interval_s must be within {low:g}..{high:g}")
    return value


def sse_state(snapshot_text: str) -> str:
    return f"event: state\ndata: {snapshot_text}\n\n"


class LiveRoutes:
    """The routes, over a LiveTap; `stopping()` is true once the server shuts down."""

    def __init__(self, tap: LiveTap, stopping: Callable[[], bool] = lambda: False,
                 folder: str = DASHBOARD_DIR):
        self.tap, self.stopping, self.folder = tap, stopping, folder
        self._text: tuple[float, str] | None = None  # (built at, monotonic s; its JSON)

    def routes(self) -> list[Route]:
        return [Route("/", self.index), Route("/dashboard/{name}", self.static),
                Route("/v1/wdmoe/state", self.state), Route("/v1/wdmoe/events", self.events)]

    def _file(self, name: str) -> Response:
        path = dashboard_file(name, self.folder)
        if path is None:
            return JSONResponse({"error": {"message": f"no dashboard file {name[:80]!r}",
                                           "type": "invalid_request_error",
                                           "code": "not_found"}}, status_code=404)
        return FileResponse(path, media_type=CONTENT_TYPES[os.path.splitext(name)[1]],
                            headers={"Cache-Control": "no-cache"})

    async def index(self, request: HttpRequest) -> Response:
        return self._file("index.html")

    async def static(self, request: HttpRequest) -> Response:
        return self._file(request.path_params["name"])

    def snapshot_text(self, reuse_s: float = 0.0) -> str:
        """The snapshot as JSON; one built less than `reuse_s` ago is given again."""
        now_s = time.monotonic()
        cached = self._text
        if cached is None or now_s - cached[0] >= reuse_s:
            cached = self._text = (now_s, json.dumps(self.tap.snapshot()))
        return cached[1]

    async def state(self, request: HttpRequest) -> Response:
        return Response(self.snapshot_text(), media_type="application/json",
                        headers={"Cache-Control": "no-cache"})

    async def events(self, request: HttpRequest) -> Response:
        try:
            interval_s = event_interval_s(request.query_params.get("interval_s"))
        except ValueError as e:
            return JSONResponse({"error": {"message": f"interval_s: {e}",
                                           "type": "invalid_request_error",
                                           "param": "interval_s", "code": None}},
                                status_code=400)
        return StreamingResponse(self._stream(interval_s), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def _stream(self, interval_s: float):
        yield f"retry: {int(interval_s * 1000)}\n" + sse_state(self.snapshot_text())
        next_s = time.monotonic() + interval_s
        while not self.stopping():
            wait_s = next_s - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(min(wait_s, STOP_LOOK_S))
                continue
            yield sse_state(self.snapshot_text(SNAPSHOT_REUSE_S))
            next_s += interval_s
            if next_s < time.monotonic():  # fell behind (a stalled loop): no burst to catch up
                next_s = time.monotonic() + interval_s
        yield ": the server is stopping\n\n"
