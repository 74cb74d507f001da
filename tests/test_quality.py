"""testbed.models.quality on hand-checkable cases: a fake bigram model with known probabilities."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from testbed.models import quality

ALPHABET = "abcd "  # token id = index; the model cycles a -> b -> c -> d -> a
P_NEXT = 0.7  # probability the fake model gives the next letter of the cycle; 0.075 to each other


class CharTokenizer:
    bos_token_id = None
    pad_token_id = 4

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ALPHABET.index(c) for c in text]}


class CycleModel(torch.nn.Module):
    """logits[p] depend only on input_ids[p]: a bigram with known softmax probabilities."""

    def __init__(self):
        super().__init__()
        probs = torch.full((5, 5), (1 - P_NEXT) / 4)
        for i in range(5):
            probs[i, (i + 1) % 4 if i < 4 else 0] = P_NEXT
        self.register_buffer("log_probs", probs.log())
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return SimpleNamespace(logits=self.log_probs[input_ids])  # [B, S, V]


@pytest.fixture
def model():
    return CycleModel()


def test_perplexity_of_a_perfectly_predicted_text(model):
    text = "abcd" * 50  # every token is the predicted one, with probability 0.7
    score = quality.score_tokens(model, CharTokenizer(), text, window=16)
    assert score.tokens == 199  # every token but the first, once
    assert score.perplexity == pytest.approx(1 / P_NEXT, rel=1e-5)
    assert score.accuracy == 1.0


def test_perplexity_and_accuracy_by_hand(model):
    # "abca": b, c right (0.7 each); a after c is wrong (0.075)
    score = quality.score_tokens(model, CharTokenizer(), "abca")
    expected = -(2 * math.log(P_NEXT) + math.log((1 - P_NEXT) / 4)) / 3
    assert score.tokens == 3 and score.correct == 2
    assert score.mean_nll == pytest.approx(expected, rel=1e-5)
    assert quality.perplexity(model, CharTokenizer(), "abca") == pytest.approx(math.exp(expected))
    assert quality.next_token_accuracy(model, CharTokenizer(), "abca") == pytest.approx(2 / 3)


@pytest.mark.parametrize("window,stride", [(8, 4), (8, 8), (8, 1), (5, 3), (1000, None)])
def test_sliding_window_scores_every_token_once(model, window, stride):
    text = "abcdabdcab" * 7
    score = quality.score_tokens(model, CharTokenizer(), text, window=window, stride=stride)
    full = quality.score_tokens(model, CharTokenizer(), text, window=1000)
    assert score.tokens == len(text) - 1
    assert score.correct == full.correct
    assert score.nll_sum == pytest.approx(full.nll_sum, rel=1e-5)


def test_max_tokens_bounds_the_work(model):
    score = quality.score_tokens(model, CharTokenizer(), "abcd" * 1000, max_tokens=64, window=32)
    assert score.tokens == 63
    assert model.calls == 3  # windows [0,32) [16,48) [32,64)


def test_sequence_agreement():
    assert quality.sequence_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == {
        "position": 1.0, "prefix": 1.0, "exact": True}
    got = quality.sequence_agreement([1, 2, 3, 4], [1, 9, 3])
    assert got == {"position": 0.5, "prefix": 0.25, "exact": False}
    assert quality.sequence_agreement([], [])["exact"]


def test_multiple_choice_picks_the_known_answer(model):
    items = [
        {"question": "abc", "choices": ["a", "d", "b"], "answer": 1},  # d follows c
        {"question": "ab", "choices": ["cd", "dd"], "answer": 0},
    ]
    result = quality.multiple_choice(model, CharTokenizer(), items, delimiter="")
    assert result["acc"] == 1.0 and result["acc_norm"] == 1.0
    assert result["predictions"] == [1, 0]
    assert result["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_choice_loglikelihood_by_hand(model):
    scores = quality.choice_loglikelihoods(model, CharTokenizer(), "a", ["bcdb", "c"],
                                           delimiter="")
    other = math.log((1 - P_NEXT) / 4)
    assert scores[0] == (pytest.approx(3 * math.log(P_NEXT) + other, rel=1e-5), 4)
    assert scores[1] == (pytest.approx(other, rel=1e-5), 1)


def test_length_normalised_variant_differs(model):
    # summed: "c" (one unlikely token) beats "bcdb" (three likely + one unlikely);
    # per byte: "bcdb" wins. The answer is the long one.
    items = [{"question": "a", "choices": ["bcdb", "c"], "answer": 0}]
    result = quality.multiple_choice(model, CharTokenizer(), items, delimiter="")
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0


def test_trailing_space_of_the_question_moves_to_the_choice():
    context, choice = quality._encode_pair(CharTokenizer(), "ab ", "cd")
    assert context == [0, 1] and choice == [4, 2, 3]


def test_choice_items_file(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"question": "q", "choices": ["x", "y"], "answer": 1}\n\n'
                    '{"question": "q2", "choices": ["x"], "answer": 0}\n')
    assert len(quality.load_choice_items(str(path))) == 2
    assert len(quality.load_choice_items(str(path), max_items=1)) == 1
    path.write_text('{"question": "q", "choices": ["x"], "answer": 3}\n')
    with pytest.raises(ValueError, match="mc.jsonl:1"):
        quality.load_choice_items(str(path))


@pytest.mark.integration
def test_works_through_the_base_stations_model(tmp_path):
    """The sweep passes the distributed model (experts hook); here its experts run locally."""
    from transformers import AutoModelForCausalLM

    from basestation.combine import combine
    from basestation.model import load_base_model
    from basestation.routing import group_by_expert
    from shard_tool.split import split
    data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "testbed", "data")
    ckpt = os.path.join(data, "tiny-mixtral")
    full = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

    class LocalRuntime:  # what the experts hook calls, experts computed from the full model
        def forward(self, layer, x, top_k_index, top_k_weights):
            experts = full.model.layers[layer].mlp.experts
            outputs = []
            keep = torch.ones_like(top_k_index, dtype=torch.bool)
            for e, (token_idx, slot) in group_by_expert(top_k_index, keep).items():
                gate, up = torch.nn.functional.linear(
                    x[token_idx], experts.gate_up_proj[e]).chunk(2, dim=-1)
                y = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
                outputs.append((e, token_idx, slot, y))
            return combine(x.shape[0], x.shape[1], x.dtype, top_k_weights, outputs)

    split(ckpt, str(tmp_path / "shards"))
    base = load_base_model(str(tmp_path / "shards"), LocalRuntime(), dtype="float32")
    with open(f"{data}/heldout-sample.txt") as f:
        text = f.read()
    remote = quality.score_tokens(base.model, base.tokenizer, text, max_tokens=512)
    local = quality.score_tokens(full, base.tokenizer, text, max_tokens=512)
    assert remote.tokens == local.tokens == 512
    assert remote.perplexity == pytest.approx(local.perplexity, rel=1e-4)
    items = quality.load_choice_items(f"{data}/mc-heldout.jsonl", max_items=5)
    assert (quality.multiple_choice(base.model, base.tokenizer, items)["predictions"]
            == quality.multiple_choice(full, base.tokenizer, items)["predictions"])
