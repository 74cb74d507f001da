"""The pure step of one MoE layer between the selector and the agents: group the kept slots by
expert (what combine.py sums when the agents answered). No sockets, no clocks.

Shape legend: T = tokens of the layer call, K = top-k slots, H = hidden, n = tokens of a group.
"""

from __future__ import annotations

import torch

# (token, slot) pairs up to which grouping in Python beats torch ops; twice the selector's
# SMALL_SELECTION, since grouping does one pass where WLR does a round per dropped box
PYTHON_GROUPING_PAIRS = 64
MAX_TOP_K = 64  # top-k slots a token may have: decode's slot indices are built for these
_ZERO = torch.tensor([0])  # decode's token index, built once (torch.tensor costs ~4 us a call)
_SLOTS = [torch.tensor([slot]) for slot in range(MAX_TOP_K)]

# expert id -> (token_idx [n], slot [n]) of the kept slots routed to it
Groups = dict[int, tuple[torch.Tensor, torch.Tensor]]
# (expert id, token_idx [n], slot [n], output [n, H])
ExpertOutput = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]


def group_by_expert(experts: torch.Tensor, keep: torch.Tensor,
                    rows_experts: list[list[int]] | None = None) -> Groups:
    """The kept (token, slot) pairs of each expert, in ascending expert id; within an expert
    slot-major then token order, as transformers' eager experts loop takes them (the rows of a
    matmul can round differently at other positions, so the order is part of bit-exactness).
    experts, keep: [T, K]; rows_experts: experts.tolist() when the caller has it."""
    if keep.shape[0] == 1 and keep.is_cpu:  # decode: one token, cached indices
        row_experts = rows_experts[0] if rows_experts is not None else experts.tolist()[0]
        return {expert: (_ZERO, _SLOTS[slot]) for expert, slot in sorted(
            (e, s) for s, (e, k) in enumerate(zip(row_experts, keep.tolist()[0])) if k)}
    if keep.numel() <= PYTHON_GROUPING_PAIRS:  # a few tokens
        lists: dict[int, tuple[list[int], list[int]]] = {}
        if rows_experts is None:
            rows_experts = experts.tolist()
        rows_keep = keep.tolist()
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
