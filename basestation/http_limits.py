"""What the HTTP edge of `basestation serve` accepts: sizes, times and JSON shapes.

Pure decisions (no sockets, no clocks: time and counts are passed in); `http_edge` applies them
to connections and bodies. Every refusal of a body is one `ApiError` in OpenAI's shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from basestation.openai_api import ApiError

MIB = 1024 * 1024
# 20 digits hold every int64 and uint64; longer integers only cost parsing time (issue 20: a
# 5,000-digit integer would give a 500)
MAX_INTEGER_DIGITS = 20
# no tokenizer we serve averages more than a few characters per token: text beyond this many per
# context token cannot fit, and is refused before it costs seconds of tokenising
MAX_CHARS_PER_TOKEN = 32
FD_RESERVE = 128  # descriptors kept for agents' sockets, shards and logs when capping connections


@dataclass(frozen=True)
class HttpLimits:
    """One serve's HTTP limits; the defaults fit a 4k-32k context with a batch of 16 prompts."""
    # 32k token ids as JSON are ~230 kB: 4 MiB holds 16 such prompts; without a limit a 20 MB
    # prompt left the server at 2.5 GB
    max_body_bytes: int = 4 * MIB
    # the request line and headers must be complete this long after the connection opens or its
    # last response ends (slowloris: 400 half-open connections would hold every descriptor)
    header_timeout_s: float = 10.0
    # a body must arrive within body_grace_s plus its size at min_body_rate (Apache's
    # mod_reqtimeout rule): a client trickling 1 KiB every 5 s is cut after ~10 s
    body_grace_s: float = 10.0
    min_body_rate_bytes_per_s: float = 64 * 1024
    max_json_depth: int = 32  # our bodies nest 4 deep; the C parser recurses without a bound
    max_connections: int = 1000  # further connections are closed at once (cut by the fd limit)
    prepare_workers: int = 2  # threads parsing and tokenising bodies off the event loop
    max_preparing: int = 64  # bodies waiting for those threads; more get 503


def body_deadline_s(started_s: float, received_bytes: int, limits: HttpLimits) -> float:
    """When the body must be complete, given what has arrived: the grace plus its size at the
    minimum rate (monotonic seconds, like `started_s`)."""
    return started_s + limits.body_grace_s + received_bytes / limits.min_body_rate_bytes_per_s


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length a request declares; None when absent or unreadable (h11 has already
    refused a malformed one)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def too_large(limits: HttpLimits) -> ApiError:
    return ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes",
                    code="request_too_large")


def too_slow() -> ApiError:
    return ApiError(408, "the request body arrived too slowly", code="request_timeout")


def connection_cap(fd_soft_limit: int, limits: HttpLimits) -> int:
    """How many HTTP connections to hold at once: the configured bound, cut so that a flood of
    connections leaves descriptors for the agents (at 1,024 fds /health would stop answering)."""
    return max(1, min(limits.max_connections, fd_soft_limit - FD_RESERVE))


def route_label(path: str, routes: tuple[str, ...]) -> str:
    """The /metrics label for a request path: its route, or one label for every unknown path, so
    junk paths cannot grow the page (they would grow it by MBs)."""
    return path if path in routes else "unmatched"


def text_fits(chars: int, context_tokens: int) -> bool:
    """Whether text of `chars` characters may fit the context (see MAX_CHARS_PER_TOKEN)."""
    return chars <= context_tokens * MAX_CHARS_PER_TOKEN


# --- JSON ---------------------------------------------------------------------------------------

def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _Refused(f"an integer of {len(text)} digits (at most {MAX_INTEGER_DIGITS})")
    return int(text)


def _constant(name: str):
    raise _Refused(f"{name} is not JSON")


class _Refused(ValueError):
    pass


def parse_json(raw: bytes, max_depth: int):
    """The body as JSON. Raises ApiError (400 invalid_json) for invalid JSON, NaN/Infinity,
    integers beyond MAX_INTEGER_DIGITS, nesting beyond `max_depth` and strings holding lone
    surrogates (\\ud800: valid JSON escapes, but no text a tokenizer can encode)."""
    try:
        value = json.loads(raw, parse_int=_integer, parse_constant=_constant)
    except _Refused as e:
        raise _invalid(str(e)) from None
    except RecursionError:
        raise _invalid(f"nested deeper than {max_depth}") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise _invalid(str(e)[:200]) from None
    _check_tree(value, max_depth)
    return value


def _check_tree(value, max_depth: int) -> None:
    """Depth and strings of a parsed body, iteratively (a recursive walk is what deep input
    attacks)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, (list, dict)):
            if depth > max_depth:
                raise _invalid(f"nested deeper than {max_depth}")
            if isinstance(item, dict):
                for key in item:
                    _check_text(key)
                item = item.values()
            stack.extend((child, depth + 1) for child in item
                         if isinstance(child, (str, list, dict)))


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid("a string holds a lone surrogate (\\ud800-\\udfff)") from None


def _invalid(message: str) -> ApiError:
    return ApiError(400, f"the body is not valid JSON: {message}", code="invalid_json")
