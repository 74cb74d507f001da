"""Per-request accounting of a shared batch (basestation/ledger.py): hand-counted cases."""

from __future__ import annotations

import torch

from basestation.ledger import RequestLedger, charge


def test_each_request_is_charged_its_own_tokens():
    # 3 tokens, top-2; tokens 0-1 belong to request 0, token 2 to request 1; boxes 0, 1, local 2
    ledgers = [RequestLedger(boxes=3), RequestLedger(boxes=3)]
    owners = torch.tensor([0, 0, 1])
    meant = torch.tensor([[0, 1], [0, 0], [1, 0]])
    sent = torch.tensor([[True, True], [True, False], [True, True]])  # token 1 slot 1 dropped
    done_box = meant.clone()
    done = sent.clone()
    charge(ledgers, owners, meant, sent, done_box, done, failed_boxes=[])
    assert ledgers[0].expert_calls == 3 and ledgers[0].experts_dropped == 1
    assert ledgers[0].calls == [2, 1, 0] and ledgers[0].drops == [1, 0, 0]
    assert ledgers[1].expert_calls == 2 and ledgers[1].calls == [1, 1, 0]
    assert ledgers[1].drops == [0, 0, 0] and ledgers[1].failures == [0, 0, 0]


def test_a_failed_box_charges_every_request_that_used_it():
    ledgers = [RequestLedger(boxes=3), RequestLedger(boxes=3)]
    owners = torch.tensor([0, 1])
    meant = torch.tensor([[0, 1], [1, 1]])
    sent = torch.ones(2, 2, dtype=torch.bool)
    # box 1 failed; token 0's slot was retried on the local box, token 1's were lost
    done_box = torch.tensor([[0, 2], [1, 1]])
    done = torch.tensor([[True, True], [False, False]])
    charge(ledgers, owners, meant, sent, done_box, done, failed_boxes=[1])
    assert ledgers[0].calls == [1, 0, 1] and ledgers[0].failures == [0, 1, 0]
    assert ledgers[1].expert_calls == 0 and ledgers[1].experts_dropped == 2
    assert ledgers[1].drops == [0, 2, 0] and ledgers[1].failures == [0, 1, 0]
