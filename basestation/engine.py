"""The serving engine: one thread owns the session (ZeroMQ sockets and model), requests queue.

Front ends (the HTTP server) `submit` a Request and read its Events through the request's own
`emit` callback; `cancel` sets its flag, which a StoppingCriteria checks after every token (or
removes it from the queue). Requests are decoded one at a time: `_loop` takes the next one and
`_run` decodes it to the end; a batching scheduler replaces those two and keeps the rest.
Free of HTTP: errors are `openai_api.ApiError`s carried in a Failed event.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import StoppingCriteria

from basestation.generate import Sampling, generate, prompt_logits
from basestation.metrics import EngineMetrics
from basestation.openai_api import (ApiError, Defaults, Params, Prompt, completion_budget,
                                    cut_at_stop, held_back, logprobs_block)

IDLE_POLL_S = 0.05  # between probe-reply polls while no request waits
STOP_JOIN_S = 10.0  # how long stop() waits for the engine thread


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
    error: ApiError


Event = Accepted | Delta | Finished | Failed


@dataclass(eq=False)
class Request:
    job: Job
    emit: Callable[[Event], None]  # called on the engine thread
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_s: float = field(default_factory=time.monotonic)


class _Halt(StoppingCriteria):
    """transformers StoppingCriteria: stop every row when `should_stop()` says so."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool,
                          device=input_ids.device)


