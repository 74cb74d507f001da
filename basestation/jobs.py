"""What a front end hands the serving engine (a Job in a Request) and what it gets back (Events).

Free of HTTP and of the model: errors are `engine_errors.EngineError`s carried in a Failed
event. The engine calls `emit` from its own threads; a front end forwards events to its event loop.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from basestation.engine_errors import EngineError
from basestation.openai_api import Params, Prompt


@dataclass(frozen=True)
class Job:
    """What one request asks for, before tokenization (that happens on the engine thread)."""
    prompts: tuple[Prompt, ...] | None  # completions: text or token ids, one choice each
    messages: tuple[dict, ...] | None  # chat: rendered with the tokenizer's chat template
    params: Params
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None


@dataclass(frozen=True)
class Accepted:
    """Prompts tokenized and within the context: the response may start."""
    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    index: int
    text: str


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str  # stop | length | cancelled
    completion_tokens: int
    logprobs: dict | None = None


@dataclass(frozen=True)
class Finished:
    choices: tuple[Choice, ...]
    prompt_tokens: int
    completion_tokens: int
    wdmoe: dict


@dataclass(frozen=True)
class Failed:
    error: EngineError


Event = Accepted | Delta | Finished | Failed


@dataclass(eq=False)
class Request:
    job: Job
    emit: Callable[[Event], None]  # called on an engine thread
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_s: float = field(default_factory=time.monotonic)


def emit(request: Request, event: Event) -> None:
    try:
        request.emit(event)
    except Exception:  # the front end is gone (event loop closed): nothing to tell
        request.cancelled.set()
