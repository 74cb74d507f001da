"""The WLR selector (Algorithm 1 per box) on small cases checked by hand, grouping, combining and
the drop/retry choice; theta = 0 leaves every family's router output untouched."""

from __future__ import annotations

import pytest
import torch

from basestation.combine import after_failures, combine
from basestation.routing import group_by_expert
from basestation.selector import rescale, select, wlr

# Router weights used by several cases (E = 4); a softmax output need only be non-negative here.
W4 = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
ONE_PER_BOX = torch.arange(4)  # expert q on box q: the paper's setting


def rows(x: torch.Tensor) -> list:
    return x.tolist()


def paper(w: torch.Tensor, t: torch.Tensor, theta: float, top_k: int, box=ONE_PER_BOX,
          available=None):
    """Mixtral's top-k (renormalised) of router weights w [T, E], then the selector."""
    top_w, experts = torch.topk(w, top_k, dim=-1)
    return select(experts, top_w / top_w.sum(-1, keepdim=True), box, t, theta, available)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theta_zero_is_stock_mixtral_routing_bit_for_bit(top_k, seed):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=top_k)
    router = MixtralTopKRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    with torch.no_grad():
        _, scores, indices = router(torch.randn(64, 32))
    latency_s = torch.rand(8) * 0.1 + 1e-3
    latency_s[3] = float("inf")  # kappa = 0 for tokens choosing box 3: still no drop at 0
    sel = select(indices, scores, torch.arange(8), latency_s, theta=0.0)
    assert sel.experts is indices and torch.equal(sel.weights, scores)  # the router's bits
    assert sel.keep.all() and not sel.dropped.any()


def test_k2_drops_the_slow_heavy_expert():
    # top-2 = experts 0 (w 0.5) and 1 (w 0.3), renormalised 0.625, 0.375. t0 = 2 s, t1 = 0.5 s.
    # WLR0 = 0.625/2 = 0.3125, WLR1 = 0.375/0.5 = 0.75; kappa = 0.3125/1.0625 = 0.2941.
    # theta 0.3 >= kappa: drop expert 0 (the smallest WLR, although the largest weight);
    # expert 1 alone keeps the top-k total: 0.375 * (1 / 0.375) = 1.
    t = torch.tensor([2.0, 0.5, 0.5, 0.5])
    sel = paper(W4, t, theta=0.3, top_k=2)
    assert rows(sel.experts) == [[0, 1]]
    assert rows(sel.keep) == [[False, True]]
    assert rows(sel.dropped) == [[True, False]]
    assert rows(sel.weights) == [[0.0, 1.0]]


def test_k2_keeps_both_when_kappa_above_theta():
    # As above, kappa = 0.2941 > theta 0.2: keep both, the router's weights untouched.
    t = torch.tensor([2.0, 0.5, 0.5, 0.5])
    sel = paper(W4, t, theta=0.2, top_k=2)
    assert rows(sel.keep) == [[True, True]]
    torch.testing.assert_close(sel.weights, torch.tensor([[0.625, 0.375]]))


def test_kappa_equal_to_theta_drops():
    # Eq. 10 boundary, all binary-exact: weights 0.5, 0.375 (unnormalised, as OLMoE's),
    # WLR0 = 0.5/0.5 = 1, WLR1 = 0.375/0.125 = 3, kappa = 1/(1+3) = 0.25 exactly.
    experts, w = torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.375]])
    t = torch.tensor([0.5, 0.125, 1.0, 1.0])
    assert rows(select(experts, w, ONE_PER_BOX, t, 0.25).keep) == [[False, True]]
    assert rows(select(experts, w, ONE_PER_BOX, t, 0.2499).keep) == [[True, True]]


def test_k3_repeated_drops():
    # w = [0.4, 0.3, 0.2] (top-3 of [0.4, 0.3, 0.2, 0.1], total 0.9, not renormalised here),
    # t = [1, 0.5, 4]: WLR 0.4, 0.6, 0.05.
    # Round 1 over {0,1,2}: kappa = 0.05/(0.05+0.6) = 0.0769.
    # Round 2 over {0,1} (after dropping 2): kappa = 0.4/(0.4+0.6) = 0.4.
    experts, w = torch.tensor([[0, 1, 2]]), torch.tensor([[0.4, 0.3, 0.2]])
    t = torch.tensor([1.0, 0.5, 4.0, 1.0])

    sel = select(experts, w, ONE_PER_BOX, t, 0.05)  # 0.0769 > 0.05: no drop
    assert rows(sel.keep) == [[True, True, True]] and torch.equal(sel.weights, w)

    sel = select(experts, w, ONE_PER_BOX, t, 0.1)  # drop 2, then 0.4 > 0.1: stop
    assert rows(sel.keep) == [[True, True, False]]
    # kept weights scaled to keep the top-k total 0.9: 0.4 * 0.9/0.7, 0.3 * 0.9/0.7
    torch.testing.assert_close(sel.weights, torch.tensor([[0.4 * 0.9 / 0.7, 0.3 * 0.9 / 0.7,
                                                           0.0]]))

    sel = select(experts, w, ONE_PER_BOX, t, 0.45)  # drop 2, then 0.4 <= 0.45: drop 0
    assert rows(sel.keep) == [[False, True, False]]
    torch.testing.assert_close(sel.weights, torch.tensor([[0.0, 0.9, 0.0]]))

    sel = select(experts, w, ONE_PER_BOX, t, 0.9)  # never below one box
    assert rows(sel.keep) == [[False, True, False]]


