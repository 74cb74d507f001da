"""Per-request accounting of a shared batch (basestation/ledger.py): hand-counted cases."""

from __future__ import annotations

import torch

from basestation.ledger import LayerFaults, RequestLedger, charge
from basestation.moe_layer import with_unheld

NONE = -1  # LayerFaults.failed_box of a slot in no failed request


def test_each_request_is_charged_its_own_tokens():
    # 3 tokens, top-2; tokens 0-1 belong to request 0, token 2 to request 1; boxes 0, 1, local 2
    ledgers = [RequestLedger(boxes=3), RequestLedger(boxes=3)]
    owners = torch.tensor([0, 0, 1])
    meant = torch.tensor([[0, 1], [0, 0], [1, 0]])
    done = torch.tensor([[True, True], [True, False], [True, True]])  # token 1 slot 1: θ drop
    charge(ledgers, owners, meant, meant.clone(), done)
    assert ledgers[0].expert_calls == 3 and ledgers[0].experts_dropped == 1
    assert ledgers[0].calls == [2, 1, 0] and ledgers[0].drops == [1, 0, 0]
    assert ledgers[1].expert_calls == 2 and ledgers[1].calls == [1, 1, 0]
    assert ledgers[1].drops == [0, 0, 0] and ledgers[1].failures == [0, 0, 0]
    # a θ drop is no fault
    assert [(lg.fault_drops, lg.retries, lg.failed_requests) for lg in ledgers] == [(0, 0, 0)] * 2


def test_a_failed_box_charges_every_request_that_used_it():
    ledgers = [RequestLedger(boxes=3), RequestLedger(boxes=3)]
    owners = torch.tensor([0, 1])
    meant = torch.tensor([[0, 1], [1, 1]])
    # box 1 failed, carrying token 0's slot 1 and both of token 1's: all three lost
    done_box = torch.tensor([[0, 1], [1, 1]])
    done = torch.tensor([[True, False], [False, False]])
    faults = LayerFaults(lost=torch.tensor([[False, True], [True, True]]),
                         retried=torch.zeros(2, 2, dtype=torch.bool),
                         failed_box=torch.tensor([[NONE, 1], [1, 1]]))
    charge(ledgers, owners, meant, done_box, done, faults)
    assert ledgers[0].calls == [1, 0, 0] and ledgers[0].failures == [0, 1, 0]
    assert ledgers[0].experts_dropped == 1 and ledgers[0].fault_drops == 1
    assert ledgers[1].expert_calls == 0 and ledgers[1].experts_dropped == 2
    assert ledgers[1].drops == [0, 2, 0] and ledgers[1].failures == [0, 1, 0]
    # two slots in one failed agent request: one failed request, two fault drops
    assert ledgers[1].fault_drops == 2 and ledgers[1].failed_requests == 1
    assert ledgers[0].failed_requests == 1 and ledgers[0].retries == 0


def test_a_retry_that_computes_is_no_fault_drop():
    """Token 0 (request 0): its one kept slot (expert on box 0) failed; the retry sends its
    θ-dropped slot 1 to box 1, which answers. Token 1 (request 1): its kept slot on box 1 is
    computed; its slot 1, on box 0, was θ-dropped and never sent: a θ drop, not a fault."""
    ledgers = [RequestLedger(boxes=3), RequestLedger(boxes=3)]
    owners = torch.tensor([0, 1])
    meant = torch.tensor([[0, 1], [1, 0]])
    done = torch.tensor([[False, True], [True, False]])
    faults = LayerFaults(lost=torch.tensor([[True, False], [False, False]]),
                         retried=torch.tensor([[False, True], [False, False]]),
                         failed_box=torch.tensor([[0, NONE], [NONE, NONE]]))
    charge(ledgers, owners, meant, meant.clone(), done, faults)
    assert (ledgers[0].expert_calls, ledgers[0].experts_dropped) == (1, 1)
    assert (ledgers[0].fault_drops, ledgers[0].retries, ledgers[0].failed_requests) == (1, 1, 1)
    assert ledgers[0].failures == [1, 0, 0]
    assert (ledgers[1].experts_dropped, ledgers[1].fault_drops, ledgers[1].retries) == (1, 0, 0)
    assert ledgers[1].failures == [0, 0, 0] and ledgers[1].failed_requests == 0


