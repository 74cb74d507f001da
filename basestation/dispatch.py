"""Scatter one layer's expert groups to their agents, gather the replies: a late agent is
waited for while its connection is up, up to its request's cap (slow is not dead).

One request per agent per layer carries every expert's token group back to back; every send
goes out before any wait. A reply counts only if it comes from the agent the request went to,
is an expert reply with the shape asked for, values a layer can produce (finite, each row within
MAX_EXPERT_GAIN of its input's norm) and a believable compute time: anything else is that agent
failing (its experts are reported failed, it is marked dead and probed back). Experts whose agent is down are computed here when a local fallback holds them.

Shape legend: T = tokens of the layer call, H = hidden, n = tokens of a request.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from basestation import link_estimator as links
from basestation.liveness import AgentLink, Prober, sane_compute_s
from basestation.routing import ExpertOutput, Groups
from wire import protocol as P
from wire.client import AgentClient, PeerUnreachable
from edge_agent.expert_math import expert_forward

log = logging.getLogger("basestation")


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


# how often a late request's agent is looked at (its connection), once past the estimate
LATE_LOOK_S = 0.02
# The largest believable gain of an expert: a reply row's norm over its input row's (floored at
# 1, since a biased expert answers a zero row). Expert inputs are normalised hidden states; the
# largest real outputs ("massive activations", ~1e3 in a few dimensions) are ~1e2 times their
# input's norm. A rogue answering ±1e30 passed the finiteness check and made every token id 0.
MAX_EXPERT_GAIN = 1e4


@dataclass(slots=True)
class _Pending:
    """One request in flight to one agent."""

    agent: AgentLink
    counts: list  # [(expert, tokens)] in the request's order
    sent_s: float
    nbytes: int
    tokens: int
    expected_by_s: float  # the estimate's deadline: past it, the agent is looked at
    cap_s: float  # the longest a request of this size is waited for, whatever the estimate
    bound: torch.Tensor | float  # the largest believable norm of each reply row (reply_bounds)
    late: bool = False


def _norms(x: torch.Tensor, dim: int | None = -1) -> torch.Tensor:
    """Row norms in float32 at least (a bf16 sum of squares overflows and rounds early)."""
    if x.dtype in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(x, dim=dim)
    return torch.linalg.vector_norm(x, dim=dim, dtype=torch.float32)


def reply_bounds(request: torch.Tensor) -> torch.Tensor | float:
    """The largest norm each row of a reply to `request` [n, H] may have: [n] (float32, CPU),
    or a float for one row (decode: two Python floats cost ~6 us a request, tensors ~20)."""
    if request.shape[0] == 1:
        return MAX_EXPERT_GAIN * max(float(_norms(request, None)), 1.0)
    return (_norms(request).clamp(min=1.0) * MAX_EXPERT_GAIN).cpu()


def out_of_bounds(y: torch.Tensor, bound: torch.Tensor | float) -> bool:
    """Whether any row of a reply `y` [n, H] is non-finite or over its bound: NaN and inf
    fail the comparison too, so this is also the finiteness check."""
    if isinstance(bound, float):
        return not float(_norms(y, None)) <= bound
    return not bool((_norms(y) <= bound).all())


def give_up_reason(now_s: float, cap_s: float, connected) -> str | None:
    """Why a late request is given up, or None to keep waiting for it: slow is not dead, only
    a gone connection or the request's cap ends the wait. `connected` is asked only when
    needed (it takes the client's lock)."""
    if now_s >= cap_s:
        return "no reply within the cap for a request this size"
    if not connected():
        return "its connection is gone"
    return None


def _next_look_s(pending) -> float:
    """When the gather must next look at its pending requests: the earliest estimate's
    deadline, or soon when one is already late (to notice a connection that went away)."""
    wake_s = math.inf
    for entry in pending:
        wake_s = min(wake_s, entry.cap_s,
                     entry.expected_by_s if not entry.late else time.perf_counter() + LATE_LOOK_S)
    return wake_s


class Dispatcher:
    def __init__(self, client: AgentClient, agents: list[AgentLink], hidden_size: int,
                 prober: Prober, wire_dtype: str | None = None, element_bytes: int = 2,
                 fallback=None, on_liveness_change=lambda: None):
        self.client = client
        self.agents = agents
        self.hidden_size = hidden_size
        self.prober = prober
        self.wire_dtype = wire_dtype
        self.element_bytes = element_bytes  # bytes per activation on the wire (the paper's ε)
        self.fallback = fallback  # edge_agent.shards.LoadedExperts or None
        self.on_liveness_change = on_liveness_change
        self.owner: dict[int, AgentLink] = {}
        for agent in agents:
            for expert in agent.experts:
                self.owner.setdefault(expert, agent)
        self.stats = MoeStats()
        # prefetch hints for the next run (MoeRuntime._send_hints): id(agent) -> (agent, the
        # PREFETCH fields); carried by the agent's EXPERT request when it gets one, else sent
        # as a PREFETCH after the requests (an extra message would only delay them)
        self.hints: dict[int, tuple[AgentLink, dict]] = {}

    def request_bytes(self, tokens: int) -> int:
        return tokens * self.hidden_size * self.element_bytes

    def has_fallback(self, expert: int) -> bool:
        return self.fallback is not None and expert in self.fallback.weights

    def run(self, layer: int, x: torch.Tensor, groups: Groups
            ) -> tuple[list[ExpertOutput], set[int]]:
        """x [T, H]; groups: expert -> (token_idx, slot). Returns the outputs and the experts
        whose request failed (their agent is then marked dead)."""
        by_agent: dict[int, tuple[AgentLink, list[int]]] = {}  # id(agent) -> agent, its experts
        local: list[int] = []
        failed: set[int] = set()
        for expert in groups:  # ascending expert id
            agent = self.owner.get(expert)
            if agent is not None and agent.alive:
                by_agent.setdefault(id(agent), (agent, []))[1].append(expert)
            elif self.has_fallback(expert):
                local.append(expert)
            else:
                failed.add(expert)
        hints, self.hints = self.hints, {}
        pending: dict[int, _Pending] = {}
        start = time.perf_counter()
        for agent, experts in by_agent.values():
            counts = [(e, groups[e][0].shape[0]) for e in experts]
            if x.shape[0] == 1 and len(experts) == 1:
                request, n_rows = x, 1  # decode's one token needs no gather
            else:  # [n, H], experts' tokens back to back
                rows = groups[experts[0]][0] if len(experts) == 1 else \
                    torch.cat([groups[e][0] for e in experts])
                request, n_rows = x[rows], rows.shape[0]
            sent_s = time.perf_counter()  # before the send: the agent may answer before it returns
            try:
                hint = hints.pop(id(agent), None) if hints else None
                request_id = self.client.send_expert(
                    agent.peer, layer, request, counts, wire_dtype=self.wire_dtype,
                    **({"prefetch": hint[1]} if hint else {}))
            except PeerUnreachable:
                self._fail(agent, "unreachable")
                failed.update(experts)
                continue
            nbytes = self.request_bytes(n_rows)
            pending[request_id] = _Pending(
                agent, counts, sent_s, nbytes, n_rows,
                expected_by_s=sent_s + links.deadline_s(agent.state, nbytes, nbytes, n_rows, 1),
                cap_s=sent_s + links.deadline_cap_s(nbytes, nbytes, n_rows, 1),
                bound=reply_bounds(request))
        for agent, fields in hints.values():  # hinted agents this layer does not call
            if agent.alive:
                try:
                    self.client.send(agent.peer, P.PREFETCH, **fields)
                except PeerUnreachable:
                    pass
        outputs: list[ExpertOutput] = []
        for expert in local:  # outage fallback: compute here while the agents work
            token_idx, slot = groups[expert]
            weights = self.fallback.weights[expert][layer]
            y = expert_forward(x[token_idx].to(self.fallback.device, self.fallback.dtype), weights)
            outputs.append((expert, token_idx, slot, y.to(x.dtype)))
            self.stats.expert_calls += int(token_idx.numel())
        while pending:
            look_s = _next_look_s(pending.values())
            if time.perf_counter() >= look_s:  # also while replies keep coming
                self._look_at_late(pending, failed)
                continue
            reply = self.client.recv(look_s - time.perf_counter())
            if reply is None:
                continue
            arrived_s = time.perf_counter()
            if self.prober.take(reply, arrived_s):
                continue
            entry = pending.get(reply.id) if reply.id is not None else None
            if entry is None or reply.peer != entry.agent.peer:
                self.client.late_replies += 1  # late, or not from the agent asked: ignored
                continue
            del pending[reply.id]
            agent, counts, sent_s, nbytes, tokens = (entry.agent, entry.counts, entry.sent_s,
                                                     entry.nbytes, entry.tokens)
            checked = self._check(reply, tokens, arrived_s - sent_s, entry.bound)
            if isinstance(checked, str):
                self.stats.invalid_replies += 1
                self._fail(agent, checked)
                failed.update(e for e, _ in counts)
                continue
            y, compute_s = checked
            agent.learn(links.LinkSample(
                round_trip_s=arrived_s - sent_s, compute_s=compute_s, request_bytes=nbytes,
                reply_bytes=nbytes, tokens=tokens, experts=1, time_s=arrived_s))
            agent.calls += tokens
            agent.compute_s_total += compute_s
            if "cache" in reply.header:  # a memory-budgeted agent's counters
                agent.cache = P.cache_figures(reply.header["cache"]) or agent.cache
            agent.last_used_s = arrived_s
            self.stats.expert_calls += tokens
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            parts = (y,) if len(counts) == 1 else y.split([n for _, n in counts])
            for (expert, _), part in zip(counts, parts):
                token_idx, slot = groups[expert]
                outputs.append((expert, token_idx, slot, part))
        self.stats.network_s += time.perf_counter() - start
        return outputs, failed

    def _look_at_late(self, pending: dict[int, _Pending], failed: set[int]) -> None:
        """Past its estimate's deadline a request is late, not lost: it is given up only when
        its agent's connection is gone (closed, reset, or silent past the heartbeat timeout)
        or at the cap of a request this size. A live agent is waited for; its reply, when it
        comes, teaches the estimate, and WLR avoids it by policy from then on."""
        now_s = time.perf_counter()
        for request_id, entry in list(pending.items()):
            if now_s < entry.expected_by_s:
                continue
            peer = entry.agent.peer
            why = give_up_reason(now_s, entry.cap_s, lambda: self.client.connected(peer))
            if why is None:
                if not entry.late:
                    entry.late = True
                    self.stats.late_replies_waited += 1
                continue
            del pending[request_id]
            self._fail(entry.agent, why)
            failed.update(e for e, _ in entry.counts)

    def _check(self, reply, tokens: int, round_trip_s: float, bound: torch.Tensor
               ) -> tuple[torch.Tensor, float] | str:
        """The reply's [n, H] tensor and compute seconds, or why it is not a valid answer to
        this request."""
        if reply.kind != P.EXPERT_REPLY:
            return f"{reply.kind} reply: {str(reply.header.get('message'))[:80]}"
        compute_s = sane_compute_s(reply.header.get("compute_s"), round_trip_s)
        if compute_s is None:
            return f"compute_s {str(reply.header.get('compute_s'))[:20]} is not believable"
        try:
            y = reply.tensor()
        except (P.ProtocolError, ValueError, TypeError, RuntimeError) as e:
            return f"malformed tensor ({e})"
        if tuple(y.shape) != (tokens, self.hidden_size):
            return f"shape {list(y.shape)}, asked for {[tokens, self.hidden_size]}"
        if out_of_bounds(y, bound):
            return f"values a layer cannot produce (non-finite, or a row over {MAX_EXPERT_GAIN:g}x " \
                   "its input's norm)"
        return y, compute_s

    def _fail(self, agent: AgentLink, why: str) -> None:
        self.stats.failed_requests += 1
        if agent.mark_failed(time.perf_counter()):
            log.warning("agent %s failed (%s): its experts are dropped until it answers again",
                        agent.name, why)
            self.on_liveness_change()
