"""CellPolicies' accounting (eval and sweep with --bandwidth): a policy's record counts its
latency passes alone; a quality pass run under a policy is charged apart."""

from __future__ import annotations

from types import SimpleNamespace

from testbed.experiments.cell_bed import CellPolicies


class _Ledger:
    def __init__(self):
        self.switches: list = []

    def switch(self, policy):
        self.switches.append(policy)


def _policies() -> CellPolicies:
    cell = CellPolicies.__new__(CellPolicies)  # no bed, no cell process: the accounting alone
    cell.bed = SimpleNamespace(policies=[], set_policy=lambda p: cell.bed.policies.append(p))
    cell.allocator = SimpleNamespace(sent=0, unchanged=0, layers=0, active=False,
                                     box_latencies=object())
    cell.runtime = SimpleNamespace(box_latency_override=None)
    cell.modeled = None
    cell.ledger = _Ledger()
    cell.policy = cell.account = None
    cell.counts = {}
    cell._at_switch = {"sent": 0, "unchanged": 0, "layers": 0}
    return cell


def _allocate(cell: CellPolicies, layers: int) -> None:
    cell.allocator.sent += layers
    cell.allocator.layers += layers


def test_a_quality_pass_under_a_policy_is_not_charged_to_its_record():
    cell = _policies()
    cell.set_policy("joint")
    _allocate(cell, 5)  # the latency pass
    cell.set_policy("joint", counted=False)  # the quality pass: same policy, charged apart
    _allocate(cell, 100)
    cell.set_policy("joint")  # the next latency pass
    _allocate(cell, 2)
    cell._count()
    assert cell.counts["joint"]["layers"] == 7
    assert cell.counts["joint (uncounted)"]["layers"] == 100
    # the cell itself switched once: accounting changes never reshape the links
    assert cell.bed.policies == ["joint"]
    assert cell.ledger.switches == ["joint", "joint (uncounted)", "joint"]
    assert cell.runtime.box_latency_override is cell.allocator.box_latencies


def test_switching_policies_moves_the_cell_and_the_selection():
    cell = _policies()
    cell.set_policy("joint")
    cell.set_policy("static", counted=False)
    assert cell.bed.policies == ["joint", "static"]
    assert cell.runtime.box_latency_override is None and not cell.allocator.active
    cell.set_policy("static")
    assert cell.bed.policies == ["joint", "static"]  # only the account changed
    assert cell.ledger.switches[-1] == "static"
