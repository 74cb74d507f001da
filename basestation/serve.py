"""`basestation serve`: the OpenAI API (chat, completions, models) over the engine, plus /health,
/metrics (Prometheus) and /stats (JSON: per-agent figures, memory-budgeted agents' cache hits,
misses and stalls included, and the MoE layers' counters).

Handlers parse the body (openai_api), submit an engine Request, and read its events from an
asyncio queue the engine thread fills through `call_soon_threadsafe`; the engine alone touches
the sockets and the model. A client that goes away cancels its request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from basestation import metrics as M
from basestation import openai_api as api
from basestation.engine import Engine
from basestation.jobs import Accepted, Delta, Failed, Finished, Job, Request

DISCONNECT_CHECK_S = 0.25  # how often a non-streamed request checks that its client is there
OPEN_PATHS = ("/health",)  # answered without the api key (load balancers)


def error_response(error: api.ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class Server:
    """The app's state: the engine, what it serves, and the HTTP response counters."""

    def __init__(self, engine: Engine, model_id: str, api_key: str | None = None):
        self.engine = engine
        self.model_id = model_id
        self.api_key = api_key
        self.created = int(time.time())
        self.responses: dict[tuple[str, int], int] = {}

    def app(self) -> Starlette:
        app = Starlette(routes=[
            Route("/health", self.health),
            Route("/metrics", self.metrics),
            Route("/stats", self.stats),
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ])
        server = self

        async def asgi(scope, receive, send):  # auth and counting around every route
            if scope["type"] != "http":
                return await app(scope, receive, send)
            status = {}

            async def counting_send(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            if server.api_key and scope["path"] not in OPEN_PATHS \
                    and not server.authorized(scope):
                response = error_response(api.ApiError(
                    401, "Incorrect API key provided (send Authorization: Bearer KEY)",
                    code="invalid_api_key"))
                await response(scope, receive, counting_send)
            else:
                await app(scope, receive, counting_send)
            key = (scope["path"], status.get("code", 0))
            server.responses[key] = server.responses.get(key, 0) + 1

        return asgi

    def authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode())

    # --- plain endpoints ------------------------------------------------------------------------

    async def health(self, request: HttpRequest) -> Response:
        agents = [a.figures() for a in self.engine.session.agents]
        alive = sum(a["alive"] for a in agents)
        ok = self.engine.alive()
        return JSONResponse({"status": "ok" if ok else "engine stopped", "model": self.model_id,
                             "agents": len(agents), "agents_alive": alive,
                             "queue_depth": self.engine.queue_depth},
                            status_code=200 if ok else 503)

    async def metrics(self, request: HttpRequest) -> Response:
        runtime = self.engine.session.runtime
        text = M.render(self.engine.metrics, dict(self.responses), self.engine.queue_depth,
                        runtime.agent_figures(), dataclasses.asdict(runtime.stats))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def stats(self, request: HttpRequest) -> Response:
        runtime = self.engine.session.runtime
        return JSONResponse({"agents": runtime.agent_figures(),
                             "moe": dataclasses.asdict(runtime.stats),
                             "prefetch": {"hints": runtime.prefetching,
                                          "hints_sent": runtime.hints_sent}})

    async def models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created,
            "owned_by": "wdmoe", "max_model_len": self.engine.context}]})

    # --- generation -----------------------------------------------------------------------------

    async def _body(self, request: HttpRequest):
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise api.ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json")

    async def chat(self, request: HttpRequest) -> Response:
        try:
            parsed = api.parse_chat(await self._body(request), self._defaults())
        except api.ApiError as e:
            return error_response(e)
        job = Job(prompts=None, messages=parsed.messages, params=parsed.params,
                  stream=parsed.stream)
        return await self._serve(request, job, parsed.include_usage, chat=True)

    async def completions(self, request: HttpRequest) -> Response:
        try:
            parsed = api.parse_completion(await self._body(request), self._defaults(),
                                          self.engine.vocab_size)
        except api.ApiError as e:
            return error_response(e)
        job = Job(prompts=parsed.prompts, messages=None, params=parsed.params,
                  stream=parsed.stream, echo=parsed.echo, logprobs=parsed.logprobs)
        return await self._serve(request, job, parsed.include_usage, chat=False)

    def _defaults(self) -> api.Defaults:
        return self.engine.defaults

    async def _serve(self, http: HttpRequest, job: Job, include_usage: bool,
                     chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request = Request(job=job, emit=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            self.engine.submit(request)
        except api.ApiError as e:
            return error_response(e)
        try:
            first = await self._next(http, request, events)
        except BaseException:
            self.engine.cancel(request)
            raise
        if first is None:  # the client left while queued
            return Response(status_code=499)
        if isinstance(first, Failed):
            return error_response(first.error)
        assert isinstance(first, Accepted), first  # the engine's first event says which
        prefix = "chatcmpl-" if chat else "cmpl-"
        ids = (prefix + request.id, int(time.time()), self.engine.defaults.model_id)
        if job.stream:
            return StreamingResponse(self._stream(request, events, ids, chat, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while True:
                event = await self._next(http, request, events)
                if event is None:
                    return Response(status_code=499)
                if isinstance(event, Failed):
                    return error_response(event.error)
                if isinstance(event, Finished):
                    return JSONResponse(_response(event, ids, chat))
        except BaseException:
            self.engine.cancel(request)
            raise

    async def _next(self, http: HttpRequest, request: Request, events: asyncio.Queue):
        """The next event; None (and the request cancelled) when the client disconnected."""
        getter = asyncio.ensure_future(events.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_CHECK_S)
                if done:
                    return getter.result()
                if await http.is_disconnected():
                    self.engine.cancel(request)
                    return None
        finally:
            if not getter.done():
                getter.cancel()  # a pending get takes nothing from the queue

    async def _stream(self, request: Request, events: asyncio.Queue, ids: tuple, chat: bool,
                      include_usage: bool):
        """SSE chunks; Starlette cancels this generator when the client disconnects, and the
        `finally` cancels the generation."""
        id_, created, model = ids
        done = False
        try:
            if chat:
                yield _sse(api.chat_chunk(id_, created, model, {"role": "assistant",
                                                                "content": ""}))
            while True:
                event = await events.get()
                if isinstance(event, Delta):
                    chunk = api.chat_chunk(id_, created, model, {"content": event.text}) if chat \
                        else api.completion_chunk(id_, created, model, event.index, event.text)
                    yield _sse(chunk)
                elif isinstance(event, Failed):  # an error event ends the stream, no [DONE]
                    done = True  # the engine has let the request go
                    yield _sse(event.error.body())
                    return
                elif isinstance(event, Finished):
                    last = []
                    for choice in event.choices:
                        last.append(api.chat_chunk(id_, created, model, {}, choice.finish_reason)
                                    if chat else api.completion_chunk(
                                        id_, created, model, choice.index, "",
                                        choice.finish_reason))
                    if include_usage:
                        usage = dict(last[-1] if last else {}, choices=[],
                                     usage=api.usage(event.prompt_tokens,
                                                     event.completion_tokens))
                        last.append(usage)
                    last[-1]["wdmoe"] = event.wdmoe
                    for chunk in last:
                        yield _sse(chunk)
                    break
            done = True
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                self.engine.cancel(request)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _response(event: Finished, ids: tuple, chat: bool) -> dict:
    id_, created, model = ids
    if chat:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": None, "finish_reason": c.finish_reason} for c in event.choices]
    else:
        choices = [{"index": c.index, "text": c.text, "logprobs": c.logprobs,
                    "finish_reason": c.finish_reason} for c in event.choices]
    return {"id": id_, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": choices,
            "usage": api.usage(event.prompt_tokens, event.completion_tokens),
            "wdmoe": event.wdmoe}


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve beyond loopback


def run_server(engine: Engine, model_id: str, host: str, port: int,
               api_key: str | None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers), then stop the engine. The port is bound
    before the ready line; raises OSError when it cannot be."""
    import socket

    import uvicorn

    server = Server(engine, model_id, api_key)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(server.app(), log_level="warning", timeout_graceful_shutdown=3,
                            lifespan="off")
    engine.start()
    print(f"basestation serve ready: http://{host}:{bound_port}/v1 model {model_id} "
          f"({len(engine.session.agents)} agents)", flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