def test_a_retry_that_fails_again_is_a_second_failed_request():
    """One token, top-2: slot 0 failed on box 0, the retry of slot 1 failed on box 1. Both are
    lost to faults, in two failed agent requests; the token keeps only its residual."""
    ledger = RequestLedger(boxes=3)
    faults = LayerFaults(lost=torch.tensor([[True, True]]),
                         retried=torch.tensor([[False, True]]),
                         failed_box=torch.tensor([[0, 1]]))
    meant = torch.tensor([[0, 1]])
    charge([ledger], torch.tensor([0]), meant, meant, torch.tensor([[False, False]]), faults)
    assert (ledger.expert_calls, ledger.experts_dropped, ledger.fault_drops) == (0, 2, 2)
    assert (ledger.retries, ledger.failed_requests, ledger.failures) == (1, 2, [1, 1, 0])


def test_ledgers_add_up_over_layer_calls():
    ledger = RequestLedger(boxes=2)
    meant = torch.tensor([[0, 1]])
    faults = LayerFaults(lost=torch.tensor([[False, True]]),
                         retried=torch.zeros(1, 2, dtype=torch.bool),
                         failed_box=torch.tensor([[NONE, 1]]))
    for _ in range(3):
        charge([ledger], torch.tensor([0]), meant, meant, torch.tensor([[True, False]]), faults)
    charge([ledger], torch.tensor([0]), meant, meant, torch.tensor([[True, True]]))
    assert (ledger.expert_calls, ledger.experts_dropped, ledger.fault_drops) == (5, 3, 3)
    assert ledger.failed_requests == 3 and ledger.failures == [0, 3]


def test_experts_with_no_live_holder_are_lost_to_a_fault():
    """Experts 2 and 3 lost their agent earlier and have no local fallback: the selector drops
    their slots (nothing is sent), and they count as fault drops, with no failed request."""
    experts = torch.tensor([[0, 2], [3, 1]])
    available = torch.tensor([True, True, False, False])
    faults = with_unheld(None, experts, available)
    assert faults.lost.tolist() == [[False, True], [True, False]]
    assert not faults.retried.any() and (faults.failed_box == NONE).all()
    # a failure this call as well: both kinds of loss in one mask
    failed = LayerFaults(torch.tensor([[True, False], [False, False]]),
                         torch.zeros(2, 2, dtype=torch.bool),
                         torch.tensor([[0, NONE], [NONE, NONE]]))
    merged = with_unheld(failed, experts, available)
    assert merged.lost.tolist() == [[True, True], [True, False]]
    assert merged.failed_box.tolist() == [[0, NONE], [NONE, NONE]]
    ledger = RequestLedger(boxes=3)
    box = torch.tensor([[0, 2], [2, 0]])  # the down agent's experts map to the local box
    charge([ledger], torch.tensor([0, 0]), box, box, torch.tensor([[True, False], [False, True]]),
           faults)
    assert (ledger.experts_dropped, ledger.fault_drops, ledger.failed_requests) == (2, 2, 0)


def test_a_request_that_lost_slots_remembers_who_was_down():
    """An exact request's error named no agent when the down agent was probed back up between
    losing the slots and the answer (tests/test_serve_faults.py, under load): the ledger keeps
    the boxes that were down while it lost slots; a request that lost nothing keeps none."""
    experts = torch.tensor([[0, 2], [3, 1]])
    faults = with_unheld(None, experts, torch.tensor([True, True, False, False]))
    lost_one, lost_none = RequestLedger(boxes=3), RequestLedger(boxes=3)
    box = torch.tensor([[0, 2], [2, 0]])
    charge([lost_one, lost_none], torch.tensor([0, 1]), box, box,
           torch.tensor([[True, False], [True, True]]), faults, down_boxes=(1,))
    assert lost_one.down == {1} and lost_none.down == set()
