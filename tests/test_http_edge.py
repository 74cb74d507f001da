"""The HTTP edge (issue 20): body limits, JSON shapes, deadlines, route counters. Pure functions
with hand numbers, the ASGI wrapper in-process, the h11 protocol on a loopback uvicorn the test
starts; the same triggers against a real `basestation serve` are in test_http_serve.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading

import pytest
from waiting import wait_until

from basestation import http_limits as L
from basestation import openai_api as api
from basestation.http_edge import EdgeApp, protocol_class

LIMITS = L.HttpLimits()


def refused(raw: bytes) -> api.ApiError:
    with pytest.raises(api.ApiError) as e:
        L.parse_json(raw, LIMITS.max_json_depth)
    assert e.value.status == 400 and e.value.code == "invalid_json"
    return e.value


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,  # RecursionError in the C parser: a 500 before
    b'{"a":' * 33 + b"1" + b"}" * 33,  # deeper than 32, though the parser copes
    b'{"prompt": [' + b"9" * 5000 + b"]}",  # ValueError (int digits limit): a 500 before
    b'{"seed": ' + b"1" * 21 + b"}",
    b'{"prompt": "\\ud800"}',  # a lone surrogate: the tokenizer's TypeError, a 500 before
    b'{"\\udfff": 1}',
    b'{"temperature": NaN}', b'{"temperature": -Infinity}',
    b"{not json", b"\xff\xfe\x00",
])
def test_parse_json_refuses_with_400(raw):
    assert len(refused(raw).message) < 300  # what is echoed is bounded


def test_parse_json_accepts_what_clients_send():
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text",
                                                                      "text": "é😀"}]}],
            "seed": -(2 ** 63), "logit_bias": {"1": -100}, "prompt": [[1, 2], [3]]}
    assert L.parse_json(json.dumps(body).encode(), 32) == body
    assert L.parse_json(b"[" * 32 + b"]" * 32, 32) == json.loads(b"[" * 32 + b"]" * 32)
    assert L.parse_json(b"18446744073709551615", 32) == 2 ** 64 - 1  # 20 digits


def test_limits_with_hand_numbers():
    limits = L.HttpLimits(body_grace_s=10.0, min_body_rate_bytes_per_s=1000.0)
    assert L.body_deadline_s(100.0, 0, limits) == 110.0
    assert L.body_deadline_s(100.0, 5000, limits) == 115.0  # 5 s more for 5 kB at 1 kB/s
    assert L.connection_cap(1024, LIMITS) == 1024 - L.FD_RESERVE
    assert L.connection_cap(65536, LIMITS) == LIMITS.max_connections
    assert L.connection_cap(10, LIMITS) == 1
    assert L.declared_length([(b"Content-Length", b"12")]) == 12
    assert L.declared_length([(b"content-length", b"x")]) is None
    assert L.declared_length([]) is None
    routes = ("/health", "/v1/completions")
    assert L.route_label("/v1/completions", routes) == "/v1/completions"
    assert L.route_label("/v1/completions/", routes) == "unmatched"
    assert L.route_label("/" + "x" * 5000, routes) == "unmatched"
    assert L.text_fits(4096 * L.MAX_CHARS_PER_TOKEN, 4096)
    assert not L.text_fits(4096 * L.MAX_CHARS_PER_TOKEN + 1, 4096)


# --- the ASGI wrapper, in-process -------------------------------------------------------------

def run_edge(body_chunks, headers=(), path="/v1/completions", method="POST",
             limits=LIMITS, api_key=None, hang=False):
    """One request through EdgeApp over an app that echoes the body's length; returns (status,
    body, the counters, whether the app ran)."""
    ran, sent, responses = [], [], {}

    async def app(scope, receive, send):
        message = await receive()
        ran.append(len(message["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    chunks = list(body_chunks)

    async def receive():
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks) or hang}
        await asyncio.Event().wait()  # a client that sends nothing more

    async def send(message):
        sent.append(message)

    edge = EdgeApp(app, ("/health", "/v1/completions"), limits, api_key, ("/health",),
                   responses)
    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    asyncio.run(edge(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start, body, responses, ran


def test_edge_refuses_a_declared_oversize_body_before_reading_it():
    limits = L.HttpLimits(max_body_bytes=100)
    start, body, _, ran = run_edge([b"x" * 10], [(b"content-length", b"101")], limits=limits)
    assert start["status"] == 413 and not ran
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert (b"connection", b"close") in start["headers"]  # the rest is never read


def test_edge_refuses_an_oversize_body_while_reading():
    limits = L.HttpLimits(max_body_bytes=100)
    start, _, _, ran = run_edge([b"x" * 60, b"x" * 60, b"x" * 60], limits=limits)
    assert start["status"] == 413 and not ran
    start, _, _, ran = run_edge([b"x" * 50, b"x" * 50], limits=limits)
    assert start["status"] == 200 and ran == [100]


def test_edge_cuts_a_body_that_stops_arriving():
    limits = L.HttpLimits(body_grace_s=0.2)
    start, body, responses, ran = run_edge([b"{"], hang=True, limits=limits)
    assert start["status"] == 408 and not ran
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert responses == {("/v1/completions", 408): 1}


def test_edge_counts_by_route_and_keeps_the_key():
    responses = {}
    for path in ["/v1/completions", "/junk1", "/junk2/" + "x" * 1000, "/health"]:
        _, _, counted, _ = run_edge([b"{}"], path=path, api_key="k")
        for key, n in counted.items():
            responses[key] = responses.get(key, 0) + n
    assert responses == {("/v1/completions", 401): 1, ("unmatched", 401): 2,
                         ("/health", 200): 1}


# --- the h11 protocol: header deadline and connection cap --------------------------------------

@contextlib.contextmanager
def tiny_uvicorn(limits: L.HttpLimits, max_connections: int):
    """uvicorn on 127.0.0.1 with our protocol; yields its port."""
    import uvicorn

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = uvicorn.Config(app, log_level="warning", lifespan="off",
                            http=protocol_class(limits, max_connections))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 60, what="uvicorn to start")
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def closed_by_server(conn: socket.socket, within_s: float) -> bool:
    """Whether the server closes `conn` (reads end, or reset) before `within_s`."""
    conn.settimeout(within_s)
    try:
        while conn.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return b"".join(iter(lambda: conn.recv(4096), b""))


@pytest.mark.integration
def test_half_sent_headers_are_cut_at_the_deadline():
    """400 slowloris connections stayed open for 75 s before (uvicorn's keep-alive timer starts
    only after a first response)."""
    with tiny_uvicorn(L.HttpLimits(header_timeout_s=0.5), max_connections=100) as port:
        check_header_deadline(port)


def check_header_deadline(port: int) -> None:
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    slow[0].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
    for conn in slow:
        assert closed_by_server(conn, within_s=10.0)
        conn.close()
    # a kept-alive connection's next request gets the same deadline, even while it trickles
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200" in conn.recv(4096)
        conn.sendall(b"GET / HTTP/1.1\r\n")
        assert closed_by_server(conn, within_s=10.0)
    assert b" 200 " in get(port)


@pytest.mark.integration
def test_connections_past_the_cap_are_closed_and_the_server_recovers():
    """No header deadline within the test: only the cap can close the fourth connection."""
    with tiny_uvicorn(L.HttpLimits(header_timeout_s=600.0), max_connections=3) as port:
        check_cap(port)


def check_cap(port: int) -> None:
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    extra = socket.create_connection(("127.0.0.1", port))
    assert closed_by_server(extra, within_s=10.0)
    extra.close()
    for conn in held:
        conn.close()
    def answers() -> bool:
        try:
            return b" 200 " in get(port)
        except OSError:
            return False

    # the held ones leave as the server sees them close
    wait_until(answers, 60, interval_s=0.05, what="the server to take connections again")
