"""One choice of a request while its tokens arrive: the text to stream (held back where a stop
string could still begin), why it finished, and its log-probabilities.

Pure of threads and sockets: the engine feeds it a token and that step's raw logits row.
"""

from __future__ import annotations

import torch

from basestation.jobs import Choice
from basestation.openai_api import Params, cut_at_stop, held_back, logprobs_block


def token_logprobs(tokenizer, logits: torch.Tensor, targets: list[int], top: int):
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
                alternatives.setdefault(tokenizer.decode([alt]), value)
        alternatives.setdefault(tokenizer.decode([token]), chosen[i])
        tokens.append(tokenizer.decode([token]))
        tops.append(alternatives)
    return tokens, chosen, tops


class ChoiceDecoder:
    """`add(token, logits)` per generated token -> (text safe to stream now, finish reason or
    None); `choice()` at the end. A finish reason of "stop" from a stop string means the
    caller must stop generating this sequence itself."""

    def __init__(self, index: int, tokenizer, params: Params, budget: int, eos_ids: set[int],
                 echo_text: str = "", logprobs: int | None = None,
                 prompt_logprobs: tuple[list, list, list] = ([], [], [])):
        self.index = index
        self.tokenizer = tokenizer
        self.params = params
        self.budget = budget
        self.eos_ids = set() if params.ignore_eos else eos_ids
        self.echo_text = echo_text
        self.top = logprobs  # None: no logprobs
        self.lp_tokens, self.lp_values, self.lp_top = (list(part) for part in prompt_logprobs)
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.finish_reason: str | None = None

    def add(self, token: int, logits: torch.Tensor | None = None) -> tuple[str, str | None]:
        self.tokens.append(token)
        if self.top is not None and logits is not None:
            more = token_logprobs(self.tokenizer, logits.unsqueeze(0), [token], self.top)
            self.lp_tokens += more[0]
            self.lp_values += more[1]
            self.lp_top += more[2]
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        stops = self.params.stop
        text, hit_stop = cut_at_stop(self.text, stops) if stops else (self.text, False)
        if hit_stop or token in self.eos_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.budget:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            safe = len(text)
        else:  # a partial character, or a possible stop string start, waits for more tokens
            safe = len(text) - held_back(text, stops)
            while safe > self.sent and text[safe - 1] == "\ufffd":
                safe -= 1
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta, self.finish_reason

    def cancel(self) -> None:
        self.finish_reason = self.finish_reason or "cancelled"

    def choice(self) -> Choice:
        text, _ = cut_at_stop(self.text, self.params.stop)
        logprobs = logprobs_block(self.lp_tokens, self.lp_values, self.lp_top) \
            if self.top is not None else None
        return Choice(self.index, self.echo_text + text, self.finish_reason or "length",
                      len(self.tokens), logprobs)
