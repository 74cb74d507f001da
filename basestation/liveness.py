"""Agents as the base station sees them: liveness, probes and calibration.

Every agent's link estimate is kept fresh even while WLR avoids it: an agent not used for
`REFRESH_AFTER_S` gets a work probe (one real token through one of its experts, so the reply
measures the round trip, the transfer and the compute the selector needs), at most one in
flight per agent. A dead agent is pinged with capped exponential backoff until it answers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from basestation import link_estimator as links
from basestation.prefetch import cache_summary
from wire import protocol as P
from wire.client import AgentClient, PeerUnreachable

# an agent unused this long gets a work probe (bounded rate: 1 per s). A probe is real work on
# the box: a request arriving meanwhile waits behind it (measured under the paper emulation,
# where a probe costs up to 5 ms of paced compute: at 0.2 s, θ > 0 made tokens slower than
# θ = 0, because the agents it drops were probed 5 times a second)
REFRESH_AFTER_S = 1.0
# while no layer runs (a server waiting for requests): fresh estimates, boxes left mostly idle
IDLE_REFRESH_AFTER_S = 2.0
TICK_S = 0.01  # how often the per-layer hook looks for due probes
PROBE_LOST_AFTER_S = 2.0  # a probe unanswered this long is forgotten and sent again
CALIBRATION_ROUNDS = 3  # pings per agent when a session starts
CALIBRATION_TOKENS = 16  # size of the payload probe, in tokens of hidden activations
DEVICE_NAME_CHARS = 64  # of an agent's device name in its figures ("cuda:0", "cpu", "mps")


@dataclass
class Backoff:
    """Capped exponential backoff between re-probes of a dead agent (time passed in)."""

    base_s: float = 0.05
    cap_s: float = 2.0
    delay_s: float = 0.05
    next_s: float = 0.0

    def reset(self, now_s: float) -> None:
        self.delay_s = self.base_s
        self.next_s = now_s + self.delay_s

    def due(self, now_s: float) -> bool:
        return now_s >= self.next_s

    def step(self, now_s: float) -> None:
        self.delay_s = min(self.delay_s * 2, self.cap_s)
        self.next_s = now_s + self.delay_s


@dataclass
class AgentLink:
    """One agent: its routing id, experts, link estimate, liveness and counters."""

    name: str  # endpoint or dial-in routing id, for humans
    peer: bytes  # routing id on the client socket
    experts: tuple[int, ...]
    info: dict = field(default_factory=dict)
    state: links.LinkState = field(default_factory=links.initial_state)
    alive: bool = True
    backoff: Backoff = field(default_factory=Backoff)
    probe_id: int | None = None
    probe_sent_s: float = 0.0
    last_used_s: float = 0.0
    # counters
    calls: int = 0  # token x expert computations done
    drops: int = 0  # (token, expert) pairs the selector dropped on this agent
    failures: int = 0  # requests with no valid reply in time, or refused
    probes: int = 0  # work probes sent while the agent was idle or avoided
    compute_s_total: float = 0.0
    # a memory-budgeted agent's cache counters (protocol.cache_figures), from its latest
    # expert reply; None: unbudgeted, or no reply yet (figures() then reads its info)
    cache: dict | None = None
    # expert replies still to be taken as cold: the first call through a path (the agent's
    # process, our socket) is many times slower than the next; taken as the estimate, it made
    # WLR avoid a healthy agent and, when deadlines decided, cost drops at θ = 0
    cold_replies: int = 1
    # replicated expert -> its token computations done here (an expert on several agents)
    replica_calls: dict = field(default_factory=dict)

    def count_replica_calls(self, counts, replicated) -> None:
        """counts: a reply's [(expert, tokens)]; the replicated ones are counted per expert."""
        for expert, tokens in counts:
            if expert in replicated:
                self.replica_calls[expert] = self.replica_calls.get(expert, 0) + tokens

    def learn(self, sample: links.LinkSample) -> None:
        """Update the link estimate with one completed request; a cold expert reply teaches
        nothing."""
        if sample.tokens and self.cold_replies:
            self.cold_replies -= 1
            return
        self.state = links.update(self.state, sample)

    def figures(self) -> dict:
        return {
            "agent": self.name, "address": self.name, "experts": list(self.experts),
            "alive": self.alive,
            "rtt_ms": round(self.state.srtt_s * 1e3, 3),
            "throughput_mbit_s": round(self.state.throughput_bytes_per_s * 8 / 1e6, 2),
            "compute_us_per_token": round(self.state.compute_s_per_token_expert * 1e6, 2),
            "calls": self.calls, "drops": self.drops, "failures": self.failures,
            "probes": self.probes, "device": self._device(),
        } | self._replica_figures() | cache_summary(self.cache or self._info().get("memory_budget"))

    def _replica_figures(self) -> dict:
        """Calls of each replicated expert this agent served (issue 24), when it holds one."""
        if not self.replica_calls:
            return {}
        return {"replica_calls": {str(e): n for e, n in sorted(self.replica_calls.items())}}

    def _info(self) -> dict:
        return self.info if isinstance(self.info, dict) else {}

    def _device(self) -> str:
        """The agent's own word for its device, for humans: any other type is not one, and a
        long one is cut (it goes into every response's figures)."""
        device = self._info().get("device", "?")
        return device[:DEVICE_NAME_CHARS] if isinstance(device, str) else "?"

    def mark_failed(self, now_s: float) -> bool:
        """Count a failure; returns True when this turned a live agent dead."""
        self.failures += 1
        if not self.alive:
            return False
        self.alive = False
        self.backoff.reset(now_s)
        return True


