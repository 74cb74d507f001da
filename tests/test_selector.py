"""The WLR selector (Algorithm 1) on small cases checked by hand, and theta = 0 against Mixtral."""

from __future__ import annotations

import pytest
import torch

from basestation.selector import renormalise, select_experts, wlr

# Router weights used by several cases (E = 4); a softmax output need only be non-negative here.
W4 = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


def rows(x: torch.Tensor) -> list:
    return x.tolist()


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theta_zero_is_stock_mixtral_routing_bit_for_bit(top_k, seed):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=top_k)
    router = MixtralTopKRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    hidden = torch.randn(64, 32)
    with torch.no_grad():
        logits, scores, indices = router(hidden)
        probs = torch.softmax(logits.float(), dim=-1)  # what the router takes top-k of
    latency_s = torch.rand(8) * 0.1 + 1e-3
    latency_s[3] = float("inf")  # kappa = 0 for tokens choosing expert 3: still no drop at 0
    sel = select_experts(probs, latency_s, theta=0.0, top_k=top_k)
    assert torch.equal(sel.experts, indices)
    assert torch.equal(sel.weights, scores)  # bit-exact, not allclose
    assert sel.keep.all() and not sel.dropped.any() and int(sel.drops.sum()) == 0


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_stock_fast_path_matches_the_general_path(top_k):
    # theta = 0 with no mask takes a short path; an all-true mask forces the general one
    torch.manual_seed(top_k)
    probs = torch.softmax(torch.randn(16, 8), dim=-1)
    latency_s = torch.rand(8) + 1e-3
    fast = select_experts(probs, latency_s, theta=0.0, top_k=top_k)
    general = select_experts(probs, latency_s, theta=0.0, top_k=top_k,
                             available=torch.ones(8, dtype=torch.bool))
    for name, a, b in zip(fast._fields, fast, general):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("theta", [0.0, 0.3])
def test_token_grouping_python_path_matches_the_torch_path(theta, monkeypatch):
    from basestation import model

    torch.manual_seed(7)
    probs = torch.softmax(torch.randn(12, 8), dim=-1)
    latency_s = torch.rand(8) + 1e-3
    available = torch.ones(8, dtype=torch.bool)
    available[5] = False
    sel = select_experts(probs, latency_s, theta=theta, top_k=3, available=available)
    small = model.tokens_per_expert(sel)  # 36 pairs: the Python path
    monkeypatch.setattr(model, "SMALL_SELECTION", 0)
    large = model.tokens_per_expert(sel)
    assert list(small) == list(large) == sorted(large) and 5 not in small
    for expert in large:
        assert torch.equal(small[expert][0], large[expert][0]), expert
        assert torch.equal(small[expert][1], large[expert][1]), expert
    kept = int(sel.keep.sum())
    assert sum(len(t) for t, _ in small.values()) == kept > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_combine_is_the_general_sum_bit_for_bit(dtype):
    from basestation.model import combine, tokens_per_expert

    torch.manual_seed(11)
    for _ in range(20):
        probs = torch.softmax(torch.randn(1, 8), dim=-1)
        sel = select_experts(probs, torch.rand(8) + 1e-3, theta=0.0, top_k=3)
        outputs = [(e, t, s, torch.randn(len(t), 16, dtype=dtype))
                   for e, (t, s) in tokens_per_expert(sel).items()]
        expected = torch.zeros(1, 16, dtype=dtype)  # MixtralExperts' arithmetic, by hand
        for _, token_idx, slot, y in sorted(outputs, key=lambda item: item[0]):
            expected.index_add_(0, token_idx, (y * sel.weights[token_idx, slot, None]).to(dtype))
        assert torch.equal(combine(1, 16, dtype, sel, outputs), expected)


def test_k2_drops_the_slow_heavy_expert():
    # top-2 = experts 0 (w 0.5) and 1 (w 0.3). t0 = 2 s, t1 = 0.5 s.
    # WLR0 = 0.5/2 = 0.25, WLR1 = 0.3/0.5 = 0.6; kappa = 0.25/(0.25+0.6) = 0.2941.
    # theta 0.3 >= kappa: drop expert 0 (the smallest WLR, although the largest weight);
    # expert 1 alone gets weight 0.3/0.3 = 1.
    t = torch.tensor([2.0, 0.5, 0.5, 0.5])
    sel = select_experts(W4, t, theta=0.3, top_k=2)
    assert rows(sel.experts) == [[0, 1]]
    assert rows(sel.keep) == [[False, True]]
    assert rows(sel.dropped) == [[True, False]]
    assert rows(sel.weights) == [[0.0, 1.0]]
    assert rows(sel.drops) == [1]


def test_k2_keeps_both_when_kappa_above_theta():
    # As above, kappa = 0.2941 > theta 0.2: keep both, weights 0.5/0.8 = 0.625, 0.3/0.8 = 0.375.
    t = torch.tensor([2.0, 0.5, 0.5, 0.5])
    sel = select_experts(W4, t, theta=0.2, top_k=2)
    assert rows(sel.keep) == [[True, True]]
    torch.testing.assert_close(sel.weights, torch.tensor([[0.625, 0.375]]))
    assert rows(sel.drops) == [0]


def test_kappa_equal_to_theta_drops():
    # Eq. 10 boundary, all binary-exact: WLR0 = 0.5/0.5 = 1, WLR1 = 0.375/0.125 = 3,
    # kappa = 1/(1+3) = 0.25 exactly. The paper's text says "kappa <= theta" drops.
    w = torch.tensor([[0.5, 0.375, 0.125, 0.0]])
    t = torch.tensor([0.5, 0.125, 1.0, 1.0])
    assert rows(select_experts(w, t, theta=0.25, top_k=2).keep) == [[False, True]]
    assert rows(select_experts(w, t, theta=0.2499, top_k=2).keep) == [[True, True]]


