"""OpenAI API shapes: request bodies parsed and checked into frozen dataclasses, responses built.

Pure functions of their inputs (no HTTP, no model): the server calls them, the tests call them
directly. Every rejection is one `ApiError` carrying the HTTP status and OpenAI's error shape;
`api_error` is the one place where the engine's own errors (`engine_errors`) get theirs.
Unknown fields are ignored, as OpenAI's own clients send many; features that would change the
answer and are not implemented (n > 1, chat logprobs) are refused rather than ignored. Our own
fields: `theta`, `latency_target_ms` (θ picked per token to hold the mean token latency on
it; not with `theta`), `ignore_eos`, and `exact` (fail with 503 `expert_lost` when an expert is
lost to a fault rather than answer without it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from basestation.engine_errors import (
    BadRequest,
    ContextTooLong,
    EngineError,
    EngineStopped,
    ExpertLost,
    GenerationFailed,
    Overloaded,
)
from basestation.latency_target import MAX_TARGET_MS

MAX_LOGPROBS = 20  # top alternatives per token a request may ask for
MAX_STOP_STRINGS = 16
# every token checks each stop's prefixes against the text's end: 16 stops of 100k characters
# make another user's stream 6x slower
MAX_STOP_CHARS = 256
# below this a temperature is greedy, as its limit is (and vLLM's rule): logits / 1e-300 overflow
# to inf and sampling gives NaN
MIN_TEMPERATURE = 1e-5
# int64, as vLLM: the sampler seeds each choice with seed + its index, which must stay within
# torch's [-2**63, 2**64) for every choice of a batch
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)
SHOWN_CHARS = 80  # of a refused value quoted in an error


class ApiError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's {"error": {...}} fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (status, message, type_,
                                                                       code, param)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code,
                          "param": self.param}}


# engine error -> (HTTP status, OpenAI error type, code); BadRequest also names its param
_ENGINE_ERRORS: dict[type[EngineError], tuple[int, str, str]] = {
    BadRequest: (400, "invalid_request_error", "invalid_value"),
    ContextTooLong: (400, "invalid_request_error", "context_length_exceeded"),
    Overloaded: (503, "server_error", "overloaded"),
    EngineStopped: (503, "server_error", "unavailable"),
    ExpertLost: (503, "server_error", "expert_lost"),
    GenerationFailed: (500, "server_error", "internal_error"),
}


def api_error(error: EngineError) -> ApiError:
    """The status and body a client gets for an engine error (500 for one not in the table)."""
    status, type_, code = next((_ENGINE_ERRORS[c] for c in type(error).__mro__
                                if c in _ENGINE_ERRORS), (500, "server_error", "internal_error"))
    return ApiError(status, error.message, type_, code, getattr(error, "param", None))


def _shown(value) -> str:
    """A value as a reply may quote it: cut, so a client's megabyte is not echoed back."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", code="invalid_value", param=param)


@dataclass(frozen=True)
class Defaults:
    """What the server fills in for a request that does not say."""
    model_id: str
    theta: float
    max_tokens: int  # cut further to what the context leaves


@dataclass(frozen=True)
class Params:
    """Generation parameters of one request (None: the model's generation_config)."""
    max_tokens: int | None  # None: the server's default, cut to the context
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    theta: float
    # fail the request (503 expert_lost) rather than answer without an expert lost to a fault;
    # θ's drops are the request's own choice and never fail it
    exact: bool = False
    # θ per token from this target (latency_target.py), in place of `theta`; None: `theta`
    latency_target_ms: float | None = None


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict, ...]  # {"role", "content"} with content a string
    params: Params
    stream: bool
    include_usage: bool


Prompt = str | tuple[int, ...]  # text, or token ids as given


@dataclass(frozen=True)
class CompletionRequest:
    prompts: tuple[Prompt, ...]  # one choice each
    params: Params
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None  # top alternatives per token; None: no logprobs


# --- field checks -------------------------------------------------------------------------------

def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    # an int is finite however long (math.isfinite overflowed on a 400-digit one: a 500)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)):
        raise invalid(name, f"expected a number, got {_shown(value)}")
    if not low <= value <= high:
        raise invalid(name, f"{_shown(value)} is outside [{low:g}, {high:g}]")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"expected an integer, got {_shown(value)}")
    if value < low or (high is not None and value > high):
        raise invalid(name, f"{value} is outside [{low}, {high if high is not None else '∞'}]")
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"expected true or false, got {_shown(value)}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "expected a non-empty string or a list of them")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid("stop", f"at most {MAX_STOP_STRINGS} strings")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise invalid("stop", f"at most {MAX_STOP_CHARS} characters each")
    return tuple(stops)


def _model(body: dict, defaults: Defaults) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "required: the id from GET /v1/models")
    if model != defaults.model_id:
        raise ApiError(404, f"The model {_shown(model)} does not exist; this server serves "
                       f"'{defaults.model_id}'", code="model_not_found", param="model")


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise invalid("stream_options", "expected an object")
    if not stream:
        raise invalid("stream_options", "only allowed with stream: true")
    return stream, _flag(options, "include_usage")


def _single_choice(body: dict) -> None:
    for name in ("n", "best_of"):
        if _integer(body, name, 1) not in (None, 1):
            raise invalid(name, "only 1 is supported")