class Prober:
    """Probes dead agents (ping, backoff) and idle or avoided ones (work), and takes the replies.

    `table` is the basestation.agents.AgentTable: its agents are probed, and an agent that
    answers while dead comes back through `table.revive`. `probe_layer` shapes the work probe:
    one token through the agent's first expert at that layer.
    """

    def __init__(self, client: AgentClient, table, probe_layer: int, wire_dtype: str | None):
        self.client = client
        self.table = table
        self.agents = table.agents
        self.probe_layer = probe_layer
        self.wire_dtype = wire_dtype
        self.in_flight: dict[int, AgentLink] = {}  # request id -> agent
        self._token = torch.zeros(1, table.hidden_size)  # [1, H]: zeros are a valid activation
        self._next_tick_s = 0.0

    def tick(self, now_s: float, refresh_after_s: float = REFRESH_AFTER_S) -> None:
        """Send the probes that are due; runs per layer, so it looks at most every TICK_S."""
        if now_s < self._next_tick_s:
            return
        self._next_tick_s = now_s + TICK_S
        for agent in self.agents:
            if agent.probe_id is not None:
                if now_s - agent.probe_sent_s < PROBE_LOST_AFTER_S:
                    continue
                self.in_flight.pop(agent.probe_id, None)
                agent.probe_id = None  # lost: try again
            if agent.alive:
                if now_s - agent.last_used_s > refresh_after_s:
                    self._send(agent, now_s, work=True)
            elif agent.backoff.due(now_s):
                self._send(agent, now_s, work=False)
                agent.backoff.step(now_s)

    def _send(self, agent: AgentLink, now_s: float, work: bool) -> None:
        """now_s: taken before the send (the agent may answer before it returns)."""
        try:
            if work:
                agent.probe_id = self.client.send_expert(
                    agent.peer, self.probe_layer, self._token, [(agent.experts[0], 1)],
                    wire_dtype=self.wire_dtype)
                agent.probes += 1
            else:
                agent.probe_id = self.client.send(agent.peer, P.PING)
        except PeerUnreachable:
            return
        agent.probe_sent_s = now_s
        self.in_flight[agent.probe_id] = agent

    def after_layer(self, replies: list, now_s: float) -> None:
        """Take the probe replies a layer's gather read ((reply, arrived_s), Gathered), then send
        the probes that are due: after the layer's requests, so none waits behind a probe."""
        for reply, arrived_s in replies:
            self.take(reply, arrived_s)
        self.tick(now_s)

    def take(self, reply, arrived_s: float) -> bool:
        """Handle a reply if it answers a probe (returns True); a valid one refreshes the agent's
        estimate and brings a dead agent back."""
        agent = self.in_flight.pop(reply.id, None)  # a dict: this runs for every reply
        if agent is None:
            return False
        agent.probe_id = None
        if reply.peer != agent.peer:
            return True  # someone else answering our probe: not evidence of anything
        round_trip_s = arrived_s - agent.probe_sent_s
        if reply.kind == P.PONG:
            sample = links.LinkSample(round_trip_s, 0.0, 0, 0, 0, 0, arrived_s)
        elif reply.kind == P.EXPERT_REPLY:
            try:
                compute_s = sane_compute_s(reply.message.compute_s, round_trip_s)
            except P.ProtocolError:  # a malformed probe reply teaches the estimate nothing
                return True
            if compute_s is None:
                return True
            nbytes = self.table.request_bytes(1)
            sample = links.LinkSample(round_trip_s, compute_s, nbytes, nbytes, 1, 1, arrived_s)
        else:
            return True
        agent.learn(sample)
        agent.last_used_s = arrived_s
        self.table.revive(agent, arrived_s)
        return True

    def poll(self, timeout_s: float = 0.0) -> None:
        """Take probe replies outside a layer call (idle time, status)."""
        self.tick(time.perf_counter(), IDLE_REFRESH_AFTER_S)
        deadline = time.perf_counter() + timeout_s
        while True:
            reply = self.client.recv(max(0.0, deadline - time.perf_counter()))
            if reply is None:
                return
            if not self.take(reply, time.perf_counter()):
                self.client.count_late()

    def warm(self, timeout_s: float = 5.0) -> None:
        """One token through each agent's first expert, its reply thrown away: the path's cold
        first call (AgentLink.cold_replies) is paid here, not by the first user's token."""
        sent = {}
        for agent in self.agents:
            try:
                sent[self.client.send_expert(agent.peer, self.probe_layer, self._token,
                                             [(agent.experts[0], 1)],
                                             wire_dtype=self.wire_dtype)] = (agent, 0.0)
            except PeerUnreachable:
                continue
        for agent, _, reply in self._answers(sent, timeout_s):
            if reply.kind == P.EXPERT_REPLY:
                agent.cold_replies = 0

    def calibrate(self, rounds: int = CALIBRATION_ROUNDS, timeout_s: float = 2.0) -> None:
        """Seed every link's estimate before the first token: warm each path (`warm`), a few
        pings, then one payload the size of a 16-token request each way (else the first
        selections use priors)."""
        self.warm(timeout_s)
        payload_bytes = self.table.request_bytes(CALIBRATION_TOKENS)
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
            for agent, sent_s, reply in self._answers(sent, timeout_s):
                if reply.kind != P.PONG:
                    continue
                arrived_s = time.perf_counter()
                agent.state = links.update(agent.state, links.LinkSample(
                    round_trip_s=arrived_s - sent_s, compute_s=0.0, request_bytes=nbytes,
                    reply_bytes=nbytes, tokens=0, experts=0, time_s=arrived_s))
                agent.last_used_s = arrived_s

    def _answers(self, sent: dict[int, tuple[AgentLink, float]], timeout_s: float):
        """(agent, sent_s, reply) for each reply to a request in `sent` (id -> agent, send
        time) from the agent it went to, until all came or `timeout_s` passed; anything else
        read meanwhile is counted late."""
        deadline = time.perf_counter() + timeout_s
        while sent:
            reply = self.client.recv(max(0.0, deadline - time.perf_counter()))
            if reply is None:
                return
            entry = sent.pop(reply.id, None)
            if entry is None or reply.peer != entry[0].peer:
                self.client.count_late()
                continue
            yield entry[0], entry[1], reply


CLOCK_SLACK_S = 1e-4  # timer reads around a send/receive; a lie this small gains nothing


def sane_compute_s(value, round_trip_s: float) -> float | None:
    """An agent's reported compute time if it is believable: a finite number of seconds,
    not negative, not longer than the round trip that contained it; else None."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    value = float(value)
    if not math.isfinite(value) or value < 0 or value > round_trip_s + CLOCK_SLACK_S:
        return None
    return value
