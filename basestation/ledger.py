"""Per-request accounting when requests share a batch: which request's tokens used which box.

A batched decode step carries the tokens of many requests through every MoE layer; the layer
charges each (token, slot) to the request that owns the token, so every answer reports its own
expert calls, drops, faults and retries per agent. Pure: tensors in, counters out.

Shape legend: T = tokens of the layer call, K = top-k slots, B = boxes (agents + the local
fallback), R = requests in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


@dataclass
class RequestLedger:
    """One request's MoE figures, per box (index = the runtime's box: agents, then local)."""
    boxes: int
    expert_calls: int = 0  # (token, expert) pairs computed
    experts_dropped: int = 0  # top-k slots not computed (dropped by θ, or lost to a fault)
    # of experts_dropped, the slots lost to a fault: their agent request failed and no retry
    # computed them, or their agent was already down with no local fallback (never θ's choice)
    fault_drops: int = 0
    retries: int = 0  # slots sent again after a failure (to another holder or the fallback)
    failed_requests: int = 0  # failed agent requests carrying its tokens (sum of failures)
    calls: list[int] = field(default_factory=list)
    drops: list[int] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)  # failed agent requests carrying its tokens
    # boxes that were down while it lost slots: names them in an exact request's error even
    # when they are back by the time it is answered
    down: set[int] = field(default_factory=set)

    def __post_init__(self):
        for name in ("calls", "drops", "failures"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.boxes)


class LayerFaults(NamedTuple):
    """What faults did to one layer call; the layer builds it only when something failed or an
    expert had no live holder, so the path with no fault costs nothing.

    lost:       [T, K] bool, slots lost to a fault and not computed in the end.
    retried:    [T, K] bool, slots sent again after a failure.
    failed_box: [T, K] long, the box whose failed agent request carried the slot; -1: none.
    """
    lost: torch.Tensor
    retried: torch.Tensor
    failed_box: torch.Tensor


def _per_owner_box(owners: torch.Tensor, box: torch.Tensor, mask: torch.Tensor, requests: int,
                   boxes: int) -> torch.Tensor:
    """[R, B] counts of the masked slots; owners [T], box [T, K], mask [T, K]."""
    flat = (owners.unsqueeze(-1) * boxes + box)[mask]
    return torch.bincount(flat, minlength=requests * boxes).reshape(requests, boxes)


def _per_owner(owners: torch.Tensor, mask: torch.Tensor, requests: int) -> list[int]:
    """[R] counts of the masked slots; owners [T], mask [T, K]."""
    return torch.bincount(owners.unsqueeze(-1).expand_as(mask)[mask],
                          minlength=requests).tolist()


def charge(ledgers: list[RequestLedger], owners: torch.Tensor, meant_box: torch.Tensor,
           done_box: torch.Tensor, done: torch.Tensor, faults: LayerFaults | None = None,
           down_boxes: tuple[int, ...] = ()) -> None:
    """Add one layer call to its requests' ledgers.

    owners [T]: index into `ledgers`; meant_box [T, K]: the box of each slot's routed expert;
    done_box/done [T, K]: the box that computed each slot (after any retry) and whether one
    did. A slot not done is a drop charged to the box it was meant for; `faults` (None: none
    this call) adds the fault drops and retries, and one failure per failed agent request to
    every request that had a slot in it. `down_boxes`: the agents down this call, recorded
    by every request that lost a slot."""
    requests, boxes = len(ledgers), ledgers[0].boxes
    owners = owners.to(device=done.device, dtype=torch.long)
    calls = _per_owner_box(owners, done_box, done, requests, boxes)
    drops = _per_owner_box(owners, meant_box, ~done, requests, boxes)
    for ledger, row_calls, row_drops in zip(ledgers, calls.tolist(), drops.tolist()):
        ledger.expert_calls += sum(row_calls)
        ledger.experts_dropped += sum(row_drops)
        for b in range(boxes):
            ledger.calls[b] += row_calls[b]
            ledger.drops[b] += row_drops[b]
    if faults is None:
        return
    lost = _per_owner(owners, faults.lost & ~done, requests)
    retried = _per_owner(owners, faults.retried, requests)
    in_failed = faults.failed_box >= 0
    touched = _per_owner_box(owners, faults.failed_box.clamp(min=0), in_failed, requests,
                             boxes) > 0
    for ledger, n_lost, n_retried, row_touched in zip(ledgers, lost, retried, touched.tolist()):
        ledger.fault_drops += n_lost
        if n_lost and down_boxes:
            ledger.down.update(down_boxes)
        ledger.retries += n_retried
        ledger.failed_requests += sum(row_touched)
        for b in range(boxes):
            ledger.failures[b] += int(row_touched[b])


def lost_message(fault_drops: int, failed: dict[str, int], down: list[str]) -> str:
    """One line for a request that asked for exactness and lost experts: how many slots, which
    agents' requests failed (name -> failed requests) and which agents are down."""
    where = [f"{name} ({n} failed request{'s' if n != 1 else ''})" for name, n in failed.items()]
    where += [f"{name} (down)" for name in down if name not in failed]
    return (f"{fault_drops} expert slot{'s' if fault_drops != 1 else ''} lost to faults"
            + (f" on {', '.join(where)}" if where else "")
            + ": the answer would not be the model's")
