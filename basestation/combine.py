"""The pure steps of one MoE layer after the agents answered: drop the failed slots and choose
the retries (`after_failures`), and the weighted sum of the experts' outputs (`combine`). No
sockets, no clocks.

Shape legend: T = tokens of the layer call, K = top-k slots, H = hidden.
"""

from __future__ import annotations

from operator import itemgetter

import torch

from basestation.routing import ExpertOutput
from basestation.selector import Selection, rescale


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


_EXPERT_ID = itemgetter(0)  # of an ExpertOutput: a C call, where a lambda is a Python frame


def combine(num_tokens: int, hidden: int, dtype: torch.dtype, weights: torch.Tensor,
            outputs: list[ExpertOutput]) -> torch.Tensor:
    """Weighted sum of expert outputs [T, H], in transformers' order (ascending expert id,
    index_add_), so an untouched selection reproduces the library's eager experts arithmetic.
    weights: [T, K] the selection's weights."""
    device = weights.device
    ordered = sorted(outputs, key=_EXPERT_ID)
    if num_tokens == 1 and ordered:
        row = weights.tolist()[0]  # float32 values, exact as Python floats
        if dtype in _NUMPY_FLOATS and weights.is_cpu:
            out = _combine_one_row(row, ordered, dtype)
            if out is not None:
                return out
        # decode in other dtypes or devices: the same products and sums, fewer torch calls
        out = None
        for _, _, slot, y in ordered:
            if y.device != device:
                y = y.to(device)
            weighted = y * row[int(slot)]
            if weighted.dtype != dtype:
                weighted = weighted.to(dtype)
            # 0 + a is a: starting from the first product skips the zeros and one add; the
            # first product is a tensor of our own, so the sum goes into it
            if out is None:
                out = weighted
            else:
                out += weighted
        return out
    out = torch.zeros(num_tokens, hidden, dtype=dtype, device=device)  # [T, H]
    for _, token_idx, slot, y in ordered:
        weighted = y.to(device) * weights[token_idx, slot, None]
        out.index_add_(0, token_idx, weighted.to(dtype))
    return out


# Decode's dtypes whose products and sums numpy computes as torch does: one IEEE multiply or add
# per element, the Python float weight taken in the array's own dtype (exact: it came from a
# float tensor). float16 is not one: numpy rounds the weight to half first, torch does not.
_NUMPY_FLOATS = (torch.float32, torch.float64)


def _combine_one_row(row: list[float], ordered: list[ExpertOutput], dtype: torch.dtype
                     ) -> torch.Tensor | None:
    """combine's one-token sum on numpy views of the replies ([1, H], all of `dtype`, on the
    CPU; else None): a product costs ~1 us there against ~4 us as a torch op with a Python
    scalar (H = 256, measured), and the bits are the same (tests/test_combine.py)."""
    out = None
    for _, _, slot, y in ordered:
        if y.dtype != dtype or not y.is_cpu or y.requires_grad:
            return None
        weighted = y.numpy() * row[int(slot)]  # a new array of y's dtype
        if out is None:  # 0 + a is a: the first product is the start of the sum
            out = weighted
        else:
            out += weighted
    return torch.from_numpy(out)
