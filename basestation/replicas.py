"""Which replica serves an expert's tokens in one layer call (issue 24): a pure function.

A roster may give one expert to several agents. For every layer call the base station knows,
per expert, how many tokens it needs (the router's slots) and which live boxes hold it, and per
box a linear model of a request's time from its measured link (link_estimator):

    t_b(n) = fixed_s + n * per_token_s        (0 when the box gets no request)

fixed_s is the round trip; per_token_s is one row's transfer both ways plus its compute. The
experts with one holder load their box first. Then every replicated expert, most tokens first,
is given to its holders a chunk at a time (a decode token is one chunk), each chunk to the
holder after which the layer ends earliest (Eq. 7's max over boxes), ties to the holder that
then finishes earliest, so an idle fast replica takes tokens before a busy one and a slow
replica only what would otherwise wait longer elsewhere. For one token this is "the replica
with the lowest expected time"; for a batch it spreads the tokens so the layer finishes
earliest.

Imports nothing: no clocks, no sockets, no tensors; boxes are indices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

# a batch's tokens of one expert are handed out in at most this many chunks: enough to balance
# two to four replicas within a few per cent, few enough to stay cheap for a prefill's thousands
SPREAD_CHUNKS = 32


class BoxCost(NamedTuple):
    """A box's expected request time, t(n) = fixed_s + n * per_token_s for n rows."""

    fixed_s: float
    per_token_s: float

    def time_s(self, rows: int) -> float:
        return self.fixed_s + rows * self.per_token_s if rows else 0.0


def spread(demand: Mapping[int, int], holders: Mapping[int, Sequence[int]],
           costs: Mapping[int, BoxCost]) -> dict[int, list[tuple[int, int]]]:
    """demand: expert -> its tokens in this layer call (> 0); holders: expert -> the live boxes
    holding it (at least one each); costs: box -> its BoxCost, for every box named. Returns, for
    each expert with two holders or more, [(box, tokens)] in the holders' order, the tokens
    summing to its demand (boxes given nothing left out). Experts with one holder load their
    box and are not in it."""
    rows: dict[int, int] = {}
    replicated = []
    for expert, tokens in demand.items():
        boxes = holders[expert]
        if len(boxes) == 1:
            rows[boxes[0]] = rows.get(boxes[0], 0) + tokens
        else:
            replicated.append(expert)
    layer_s = max((costs[box].time_s(n) for box, n in rows.items()), default=0.0)
    plan: dict[int, list[tuple[int, int]]] = {}
    # most tokens first (then by id, so equal demands always go the same way)
    for expert in sorted(replicated, key=lambda e: (-demand[e], e)):
        tokens, boxes = demand[expert], holders[expert]
        chunk = -(-tokens // SPREAD_CHUNKS)
        given = dict.fromkeys(boxes, 0)
        left = tokens
        while left:
            take = min(chunk, left)
            best, best_key = boxes[0], None
            for box in boxes:
                end_s = costs[box].time_s(rows.get(box, 0) + take)
                key = (max(layer_s, end_s), end_s)
                if best_key is None or key < best_key:
                    best, best_key = box, key
            rows[best] = rows.get(best, 0) + take
            given[best] += take
            left -= take
            layer_s = best_key[0]
        plan[expert] = [(box, n) for box, n in given.items() if n]
    return plan


def cut(tokens: int, shares: Sequence[tuple[object, int]]) -> list[tuple[object, int, int]]:
    """A group of `tokens` rows cut into consecutive parts by the planned shares:
    [(holder, start, stop)], each holder up to its share in order (the selector may have
    dropped some rows since the plan), the last one taking any rows beyond the plan; parts of
    no rows left out."""
    parts, start = [], 0
    for i, (holder, share) in enumerate(shares):
        stop = tokens if i == len(shares) - 1 else min(tokens, start + share)
        if stop > start:
            parts.append((holder, start, stop))
        start = stop
    return parts