def test_a_slow_box_is_dropped_whole():
    # Experts 0 and 1 live on box 0 (slow, t = 1 s), expert 2 on box 1 (t = 0.1 s).
    # A token's top-3: experts 0 (0.4), 1 (0.1), 2 (0.3).
    # Per box: W_0 = 0.5, WLR_0 = 0.5; W_1 = 0.3, WLR_1 = 3; kappa = 0.5/3.5 = 0.1429.
    # theta 0.15: drop box 0, i.e. BOTH its experts (dropping one would not shorten the
    # layer: box 0 would still be on the critical path); expert 2 keeps the total 0.8.
    experts, w = torch.tensor([[0, 1, 2]]), torch.tensor([[0.4, 0.1, 0.3]])
    box = torch.tensor([0, 0, 1])
    t = torch.tensor([1.0, 0.1])
    sel = select(experts, w, box, t, 0.15)
    assert rows(sel.keep) == [[False, False, True]]
    torch.testing.assert_close(sel.weights, torch.tensor([[0.0, 0.0, 0.8]]))
    # theta 0.05 < kappa: nothing dropped
    assert rows(select(experts, w, box, t, 0.05).keep) == [[True, True, True]]
    # The paper's rule on slots would, at 0.05, drop expert 1 alone (WLR 0.4, 0.1, 3:
    # kappa = 0.1/3.1 = 0.032, then 0.4/3.4 = 0.118): a loss of weight and no time saved.
    per_slot = select(experts, w, torch.arange(3), torch.tensor([1.0, 1.0, 0.1]), 0.05)
    assert rows(per_slot.keep) == [[True, False, True]]


def test_a_token_on_one_box_is_never_dropped():
    # all top-k on one box: there is no other box to fall back to, whatever theta
    experts, w = torch.tensor([[0, 1]]), torch.tensor([[0.7, 0.3]])
    sel = select(experts, w, torch.tensor([0, 0]), torch.tensor([5.0]), 0.9)
    assert rows(sel.keep) == [[True, True]] and torch.equal(sel.weights, w)


def test_k2_theta_half_always_keeps_exactly_the_best_wlr():
    # With two boxes kappa = min/(min+max) <= 0.5, so theta >= 0.5 always drops one.
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(200, 8), dim=-1)
    t = torch.rand(8) + 0.01
    sel = paper(w, t, theta=0.5, top_k=2, box=torch.arange(8))
    assert rows(sel.keep.sum(-1)) == [1] * 200
    top_wlr = torch.gather(wlr(w, t.expand(200, 8)), 1, sel.experts)
    assert torch.equal(sel.keep[:, 0], top_wlr[:, 0] > top_wlr[:, 1])
    torch.testing.assert_close(sel.weights.sum(-1), torch.ones(200))


def test_wlr_tie_drops_the_lower_weight_slot():
    # WLR0 = 0.5/1 = 0.5, WLR1 = 0.25/0.5 = 0.5: a tie, kappa = 0.5.
    # theta 0.5 drops one; the rule picks the later slot (the smaller router weight).
    experts, w = torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.25]])
    sel = select(experts, w, ONE_PER_BOX, torch.tensor([1.0, 0.5, 1.0, 1.0]), 0.5)
    assert rows(sel.keep) == [[True, False]]
    assert rows(sel.weights) == [[0.75, 0.0]]


def test_unavailable_experts_are_dropped_and_do_not_count_as_boxes():
    experts, w = torch.tensor([[0, 1]]), torch.tensor([[0.625, 0.375]])
    alive = torch.tensor([False, True, True, True])
    for theta in (0.0, 0.4):
        sel = select(experts, w, ONE_PER_BOX, torch.ones(4), theta, available=alive)
        assert rows(sel.keep) == [[False, True]] and rows(sel.dropped) == [[True, False]]
        assert rows(sel.weights) == [[0.0, 1.0]]
    none = select(experts, w, ONE_PER_BOX, torch.ones(4), 0.3,
                  available=torch.zeros(4, dtype=torch.bool))
    assert not none.keep.any() and rows(none.weights) == [[0.0, 0.0]]