def _params(body: dict, defaults: Defaults, max_tokens_low: int, *names: str) -> Params:
    max_tokens = None
    for name in names:  # max_completion_tokens supersedes the deprecated max_tokens
        value = _integer(body, name, max_tokens_low)
        if value is not None:
            max_tokens = value
    theta = _number(body, "theta", 0.0, 1.0)
    target_ms = _latency_target(body)
    if theta is not None and target_ms is not None:
        raise invalid("latency_target_ms", "give theta or latency_target_ms, not both")
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None and temperature < MIN_TEMPERATURE:
        temperature = 0.0
    return Params(max_tokens=max_tokens, temperature=temperature,
                  top_p=_number(body, "top_p", 1e-9, 1.0),
                  seed=_integer(body, "seed", *SEED_RANGE), stop=_stop(body),
                  ignore_eos=_flag(body, "ignore_eos"),
                  # a target starts exact (θ = 0) and its controller takes it from there
                  theta=0.0 if target_ms is not None else defaults.theta if theta is None
                  else theta, exact=_flag(body, "exact"), latency_target_ms=target_ms)


def _latency_target(body: dict) -> float | None:
    value = body.get("latency_target_ms")
    if value is None:
        return None
    # an int is finite however long (math.isfinite would overflow on a 400-digit one)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)):
        raise invalid("latency_target_ms", f"expected a number, got {_shown(value)}")
    if not 0 < value <= MAX_TARGET_MS:
        raise invalid("latency_target_ms", f"{_shown(value)}: must be > 0 and <= "
                      f"{MAX_TARGET_MS:g}")
    return float(value)


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


# --- requests -----------------------------------------------------------------------------------

def _content(index: int, content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{index}].content", "only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise invalid(f"messages[{index}].content", "expected a string or a list of text parts")


def parse_chat(body, defaults: Defaults) -> ChatRequest:
    """A /v1/chat/completions body. Raises ApiError."""
    body = _object(body)
    _model(body, defaults)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("messages", "expected a non-empty list of {role, content}")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{i}]", "expected an object with a role")
        messages.append({"role": message["role"], "content": _content(i, message.get("content"))})
    _single_choice(body)
    if _flag(body, "logprobs"):
        raise invalid("logprobs", "not supported on chat completions yet (use /v1/completions)")
    stream, include_usage = _stream(body)
    return ChatRequest(messages=tuple(messages), stream=stream, include_usage=include_usage,
                       params=_params(body, defaults, 1, "max_tokens", "max_completion_tokens"))


def _prompts(value, vocab_size: int) -> tuple[Prompt, ...]:
    def ids(seq, where: str) -> tuple[int, ...]:
        if not seq or not all(isinstance(t, int) and not isinstance(t, bool) for t in seq):
            raise invalid(where, "expected a non-empty list of token ids")
        bad = [t for t in seq if not 0 <= t < vocab_size]
        if bad:
            raise invalid(where, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        return tuple(seq)

    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return tuple(value)
        if all(isinstance(p, list) for p in value):
            return tuple(ids(p, f"prompt[{i}]") for i, p in enumerate(value))
        return (ids(value, "prompt"),)
    raise invalid("prompt", "expected a string, a list of strings, a list of token ids or a "
                  "list of such lists")


def parse_completion(body, defaults: Defaults, vocab_size: int,
                     max_prompts: int | None = None) -> CompletionRequest:
    """A /v1/completions body; `max_prompts`: the most sequences the server decodes together
    (each prompt is one, as each of n choices would be). Raises ApiError."""
    body = _object(body)
    _model(body, defaults)
    prompts = _prompts(body.get("prompt"), vocab_size)
    if max_prompts is not None and len(prompts) > max_prompts:
        raise invalid("prompt", f"{len(prompts)} prompts; at most {max_prompts} in one request "
                      f"(the batch holds {max_prompts} sequences)")
    _single_choice(body)
    if body.get("suffix") is not None:
        raise invalid("suffix", "not supported")
    stream, include_usage = _stream(body)
    echo = _flag(body, "echo")
    if echo and stream:
        raise invalid("echo", "not supported with stream: true")
    return CompletionRequest(prompts=prompts, stream=stream, include_usage=include_usage,
                             echo=echo, logprobs=_integer(body, "logprobs", 0, MAX_LOGPROBS),
                             params=_params(body, defaults, 0, "max_tokens"))


def completion_budget(prompt_tokens: int, requested: int | None, default: int,
                      context: int) -> int:
    """New tokens a request may generate: what it asked for, else the server's default cut to
    what the context leaves. Raises ContextTooLong when prompt and request exceed the context."""
    if prompt_tokens > context or (requested is not None and prompt_tokens + requested > context):
        asked = "" if requested is None else f" and {requested} for the completion"
        raise ContextTooLong(f"This model's maximum context length is {context} tokens; the "
                             f"request has {prompt_tokens} in the prompt{asked}")
    return requested if requested is not None else max(0, min(default, context - prompt_tokens))


# --- stop strings -------------------------------------------------------------------------------

def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one occurred."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could still begin a stop string (not yet safe to stream)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


# --- responses ----------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_block(tokens: list[str], token_logprobs: list[float | None],
                   top_logprobs: list[dict | None], start_offset: int = 0) -> dict:
    """/v1/completions `logprobs` (the shape lm-eval's local-completions reads): token strings,
    their log-probabilities (None for a first prompt token), top alternatives, text offsets."""
    offsets, at = [], start_offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def chat_chunk(id_: str, created: int, model: str, delta: dict,
               finish_reason: str | None = None) -> dict:
    return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}


def completion_chunk(id_: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None = None) -> dict:
    return {"id": id_, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}]}