class Engine:
    def __init__(self, session, defaults: Defaults, max_queue: int = 16):
        self.session = session
        self.defaults = defaults
        self.max_queue = max_queue
        self.metrics = EngineMetrics()
        base = session.base
        self.tokenizer = base.tokenizer
        text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") \
            else base.config
        self.context = int(getattr(text_config, "max_position_embeddings", 0)
                           or self.tokenizer.model_max_length)
        self.vocab_size = int(text_config.vocab_size)
        eos = base.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._pending: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._current: Request | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # --- called from any thread -----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def submit(self, request: Request) -> None:
        """Queue a request. Raises ApiError (503) when the queue is full or stopping."""
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", "server_error", "unavailable")
            waiting = len(self._pending) - (self._current is None)  # the next is taken now
            if waiting >= self.max_queue:
                self.metrics.rejected += 1
                raise ApiError(503, f"overloaded: {len(self._pending)} requests already wait "
                               "(one is decoded at a time); retry later", "server_error",
                               "overloaded")
            self._pending.append(request)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request: taken off the queue, or stopped after its current token."""
        request.cancelled.set()
        with self._cond:
            if request in self._pending:
                self._pending.remove(request)
                self.metrics.cancelled += 1

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            pending, self._pending = list(self._pending), collections.deque()
            self._cond.notify()
        for request in pending:
            request.cancelled.set()
            _emit(request, Failed(ApiError(503, "the server is shutting down", "server_error",
                                            "unavailable")))
        if self._current is not None:
            self._current.cancelled.set()
        if self._thread.is_alive():
            self._thread.join(STOP_JOIN_S)

    # --- the engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._pending and not self._stopping:
                    self._cond.wait(IDLE_POLL_S)
                if self._stopping:
                    return
                request = self._pending.popleft() if self._pending else None
                self._current = request
            if request is None:
                self.session.poll_probes(0.0)  # dead agents come back while idle
                continue
            try:
                self._run(request)
            except Exception as e:  # a bug must fail one request, not the server
                traceback.print_exc(file=sys.stderr)
                self.metrics.failed += 1
                _emit(request, Failed(ApiError(500, f"generation failed: {e}", "server_error",
                                               "internal_error")))
            finally:
                with self._cond:
                    self._current = None

    def _encode(self, job: Job) -> list[list[int]]:
        if job.messages is not None:
            try:
                ids = self.tokenizer.apply_chat_template(list(job.messages),
                                                         add_generation_prompt=True,
                                                         return_dict=True)["input_ids"]
            except Exception as e:  # jinja's raise_exception: e.g. roles must alternate
                raise ApiError(400, f"messages: the chat template refused them: {e}",
                               code="invalid_value", param="messages") from None
            return [list(ids)]
        prompts = [list(p) if isinstance(p, tuple) else self.tokenizer(p).input_ids
                   for p in job.prompts]
        if not all(prompts):
            raise ApiError(400, "prompt: empty after tokenization", code="invalid_value",
                           param="prompt")
        return prompts

    def _run(self, request: Request) -> None:
        job = request.job
        try:
            prompts = self._encode(job)
            budgets = [completion_budget(len(ids), job.params.max_tokens,
                                         self.defaults.max_tokens, self.context)
                       for ids in prompts]
        except ApiError as e:
            self.metrics.failed += 1
            _emit(request, Failed(e))
            return
        prompt_tokens = sum(map(len, prompts))
        _emit(request, Accepted(prompt_tokens=prompt_tokens))
        runtime = self.session.runtime
        stats_before = dataclasses.replace(runtime.stats)
        agents_before = [a.figures() for a in self.session.agents]
        latencies: list[float] = []
        choices = []
        for index, (ids, budget) in enumerate(zip(prompts, budgets)):
            if request.cancelled.is_set():
                break
            choices.append(self._choice(request, index, ids, budget, latencies))
        completion_tokens = sum(c.completion_tokens for c in choices)
        self.metrics.prompt_tokens += prompt_tokens
        self.metrics.completion_tokens += completion_tokens
        for ms in latencies:
            self.metrics.token_latency.observe(ms / 1e3)
        if request.cancelled.is_set():
            self.metrics.cancelled += 1
            return
        self.metrics.completed += 1
        stats = runtime.stats
        wdmoe = {
            "theta": job.params.theta,
            "token_latency_ms": [round(t, 3) for t in latencies],
            "expert_calls": stats.expert_calls - stats_before.expert_calls,
            "experts_dropped": stats.experts_dropped - stats_before.experts_dropped,
            "agents": agent_figures(agents_before, [a.figures() for a in self.session.agents]),
        }
        _emit(request, Finished(choices=tuple(choices), prompt_tokens=prompt_tokens,
                                completion_tokens=completion_tokens, wdmoe=wdmoe))

    def _choice(self, request: Request, index: int, ids: list[int], budget: int,
                latencies: list[float]) -> Choice:
        job, params = request.job, request.job.params
        input_ids = torch.tensor([ids])
        echo_text = ""
        if job.echo:
            prompt = job.prompts[index]
            echo_text = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
        lp_tokens, lp_values, lp_top = [], [], []
        if job.echo and job.logprobs is not None:
            logits = prompt_logits(self.session, input_ids, theta=params.theta)
            lp_tokens, lp_values, lp_top = self._logprobs(logits[:-1], ids[1:], job.logprobs)
            lp_tokens = [self._piece(ids[0])] + lp_tokens
            lp_values, lp_top = [None] + lp_values, [None] + lp_top
        if budget == 0:
            logprobs = logprobs_block(lp_tokens, lp_values, lp_top) \
                if job.logprobs is not None else None
            return Choice(index, echo_text, "length", 0, logprobs)

        state = {"text": "", "sent": 0, "stopped": False}

        def on_text(piece: str) -> None:
            state["text"] += piece
            if params.stop and not state["stopped"]:
                _, state["stopped"] = cut_at_stop(state["text"], params.stop)
            if job.stream and not state["stopped"]:
                safe = len(state["text"]) - held_back(state["text"], params.stop)
                if safe > state["sent"]:
                    _emit(request, Delta(index, state["text"][state["sent"]:safe]))
                    state["sent"] = safe

        halt = _Halt(lambda: request.cancelled.is_set() or state["stopped"])
        result = generate(self.session, input_ids, max_new_tokens=budget,
                          ignore_eos=params.ignore_eos, on_text=on_text, theta=params.theta,
                          sampling=Sampling(params.temperature, params.top_p, params.seed),
                          stopping_criteria=[halt], output_logits=job.logprobs is not None)
        latencies.extend(result.token_latency_ms)
        text, hit_stop = cut_at_stop(result.text, params.stop)
        if job.stream and len(text) > state["sent"]:
            _emit(request, Delta(index, text[state["sent"]:]))
        if request.cancelled.is_set():
            reason = "cancelled"
        elif hit_stop or (result.token_ids and result.token_ids[-1] in self.eos_ids
                          and not params.ignore_eos):
            reason = "stop"
        else:
            reason = "length"
        logprobs = None
        if job.logprobs is not None:
            if result.step_logits:
                steps = torch.stack(result.step_logits)
                more = self._logprobs(steps, result.token_ids, job.logprobs)
                lp_tokens, lp_values, lp_top = (lp_tokens + more[0], lp_values + more[1],
                                                lp_top + more[2])
            logprobs = logprobs_block(lp_tokens, lp_values, lp_top)
        return Choice(index, echo_text + text, reason, len(result.token_ids), logprobs)

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _logprobs(self, logits: torch.Tensor, targets: list[int], top: int):
        """Row i of `logits` [N, V] predicts targets[i]: token strings, their log-probabilities
        and the `top` best alternatives (the chosen token always among them)."""
        if not targets:
            return [], [], []
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = logp[torch.arange(len(targets)), torch.tensor(targets)].tolist()
        best_values, best_ids = logp.topk(top, dim=-1) if top else (None, None)
        tokens, tops = [], []
        for i, token in enumerate(targets):
            alternatives = {}
            if top:
                for value, alt in zip(best_values[i].tolist(), best_ids[i].tolist()):
                    alternatives.setdefault(self._piece(alt), value)
            alternatives.setdefault(self._piece(token), chosen[i])
            tokens.append(self._piece(token))
            tops.append(alternatives)
        return tokens, chosen, tops


def agent_figures(before: list[dict], after: list[dict]) -> list[dict]:
    """Each agent's estimates now, and its calls, drops and failures during this request."""
    earlier = {a["address"]: a for a in before}
    out = []
    for a in after:
        b = earlier.get(a["address"], {})
        out.append({"address": a["address"], "experts": a["experts"], "alive": a["alive"],
                    **{k: a[k] - b.get(k, 0) for k in ("calls", "drops", "failures")},
                    "rtt_ms": a["rtt_ms"], "throughput_mbit_s": a["throughput_mbit_s"],
                    "compute_us_per_token": a["compute_us_per_token"]})
    return out


def _emit(request: Request, event: Event) -> None:
    try:
        request.emit(event)
    except Exception:  # the front end is gone (event loop closed): nothing to tell
        request.cancelled.set()
