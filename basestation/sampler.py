"""Per-request sampling inside transformers' continuous batching.

transformers' continuous batching samples every row of a batch with one policy (its
generation_config) and one global generator. A server needs each request's own temperature,
top-p and seed (the same seed gives the same answer alone or in a crowd) and, for `logprobs`,
the raw log-probabilities of every generated token. `BatchSampler` is a continuous-batching
logits processor (the library's extension point for per-request processing): for each row it
asks the engine's `pick` callback which token that request takes, then hands the library a row
whose only finite entry is that token, so the library's argmax agrees.

`RowSampler` is one request's policy, built from transformers' own logits warpers.
"""

from __future__ import annotations

import math
import secrets
import types
from typing import Callable

import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)

from basestation.generate import Sampling, apply_sampling


class RowSampler:
    """One request's choice of the next token from its raw logits row [V] (float32)."""

    def __init__(self, generation_config, sampling: Sampling, stream: int = 0):
        config = types.SimpleNamespace(
            do_sample=bool(generation_config.do_sample),
            temperature=generation_config.temperature, top_p=generation_config.top_p,
            top_k=generation_config.top_k)
        apply_sampling(config, sampling)
        self.greedy = not config.do_sample
        warpers = []
        if not self.greedy:
            if config.temperature is not None and config.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(float(config.temperature)))
            if config.top_k:
                warpers.append(TopKLogitsWarper(int(config.top_k)))
            if config.top_p is not None and config.top_p < 1.0:
                warpers.append(TopPLogitsWarper(float(config.top_p)))
        self.warpers = LogitsProcessorList(warpers)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)
        # several choices of one request with one seed: each its own stream, reproducibly
        self.generator = torch.Generator().manual_seed(seed + stream)

    def pick(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return greedy(logits)
        scores = self.warpers(None, logits.unsqueeze(0))
        probs = torch.softmax(scores, dim=-1)
        # a row the warpers could not make a distribution of (inf or NaN logits): multinomial
        # would raise, or draw garbage; the likeliest token is the one answer left
        if not bool(torch.isfinite(probs).all()):
            return greedy(logits)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def greedy(logits: torch.Tensor) -> int:
    """The likeliest token of a row [V]; NaN entries never win (argmax takes NaN as largest)."""
    token = int(logits.argmax())
    if math.isnan(float(logits[token])):  # rare: only then the copy without NaN
        token = int(torch.nan_to_num(logits, nan=float("-inf")).argmax())
    return token


class BatchSampler(ContinuousBatchingLogitsProcessor):
    """The continuous-batching logits processor: `pick(request_id, logits_row) -> token`."""

    supported_kwargs: dict[str, type] = {}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, pick: Callable[[str, torch.Tensor], int]):
        self.pick = pick
        self._rows: list[str] = []

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.zero_()

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        # the rows of the coming __call__, in order (the library calls both on its one thread)
        self._rows = [future.state.request_id for future in requests_with_new_token]
        return torch.zeros(len(self._rows), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        """scores [R, V], one row per sequence that takes a token this step; R is 0 for a step
        that only prefills part of a long prompt."""
        chosen = torch.tensor([self.pick(request_id, scores[row])
                               for row, request_id in enumerate(self._rows)], dtype=torch.long)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(chosen)), chosen] = 0.0
        return out


def processor_list(sampler: BatchSampler) -> ContinuousBatchingLogitsProcessorList:
    processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([sampler]))
    # one argument row for the sampler in the library's static input tensor (it counts rows
    # only for the processors it converts itself)
    processors.tensors_required = 1
    return processors
