"""The per-layer dispatcher: latency vector in, expert outputs back, faults absorbed.

For each MoE layer call: the selector has chosen (token, expert) pairs; this module groups them
by agent (one message per agent, all sends before any wait), gathers replies until a deadline
derived from each link's estimate, feeds the measured round trips to the link estimator, and
turns a late or missing reply into a drop (weights renormalised) with one retry for tokens
left with no expert. Dead agents are re-probed with capped exponential backoff.

Shape legend: T = tokens of the layer call, H = hidden, E = experts, K = top-k.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from basestation import link_estimator as links
from basestation.channel_model import ChannelScenario, scenario_latency_s
from basestation.model import combine, tokens_per_expert
from basestation.selector import Selection, renormalise, wlr
from edge_agent import protocol as P
from edge_agent.client import AgentClient, PeerUnreachable
from edge_agent.expert_math import expert_forward

PROBE_BACKOFF_START_S = 0.05  # first re-probe of a dead agent
PROBE_BACKOFF_MAX_S = 2.0  # cap of the exponential backoff between probes
IDLE_PROBE_AFTER_S = 1.0  # an agent unused this long gets a light ping (keeps RTT fresh)
CALIBRATION_ROUNDS = 3  # pings per agent when a session starts
CALIBRATION_TOKENS = 16  # size of the payload probe, in tokens of hidden activations


@dataclass
class AgentLink:
    """One agent as the base station sees it."""

    name: str  # endpoint or dial-in routing id, for humans
    peer: bytes  # routing id on the client socket
    experts: tuple[int, ...]
    info: dict = field(default_factory=dict)
    state: links.LinkState = field(default_factory=links.initial_state)
    alive: bool = True
    next_probe_s: float = 0.0
    backoff_s: float = PROBE_BACKOFF_START_S
    probe_id: int | None = None
    probe_sent_s: float = 0.0
    last_used_s: float = 0.0
    # counters
    calls: int = 0  # token x expert computations done
    drops: int = 0  # (token, expert) pairs the selector dropped on this agent
    failures: int = 0  # requests with no reply in time, or refused
    compute_s_total: float = 0.0

    def figures(self) -> dict:
        return {
            "agent": self.name, "experts": list(self.experts), "alive": self.alive,
            "rtt_ms": round(self.state.srtt_s * 1e3, 3),
            "throughput_mbit_s": round(self.state.throughput_bytes_per_s * 8 / 1e6, 2),
            "compute_us_per_token": round(self.state.compute_s_per_token_expert * 1e6, 2),
            "calls": self.calls, "drops": self.drops, "failures": self.failures,
            "device": self.info.get("device", "?"),
        }


@dataclass
class LayerStats:
    expert_calls: int = 0  # token x expert computations done on agents (or fallback)
    experts_dropped: int = 0  # by the selector or by a fault
    fault_drops: int = 0
    retries: int = 0
    residual_only: int = 0  # tokens whose every expert failed, retry included
    network_s: float = 0.0  # waiting for agents (wall time of the gather)


class Dispatcher:
    """The MoeRuntime of a live base station (see basestation/model.py)."""

    def __init__(self, client: AgentClient, agents: list[AgentLink], num_experts: int,
                 hidden_size: int, ffn_size: int, theta: float = 0.0,
                 latency: str = "measured", scenario: ChannelScenario | None = None,
                 wire_dtype: str | None = None, element_bytes: int = 2, fallback=None,
                 seed: int = 0):
        self.client = client
        self.agents = agents
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_size = ffn_size
        self.theta = theta
        self.latency_mode = latency
        self.scenario = scenario or ChannelScenario()
        self.wire_dtype = wire_dtype
        self.fallback = fallback  # edge_agent.shards.LoadedExperts or None
        self.rng = np.random.default_rng(seed)
        self.owner: dict[int, AgentLink] = {}
        for agent in agents:
            for expert in agent.experts:
                self.owner.setdefault(expert, agent)
        self.stats = LayerStats()
        self._available: torch.Tensor | None = None  # cached; cleared when liveness changes
        self._available_stale = True
        self._probes: dict[int, AgentLink] = {}  # request id of a probe in flight -> its agent
        self._element_bytes = element_bytes  # bytes per activation on the wire (the paper's ε)

    # -- what the selector needs ----------------------------------------------------------

    def _request_bytes(self, tokens: int) -> int:
        return tokens * self.hidden_size * self._element_bytes

    def latency_s(self, layer: int, tokens: int) -> torch.Tensor:
        """[E] expected seconds for each expert's device to return `tokens` tokens."""
        if self.latency_mode == "model":
            t = scenario_latency_s(self.scenario, self.hidden_size, self.ffn_size, tokens=tokens,
                                   bytes_per_element=self._element_bytes, rng=self.rng)
            return torch.as_tensor(np.resize(t, self.num_experts), dtype=torch.float32)
        nbytes = self._request_bytes(tokens)
        t = [float("inf")] * self.num_experts  # a list first: one tensor op, not E setitems
        for expert in range(self.num_experts):
            agent = self.owner.get(expert)
            if agent is not None and agent.alive:
                t[expert] = links.expected_time_s(agent.state, nbytes, nbytes, tokens, 1)
            elif self._has_fallback(expert):
                t[expert] = float(tokens) * 1e-3  # local, no network
        return torch.tensor(t)

    def available(self) -> torch.Tensor | None:
        """[E] bool of experts with a live agent or a fallback; None when all have one.
        Rebuilt only when an agent dies or comes back, not on every layer call."""
        if self._available_stale:
            mask = torch.tensor([self._live(q) or self._has_fallback(q)
                                 for q in range(self.num_experts)])
            self._available = None if bool(mask.all()) else mask
            self._available_stale = False
        return self._available

    def _live(self, expert: int) -> bool:
        agent = self.owner.get(expert)
        return agent is not None and agent.alive

    def _has_fallback(self, expert: int) -> bool:
        return self.fallback is not None and expert in self.fallback.weights

    # -- one layer --------------------------------------------------------------------------

    def run_experts(self, layer: int, x: torch.Tensor, w: torch.Tensor,
                    selection: Selection) -> torch.Tensor:
        """x [T, H], w [T, E] router probabilities -> weighted expert sum [T, H]."""
        self._probe_dead_and_idle()
        groups = tokens_per_expert(selection)
        self._count_selector_drops(selection)
        outputs, failed = self._scatter_gather(layer, x, groups)
        if failed:
            selection = self._drop_failed(selection, failed)
            retried, selection = self._retry_orphans(layer, x, w, selection, failed)
            outputs += retried
        return combine(x.shape[0], x.shape[1], x.dtype, selection, outputs)

    def _count_selector_drops(self, selection: Selection) -> None:
        if self.theta <= 0:  # the selector never drops then: skip the torch ops per layer
            return
        dropped = selection.experts[selection.dropped]
        self.stats.experts_dropped += int(dropped.numel())
        for expert in dropped.tolist():
            if expert in self.owner:
                self.owner[expert].drops += 1

    def _scatter_gather(self, layer: int, x: torch.Tensor, groups: dict
                        ) -> tuple[list, set[int]]:
        """Send every agent its experts' tokens, then gather. Returns the outputs
        [(expert, token_idx, slot, y)] and the experts that failed."""
        by_agent: dict[int, tuple[AgentLink, list[int]]] = {}  # id(agent) -> agent, its experts
        local: list[int] = []
        failed: set[int] = set()
        for expert in groups:
            agent = self.owner.get(expert)
            if agent is not None and agent.alive:
                by_agent.setdefault(id(agent), (agent, []))[1].append(expert)
            elif self._has_fallback(expert):
                local.append(expert)
            else:
                failed.add(expert)
        pending: dict[int, tuple[AgentLink, list[int], float, int]] = {}
        deadline = 0.0
        start = time.perf_counter()
        for agent, experts in by_agent.values():
            experts.sort()
            rows = groups[experts[0]][0] if len(experts) == 1 else \
                torch.cat([groups[e][0] for e in experts])
            # [n, H], experts' tokens back to back; decode's one token needs no gather
            request = x if x.shape[0] == 1 and len(rows) == 1 else x[rows]
            counts = [(e, len(groups[e][0])) for e in experts]
            nbytes = self._request_bytes(len(rows))
            try:
                request_id = self.client.send_expert(agent.peer, layer, request, counts,
                                                     wire_dtype=self.wire_dtype)
            except PeerUnreachable:
                self._mark_failed(agent)
                failed.update(experts)
                continue
            sent_s = time.perf_counter()
            pending[request_id] = (agent, experts, sent_s, nbytes)
            deadline = max(deadline, sent_s + links.deadline_s(
                agent.state, nbytes, nbytes, len(rows), len(experts)))
        outputs = []
        for expert in local:  # outage fallback: compute here while the agents work
            token_idx, slot = groups[expert]
            y = expert_forward(x[token_idx].to(self.fallback.device, self.fallback.dtype),
                               self.fallback.weights[expert][layer])
            outputs.append((expert, token_idx, slot, y.to(x.dtype)))
            self.stats.expert_calls += int(token_idx.numel())
        while pending:
            reply = self.client.recv(max(0.0, deadline - time.perf_counter()))
            if reply is None:
                break
            arrived_s = time.perf_counter()
            if self._handle_probe(reply, arrived_s):
                continue
            entry = pending.pop(reply.id, None) if reply.id is not None else None
            if entry is None:
                self.client.late_replies += 1
                continue
            agent, experts, sent_s, nbytes = entry
            try:
                y = reply.check().tensor().to(x.dtype)  # [n, H]
            except Exception:  # an error reply or a malformed tensor: that agent failed
                self._mark_failed(agent)
                failed.update(experts)
                continue
            self._record(agent, reply, sent_s, arrived_s, nbytes, y.shape[0], len(experts))
            parts = (y,) if len(experts) == 1 else y.split([len(groups[e][0]) for e in experts])
            for expert, part in zip(experts, parts):
                token_idx, slot = groups[expert]
                outputs.append((expert, token_idx, slot, part))
        for agent, experts, _, _ in pending.values():  # silent past the deadline
            self._mark_failed(agent)
            failed.update(experts)
        self.stats.network_s += time.perf_counter() - start
        return outputs, failed

    def _record(self, agent: AgentLink, reply, sent_s: float, arrived_s: float, nbytes: int,
                tokens: int, experts: int) -> None:
        compute_s = float(reply.header.get("compute_s", 0.0))
        agent.state = links.update(agent.state, links.LinkSample(
            round_trip_s=arrived_s - sent_s, compute_s=compute_s, request_bytes=nbytes,
            reply_bytes=nbytes, tokens=tokens, experts=experts, time_s=arrived_s))
        agent.calls += tokens
        agent.compute_s_total += compute_s
        agent.last_used_s = arrived_s
        self.stats.expert_calls += tokens

    def _mark_failed(self, agent: AgentLink) -> None:
        agent.failures += 1
        if agent.alive:
            agent.alive = False
            self._available_stale = True
            agent.backoff_s = PROBE_BACKOFF_START_S
            agent.next_probe_s = time.perf_counter() + agent.backoff_s

    # -- faults -----------------------------------------------------------------------------

    def _drop_failed(self, selection: Selection, failed: set[int]) -> Selection:
        hit = selection.keep & torch.isin(
            selection.experts, torch.tensor(sorted(failed), device=selection.experts.device))
        keep = selection.keep & ~hit
        n_hit = int(hit.sum())
        self.stats.experts_dropped += n_hit
        self.stats.fault_drops += n_hit
        return selection._replace(weights=renormalise(selection.weights, keep), keep=keep,
                                  dropped=selection.dropped | hit)

    def _retry_orphans(self, layer: int, x: torch.Tensor, w: torch.Tensor,
                       selection: Selection, failed: set[int]) -> tuple[list, Selection]:
        """Tokens left with no expert get the best live expert by WLR, once; those whose
        retry fails too keep the residual alone."""
        orphans = (~selection.keep.any(dim=-1)).nonzero(as_tuple=True)[0]  # [n]
        if orphans.numel() == 0:
            return [], selection
        live = torch.tensor([(self._live(q) or self._has_fallback(q)) and q not in failed
                             for q in range(self.num_experts)], device=w.device)
        if not bool(live.any()):
            self.stats.residual_only += int(orphans.numel())
            return [], selection
        score = wlr(w[orphans], self.latency_s(layer, 1).to(w.device)).masked_fill(
            ~live, -1.0)  # [n, E]
        best = score.argmax(dim=-1)  # [n]
        # a retried token uses one expert at weight 1, in slot 0
        experts, weights = selection.experts.clone(), selection.weights.clone()
        experts[orphans, 0] = best
        weights[orphans, 0] = 1.0
        retry_keep = torch.zeros_like(selection.keep)
        retry_keep[orphans, 0] = True
        self.stats.retries += int(orphans.numel())
        outputs, failed_again = self._scatter_gather(
            layer, x, tokens_per_expert(selection._replace(experts=experts, keep=retry_keep)))
        if failed_again:
            lost = torch.isin(best, torch.tensor(sorted(failed_again), device=best.device))
            retry_keep[orphans[lost], 0] = False
            weights[orphans[lost], 0] = 0.0
            self.stats.residual_only += int(lost.sum())
        return outputs, selection._replace(experts=experts, weights=weights,
                                           keep=selection.keep | retry_keep)

    # -- probes -----------------------------------------------------------------------------

    def _probe_dead_and_idle(self) -> None:
        now = time.perf_counter()
        for agent in self.agents:
            if agent.probe_id is not None:
                if now - agent.probe_sent_s < PROBE_BACKOFF_MAX_S:
                    continue
                self._probes.pop(agent.probe_id, None)
                agent.probe_id = None  # lost: try again
            due = (not agent.alive and now >= agent.next_probe_s) or \
                  (agent.alive and now - agent.last_used_s > IDLE_PROBE_AFTER_S)
            if not due:
                continue
            try:
                agent.probe_id = self.client.send(agent.peer, P.PING)
                self._probes[agent.probe_id] = agent
                agent.probe_sent_s = now
            except PeerUnreachable:
                pass
            if not agent.alive:
                agent.backoff_s = min(agent.backoff_s * 2, PROBE_BACKOFF_MAX_S)
                agent.next_probe_s = now + agent.backoff_s
            else:
                agent.last_used_s = now

    def _handle_probe(self, reply, arrived_s: float) -> bool:
        agent = self._probes.pop(reply.id, None)  # a dict: this runs for every reply
        if agent is None:
            return False
        agent.probe_id = None
        if reply.kind == P.PONG:
            if not agent.alive:
                agent.alive = True
                agent.backoff_s = PROBE_BACKOFF_START_S
                self._available_stale = True
            agent.state = links.update(agent.state, links.LinkSample(
                round_trip_s=arrived_s - agent.probe_sent_s, compute_s=0.0,
                request_bytes=0, reply_bytes=0, tokens=0, experts=0, time_s=arrived_s))
        return True

    def calibrate(self, rounds: int = CALIBRATION_ROUNDS, timeout_s: float = 2.0) -> None:
        """Seed every link's estimate before the first token: a few pings, then one payload
        the size of a 16-token request each way (else the first selections use priors)."""
        payload_bytes = CALIBRATION_TOKENS * self.hidden_size * self._element_bytes
        for round_index in range(rounds + 1):
            nbytes = payload_bytes if round_index == rounds else 0
            sent = {}
            for agent in self.agents:
                try:
                    frames = [bytes(nbytes)] if nbytes else []
                    request_id = self.client.send(agent.peer, P.PING, frames,
                                                  **({"reply_bytes": nbytes} if nbytes else {}))
                    sent[request_id] = (agent, time.perf_counter())
                except PeerUnreachable:
                    continue
            deadline = time.perf_counter() + timeout_s
            while sent:
                reply = self.client.recv(max(0.0, deadline - time.perf_counter()))
                if reply is None:
                    break
                entry = sent.pop(reply.id, None)
                if entry is None or reply.kind != P.PONG:
                    continue
                agent, sent_s = entry
                arrived_s = time.perf_counter()
                agent.state = links.update(agent.state, links.LinkSample(
                    round_trip_s=arrived_s - sent_s, compute_s=0.0, request_bytes=nbytes,
                    reply_bytes=nbytes, tokens=0, experts=0, time_s=arrived_s))
                agent.last_used_s = arrived_s

    def poll_probes(self, timeout_s: float = 0.0) -> None:
        """Take in probe replies outside a layer call (idle time, status)."""
        self._probe_dead_and_idle()
        deadline = time.perf_counter() + timeout_s
        while True:
            reply = self.client.recv(max(0.0, deadline - time.perf_counter()))
            if reply is None:
                return
            if not self._handle_probe(reply, time.perf_counter()):
                self.client.late_replies += 1
