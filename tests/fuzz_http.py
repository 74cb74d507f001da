"""A bounded HTTP fuzzer for `basestation serve` (issue 20): hostile and careless requests, each
answered by a status, never a 500, a hang or a dead server.

Cases are drawn from a seeded `random.Random`, so a failure reproduces from its seed and index:
bodies (sizes, bytes, truncation, declared lengths), nesting, numbers, strings, prompt lists,
stop strings and slow connections (half-sent headers, trickled bodies). Only 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import time
from dataclasses import dataclass, field

CASE_TIMEOUT_S = 120.0  # one request's socket timeout: a hang fails the case, not the run
MAX_TOKENS = 3  # generations the fuzzer starts stay short
PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class Outcome:
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # "kind #i: what went wrong"
    cases: int = 0


def _base(rng: random.Random, model: str, chat: bool) -> dict:
    if chat:
        return {"model": model, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": MAX_TOKENS, "temperature": 0}
    return {"model": model, "prompt": "The queue", "max_tokens": MAX_TOKENS, "temperature": 0}


def _text(rng: random.Random) -> str:
    pool = ["\ud800", "\udfff", "\x00", "\u202e", "😀", "é", "\n", "\\", '"', "a" * 50,
            "\ufeff", "\uffff"]
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, 8)))


def _nested(rng: random.Random) -> bytes:
    depth = rng.choice([10, 33, 100, 1000, 100_000, 600_000])  # within 4 MiB
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    return b'{"model": "m", "prompt": ' + opener * depth + b"1" + closer * depth + b"}"


def _number(rng: random.Random) -> bytes:
    field_ = rng.choice(["max_tokens", "seed", "temperature", "top_p", "theta", "logprobs",
                         "n", "prompt"])
    value = rng.choice([b"9" * 5000, b"-" + b"9" * 4301, b"1" * 21, b"1e309", b"-1e309",
                        b"NaN", b"Infinity", b"-0", b"1e-300", b"5e-324", b"18446744073709551615",
                        b"-9223372036854775809", b"0.0000001", b"2.0000001", b"[99999999]"])
    return b'{"model": "%s", "prompt": "x", "max_tokens": 2, "%s": %s}' % (
        b"MODEL", field_.encode(), value)


def json_case(rng: random.Random, model: str) -> tuple[str, bytes]:
    """One request body of a kind chosen by `rng`: (path, body bytes)."""
    chat = rng.random() < 0.4
    path = PATHS[chat]
    body = _base(rng, model, chat)
    kind = rng.choice(["strings", "prompts", "stops", "fields", "nested", "numbers", "bytes"])
    if kind == "nested":
        return PATHS[0], _nested(rng)
    if kind == "numbers":
        return PATHS[0], _number(rng).replace(b"MODEL", model.encode())
    if kind == "bytes":
        raw = json.dumps(body).encode()
        cut = rng.randint(0, len(raw))
        return path, rng.choice([raw[:cut], bytes(rng.randrange(256) for _ in range(64)),
                                 b"", b"null", b"[]", b'"x"', b"\xef\xbb\xbf" + raw])
    if kind == "strings":
        text = _text(rng)
        if chat:
            body["messages"] = [{"role": rng.choice(["user", "system", text]), "content": text}]
        else:
            body[rng.choice(["prompt", "model", "suffix", "user"])] = text
    elif kind == "prompts" and not chat:
        count = rng.choice([0, 1, 2, 16, 17, 200, 2000])
        item = rng.choice(["a", [1, 2, 3], [99999], [], ""])
        body["prompt"] = [item] * count
    elif kind == "stops":
        count = rng.choice([1, 4, 16, 17, 100])
        length = rng.choice([1, 2, 256, 257, 100_000])
        body["stop"] = ["x" * length] * count if rng.random() < 0.8 else "y" * length
    else:
        name = rng.choice(["temperature", "top_p", "seed", "max_tokens", "stream", "n",
                           "logprobs", "echo", "stream_options", "theta", "exact"])
        body[name] = rng.choice([None, True, -1, 0, 1, 2, 1e-300, 2 ** 64, -(2 ** 63) - 1,
                                 "x", [], {}, {"include_usage": "yes"}, 0.5])
    try:
        return path, json.dumps(body).encode()
    except (TypeError, ValueError):
        return path, json.dumps(_base(rng, model, chat)).encode()


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CASE_TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json",
                                                       **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send `data` and read until the server closes; a reset counts as closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=CASE_TIMEOUT_S) as conn:
        try:
            conn.sendall(data)
            return b"".join(iter(lambda: conn.recv(65536), b""))
        except (ConnectionResetError, BrokenPipeError):
            return b""


def body_cases(port: int, max_body_bytes: int) -> list[tuple[str, int, bytes]]:
    """Bodies past the size limit, declared or streamed: (what, status, reply)."""
    out = []
    # declared too large, body never sent: refused without waiting for it
    reply = raw_exchange(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                         + str(max_body_bytes * 4).encode() + b"\r\n\r\n")
    out.append(("declared", _status(reply), reply))
    # chunked, no length: cut while reading
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", port), timeout=CASE_TIMEOUT_S) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        reply = b""
        try:
            for _ in range(max_body_bytes // len(chunk) + 2):
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.sendall(b"0\r\n\r\n")
        except (ConnectionResetError, BrokenPipeError):
            pass
        try:
            reply = b"".join(iter(lambda: conn.recv(65536), b""))
        except ConnectionResetError:
            pass
    out.append(("chunked", _status(reply), reply))
    return out


def _status(reply: bytes) -> int:
    try:
        return int(reply.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0  # closed without an answer


def slow_connections(port: int, count: int) -> list[socket.socket]:
    """Connections that never finish: half-sent headers, or a body trickled after full ones."""
    conns = []
    for i in range(count):
        conn = socket.create_connection(("127.0.0.1", port), timeout=CASE_TIMEOUT_S)
        if i % 3 == 0:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        elif i % 3 == 1:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000"
                         b"\r\n\r\n{")
        conns.append(conn)
    return conns


def all_closed(conns: list[socket.socket], within_s: float) -> list[int]:
    """Indexes of the connections the server had not closed within `within_s` (all of them
    share one deadline); a reply before the close is allowed (408)."""
    deadline = time.monotonic() + within_s
    open_ = []
    for i, conn in enumerate(conns):
        try:
            while True:
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                if not conn.recv(65536):
                    break
        except ConnectionResetError:
            pass
        except socket.timeout:
            open_.append(i)
        finally:
            conn.close()
    return open_


def fuzz(port: int, model: str, seed: int, count: int, max_body_bytes: int,
         slow: int = 60, slow_within_s: float = 60.0) -> Outcome:
    """`count` JSON cases, the oversize bodies and `slow` slow connections held meanwhile; a
    failure is a 5xx other than 503, a reply that is not OpenAI's error shape, a request that
    hangs, or a slow connection still open after `slow_within_s`."""
    rng = random.Random(seed)
    outcome = Outcome()
    held = slow_connections(port, slow)

    def record(what: str, status: int, reply: bytes) -> None:
        outcome.cases += 1
        outcome.statuses[status] = outcome.statuses.get(status, 0) + 1
        if status == 0 or (status >= 500 and status != 503):
            outcome.failures.append(f"{what}: {status} {reply[:300]!r}")
        elif status >= 400 and b'"error"' not in reply:
            outcome.failures.append(f"{what}: {status} not in OpenAI's shape {reply[:300]!r}")

    for what, status, reply in body_cases(port, max_body_bytes):
        record(f"body {what}", status, reply)
    for i in range(count):
        path, body = json_case(rng, model)
        try:
            if len(body) > max_body_bytes:  # refused on its declared length: send no body
                reply = raw_exchange(port, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                     b"%d\r\n\r\n" % (path.encode(), len(body)))
                status = _status(reply)
                if status != 413:
                    outcome.failures.append(f"case {i}: {len(body)} bytes got {status}")
            else:
                status, reply = request(port, "POST", path, body)
        except OSError as e:
            status, reply = 0, repr(e).encode()
        record(f"seed {seed} case {i} {body[:120]!r}", status, reply)
    for i in range(count // 10):  # junk paths and methods
        path = "/" + "".join(rng.choice("abc/%.~") for _ in range(rng.randint(1, 2000)))
        status, reply = request(port, rng.choice(["GET", "POST", "DELETE"]), path, b"{}")
        outcome.cases += 1
        outcome.statuses[status] = outcome.statuses.get(status, 0) + 1
        if status >= 500 or status == 0:
            outcome.failures.append(f"junk path {i}: {status}")
    still_open = all_closed(held, slow_within_s)
    if still_open:
        outcome.failures.append(f"slow connections still open: {still_open}")
    return outcome
