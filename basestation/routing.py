"""Pure steps of one MoE layer around the selector: group the kept slots by expert, choose the
retries after a failure, and combine the experts' outputs. No sockets, no clocks.

Shape legend: T = tokens of the layer call, K = top-k slots, H = hidden, n = tokens of a group.
"""

from __future__ import annotations

import torch

from basestation.selector import Selection, rescale

SMALL_SELECTION = 64  # (token, slot) pairs up to which grouping in Python beats torch ops
_ZERO = torch.tensor([0])  # decode's token index, built once (torch.tensor costs ~4 us a call)
_SLOTS = [torch.tensor([slot]) for slot in range(64)]

# expert id -> (token_idx [n], slot [n]) of the kept slots routed to it
Groups = dict[int, tuple[torch.Tensor, torch.Tensor]]
# (expert id, token_idx [n], slot [n], output [n, H])
ExpertOutput = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]


def group_by_expert(experts: torch.Tensor, keep: torch.Tensor) -> Groups:
    """The kept (token, slot) pairs of each expert, in ascending expert id; within an expert
    slot-major then token order, as transformers' eager experts loop takes them (the rows of a
    matmul can round differently at other positions, so the order is part of bit-exactness).
    experts, keep: [T, K]."""
    if keep.shape[0] == 1 and keep.device.type == "cpu":  # decode: one token, cached indices
        return {expert: (_ZERO, _SLOTS[slot]) for expert, slot in sorted(
            (e, s) for s, (e, k) in enumerate(zip(experts[0].tolist(), keep[0].tolist())) if k)}
    if keep.numel() <= SMALL_SELECTION:  # a few tokens
        lists: dict[int, tuple[list[int], list[int]]] = {}
        rows_experts, rows_keep = experts.tolist(), keep.tolist()
        for slot in range(keep.shape[1]):
            for token, (row_experts, row_keep) in enumerate(zip(rows_experts, rows_keep)):
                if row_keep[slot]:
                    expert = row_experts[slot]
                    lists.setdefault(expert, ([], []))[0].append(token)
                    lists[expert][1].append(slot)
        device = keep.device
        return {expert: (torch.tensor(lists[expert][0], device=device),
                         torch.tensor(lists[expert][1], device=device))
                for expert in sorted(lists)}
    slot, token_idx = torch.nonzero(keep.t(), as_tuple=True)  # slot-major
    chosen = experts[token_idx, slot]
    order = torch.argsort(chosen, stable=True)  # (slot, token) order kept within an expert
    token_idx, slot, chosen = token_idx[order], slot[order], chosen[order]
    ids, counts = torch.unique_consecutive(chosen, return_counts=True)
    sizes = counts.tolist()
    return {expert: (t_idx, s_idx) for expert, t_idx, s_idx in
            zip(ids.tolist(), token_idx.split(sizes), slot.split(sizes))}


def after_failures(selection: Selection, router_weights: torch.Tensor,
                   failed: torch.Tensor, usable: torch.Tensor) -> tuple[Selection, torch.Tensor]:
    """The drop/retry choice once some experts' requests failed.

    failed: [T, K] bool, kept slots whose expert's request failed: they are dropped.
    usable: [T, K] bool, slots whose expert can still be asked (its box did not fail).
    A token left with no kept slot is retried once on its highest-weight usable slot that the
    selector had dropped (the router chose it; WLR had only found it slower).
    Returns the new selection (weights rescaled from the router's) and the [T, K] retry slots.
    """
    keep = selection.keep & ~failed
    orphans = ~keep.any(dim=-1, keepdim=True)  # [T, 1]
    candidates = orphans & usable & ~selection.keep  # [T, K]
    score = torch.where(candidates, router_weights.float(), torch.full_like(
        router_weights, -1.0, dtype=torch.float32))
    best = score.argmax(dim=-1, keepdim=True)  # [T, 1]
    retry = torch.zeros_like(keep).scatter_(1, best, True) & candidates
    keep = keep | retry
    return Selection(selection.experts, rescale(router_weights, keep), keep, ~keep), retry


def combine(num_tokens: int, hidden: int, dtype: torch.dtype, weights: torch.Tensor,
            outputs: list[ExpertOutput]) -> torch.Tensor:
    """Weighted sum of expert outputs [T, H], in transformers' order (ascending expert id,
    index_add_), so an untouched selection reproduces the library's eager experts arithmetic.
    weights: [T, K] the selection's weights."""
    device = weights.device
    ordered = sorted(outputs, key=lambda item: item[0])
    if num_tokens == 1 and ordered:  # decode: the same products and sums, fewer torch calls
        row = weights[0].tolist()  # float32 values, exact as Python floats
        out = None
        for _, _, slot, y in ordered:
            if y.device != device:
                y = y.to(device)
            weighted = y * row[int(slot)]
            if weighted.dtype != dtype:
                weighted = weighted.to(dtype)
            # 0 + a is a: starting from the first product skips the zeros and one add
            out = weighted if out is None else out + weighted
        return out
    out = torch.zeros(num_tokens, hidden, dtype=dtype, device=device)  # [T, H]
    for _, token_idx, slot, y in ordered:
        weighted = y.to(device) * weights[token_idx, slot, None]
        out.index_add_(0, token_idx, weighted.to(dtype))
    return out
