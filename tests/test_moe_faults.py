"""What a MoE layer call charges when agents fail (basestation/moe_layer.py with a stand-in
dispatcher): fault drops, retries and failed agent requests per request and per run, counted
by hand. Agent A holds experts 0-1, agent B experts 2-3; top-2; no local fallback."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from basestation.agents import AgentTable
from basestation.ledger import RequestLedger
from basestation.liveness import AgentLink
from basestation.moe_layer import MoeRuntime

HIDDEN = 4


class StandInDispatcher:
    """Answers every group with ones, except that every request to an agent in `failing`
    fails (the agent is then dead, as Dispatcher leaves it: through the table)."""

    def __init__(self):
        self.a = AgentLink(name="A", peer=b"a", experts=(0, 1))
        self.b = AgentLink(name="B", peer=b"b", experts=(2, 3))
        self.agents = [self.a, self.b]
        self.owner = {0: self.a, 1: self.a, 2: self.b, 3: self.b}
        self.table = AgentTable(self.agents, num_experts=4, hidden_size=HIDDEN, element_bytes=4)
        self.stats = self.table.stats
        self.failing = set()
        self.requests: list[tuple[str, list[int]]] = []  # (agent, experts) per request sent

    def run(self, layer, x, groups, hints=None):
        outputs, failed, by_agent = [], set(), {}
        for expert in groups:
            by_agent.setdefault(self.owner[expert].name, []).append(expert)
        for agent in self.agents:
            experts = by_agent.get(agent.name)
            if not experts:
                continue
            self.requests.append((agent.name, experts))
            if agent.name in self.failing:
                self.table.fail(agent, "failing", 0.0)
                failed.update(experts)
                continue
            for expert in experts:
                token_idx, slot = groups[expert]
                outputs.append((expert, token_idx, slot, torch.ones(len(token_idx), HIDDEN)))
        return outputs, failed, []


def runtime_and_dispatcher():
    dispatcher = StandInDispatcher()
    prober = SimpleNamespace(after_layer=lambda replies, now_s: None)
    return MoeRuntime(dispatcher.table, dispatcher, prober, ffn_size=8), dispatcher


def figures(ledger: RequestLedger) -> tuple:
    return (ledger.expert_calls, ledger.experts_dropped, ledger.fault_drops, ledger.retries,
            ledger.failed_requests)


def test_a_failed_agent_charges_only_the_requests_it_carried():
    """θ = 0, tokens 0-1 of request 0 and token 2 of request 1. B fails: the slots it carried
    (token 0's and token 1's second) are lost, in one failed request, all request 0's."""
    runtime, dispatcher = runtime_and_dispatcher()
    dispatcher.failing = {"B"}
    ledgers = [runtime.new_ledger(), runtime.new_ledger()]
    experts = torch.tensor([[0, 2], [1, 3], [0, 1]])
    weights = torch.tensor([[0.6, 0.4]] * 3)
    with runtime.batch(ledgers=ledgers, owners=torch.tensor([0, 0, 1])):
        out = runtime.forward(0, torch.ones(3, HIDDEN), experts, weights)
    assert figures(ledgers[0]) == (2, 2, 2, 0, 1) and ledgers[0].failures == [0, 1, 0]
    assert figures(ledgers[1]) == (2, 0, 0, 0, 0) and ledgers[1].failures == [0, 0, 0]
    assert out[2].tolist() == [1.0] * HIDDEN  # request 1's token is untouched
    stats = dispatcher.stats
    assert (stats.fault_drops, stats.experts_dropped, stats.retries) == (2, 2, 0)

    # B is down now: its experts have no live holder, so a slot routed to one is lost to that
    # fault though nothing is sent; request 1 is charged a fault drop, no failed request
    ledgers = [runtime.new_ledger()]
    with runtime.batch(ledgers=ledgers, owners=torch.tensor([0])):
        runtime.forward(1, torch.ones(1, HIDDEN), torch.tensor([[2, 0]]),
                        torch.tensor([[0.6, 0.4]]))
    assert figures(ledgers[0]) == (1, 1, 1, 0, 0)
    assert (stats.fault_drops, stats.experts_dropped) == (3, 3)
    assert dispatcher.requests[-1] == ("A", [0])


def test_a_retry_that_computes_recovers_the_token_not_the_slot():
    """θ = 0.5 with k = 2 keeps one box per token: the heavier, B's expert 2. B fails, the
    token is retried on the slot θ had dropped (expert 0 on A), which answers."""
    runtime, dispatcher = runtime_and_dispatcher()
    dispatcher.failing = {"B"}
    ledger = runtime.new_ledger()
    with runtime.batch(theta=0.5, ledgers=[ledger]):
        runtime.forward(0, torch.ones(1, HIDDEN), torch.tensor([[2, 0]]),
                        torch.tensor([[0.9, 0.1]]))
    assert dispatcher.requests == [("B", [2]), ("A", [0])]
    # one call (the retry), one drop (expert 2, lost to B), one retry, one failed request
    assert figures(ledger) == (1, 1, 1, 1, 1) and ledger.failures == [0, 1, 0]
    stats = dispatcher.stats
    assert (stats.experts_dropped, stats.fault_drops, stats.retries) == (1, 1, 1)


def test_a_retry_that_fails_again_is_lost_too():
    runtime, dispatcher = runtime_and_dispatcher()
    dispatcher.failing = {"A", "B"}
    ledger = runtime.new_ledger()
    with runtime.batch(theta=0.5, ledgers=[ledger]):
        runtime.forward(0, torch.ones(1, HIDDEN), torch.tensor([[2, 0]]),
                        torch.tensor([[0.9, 0.1]]))
    assert figures(ledger) == (0, 2, 2, 1, 2) and ledger.failures == [1, 1, 0]
    stats = dispatcher.stats
    assert (stats.experts_dropped, stats.fault_drops, stats.retries) == (2, 2, 1)
    assert stats.residual_only == 1


def test_theta_drops_are_no_faults():
    runtime, dispatcher = runtime_and_dispatcher()
    ledger = runtime.new_ledger()
    with runtime.batch(theta=0.5, ledgers=[ledger]):
        runtime.forward(0, torch.ones(1, HIDDEN), torch.tensor([[2, 0]]),
                        torch.tensor([[0.9, 0.1]]))
    assert figures(ledger) == (1, 1, 0, 0, 0)
    assert (dispatcher.stats.experts_dropped, dispatcher.stats.fault_drops) == (1, 0)
