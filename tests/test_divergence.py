"""testbed.experiments.divergence (KL(θ=0 || θ) and top-1 agreement over held-out blocks) and
testbed.experiments.pass_counts, on hand-checkable distributions and a fake model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from testbed.experiments import divergence, pass_counts


class CharTokenizer:
    bos_token_id = 9

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [ord(c) - ord("a") for c in text]}


class ShiftModel(torch.nn.Module):
    """Next-token log-probabilities that depend only on the input token: token t puts
    probability P on (t + 1) % V and spreads the rest; `shift` moves that mass to t + 2."""

    V = 10
    P = 0.6

    def __init__(self, shift: int = 1):
        super().__init__()
        self.shift, self.calls = shift, 0

    def table(self) -> torch.Tensor:
        probs = torch.full((self.V, self.V), (1 - self.P) / (self.V - 1))
        for t in range(self.V):
            probs[t, (t + self.shift) % self.V] = self.P
        return probs.log()

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return SimpleNamespace(logits=self.table()[input_ids])  # [B, S, V]


def test_blocks_are_equal_and_open_with_bos():
    blocks = divergence.heldout_blocks(CharTokenizer(), "abcdefghij" * 3, max_tokens=25,
                                       block_tokens=5)
    assert blocks == [[9, 0, 1, 2, 3], [9, 4, 5, 6, 7], [9, 8, 9, 0, 1],
                      [9, 2, 3, 4, 5], [9, 6, 7, 8, 9], [9, 0, 1, 2, 3]]
    with pytest.raises(ValueError):
        divergence.heldout_blocks(CharTokenizer(), "abc", block_tokens=8)


def test_kl_and_agreement_by_hand():
    """Every position's reference is 0.6 on t+1 and 0.4/9 elsewhere; the candidate swaps the
    0.6 to t+2: KL = 0.6 ln(0.6 / (0.4/9)) + (0.4/9) ln((0.4/9) / 0.6), agreement 0."""
    blocks = divergence.heldout_blocks(CharTokenizer(), "abcdefghij" * 4, block_tokens=8)
    reference = divergence.Divergence.measure_reference(ShiftModel(1), blocks)
    moved = reference.against(ShiftModel(2))
    low = 0.4 / 9
    kl = 0.6 * math.log(0.6 / low) + low * math.log(low / 0.6)
    assert moved["kl_nats"]["value"] == pytest.approx(kl, rel=1e-5)
    assert moved["top1_agreement"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert moved["positions"] == 5 * 7 and moved["blocks"] == 5
    same = reference.against(ShiftModel(1))
    assert same["kl_nats"]["value"] == 0.0 and same["top1_agreement"]["value"] == 1.0
    assert reference.of_reference() == same


def test_interval_is_over_blocks():
    """Half the blocks agree fully, half not at all: the mean is 0.5 and the interval, drawn
    over 4 blocks, is wide; over positions it would be far narrower."""
    ref = torch.log_softmax(torch.randn(4, 16, 6, generator=torch.Generator().manual_seed(0)),
                            dim=-1)
    cand = ref.clone()
    cand[2:] = ref[2:].roll(1, dims=-1)  # blocks 2, 3: another argmax everywhere
    figures = divergence.compare(ref, cand)
    assert figures.agreement == [1.0, 1.0, 0.0, 0.0] and figures.kl_nats[0] == 0.0
    summary = divergence.summarize(figures)
    agree = summary["top1_agreement"]
    assert agree["value"] == 0.5 and agree["low"] <= 0.25 and agree["high"] >= 0.75
    assert summary["interval"] == "bootstrap 95 % over blocks"
    with pytest.raises(ValueError):
        divergence.compare(ref, cand[:2])


def test_batches_of_blocks_equal_one_pass():
    blocks = divergence.heldout_blocks(CharTokenizer(), "abcdefghij" * 8, block_tokens=6)
    model = ShiftModel()
    whole = divergence.block_logprobs(model, blocks, blocks_per_forward=100)
    assert model.calls == 1
    split = divergence.block_logprobs(model, blocks, blocks_per_forward=3)
    assert model.calls == 1 + math.ceil(len(blocks) / 3) and torch.equal(whole, split)


def test_pass_counts_and_exact_failure():
    stats = SimpleNamespace(expert_calls=10, experts_dropped=2, fault_drops=0,
                            failed_requests=0, retries=0)
    with pass_counts.counted(stats) as counts:
        stats.expert_calls += 30
        stats.experts_dropped += 10
        stats.fault_drops += 4
        stats.failed_requests += 1
    assert counts == {"expert_calls": 30, "experts_dropped": 10, "fault_drops": 4,
                      "failed_requests": 1, "retries": 0}
    assert pass_counts.drop_rate(counts) == 0.25
    clean = pass_counts.zero()
    row = {"exact": True, "passes": {"latency": clean, "quality": counts},
           "divergence": {"reference_pass": clean}}
    assert pass_counts.fault_losses(row) == {"quality": 4}
    assert pass_counts.exact_failure(row) == "lost experts to faults: quality 4"
    assert pass_counts.exact_failure(dict(row, exact=False)) is None  # not asked: counts only
    reference_lost = {"exact": True, "passes": {"latency": clean, "quality": clean},
                      "divergence": {"reference_pass": counts}}
    assert pass_counts.exact_failure(reference_lost) == "lost experts to faults: reference 4"
