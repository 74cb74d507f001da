"""The WLR expert-selection policy (WDMoE paper §III, Algorithm 1), per box, as a pure function.

The family's own router (transformers' code) has already chosen every token's top-k slots
(expert ids and weights). This module decides which of those slots to call.

Latency is per **box** (agent): with several experts on one agent, that agent answers one
request per layer carrying all of them, so what a slot costs is its box's time for the whole
layer request, and dropping one of two experts on a slow box saves nothing. The rule therefore
acts on the boxes a token uses: a box's weight is the sum of the token's top-k weights it hosts,

    WLR_b = W_b / t_b                                           (Eq. 9, per box)
    kappa = min_b WLR_b / (min_b WLR_b + max_b WLR_b)           (Eq. 10)

and while kappa <= theta and more than one box remains, every slot of the box with the smallest
WLR is dropped, which takes that box off this token's critical path. With one expert per box
this is exactly the paper's Algorithm 1. The kept weights are rescaled to keep the top-k's
total weight (for Mixtral, whose top-k weights sum to 1, that is the paper's renormalisation).
theta <= 0 never drops and returns the router's weights untouched, bit for bit.

Shape legend: T = tokens, K = top-k slots, E = experts, B = boxes.
Imports only torch: no clocks, no sockets; latencies are passed in.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Selection(NamedTuple):
    """Which of the router's top-k slots to call, and with which weights.

    experts: [T, K] int64, the router's expert ids (unchanged).
    weights: [T, K] float, the weights to combine with: the router's where nothing was dropped
        for that token, else the kept ones rescaled to the top-k total; 0 where not kept.
    keep:    [T, K] bool, the slots whose expert must be called.
    dropped: [T, K] bool, slots removed by the WLR rule or for lack of a live expert.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    keep: torch.Tensor
    dropped: torch.Tensor


