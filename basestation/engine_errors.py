"""What the serving engine raises, and what its Failed events carry: its own errors, free of HTTP.

A front end maps them to its statuses and bodies in one place (`openai_api.api_error` for the
OpenAI API). The text of each is meant for the client: it names what was refused and why.
"""

from __future__ import annotations


class EngineError(Exception):
    """A request the engine refused or could not finish."""

    @property
    def message(self) -> str:
        return str(self)


class BadRequest(EngineError):
    """A field of the request the engine cannot run as given; `param` names it."""

    def __init__(self, param: str, problem: str):
        super().__init__(f"{param}: {problem}")
        self.param = param


class ContextTooLong(EngineError):
    """The prompt, or the prompt plus the completion asked for, passes the model's context."""


class Overloaded(EngineError):
    """No place for the request's prompts in the batch nor in the queue: retry later."""


class EngineStopped(EngineError):
    """The engine is shutting down: queued requests fail with it, new ones are refused."""


class ExpertLost(EngineError):
    """An exact request lost an expert to a fault (θ's own drops never fail a request)."""


class GenerationFailed(EngineError):
    """An error in the server failed the request; the others go on."""


def check_room(held_prompts: int, new_prompts: int, max_batch: int, max_queue: int) -> None:
    """Every prompt takes a place in the batch or the queue, as n choices would (else 200
    prompts in one request would be served where n: 200 is refused). Raises Overloaded when
    `new_prompts` do not fit beside the `held_prompts` of requests not yet ended."""
    if held_prompts + new_prompts > max_batch + max_queue:
        raise Overloaded(f"overloaded: {held_prompts} prompts are in flight (up to {max_batch} "
                         f"are decoded together, {max_queue} wait); retry later")