def test_k3_repeated_drops():
    # w = [0.4, 0.3, 0.2, 0.1], t = [1, 0.5, 4, 1]: top-3 = experts 0, 1, 2 with
    # WLR 0.4, 0.6, 0.05.
    # Round 1 over {0,1,2}: kappa = 0.05/(0.05+0.6) = 0.0769.
    # Round 2 over {0,1} (after dropping 2): kappa = 0.4/(0.4+0.6) = 0.4.
    w = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    t = torch.tensor([1.0, 0.5, 4.0, 1.0])

    sel = select_experts(w, t, theta=0.05, top_k=3)  # 0.0769 > 0.05: no drop
    assert rows(sel.keep) == [[True, True, True]]
    torch.testing.assert_close(sel.weights, torch.tensor([[0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9]]))

    sel = select_experts(w, t, theta=0.1, top_k=3)  # drop 2, then 0.4 > 0.1: stop
    assert rows(sel.experts) == [[0, 1, 2]]
    assert rows(sel.keep) == [[True, True, False]]
    torch.testing.assert_close(sel.weights, torch.tensor([[0.4 / 0.7, 0.3 / 0.7, 0.0]]))
    assert rows(sel.drops) == [1]

    sel = select_experts(w, t, theta=0.45, top_k=3)  # drop 2, then 0.4 <= 0.45: drop 0
    assert rows(sel.keep) == [[False, True, False]]
    assert rows(sel.weights) == [[0.0, 1.0, 0.0]]
    assert rows(sel.drops) == [2]

    sel = select_experts(w, t, theta=0.9, top_k=3)  # never below one expert
    assert rows(sel.keep) == [[False, True, False]]


def test_k2_theta_half_always_keeps_exactly_the_best_wlr():
    # With two experts kappa = min/(min+max) <= 0.5, so theta >= 0.5 always drops one.
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(200, 8), dim=-1)
    t = torch.rand(200, 8) + 0.01
    sel = select_experts(w, t, theta=0.5, top_k=2)
    assert rows(sel.keep.sum(-1)) == [1] * 200
    assert rows(sel.drops) == [1] * 200
    top_wlr = torch.gather(wlr(w, t), 1, sel.experts)
    assert torch.equal(sel.keep[:, 0], top_wlr[:, 0] > top_wlr[:, 1])
    assert torch.equal(sel.weights.sum(-1), torch.ones(200))


def test_wlr_tie_drops_the_lower_weight_slot():
    # WLR0 = 0.5/1 = 0.5, WLR1 = 0.25/0.5 = 0.5: a tie, kappa = 0.5.
    # theta 0.5 drops one; the rule picks the later slot (the smaller router weight).
    w = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    t = torch.tensor([1.0, 0.5, 1.0, 1.0])
    sel = select_experts(w, t, theta=0.5, top_k=2)
    assert rows(sel.experts) == [[0, 1]]
    assert rows(sel.keep) == [[True, False]]
    assert rows(sel.weights) == [[1.0, 0.0]]


def test_available_mask():
    t = torch.ones(4)
    # Expert 0 dead: top-2 among {1, 2, 3} = 1 (0.3), 2 (0.15); weights 0.3/0.45, 0.15/0.45.
    alive = torch.tensor([False, True, True, True])
    sel = select_experts(W4, t, theta=0.0, top_k=2, available=alive)
    assert rows(sel.experts) == [[1, 2]]
    torch.testing.assert_close(sel.weights, torch.tensor([[2 / 3, 1 / 3]]))

    # One expert alive: the second slot is empty (-1, not kept), not a WLR drop.
    alive = torch.tensor([False, False, True, False])
    sel = select_experts(W4, t, theta=0.0, top_k=2, available=alive)
    assert rows(sel.experts) == [[2, -1]]
    assert rows(sel.keep) == [[True, False]]
    assert rows(sel.weights) == [[1.0, 0.0]]
    assert rows(sel.drops) == [0]

    # None alive: nothing kept, all weights 0.
    sel = select_experts(W4, t, theta=0.3, top_k=2, available=torch.zeros(4, dtype=torch.bool))
    assert rows(sel.experts) == [[-1, -1]]
    assert not sel.keep.any() and rows(sel.weights) == [[0.0, 0.0]]


def test_per_token_latency():
    # Two tokens with the same weights, latency [T, E]. Token 0 sees expert 0 slow
    # (kappa = 0.2941 as in test_k2_drops...), token 1 sees both at 1 s:
    # WLR 0.5, 0.3, kappa = 0.3/0.8 = 0.375 > 0.3: keep both.
    w = W4.expand(2, 4)
    t = torch.tensor([[2.0, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    sel = select_experts(w, t, theta=0.3, top_k=2)
    assert rows(sel.keep) == [[False, True], [True, True]]
    torch.testing.assert_close(sel.weights, torch.tensor([[0.0, 1.0], [0.625, 0.375]]))
    assert rows(sel.drops) == [1, 0]


def test_renormalise_handles_empty_tokens():
    weights = torch.tensor([[0.6, 0.2], [0.5, 0.5]])
    keep = torch.tensor([[True, True], [False, False]])
    torch.testing.assert_close(renormalise(weights, keep), torch.tensor([[0.75, 0.25], [0.0, 0.0]]))


def test_bad_shapes():
    with pytest.raises(ValueError):
        select_experts(W4, torch.ones(3), theta=0.1, top_k=2)
    with pytest.raises(ValueError):
        select_experts(W4, torch.ones(4), theta=0.1, top_k=5)
