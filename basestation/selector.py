"""The WLR expert-selection policy (WDMoE paper §III, Algorithm 1) as a pure, vectorised function.

For each token the router's top-k experts are taken exactly as Mixtral does; then, among the
experts still kept, the one with the smallest weight-to-latency ratio (WLR = w / t, Eq. 9) is
dropped while kappa = min(WLR) / (min(WLR) + max(WLR)) (Eq. 10) is <= theta and more than one
expert remains. The kept weights are renormalised to sum to one. theta = 0 never drops, so it
reproduces stock Mixtral routing bit for bit.

Shape legend: T = tokens, E = experts (all of them), K = top_k slots.
Imports only torch: no clocks, no sockets; latencies are passed in.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Selection(NamedTuple):
    """What the selector chose for every token.

    experts: [T, K] int64, the top-k expert ids by router weight, in descending weight order.
        A slot with no available expert to fill it (fewer than K available) holds -1.
    weights: [T, K] float, the kept experts' renormalised weights; 0 where a slot is not kept.
    keep:    [T, K] bool, the slots whose expert must be called.
    dropped: [T, K] bool, the slots removed by the WLR rule (a subset of ~keep).
    drops:   [T] int64, how many experts the WLR rule removed for each token.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    keep: torch.Tensor
    dropped: torch.Tensor
    drops: torch.Tensor


def wlr(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Weight-to-latency ratio, Eq. 9: WLR = w ⊘ t element-wise. w [..., E]; t [E] or [..., E]."""
    return w / t.to(w.dtype)


def renormalise(weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the slots not kept and scale the rest to sum to 1 per token; a token with none stays 0.

    Same op order as Mixtral's `top_value /= top_value.sum(-1)`, so with every slot kept the
    result is bit-identical to stock routing.
    """
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    total = kept.sum(dim=-1, keepdim=True)
    return kept / torch.where(total > 0, total, torch.ones_like(total))


def select_experts(
    w: torch.Tensor,
    t: torch.Tensor,
    theta: float,
    top_k: int,
    available: torch.Tensor | None = None,
) -> Selection:
    """Algorithm 1 for every token at once.

    w: [T, E] router probabilities (softmax of the gate logits over all experts, as Mixtral's
        router computes them, normally float32).
    t: [E] or [T, E] expected seconds for the device hosting each expert to return; must be > 0
        (inf is allowed: WLR 0, so that expert is the first to go when theta > 0).
    theta: drop threshold on kappa (Eq. 10); theta <= 0 never drops.
    top_k: K, experts per token before any drop.
    available: optional [E] bool; False experts are never chosen (as if absent from the
        router) and top-k is taken among the available ones.
    """
    num_tokens, num_experts = w.shape  # w: [T, E]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in 1..{num_experts}")
    if t.shape not in ((num_experts,), (num_tokens, num_experts)):
        raise ValueError(
            f"latency shape {tuple(t.shape)} is neither [E] nor [T, E] for w {tuple(w.shape)}"
        )

    if theta <= 0 and available is None:
        # Stock routing, in as few torch calls as possible (this runs per layer per token): the
        # same topk and the same division as the general path below, so the same bits.
        top_w, experts = torch.topk(w, top_k, dim=-1)  # [T, K]
        keep = torch.ones_like(experts, dtype=torch.bool)
        dropped = torch.zeros_like(keep)
        return Selection(experts, top_w / top_w.sum(dim=-1, keepdim=True), keep, dropped,
                         torch.zeros(num_tokens, dtype=torch.int64, device=w.device))

    # Top-k by weight exactly as MixtralTopKRouter: torch.topk of the softmax, then /= sum.
    scores = w
    if available is not None:
        scores = w.masked_fill(~available.to(w.device, torch.bool), float("-inf"))
    top_w, experts = torch.topk(scores, top_k, dim=-1)  # [T, K]
    filled = torch.isfinite(top_w)  # False only for slots with no available expert left
    experts = torch.where(filled, experts, torch.full_like(experts, -1))

    # WLR of the chosen experts, Eq. 9, gathered per slot: [T, K].
    t_full = t.to(w.device, w.dtype).expand(num_tokens, num_experts)
    top_t = torch.gather(t_full, 1, experts.clamp(min=0))
    top_wlr = wlr(torch.where(filled, top_w, torch.zeros_like(top_w)), top_t)

    keep = filled.clone()
    slot = torch.arange(top_k, device=w.device)
    if theta > 0:
        # At most K-1 rounds; each drops one expert from every token whose kappa <= theta.
        # kappa can only grow after a drop (min rises, max stays), so a token that stops, stays.
        for _ in range(top_k - 1):
            n_kept = keep.sum(dim=-1)  # [T]
            inf = torch.full_like(top_wlr, float("inf"))
            wlr_min, _ = torch.where(keep, top_wlr, inf).min(dim=-1)  # [T]
            wlr_max, _ = torch.where(keep, top_wlr, -inf).max(dim=-1)  # [T]
            kappa = wlr_min / (wlr_min + wlr_max)  # Eq. 10; NaN (0/0, inf/inf) never drops
            drop_token = (n_kept > 1) & (kappa <= theta)  # [T]
            if not bool(drop_token.any()):
                break
            # The kept slot with the smallest WLR; on a tie, the later slot (lower router weight).
            is_min = keep & (top_wlr == wlr_min[:, None])
            victim = torch.where(is_min, slot, torch.full_like(slot, -1)).max(dim=-1).values
            keep = keep & ~((slot[None, :] == victim[:, None]) & drop_token[:, None])

    weights = renormalise(top_w, keep)  # [T, K]; all kept: stock Mixtral's /= sum, bit for bit
    dropped = filled & ~keep
    return Selection(experts, weights, keep, dropped, dropped.sum(dim=-1))
