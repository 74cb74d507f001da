"""Generation through the distributed model, with per-token timing and per-agent figures.

Sampling, stopping and the KV cache are transformers' `generate`; a streamer timestamps each
token as it comes (the first one includes the prefill). With a latency target, θ changes per
token: hooks on the model run each forward pass inside `runtime.batch` at the θ the target's
controller picks (`latency_target.py`), told each token's latency by the streamer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from basestation.latency_target import Pacer, mean_theta, start
from basestation.latency_target import report as target_report


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    token_latency_ms: list[float]
    expert_calls: int
    experts_dropped: int
    fault_drops: int  # of experts_dropped: lost to a fault (a failed agent, not θ's choice)
    retries: int  # slots sent again after a failure
    failed_requests: int  # agent requests that failed (no valid reply)
    agents: list[dict] = field(default_factory=list)
    interrupted: bool = False
    # with a latency target: latency_target.report's figures (target_ms, achieved_mean_ms,
    # thetas, feasible) and the mean θ its tokens ran at
    latency_target: dict | None = None
    mean_theta: float | None = None
    # raw logits of each generated token's step [V], when asked (output_logits); not in to_json
    step_logits: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def tokens_per_s(self) -> float:
        total_s = sum(self.token_latency_ms) / 1e3
        return len(self.token_ids) / total_s if total_s > 0 else 0.0

    def to_json(self) -> dict:
        out = {f.name: copy.deepcopy(getattr(self, f.name))
               for f in dataclasses.fields(self) if f.name != "step_logits"}
        out["tokens_per_s"] = round(self.tokens_per_s, 3)
        out["token_latency_ms"] = [round(t, 3) for t in self.token_latency_ms]
        return out

    def summary(self) -> str:
        mean_ms = sum(self.token_latency_ms) / max(1, len(self.token_latency_ms))
        considered = self.expert_calls + self.experts_dropped
        share = 100 * self.experts_dropped / considered if considered else 0.0
        return (f"[{len(self.token_ids)} tokens, {self.tokens_per_s:.1f} tokens/s, mean token "
                f"latency {mean_ms:.1f} ms, experts dropped {self.experts_dropped} "
                f"({share:.1f} %)" + faults_text(self.fault_drops, self.retries)
                + target_text(self.latency_target, self.mean_theta)
                + (", interrupted" if self.interrupted else "") + "]")


def target_text(figures: dict | None, theta: float | None) -> str:
    """", latency target 40 ms: achieved 41.2 ms at mean theta 0.21" for a summary line (", not
    feasible" when even θ = 1/2 was too slow); empty without a target."""
    if figures is None:
        return ""
    achieved = figures["achieved_mean_ms"]
    return (f", latency target {figures['target_ms']:g} ms: achieved "
            + ("-" if achieved is None else f"{achieved:.1f} ms") + f" at mean theta {theta:.3f}"
            + ("" if figures["feasible"] else ", not feasible"))


def faults_text(fault_drops: int, retries: int) -> str:
    """", fault drops N, retries M" for a summary line; empty when nothing was lost or retried."""
    if not (fault_drops or retries):
        return ""
    return f", fault drops {fault_drops}, retries {retries}"


class StopOnFault:
    """A StoppingCriteria for exact generation: stop at the first slot lost to a fault (the
    answer is no longer the model's; generating on would only cost time)."""

    def __init__(self, stats, fault_drops_before: int):
        self.stats, self.before = stats, fault_drops_before

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        lost = self.stats.fault_drops > self.before
        return torch.full((input_ids.shape[0],), lost, dtype=torch.bool, device=input_ids.device)


class TimingStreamer:
    """transformers streamer protocol (put/end): timestamps tokens, forwards text pieces."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None = None,
                 on_latency: Callable[[float], None] | None = None):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.on_latency = on_latency  # each token's latency (ms), as it comes
        self.token_ids: list[int] = []
        self.times_s: list[float] = []
        self._prompt_seen = False
        self._text = ""

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self._prompt_seen:  # generate() first streams the prompt
            self._prompt_seen = True
            self.times_s.append(now)
            return
        self.token_ids.extend(value.reshape(-1).tolist())
        self.times_s.append(now)
        if self.on_latency is not None:
            self.on_latency((now - self.times_s[-2]) * 1e3)
        if self.on_text is not None:
            text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for a split multi-byte character
                self.on_text(text[len(self._text):])
                self._text = text

    def end(self) -> None:
        pass

    def latencies_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.times_s, self.times_s[1:])]


@dataclass(frozen=True)
class Sampling:
    """A request's sampling; a None field keeps the model's generation_config value."""
    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    seed: int | None = None  # seeds torch's global generator (one request at a time)


# Temperatures below this sample greedily. At 1e-5 a logit gap of 1e-3 already gives the runner-up
# a probability under e^-100, so sampling is argmax in all but name; far below it logits /
# temperature overflow float32 to inf, and softmax of inf - inf is NaN (1e-300 crashed serve).
GREEDY_BELOW_TEMPERATURE = 1e-5

# When a request leaves sampling to the model and its generation_config does not sample (Mixtral's
# and the tiny model's do not): greedy decoding of a small model loops ("====" rows), so chat and
# serve sample with these instead.
FALLBACK_TEMPERATURE = 0.7
FALLBACK_TOP_P = 0.9


def apply_sampling(config, sampling: Sampling) -> None:
    """Set `sampling` on a GenerationConfig in place; what it leaves None stays the model's
    (or the fallback above, when the model's config does not sample). Temperature 0 (or below
    GREEDY_BELOW_TEMPERATURE): greedy."""
    if sampling.temperature is not None and not sampling.temperature >= GREEDY_BELOW_TEMPERATURE:
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
        return
    if not config.do_sample:
        config.do_sample, config.top_k = True, 0
        config.temperature, config.top_p = FALLBACK_TEMPERATURE, FALLBACK_TOP_P
    if sampling.temperature is not None:
        config.do_sample, config.temperature = True, sampling.temperature
    if sampling.top_p is not None:
        config.top_p = sampling.top_p


def context_length(config, tokenizer) -> int:
    """Tokens the model attends to at most: its (text) config's max_position_embeddings, else
    the tokenizer's model_max_length."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text_config, "max_position_embeddings", 0) or tokenizer.model_max_length)


def budget_error(prompt_tokens: int, max_new_tokens: int, context: int) -> str | None:
    """Why a prompt and its new tokens cannot run, in one line, or None when they can: no
    prompt at all, or more than the context (past it the positions were never trained: the
    model ran on and produced garbage)."""
    if prompt_tokens < 1:
        return "the prompt is empty (it gives no tokens)"
    if max_new_tokens < 1:
        return f"--max-new-tokens {max_new_tokens}: must be at least 1"
    if prompt_tokens + max_new_tokens > context:
        return (f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} "
                f"pass the model's context of {context} tokens")
    return None