def test_rescale_keeps_the_topk_total_and_leaves_full_rows_alone():
    weights = torch.tensor([[0.6, 0.2], [0.5, 0.5], [0.3, 0.1]])
    keep = torch.tensor([[True, True], [False, False], [False, True]])
    out = rescale(weights, keep)
    assert torch.equal(out[0], weights[0])  # untouched bits
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.2], [0.0, 0.0], [0.0, 0.4]]))


def test_bad_shapes():
    with pytest.raises(ValueError):
        select(torch.tensor([[0, 1]]), torch.tensor([[0.5]]), ONE_PER_BOX, torch.ones(4), 0.1)
    with pytest.raises(ValueError):
        select(torch.tensor([[0, 7]]), torch.tensor([[0.5, 0.5]]), ONE_PER_BOX, torch.ones(4),
               0.1)


@pytest.mark.parametrize("theta", [0.0, 0.3])
def test_grouping_python_path_matches_the_torch_path(theta, monkeypatch):
    from basestation import routing

    torch.manual_seed(7)
    probs = torch.softmax(torch.randn(12, 8), dim=-1)
    available = torch.ones(8, dtype=torch.bool)
    available[5] = False
    sel = paper(probs, torch.rand(8) + 1e-3, theta, 3, torch.arange(8), available)
    small = group_by_expert(sel.experts, sel.keep)  # 36 pairs: the Python path
    monkeypatch.setattr(routing, "PYTHON_GROUPING_PAIRS", 0)
    large = group_by_expert(sel.experts, sel.keep)
    assert list(small) == list(large) == sorted(large) and 5 not in small
    for expert in large:
        assert torch.equal(small[expert][0], large[expert][0]), expert
        assert torch.equal(small[expert][1], large[expert][1]), expert
    assert sum(len(t) for t, _ in small.values()) == int(sel.keep.sum()) > 0


def test_grouping_takes_rows_in_the_eager_loops_order():
    # transformers' eager experts loop takes an expert's rows slot-major (torch.where over
    # [K, T]); rows in another order can round differently in the matmul
    experts = torch.tensor([[1, 0], [0, 1], [1, 2]])
    groups = group_by_expert(experts, torch.ones(3, 2, dtype=torch.bool))
    mask = torch.nn.functional.one_hot(experts, 3).permute(2, 1, 0)
    for expert, (token_idx, slot) in groups.items():
        want_slot, want_token = torch.where(mask[expert])
        assert rows(token_idx) == rows(want_token) and rows(slot) == rows(want_slot)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_combine_is_the_general_sum_bit_for_bit(dtype):
    torch.manual_seed(11)
    for _ in range(20):
        top_w, experts = torch.topk(torch.softmax(torch.randn(1, 8), dim=-1), 3)
        weights = top_w / top_w.sum(-1, keepdim=True)
        outputs = [(e, t, s, torch.randn(len(t), 16, dtype=dtype)) for e, (t, s) in
                   group_by_expert(experts, torch.ones_like(experts, dtype=torch.bool)).items()]
        expected = torch.zeros(1, 16, dtype=dtype)  # the eager experts' arithmetic, by hand
        for _, token_idx, slot, y in sorted(outputs, key=lambda item: item[0]):
            expected.index_add_(0, token_idx, (y * weights[token_idx, slot, None]).to(dtype))
        assert torch.equal(combine(1, 16, dtype, weights, outputs), expected)


def test_failed_slots_are_dropped_and_orphans_retried_on_their_best_usable_slot():
    # token 0: kept 0 and 1, expert 1 failed -> expert 0 keeps the total 1.0
    # token 1: kept only 1 (WLR had dropped 2 and 3), 1 failed -> retry the best usable
    #   dropped slot: 3 (0.3) is on a failed box, so 2 (0.2)
    # token 2: kept only 1, failed, nothing usable -> the residual alone
    experts = torch.tensor([[0, 1, 2], [1, 2, 3], [1, 2, 3]])
    router = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.2, 0.3], [0.5, 0.2, 0.3]])
    keep = torch.tensor([[True, True, False], [True, False, False], [True, False, False]])
    sel = select(experts, router, torch.arange(4), torch.ones(4), 0.0)._replace(
        keep=keep, weights=rescale(router, keep), dropped=~keep)
    failed = keep & (experts == 1)
    usable = (experts != 1) & (experts != 3)
    usable[2] = False
    new, retry = after_failures(sel, router, failed, usable)
    assert rows(retry) == [[False] * 3, [False, True, False], [False] * 3]
    assert rows(new.keep) == [[True, False, False], [False, True, False], [False] * 3]
    torch.testing.assert_close(new.weights, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0],
                                                          [0.0, 0.0, 0.0]]))