def wlr(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Weight-to-latency ratio, Eq. 9: WLR = w ⊘ t element-wise."""
    return w / t.to(w.dtype)


def rescale(weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the slots not kept; scale the kept ones so each token keeps its top-k total weight.

    weights, keep: [T, K]. Tokens with every slot kept are returned untouched (bit for bit);
    a token with none kept gets zeros (its MoE output is then zero: the residual alone).
    """
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    full = weights.sum(dim=-1, keepdim=True)  # [T, 1]
    part = kept.sum(dim=-1, keepdim=True)
    scaled = kept * (full / torch.where(part != 0, part, torch.ones_like(part)))
    untouched = keep.all(dim=-1, keepdim=True)
    return torch.where(untouched, weights, scaled)


def _box_weights(weights: torch.Tensor, same_box: torch.Tensor, keep: torch.Tensor
                 ) -> torch.Tensor:
    """[T, K]: for each slot, the token's kept weight on that slot's box (W_b of Eq. 9).
    same_box: [T, K, K], slots j and k on one box."""
    kept_w = torch.where(keep, weights, torch.zeros_like(weights))  # [T, K]
    return (same_box * kept_w[:, None, :]).sum(dim=-1)


# Up to this many (token, slot) pairs (decode, small batches) the rule runs on Python floats:
# the tensor loop below costs ~25 torch calls per round, 170 us per layer for one token on
# this CPU, which at θ > 0 cost decode more base-station time than WLR saved on the links.
# Both paths make the same decisions (tests/test_selector.py checks them against each other).
SMALL_SELECTION = 32
# (keep, dropped) [T, K] of small selections on the CPU, built once per shape (every slot
# kept) or per one token's pattern (decode): read only, they save two tensors a layer call
_ALL_KEPT: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
_ONE_TOKEN: dict[tuple[bool, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def _all_kept(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, dropped) [T, K] for a selection that keeps every slot."""
    pair = _ALL_KEPT.get(shape)
    if pair is None:
        keep = torch.ones(shape, dtype=torch.bool)
        pair = _ALL_KEPT[shape] = (keep, ~keep)
    return pair


def _kept(rows_keep: list[list[bool]], shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, dropped) [T, K] (`shape`) of these rows."""
    if len(rows_keep) == 1:
        pattern = tuple(rows_keep[0])
        pair = _ONE_TOKEN.get(pattern)
        if pair is None:
            keep = torch.tensor([pattern], dtype=torch.bool)
            pair = _ONE_TOKEN[pattern] = (keep, ~keep)
        return pair
    keep = torch.tensor(rows_keep, dtype=torch.bool).reshape(shape)
    return keep, ~keep


def _select_few(experts: torch.Tensor, weights: torch.Tensor, box_of_expert: torch.Tensor,
                box_latency_s: torch.Tensor | list[float], theta: float | torch.Tensor,
                available: torch.Tensor | None, rows_experts: list[list[int]] | None
                ) -> Selection:
    """`select` token by token on Python floats (float64, like the tensor path)."""
    if rows_experts is None:
        rows_experts = experts.tolist()
    num_experts = box_of_expert.shape[0]
    if any(not 0 <= e < num_experts for row in rows_experts for e in row):
        raise ValueError(f"expert ids outside 0..{num_experts - 1}")
    if isinstance(theta, torch.Tensor):
        if theta.shape != (experts.shape[0],):
            raise ValueError(f"theta {tuple(theta.shape)} is neither a number nor [T]")
        thetas = theta.double().tolist()
    elif available is None and theta <= 0:  # decode at θ = 0: no per-token list to build
        return Selection(experts, weights, *_all_kept((experts.shape[0], experts.shape[1])))
    else:
        thetas = [float(theta)] * experts.shape[0]
    if available is None and all(t <= 0 for t in thetas):
        # stock routing: nothing to decide, the router's bits untouched
        return Selection(experts, weights, *_all_kept((experts.shape[0], experts.shape[1])))
    usable = available.tolist() if available is not None else None
    rows_keep = [[usable[e] for e in row] if usable else [True] * len(row)
                 for row in rows_experts]
    if all(t <= 0 for t in thetas):
        keep, dropped = _kept(rows_keep, experts.shape)
        return Selection(experts, rescale(weights, keep), keep, dropped)
    boxes_of = box_of_expert.tolist()
    t_box = box_latency_s.double().tolist() if isinstance(box_latency_s, torch.Tensor) \
        else box_latency_s
    # a float dtype's values are exact as Python floats: .double() would be a torch op for nothing
    rows_w = weights.tolist() if weights.is_floating_point() else weights.double().tolist()
    for i, (row_experts, row_w, token_theta) in enumerate(zip(rows_experts, rows_w, thetas)):
        slot_box = [boxes_of[e] for e in row_experts]
        row_keep = rows_keep[i]
        while token_theta > 0:
            box_w: dict[int, float] = {}  # the token's kept boxes, in order of leading slot
            for b, w, k in zip(slot_box, row_w, row_keep):
                if k:
                    box_w[b] = box_w.get(b, 0.0) + w
            if len(box_w) < 2:
                break
            ratios = [(b, w / t_box[b]) for b, w in box_w.items()]  # WLR, Eq. 9
            lo = min(r for _, r in ratios)
            hi = max(r for _, r in ratios)
            total = lo + hi
            # Eq. 10; 0/0 and inf/inf are NaN in the tensor path, and NaN never drops
            if total == 0 or math.isnan(total) or not lo / total <= token_theta:
                break
            # the smallest WLR; on a tie, the box whose leading slot comes later
            victim = [b for b, r in ratios if r == lo][-1]
            row_keep = [k and b != victim for b, k in zip(slot_box, row_keep)]
        rows_keep[i] = row_keep
    keep, dropped = _kept(rows_keep, experts.shape)
    if all(all(row) for row in rows_keep):  # rescale would return the router's weights
        return Selection(experts, weights, keep, dropped)
    return Selection(experts, rescale(weights, keep), keep, dropped)


def select(
    experts: torch.Tensor,
    weights: torch.Tensor,
    box_of_expert: torch.Tensor,
    box_latency_s: torch.Tensor | list[float],
    theta: float | torch.Tensor,
    available: torch.Tensor | None = None,
    rows_experts: list[list[int]] | None = None,
) -> Selection:
    """Algorithm 1 over boxes, for every token at once.

    experts: [T, K] the router's top-k expert ids; weights: [T, K] their router weights (any
        scale: softmax, sigmoid, unnormalised; WLR ratios do not depend on it).
    box_of_expert: [E] int64, the box hosting each expert.
    box_latency_s: [B] expected seconds for each box to return this layer's request; must be
        > 0 (inf allowed: WLR 0, the first to go). A list of floats will do for a selection of
        at most SMALL_SELECTION slots on the CPU (decode builds no tensor for it).
    theta: drop threshold on kappa (Eq. 10), one for all tokens or [T] one per token (tokens
        of several requests in one batch, each with its own θ); theta <= 0 never drops.
    available: optional [E] bool; slots of unavailable experts are dropped first (no box can
        serve them) and do not count as boxes.
    rows_experts: experts.tolist(), when the caller has it (decode reads the routing as Python
        lists once, for the selector, the grouping and the accounting).
    """
    if experts.shape != weights.shape or experts.dim() != 2:
        raise ValueError(f"experts {tuple(experts.shape)} and weights {tuple(weights.shape)} "
                         "must both be [T, K]")
    if experts.numel() <= SMALL_SELECTION and experts.device.type == "cpu":
        return _select_few(experts, weights, box_of_expert, box_latency_s, theta, available,
                           rows_experts)
    num_experts = box_of_expert.shape[0]
    if experts.numel() and not (0 <= int(experts.min()) and int(experts.max()) < num_experts):
        raise ValueError(f"expert ids outside 0..{num_experts - 1}")
    keep = torch.ones_like(experts, dtype=torch.bool)
    if available is not None:
        keep = available.to(experts.device)[experts]
    if isinstance(theta, torch.Tensor):
        if theta.shape != (experts.shape[0],):
            raise ValueError(f"theta {tuple(theta.shape)} is neither a number nor [T]")
        if not bool((theta > 0).any()):
            theta = 0.0
        else:
            theta = theta.to(weights.device, torch.float64)
    if not isinstance(theta, torch.Tensor) and theta <= 0:
        if available is None:  # stock routing: nothing to decide, the router's bits untouched
            return Selection(experts, weights, keep, ~keep)
        return Selection(experts, rescale(weights, keep), keep, ~keep)

    slot_box = box_of_expert.to(experts.device)[experts]  # [T, K]
    slot_t = box_latency_s.to(weights.device, torch.float64)[slot_box]  # [T, K]
    num_slots = experts.shape[1]
    slot = torch.arange(num_slots, device=experts.device)
    same_box = slot_box[:, :, None] == slot_box[:, None, :]  # [T, K, K]
    # a slot "leads" its box when no earlier kept slot of the token is on the same box
    same_box_earlier = same_box & (slot[None, :, None] > slot[None, None, :])
    weights64 = weights.double()
    for _ in range(num_slots - 1):  # each round takes one box off every token still over theta
        leads = keep & ~(same_box_earlier & keep[:, None, :]).any(dim=-1)  # [T, K]
        n_boxes = leads.sum(dim=-1)  # [T]
        box_wlr = wlr(_box_weights(weights64, same_box, keep), slot_t)  # [T, K]
        inf = torch.full_like(box_wlr, float("inf"))
        wlr_min = torch.where(leads, box_wlr, inf).min(dim=-1).values  # [T]
        wlr_max = torch.where(leads, box_wlr, -inf).max(dim=-1).values
        kappa = wlr_min / (wlr_min + wlr_max)  # Eq. 10; NaN (0/0, inf/inf) never drops
        drop_token = (n_boxes > 1) & (kappa <= theta)  # [T]
        if not bool(drop_token.any()):
            break
        # the box with the smallest WLR; on a tie, the one whose leading slot comes later
        # (lower router weight)
        is_min = leads & (box_wlr == wlr_min[:, None])
        victim_slot = torch.where(is_min, slot, torch.full_like(slot, -1)).max(dim=-1).values
        victim_box = slot_box.gather(1, victim_slot.clamp(min=0)[:, None])  # [T, 1]
        keep = keep & ~((slot_box == victim_box) & drop_token[:, None])
    return Selection(experts, rescale(weights, keep), keep, ~keep)
