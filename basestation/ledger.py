"""Per-request accounting when requests share a batch: which request's tokens used which box.

A batched decode step carries the tokens of many requests through every MoE layer; the layer
charges each (token, slot) to the request that owns the token, so every answer reports its own
expert calls, drops and failures per agent. Pure: tensors in, counters out.

Shape legend: T = tokens of the layer call, K = top-k slots, B = boxes (agents + the local
fallback), R = requests in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RequestLedger:
    """One request's MoE figures, per box (index = the runtime's box: agents, then local)."""
    boxes: int
    expert_calls: int = 0  # (token, expert) pairs computed
    experts_dropped: int = 0  # top-k slots not computed (dropped by θ, or lost to a fault)
    calls: list[int] = field(default_factory=list)
    drops: list[int] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)  # failed agent requests carrying its tokens

    def __post_init__(self):
        for name in ("calls", "drops", "failures"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.boxes)


def _per_owner_box(owners: torch.Tensor, box: torch.Tensor, mask: torch.Tensor, requests: int,
                   boxes: int) -> torch.Tensor:
    """[R, B] counts of the masked slots; owners [T], box [T, K], mask [T, K]."""
    flat = (owners.unsqueeze(-1) * boxes + box)[mask]
    return torch.bincount(flat, minlength=requests * boxes).reshape(requests, boxes)


def charge(ledgers: list[RequestLedger], owners: torch.Tensor, meant_box: torch.Tensor,
           sent: torch.Tensor, done_box: torch.Tensor, done: torch.Tensor,
           failed_boxes: list[int]) -> None:
    """Add one layer call to its requests' ledgers.

    owners [T]: index into `ledgers`; meant_box [T, K]: the box of each slot's routed expert;
    sent [T, K]: whether the slot was sent there (kept by the selector); done_box/done [T, K]:
    the box that computed each slot (after any retry) and whether one did. A slot not done is
    a drop charged to the box it was meant for; a failed box charges one failure to every
    request that had a slot sent to it."""
    requests, boxes = len(ledgers), ledgers[0].boxes
    owners = owners.to(torch.long)
    calls = _per_owner_box(owners, done_box, done, requests, boxes)
    drops = _per_owner_box(owners, meant_box, ~done, requests, boxes)
    touched = _per_owner_box(owners, meant_box, sent, requests, boxes) > 0
    for r, (row_calls, row_drops, row_touched) in enumerate(
            zip(calls.tolist(), drops.tolist(), touched.tolist())):
        ledger = ledgers[r]
        ledger.expert_calls += sum(row_calls)
        ledger.experts_dropped += sum(row_drops)
        for b in range(boxes):
            ledger.calls[b] += row_calls[b]
            ledger.drops[b] += row_drops[b]
        for b in failed_boxes:
            ledger.failures[b] += int(row_touched[b])