def generate(session, input_ids: torch.Tensor, max_new_tokens: int = 32,
             temperature: float | None = 0.0, ignore_eos: bool = False,
             on_text: Callable[[str], None] | None = None,
             theta: float | None = None, *, sampling: Sampling | None = None,
             stopping_criteria: list | None = None,
             output_logits: bool = False, exact: bool = False,
             latency_target_ms: float | None = None) -> GenerationResult:
    """Run generation at this request's θ (default: the session's), or with
    `latency_target_ms` at the θ per token that holds the mean token latency on it (the
    result's latency_target says how it went); Ctrl-C ends it early
    (the result says so). `temperature` None samples with the model's generation_config;
    `sampling`, when given, replaces `temperature` (its None fields keep the model's);
    `stopping_criteria` are transformers StoppingCriteria; `output_logits` keeps each step's
    raw logits in `step_logits`; `exact` stops at the first expert slot lost to a fault (the
    caller sees fault_drops > 0)."""
    base = session.base
    runtime = session.runtime
    before = dataclasses.replace(runtime.stats)
    pacer = Pacer(start(latency_target_ms)) if latency_target_ms is not None else None
    streamer = TimingStreamer(base.tokenizer, on_text,
                              on_latency=pacer.token if pacer is not None else None)
    config = copy.deepcopy(base.model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.pad_token_id = base.tokenizer.eos_token_id
    if sampling is None and temperature is None:  # the model's defaults (chat)
        sampling = Sampling()
    if sampling is not None:
        apply_sampling(config, sampling)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
    elif temperature >= GREEDY_BELOW_TEMPERATURE:
        config.do_sample, config.temperature, config.top_p, config.top_k = True, temperature, 1.0, 0
    else:
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    extra = {}
    stopping_criteria = list(stopping_criteria or [])
    if exact:
        stopping_criteria.append(StopOnFault(runtime.stats, before.fault_drops))
    if stopping_criteria:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList(stopping_criteria)
    if output_logits:
        config.output_logits, config.return_dict_in_generate = True, True
    if ignore_eos:  # no eos: generation runs to max_new_tokens
        # an empty list, not None: transformers fills a None back in from the model's own
        # generation config, so None still stopped at the end-of-sequence token
        config.eos_token_id = []
    interrupted = False
    output = None
    try:
        plan = paced(base.model, runtime, pacer) if pacer is not None else \
            runtime.batch(theta=session.theta if theta is None else theta)
        with torch.inference_mode(), plan:
            output = base.model.generate(input_ids.to(base.device), generation_config=config,
                                         streamer=streamer,
                                         attention_mask=torch.ones_like(input_ids), **extra)
    except KeyboardInterrupt:
        interrupted = True
    stats = runtime.stats
    token_ids = streamer.token_ids
    return GenerationResult(
        text=base.tokenizer.decode(token_ids, skip_special_tokens=True),
        token_ids=token_ids,
        token_latency_ms=streamer.latencies_ms()[: len(token_ids)],
        expert_calls=stats.expert_calls - before.expert_calls,
        experts_dropped=stats.experts_dropped - before.experts_dropped,
        fault_drops=stats.fault_drops - before.fault_drops,
        retries=stats.retries - before.retries,
        failed_requests=stats.failed_requests - before.failed_requests,
        agents=[a.figures() for a in session.agents],
        interrupted=interrupted,
        latency_target=target_report(latency_target_ms, [pacer]) if pacer is not None
        else None,
        mean_theta=mean_theta([pacer]) if pacer is not None else None,
        step_logits=[step[0].float().cpu() for step in output.logits][: len(token_ids)]
        if output_logits and output is not None else None)


@contextlib.contextmanager
def per_pass_theta(model, runtime, theta_for: Callable):
    """Inside, each forward pass of `model` runs at the θ `theta_for(args, kwargs)` gives it
    (a number, or [T] one per token), as serve's engine does it: a pre-hook enters
    `runtime.batch`, a hook that runs also when the forward raised leaves it. The hook's batch
    is the innermost, so it holds over any θ a caller set around the model."""
    step = contextlib.ExitStack()

    def before(module, args, kwargs):
        step.enter_context(runtime.batch(theta=theta_for(args, kwargs)))

    def after(module, args, kwargs, output):
        step.close()

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True, always_call=True)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        step.close()


def paced(model, runtime, pacer: Pacer):
    """Inside, each forward pass of `model` runs at the θ `pacer` picks for it."""
    return per_pass_theta(model, runtime, lambda args, kwargs: pacer.next_theta())


def prompt_logits(session, input_ids: torch.Tensor, theta: float | None = None,
                  ledgers: list | None = None) -> torch.Tensor:
    """One forward pass of the prompt through the distributed model at θ (default: the
    session's), charged to `ledgers` (RequestLedger, every token to the first): float32 logits
    [T, V] (row i predicts token i + 1), for the log-probabilities of a prompt (echo)."""
    base = session.base
    with torch.inference_mode(), session.runtime.batch(
            theta=session.theta if theta is None else theta, ledgers=ledgers):
        out = base.model(input_ids.to(base.device), attention_mask=torch.ones_like(input_ids),
                         use_cache=False)
    return out.logits[0].float().cpu()