def test_theta_per_token_for_requests_batched_together():
    # Two tokens of two requests with the same routing (as test_k2_drops_the_slow_heavy_expert:
    # kappa = 0.2941): the one at θ 0.3 drops expert 0, the one at θ 0 keeps the router's bits.
    t = torch.tensor([2.0, 0.5, 0.5, 0.5])
    top_w, experts = torch.topk(W4.expand(2, 4), 2, dim=-1)
    weights = top_w / top_w.sum(-1, keepdim=True)
    sel = select(experts, weights, ONE_PER_BOX, t, torch.tensor([0.3, 0.0]))
    assert rows(sel.keep) == [[False, True], [True, True]]
    assert torch.equal(sel.weights[1], weights[1])
    assert rows(sel.weights[0]) == [0.0, 1.0]
    # all zero: the stock path, the router's weights untouched
    zero = select(experts, weights, ONE_PER_BOX, t, torch.zeros(2))
    assert zero.weights is weights and zero.keep.all()
    with pytest.raises(ValueError):
        select(experts, weights, ONE_PER_BOX, t, torch.zeros(3))


@pytest.mark.parametrize("seed", range(6))
def test_small_selections_on_python_floats_decide_as_the_tensor_path(seed, monkeypatch):
    """Decode-sized selections run on Python floats (selector.SMALL_SELECTION); on the same
    inputs, including WLR ties, boxes with several experts, missing experts, infinite
    latencies and per-token θ, they keep the same slots with the same weights."""
    import basestation.selector as selector

    g = torch.Generator().manual_seed(seed)
    cases = []
    for _ in range(60):
        tokens, top_k = int(torch.randint(1, 6, (1,), generator=g)), int(
            torch.randint(1, 5, (1,), generator=g))
        num_experts, num_boxes = 8, int(torch.randint(2, 6, (1,), generator=g))
        experts = torch.stack([torch.randperm(num_experts, generator=g)[:top_k]
                               for _ in range(tokens)])
        weights = torch.randint(1, 5, (tokens, top_k), generator=g).float() / 8  # ties
        box = torch.randint(0, num_boxes, (num_experts,), generator=g)
        latency = torch.randint(1, 4, (num_boxes,), generator=g).double() * 1e-3
        if seed % 2:
            latency[0] = float("inf")
        available = torch.rand(num_experts, generator=g) > 0.2 if seed % 3 == 0 else None
        theta = torch.rand(tokens, generator=g) * 0.6 if seed >= 3 else 0.25
        cases.append((experts, weights, box, latency, theta, available))
    fast = [select(*case) for case in cases]
    monkeypatch.setattr(selector, "SMALL_SELECTION", -1)
    for case, quick in zip(cases, fast):
        slow = select(*case)
        assert torch.equal(quick.keep, slow.keep) and torch.equal(quick.dropped, slow.dropped)
        assert torch.equal(quick.weights, slow.weights)
    assert any(bool(q.dropped.any()) for q in fast) and any(not q.dropped.any() for q in fast)


def test_reply_bounds_refuse_what_no_layer_produces():
    """A reply row may be at most MAX_EXPERT_GAIN x its input row's norm (floored at 1); NaN
    and inf fail the same comparison. Regression: ±1e30 replies passed a finiteness check."""
    from basestation.dispatch import MAX_EXPERT_GAIN, out_of_bounds, reply_bounds

    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # norms 5 and 0 (floored at 1)
    bound = reply_bounds(x)
    assert bound.tolist() == [5 * MAX_EXPERT_GAIN, MAX_EXPERT_GAIN]
    assert not out_of_bounds(torch.tensor([[30.0, 40.0], [0.5, 0.0]]), bound)
    assert out_of_bounds(torch.tensor([[0.0, 0.0], [2 * MAX_EXPERT_GAIN, 0.0]]), bound)
    assert out_of_bounds(torch.tensor([[1e30, -1e30], [0.0, 0.0]]), bound)
    assert out_of_bounds(torch.tensor([[float("nan"), 0.0], [0.0, 0.0]]), bound)
    assert out_of_bounds(torch.tensor([[0.0, 0.0], [float("-inf"), 0.0]]), bound)
    assert not out_of_bounds(torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.bfloat16), bound)
    one = reply_bounds(torch.tensor([[0.6, 0.8]]))  # decode's one row: a float
    assert one == MAX_EXPERT_GAIN
    assert not out_of_bounds(torch.tensor([[MAX_EXPERT_GAIN, 0.0]]), one)
    assert out_of_bounds(torch.tensor([[MAX_EXPERT_GAIN, 200.0]]), one)
    assert out_of_bounds(torch.tensor([[float("nan"), 0.0]]), one)
    assert out_of_bounds(torch.tensor([[1e30, 1e30]], dtype=torch.bfloat16), one)
