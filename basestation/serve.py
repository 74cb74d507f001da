"""`basestation serve`: the OpenAI API (chat, completions, models) over the engine, plus /health,
/metrics (Prometheus) and /stats (JSON: per-agent figures, memory-budgeted agents' cache hits,
misses and stalls included, and the MoE layers' counters), and the live dashboard: the page at
`/`, its state at /v1/wdmoe/state and /v1/wdmoe/events (live_routes.py).

`http_edge` reads each body whole under its limits; handlers parse it, check it and tokenize it
on a worker thread (a 4 MiB prompt takes seconds: never on the event loop or the engine's
admission thread), submit an engine Request, and read its events from an asyncio queue the
engine thread fills through `call_soon_threadsafe`; the engine alone touches the sockets and the
model. A client that goes away cancels its request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from basestation import http_limits as L
from basestation import metrics as M
from basestation import openai_api as api
from basestation.engine import Engine
from basestation.engine_errors import EngineError
from basestation.http_edge import EdgeApp, protocol_class, raise_fd_limit
from basestation.jobs import Accepted, Delta, Failed, Finished, Job, Request
from basestation.live_routes import LiveRoutes
from basestation.live_tap import LiveTap

DISCONNECT_CHECK_S = 0.25  # how often a non-streamed request checks that its client is there
# answered without the api key: /health (load balancers), the dashboard's page and its static
# files (they carry no data: the page asks for the key and sends it with its data requests)
OPEN_PATHS = ("/health", "/")
OPEN_PREFIXES = ("/dashboard/",)


def http_error(error: api.ApiError | EngineError) -> api.ApiError:
    """An error as the client sees it: the engine's get their status and body from the one
    table in `openai_api.api_error`."""
    return api.api_error(error) if isinstance(error, EngineError) else error


def error_response(error: api.ApiError | EngineError) -> JSONResponse:
    error = http_error(error)
    return JSONResponse(error.body(), status_code=error.status)


def overloaded(what: str) -> api.ApiError:
    return api.ApiError(503, f"overloaded: {what}; retry later", "server_error", "overloaded")


class Server:
    """The app's state: the engine, what it serves, the HTTP response counters and the prompts
    in flight."""

    def __init__(self, engine: Engine, model_id: str, api_key: str | None = None,
                 limits: L.HttpLimits = L.HttpLimits()):
        self.engine = engine
        self.model_id = model_id
        self.api_key = api_key
        self.limits = limits
        self.created = int(time.time())
        self.responses: dict[tuple[str, int], int] = {}
        self._workers = ThreadPoolExecutor(limits.prepare_workers, thread_name_prefix="prepare")
        self._preparing = 0  # bodies given to the workers and not yet back (event loop only)
        self.stopping = False  # set when the server shuts down: the event streams end
        self.live: LiveTap | None = None  # the dashboard's recorder, attached by app()

    def app(self) -> EdgeApp:
        """The ASGI app; attaches the live recorder to the engine's runtime (once)."""
        if self.live is None:
            engine = self.engine
            self.live = LiveTap(engine.session.runtime,
                                max(engine.session.base.moe_layers, default=-1) + 1,
                                self.model_id, engine.defaults.theta).attach()
            engine.live = self.live
        routes = [
            Route("/health", self.health),
            Route("/metrics", self.metrics),
            Route("/stats", self.stats),
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            *LiveRoutes(self.live, lambda: self.stopping).routes(),
        ]
        edge = EdgeApp(Starlette(routes=routes), tuple(r.path for r in routes), self.limits,
                       self.api_key, OPEN_PATHS, self.responses, OPEN_PREFIXES)
        return edge

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

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
        recorder = self.live.recorder if self.live is not None else None
        text = M.render(self.engine.metrics, dict(self.responses), self.engine.queue_depth,
                        runtime.agent_figures(), dataclasses.asdict(runtime.stats),
                        (recorder.slots_routed, recorder.slots_computed) if recorder else None)
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

    async def chat(self, request: HttpRequest) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, chat=False)

    def _defaults(self) -> api.Defaults:
        return self.engine.defaults

    async def _generate(self, http: HttpRequest, chat: bool) -> Response:
        raw = await http.body()  # read whole already, under the limits, by http_edge
        if self._preparing >= self.limits.max_preparing:
            return error_response(overloaded(f"{self._preparing} request bodies wait to be "
                                             "read"))
        self._preparing += 1
        try:
            job, include_usage = await asyncio.get_running_loop().run_in_executor(
                self._workers, self._prepare, raw, chat)
        except (api.ApiError, EngineError) as e:
            return error_response(e)
        except Exception as e:  # a bug fails this request, with its trace on stderr
            traceback.print_exc(file=sys.stderr)
            return error_response(api.ApiError(500, f"the request could not be prepared: "
                                               f"{type(e).__name__}", "server_error",
                                               "internal_error"))
        finally:
            self._preparing -= 1
        return await self._serve(http, job, include_usage, chat=chat)

    def _prepare(self, raw: bytes, chat: bool) -> tuple[Job, bool]:
        """On a worker thread: the body parsed, checked and tokenized into a Job whose prompts
        are token ids (an echoed text prompt stays text: the engine echoes it as given). Raises
        ApiError, or the engine's BadRequest and ContextTooLong."""
        body = L.parse_json(raw, self.limits.max_json_depth)
        context = self.engine.context
        if chat:
            parsed = api.parse_chat(body, self._defaults())
            chars = sum(len(m["content"]) for m in parsed.messages)
            job = Job(prompts=None, messages=parsed.messages, params=parsed.params,
                      stream=parsed.stream)
            texts = [chars]
        else:
            parsed = api.parse_completion(body, self._defaults(), self.engine.vocab_size,
                                          max_prompts=self.engine.max_batch)
            job = Job(prompts=parsed.prompts, messages=None, params=parsed.params,
                      stream=parsed.stream, echo=parsed.echo, logprobs=parsed.logprobs)
            texts = [len(p) for p in parsed.prompts if isinstance(p, str)]
        for chars in texts:
            if not L.text_fits(chars, context):
                raise api.ApiError(400, f"This model's maximum context length is {context} "
                                   f"tokens; a prompt of {chars} characters cannot fit",
                                   code="context_length_exceeded")
        # the engine's own tokenization (one owner of the rule), here rather than on its thread
        ids = self.engine.encode(job)
        for prompt_ids in ids:
            api.completion_budget(len(prompt_ids), parsed.params.max_tokens,
                                  self._defaults().max_tokens, context)
        prompts = tuple(p if job.echo and isinstance(p, str) else tuple(i)
                        for p, i in zip(job.prompts or [None], ids))
        return dataclasses.replace(job, prompts=prompts, messages=None), parsed.include_usage

    async def _serve(self, http: HttpRequest, job: Job, include_usage: bool,
                     chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:  # on an engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        request = Request(job=job, emit=emit)
        try:
            self.engine.submit(request)  # each prompt takes a place in the batch or the queue
        except EngineError as e:
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
                    yield _sse(http_error(event.error).body())
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
               api_key: str | None, limits: L.HttpLimits = L.HttpLimits()) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers), then stop the engine. The port is bound
    before the ready line; raises OSError when it cannot be."""
    import socket

    import uvicorn

    server = Server(engine, model_id, api_key, limits)
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
    max_connections = L.connection_cap(raise_fd_limit(), limits)
    config = uvicorn.Config(server.app(), log_level="warning", timeout_graceful_shutdown=3,
                            lifespan="off", http=protocol_class(limits, max_connections))
    userver = uvicorn.Server(config)
    original_exit = userver.handle_exit

    def handle_exit(sig, frame) -> None:  # the event streams end first, then uvicorn waits
        server.stopping = True
        original_exit(sig, frame)

    userver.handle_exit = handle_exit
    engine.start()
    print(f"basestation serve ready: http://{host}:{bound_port}/v1 model {model_id} "
          f"({len(engine.session.agents)} agents)", flush=True)
    try:
        userver.run(sockets=[sock])
    finally:
        server.close()
        engine.stop()
        sock.close()
