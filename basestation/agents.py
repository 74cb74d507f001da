"""What the base station knows about its agents, in one object that the others read.

`AgentTable` owns the agents, which agents hold each expert, who is alive, the boxes table the
selector weighs (built once per liveness change, then cached), the local fallback, the
per-agent counters and the MoE layers' shared counters (`MoeStats`). An agent dies or comes
back only through `fail` and `revive`, which drop the cached boxes.

An expert may have several holders (replicas, issue 24): the cached boxes table names the
first live one; `route` picks, per layer call, the replica each expert's tokens go to from the
agents' link estimates now (basestation/replicas.py), and `other_holder` is where a failed
replica's tokens are sent again.

Shape legend: E = experts, B = boxes (the agents in order, then the local fallback).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from basestation.channel_model import comm_bytes
from basestation.ledger import RequestLedger
from basestation.link_estimator import LinkSample, update
from basestation.liveness import AgentLink
from basestation.replicas import BoxCost, spread

log = logging.getLogger("basestation")

ASSIGN_CACHE_SETS = 1024  # expert sets whose assignment is kept (AgentTable.assign)


@dataclass
class MoeStats:
    """Counters of the MoE layers, one object: the dispatcher and the MoE layer both add to it."""

    expert_calls: int = 0  # token x expert computations done on agents (or the fallback)
    experts_dropped: int = 0  # (token, slot) pairs not computed: by the selector or a fault
    fault_drops: int = 0
    retries: int = 0
    residual_only: int = 0  # tokens whose every expert failed, retry included
    failed_requests: int = 0  # requests with no valid reply: agent gone, over the cap, refused
    late_replies_waited: int = 0  # requests past their estimate's deadline, waited for (alive)
    invalid_replies: int = 0  # replies refused by the checks (wrong peer, shape, NaN, ...)
    network_s: float = 0.0  # waiting for agents (wall time of the gathers)
    replica_retries: int = 0  # (expert, tokens) parts sent again to another replica


class Boxes(NamedTuple):
    """The boxes table for the agents' liveness now.

    box_of_expert: [E] long, the agent index of each expert's live holder, else the local box.
    available: [E] bool, None when every expert has a live holder or a fallback.
    box_list, held: the same as Python lists (decode reads them without tensor ops); held is
        None with `available`.
    """

    box_of_expert: torch.Tensor
    available: torch.Tensor | None
    box_list: list[int]
    held: list[bool] | None


class Route(NamedTuple):
    """One layer call's choice among replicas (AgentTable.route).

    box_of_expert: [E] long and box_list the same as a list: the boxes table's, with each
        replicated expert on the replica that takes the most of its tokens (what the selector
        weighs its slots by).
    parts: replicated expert -> [(agent, tokens)], its tokens' planned split, in order.
    """

    box_of_expert: torch.Tensor
    box_list: list[int]
    parts: dict[int, list[tuple[AgentLink, int]]]


class AgentTable:
    """The agents of one base station, their experts and liveness; `fallback` is an
    edge_agent.shards.LoadedExperts (experts computed here while their agent is down) or None.
    `element_bytes`: bytes per activation on the wire (the paper's ε)."""

    def __init__(self, agents: list[AgentLink], num_experts: int, hidden_size: int,
                 element_bytes: int = 2, fallback=None):
        self.agents = agents
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.element_bytes = element_bytes
        self.fallback = fallback
        self.local_box = len(agents)  # the box index of the local fallback
        self.holders: dict[int, tuple[AgentLink, ...]] = {}  # expert -> its agents, in order
        for agent in agents:
            for expert in agent.experts:
                self.holders[expert] = self.holders.get(expert, ()) + (agent,)
        self.holder = {e: h[0] for e, h in self.holders.items()}  # the first, for its hints
        self.replicated = frozenset(e for e, h in self.holders.items() if len(h) > 1)
        for expert in self.replicated:  # counted per replica from the start (figures: 0s)
            for agent in self.holders[expert]:
                agent.replica_calls.setdefault(expert, 0)
        self.box_of_agent = {id(agent): b for b, agent in enumerate(agents)}
        self.stats = MoeStats()
        self.liveness_changes = 0  # agents turned dead or back alive
        self._boxes: Boxes | None = None
        self._assigned: dict[tuple[int, ...], tuple] = {}  # assign's, for the liveness now

    def request_bytes(self, tokens: int) -> int:
        """Bytes of a request carrying `tokens` activations, and of its reply (Eq. 5)."""
        return int(comm_bytes(self.hidden_size, tokens, self.element_bytes))

    def has_fallback(self, expert: int) -> bool:
        return self.fallback is not None and expert in self.fallback.weights

    def new_ledger(self) -> RequestLedger:
        return RequestLedger(boxes=len(self.agents) + 1)

    def boxes(self) -> Boxes:
        """The boxes table; built again only after an agent died or came back."""
        if self._boxes is None:
            box, ok = [], []
            for expert in range(self.num_experts):
                agent = self.live_holder(expert)
                if agent is not None:
                    box.append(self.box_of_agent[id(agent)])
                    ok.append(True)
                else:
                    box.append(self.local_box)
                    ok.append(self.has_fallback(expert))
            every = all(ok)
            self._boxes = Boxes(torch.tensor(box), None if every else torch.tensor(ok), box,
                                None if every else ok)
        return self._boxes

    def assign(self, experts) -> tuple[dict[int, tuple[AgentLink, list[int]]], list[int],
                                        set[int]]:
        """Experts (ascending) -> ({id(agent): (agent, its experts)} for live holders, the
        experts the fallback computes, the experts no one can compute: a new set, the others
        are shared and read only). Cached per expert set until an agent dies or comes back:
        decode asks for the same few sets layer after layer."""
        key = tuple(experts)
        assigned = self._assigned.get(key)
        if assigned is None:
            if len(self._assigned) >= ASSIGN_CACHE_SETS:  # prefill's sets are many: bounded
                self._assigned.clear()
            by_agent, local, unheld = self._assign(key)
            assigned = self._assigned[key] = (by_agent, local, frozenset(unheld))
        return assigned[0], assigned[1], set(assigned[2])

    def _assign(self, experts) -> tuple[dict[int, tuple[AgentLink, list[int]]], list[int],
                                         set[int]]:
        by_agent: dict[int, tuple[AgentLink, list[int]]] = {}
        local: list[int] = []
        unheld: set[int] = set()
        for expert in experts:
            agent = self.live_holder(expert)
            if agent is not None:
                entry = by_agent.get(id(agent))
                if entry is None:
                    by_agent[id(agent)] = (agent, [expert])
                else:
                    entry[1].append(expert)
            elif self.has_fallback(expert):
                local.append(expert)
            else:
                unheld.add(expert)
        return by_agent, local, unheld

    def live_holder(self, expert: int) -> AgentLink | None:
        """The first live agent holding `expert`, or None."""
        for agent in self.holders.get(expert, ()):
            if agent.alive:
                return agent
        return None

    def other_holder(self, expert: int, tried) -> AgentLink | None:
        """A live holder of `expert` not among `tried` (ids of agents): where a failed replica's
        tokens go next; the one with the lowest expected one-token time."""
        best, best_s = None, 0.0
        for agent in self.holders.get(expert, ()):
            if agent.alive and id(agent) not in tried:
                time_s = self.box_cost(agent).time_s(1)
                if best is None or time_s < best_s:
                    best, best_s = agent, time_s
        return best

    def box_cost(self, agent: AgentLink) -> BoxCost:
        """The agent's request time model from its link estimate now: the round trip, then per
        row its transfer both ways and its compute (link_estimator.expected_time_s, linear)."""
        state = agent.state
        row_bytes = 2 * self.request_bytes(1)
        return BoxCost(state.srtt_s, row_bytes / state.throughput_bytes_per_s
                       + state.compute_s_per_token_expert)

    def route(self, demand: dict[int, int]) -> Route | None:
        """demand: expert -> its tokens in this layer call. The replicas' split of the
        replicated experts with two live holders or more (replicas.spread on the estimates
        now), or None when no expert of `demand` has a choice."""
        holders, boxes_of = self.holders, self.box_of_agent
        live: dict[int, list[int]] = {}
        choice = False
        for expert in demand:
            boxes = [boxes_of[id(a)] for a in holders.get(expert, ()) if a.alive]
            if boxes:  # else the fallback or no one: no request, no load
                live[expert] = boxes
                choice = choice or len(boxes) > 1
        if not choice:  # the costs are worked out only for a layer with a choice to make
            return None
        costs = {box: self.box_cost(self.agents[box]) for boxes in live.values() for box in boxes}
        plan = spread({e: demand[e] for e in live}, live, costs)
        box_list = list(self.boxes().box_list)
        parts = {}
        for expert, shares in plan.items():
            box_list[expert] = max(shares, key=lambda share: share[1])[0]
            parts[expert] = [(self.agents[box], n) for box, n in shares]
        return Route(torch.tensor(box_list), box_list, parts)

    def fail(self, agent: AgentLink, why: str, now_s: float) -> None:
        """A request to `agent` got no valid answer: count it, and mark the agent dead (the
        prober pings it back)."""
        self.stats.failed_requests += 1
        if agent.mark_failed(now_s):
            self._boxes = None
            self._assigned = {}
            self.liveness_changes += 1
            log.warning("agent %s failed (%s): its experts go to their other replicas, or are "
                        "dropped, until it answers again", agent.name, why)

    def answered(self, agent: AgentLink, sample: LinkSample, cache) -> None:
        """A valid expert reply: the link estimate learns, the counters count. `cache`: the
        reply's cache figures (a memory-budgeted agent's), else None."""
        tokens = sample.tokens
        if tokens and agent.cold_replies:  # AgentLink.learn inlined (it runs per reply)
            agent.cold_replies -= 1
        else:
            agent.state = update(agent.state, sample)
        agent.calls += tokens
        agent.compute_s_total += sample.compute_s
        agent.last_used_s = sample.time_s
        self.stats.expert_calls += tokens
        if cache is not None:
            agent.cache = cache  # parsed by the reply's decode (protocol.cache_figures)

    def revive(self, agent: AgentLink, now_s: float) -> None:
        """A dead agent answered a probe: it is asked again."""
        if not agent.alive:
            agent.alive = True
            agent.backoff.reset(now_s)
            self._boxes = None
            self._assigned = {}
            self.liveness_changes += 1

    def count_drops(self, dropped: list[int], held: list[bool] | None,
                    box_list: list[int]) -> None:
        """The experts of the slots the selector dropped (one entry a slot); `held` (boxes'):
        a slot of an expert with no live holder was lost to a fault, not dropped by θ;
        box_list: the box each expert's slots were weighed on, charged the drop."""
        self.stats.experts_dropped += len(dropped)
        if held is not None:
            self.stats.fault_drops += sum(1 for expert in dropped if not held[expert])
        agents = self.agents
        for expert in dropped:  # an expert on the local box: its first holder's (it is down)
            box = box_list[expert]
            agent = agents[box] if box < len(agents) else self.holder.get(expert)
            if agent is not None:
                agent.drops += 1

    def budgeted_agents(self) -> list[AgentLink]:
        """The memory-budgeted agents that take prefetch hints: their info's memory_budget
        "prefetch" is false while their loads cost no waiting on storage (edge_agent/shards.py
        HINT_LOAD_RATIO; absent, from agents before it: true)."""
        return [a for a in self.agents if isinstance(a.info.get("memory_budget"), dict)
                and a.info["memory_budget"].get("prefetch", True) is not False]

    def figures(self) -> list[dict]:
        """Every agent's AgentLink.figures() (with cache_* figures for budgeted agents)."""
        return [agent.figures() for agent in self.agents]
