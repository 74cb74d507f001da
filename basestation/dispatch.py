"""Scatter one layer's expert groups to their agents, gather the replies: a late agent is
waited for while its connection is up, up to its request's cap (slow is not dead). It sends,
gathers and checks; what it learns about an agent goes to the agent table (agents.py).

One request per agent per layer carries every expert's token group back to back; every send
goes out before any wait. A reply counts only if it comes from the agent the request went to,
is an expert reply with the shape asked for, values a layer can produce (finite, each row within
MAX_EXPERT_GAIN of its input's norm) and a believable compute time: anything else is that agent
failing (its experts are reported failed, it is marked dead and probed back). Experts whose
agent is down are computed here when a local fallback holds them. Probe replies arrive on the
same socket: the gather sets them aside for the prober (liveness.py), which takes them after
the layer.

With replicas (an expert on several agents), a layer's route (AgentTable.route) cuts each
replicated expert's tokens over its replicas, and a request that fails is sent again, within the
same gather, to another live replica of each of its experts before any of them counts as failed.

Shape legend: T = tokens of the layer call, H = hidden, n = tokens of a request.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from operator import itemgetter
from typing import NamedTuple

import numpy as np
import torch

from basestation import link_estimator as links
from basestation.agents import AgentTable, MoeStats
from basestation.liveness import CLOCK_SLACK_S, AgentLink, Prober, sane_compute_s
from basestation.replicas import cut
from basestation.routing import ExpertOutput, Groups
from edge_agent.expert_math import expert_forward
from wire import messages as M
from wire import protocol as P
from wire.client import AgentClient, PeerUnreachable

_EXPERT_OF_PART = itemgetter(0)  # of a (expert, token_idx, slot) part
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
    # the estimate's deadline: past it, the agent is looked at (once late: the next look at
    # its connection, LATE_LOOK_S after the last). Until `estimated`, the least
    # deadline any estimate gives (sent_s + the floor): a reply almost always comes first, so
    # the estimate's own is worked out only when that passes (_estimate)
    expected_by_s: float
    cap_s: float  # the longest a request of this size is waited for, whatever the estimate
    request: torch.Tensor  # [n, H] what was sent: the bounds of its reply rows (refused)
    state: links.LinkState  # the agent's estimate when sent, for its deadline
    late: bool = False
    estimated: bool = False
    # [(expert, token_idx, slot)] of the request's rows when they are not whole groups (a
    # route's cut, a replica's retry); None: `counts`' experts' whole groups
    parts: list | None = None
    tried: frozenset = frozenset()  # ids of the agents these rows were sent to before


_WIDE_FLOATS = (torch.float32, torch.float64)  # dtypes whose norm needs no wider sum


def _norms(x: torch.Tensor, dim: int | None = -1) -> torch.Tensor:
    """Row norms in float32 at least (a bf16 sum of squares overflows and rounds early)."""
    if x.dtype in _WIDE_FLOATS:
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


_GAIN = torch.tensor(MAX_EXPERT_GAIN)  # the bound of a row whose input's norm is at most 1
# a row whose sum of squares is under this is within MAX_EXPERT_GAIN however vector_norm rounds
# its float32 sum (at most ~n * 2^-24 relative, n = H: 1e-3 covers H up to ~16000)
_CLEARLY_WITHIN_GAIN_SQUARED = (MAX_EXPERT_GAIN * (1 - 1e-3)) ** 2


def refused(y: torch.Tensor, request: torch.Tensor) -> bool:
    """out_of_bounds(y, reply_bounds(request)), looking at the request only when a reply row
    is over MAX_EXPERT_GAIN, the least bound of any row (an input's norm is floored at 1)."""
    if y.shape[0] == 1:  # decode: _norms inlined, on a Python float (called per reply)
        if y.dtype == torch.float32 and y.is_cpu and not y.requires_grad:
            # numpy's sum of squares, in float64 (float32 squares cannot overflow it: no
            # warning for a rogue's 1e30), is ~1 us cheaper than vector_norm; it rounds
            # otherwise, so it only lets through rows far inside the bound (NaN, inf fall through)
            row = y.numpy()[0].astype(np.float64)
            if row.dot(row) <= _CLEARLY_WITHIN_GAIN_SQUARED:
                return False
        norm = float(torch.linalg.vector_norm(y) if y.dtype in _WIDE_FLOATS else
                     torch.linalg.vector_norm(y, dtype=torch.float32))
        if norm <= MAX_EXPERT_GAIN:
            return False
    elif not out_of_bounds(y, _GAIN):
        return False
    return out_of_bounds(y, reply_bounds(request))


def give_up_reason(now_s: float, cap_s: float, connected) -> str | None:
    """Why a late request is given up, or None to keep waiting for it: slow is not dead, only
    a gone connection or the request's cap ends the wait. `connected` is asked only when
    needed (it takes the client's lock)."""
    if now_s >= cap_s:
        return "no reply within the cap for a request this size"
    if not connected():
        return "its connection is gone"
    return None


def _next_wake_s(pending) -> float:
    """When the gather must next look at its pending requests: the earliest `expected_by_s`
    (an estimate's deadline; for a late request, its next look at the connection, LATE_LOOK_S
    after the last) or cap. Taken again only when the pending requests change."""
    wake_s = math.inf
    for entry in pending:
        if entry.expected_by_s < wake_s:
            wake_s = entry.expected_by_s
        if entry.cap_s < wake_s:
            wake_s = entry.cap_s
    return wake_s


class Gathered(NamedTuple):
    """What one Dispatcher.run brought back."""

    outputs: list[ExpertOutput]
    failed: set[int]  # experts whose request failed (their agent is dead now)
    probe_replies: list  # (reply, arrived_s) answering the prober's probes, for Prober.take


class Dispatcher:
    """Runs one layer's groups on the agents. It reads the agent table (who holds an expert,
    who is alive) and changes it only through its methods: `fail`, `answered`."""

    def __init__(self, client: AgentClient, table: AgentTable, prober: Prober,
                 wire_dtype: str | None = None):
        self.client = client
        self.table = table
        self.probes_in_flight = prober.in_flight  # read only: which replies are the prober's
        self.wire_dtype = wire_dtype
        self.stats: MoeStats = table.stats
        self.hidden_size = table.hidden_size
        # request rows -> (its bytes each way, its deadline cap: deadline_cap_s)
        self._sizes: dict[int, tuple[int, float]] = {}

    def run(self, layer: int, x: torch.Tensor, groups: Groups, hints: dict | None = None,
            route: dict | None = None) -> Gathered:
        """x [T, H]; groups: expert -> (token_idx, slot). `hints`: id(agent) -> (agent, its
        PREFETCH fields), carried in the agent's EXPERT request when it gets one, else sent as
        a PREFETCH after the requests (an extra message before them would only delay them).
        `route`: replicated expert -> [(agent, tokens)], the split of its group over its
        replicas (AgentTable.route's parts). Returns the outputs, the experts whose request
        failed (their agent is then dead, and no other replica could take them) and the probe
        replies read meanwhile."""
        table = self.table
        by_agent, local, failed = table.assign(groups)
        hints = dict(hints) if hints else None  # taken as they are sent
        pending: dict[int, _Pending] = {}
        probe_replies: list = []
        # bound once: this runs per layer call, the loops per request and reply
        perf_counter, client, sizes = time.perf_counter, self.client, self._sizes
        send_expert, wire_dtype = client.send_expert, self.wire_dtype
        start = perf_counter()
        decode = x.shape[0] == 1
        if route:  # replicas: requests of cut groups, built apart (the plain path stays lean)
            by_agent = self._send_routed(layer, x, groups, by_agent, route, hints, pending,
                                         failed)
        for agent, experts in by_agent.values():
            if decode and len(experts) == 1:
                request, n_rows = x, 1  # decode's one token needs no gather
                counts = [(experts[0], 1)]
            else:  # [n, H], experts' tokens back to back
                counts = [(e, groups[e][0].shape[0]) for e in experts]
                rows = groups[experts[0]][0] if len(experts) == 1 else \
                    torch.cat([groups[e][0] for e in experts])
                request, n_rows = x[rows], rows.shape[0]
            hint = hints.pop(id(agent), None) if hints else None
            sent_s = perf_counter()  # before the send: the agent may answer before it returns
            try:
                request_id = send_expert(agent.peer, layer, request, counts, wire_dtype=wire_dtype,
                                         prefetch=hint[1] if hint is not None else None)
            except PeerUnreachable:
                table.fail(agent, "unreachable", perf_counter())
                self._resend(layer, x, [(e, *groups[e]) for e in experts], frozenset(
                    (id(agent),)), pending, failed)
                continue
            size = sizes.get(n_rows)
            nbytes, cap_s, soonest_s = size if size is not None else self._size(n_rows)
            pending[request_id] = _Pending(agent, counts, sent_s, nbytes, n_rows,
                                           sent_s + soonest_s, sent_s + cap_s, request,
                                           agent.state)
        if hints:
            self._send_prefetch(hints)
        outputs: list[ExpertOutput] = []
        for expert in local:  # outage fallback: compute here while the agents work
            outputs.append(self._compute_locally(layer, x, expert, groups[expert]))
        recv, in_probes = client.recv, self.probes_in_flight
        wake_s = _next_wake_s(pending.values())
        while pending:
            now_s = perf_counter()
            if now_s >= wake_s:  # also while replies keep coming
                if self._estimate(pending.values()):  # the floor passed: the real deadlines
                    wake_s = _next_wake_s(pending.values())
                    continue
                for entry in self._look_at_late(pending, now_s):
                    self._resend_entry(layer, x, groups, entry, pending, failed)
                wake_s = _next_wake_s(pending.values())
                continue
            reply = recv(wake_s - now_s)
            if reply is None:
                continue
            arrived_s = perf_counter()
            request_id = reply.header.get("id")  # Reply.id, without the property's call
            if request_id in in_probes:
                probe_replies.append((reply, arrived_s))
                continue
            # the pending request it answers, from the agent asked (no longer pending then)
            entry = pending.get(request_id) if request_id is not None else None
            if entry is None or reply.peer != entry.agent.peer:
                client.count_late()  # late, or not from the agent asked: ignored
                continue
            del pending[request_id]
            if pending:
                wake_s = _next_wake_s(pending.values())
            y = self._take(reply, entry, arrived_s)
            if isinstance(y, str):
                self.stats.invalid_replies += 1
                table.fail(entry.agent, y, arrived_s)
                self._resend_entry(layer, x, groups, entry, pending, failed)
                wake_s = _next_wake_s(pending.values())
                continue
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            counts = entry.counts
            if table.replicated:
                entry.agent.count_replica_calls(counts, table.replicated)
            if entry.parts is not None:  # rows not of whole groups: each part says whose
                for (expert, token_idx, slot), part in zip(entry.parts,
                                                           y.split([n for _, n in counts])):
                    outputs.append((expert, token_idx, slot, part))
                continue
            if len(counts) == 1:
                expert = counts[0][0]
                token_idx, slot = groups[expert]
                outputs.append((expert, token_idx, slot, y))
                continue
            for (expert, _), part in zip(counts, y.split([n for _, n in counts])):
                token_idx, slot = groups[expert]
                outputs.append((expert, token_idx, slot, part))
        self.stats.network_s += perf_counter() - start
        return Gathered(outputs, failed, probe_replies)

    def _send_routed(self, layer: int, x: torch.Tensor, groups: Groups, by_agent: dict,
                     route: dict, hints: dict | None, pending: dict, failed: set) -> dict:
        """Send the requests of every agent given a part of a replicated expert's group: its
        unreplicated experts' whole groups and its parts, cut by `route`. Returns by_agent
        without them (the plain path sends the rest)."""
        parts_of: dict[int, tuple] = {}  # id(agent) -> (agent, [(expert, token_idx, slot)])
        for expert, shares in route.items():
            group = groups.get(expert)
            if group is None:  # the selector dropped every slot of it
                continue
            token_idx, slot = group
            for agent, begin, end in cut(int(token_idx.shape[0]), shares):
                entry = parts_of.setdefault(id(agent), (agent, []))
                entry[1].append((expert, token_idx[begin:end], slot[begin:end]))
        if not parts_of:
            return by_agent
        rest = {}
        for key, (agent, experts) in by_agent.items():
            mine = [e for e in experts if e not in route]
            if key in parts_of:
                parts_of[key][1].extend((e, *groups[e]) for e in mine)
            elif mine:
                rest[key] = (agent, mine)
        for key, (agent, parts) in parts_of.items():
            parts.sort(key=_EXPERT_OF_PART)  # ascending ids, as the plain path sends them
            hint = hints.pop(key, None) if hints else None
            self._send_parts(layer, x, agent, parts, frozenset(), pending, failed, hint)
        return rest

    def _send_parts(self, layer: int, x: torch.Tensor, agent: AgentLink, parts: list,
                    tried: frozenset, pending: dict, failed: set, hint=None) -> None:
        """One request to `agent` carrying `parts` [(expert, token_idx, slot)] back to back;
        if it cannot be sent, the parts go to another replica (or count as failed)."""
        rows = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
        request, n_rows = x[rows], int(rows.shape[0])
        counts = [(expert, int(token_idx.shape[0])) for expert, token_idx, _ in parts]
        sent_s = time.perf_counter()
        try:
            request_id = self.client.send_expert(
                agent.peer, layer, request, counts, wire_dtype=self.wire_dtype,
                prefetch=hint[1] if hint is not None else None)
        except PeerUnreachable:
            self.table.fail(agent, "unreachable", time.perf_counter())
            self._resend(layer, x, parts, tried | {id(agent)}, pending, failed)
            return
        nbytes, cap_s, soonest_s = self._size(n_rows)
        pending[request_id] = _Pending(agent, counts, sent_s, nbytes, n_rows, sent_s + soonest_s,
                                       sent_s + cap_s, request, agent.state, parts=parts,
                                       tried=tried)

    def _size(self, n_rows: int) -> tuple[int, float, float]:
        """(bytes each way, cap, soonest deadline) of a request of n_rows: functions of its
        size alone, worked out once per size (deadline_s is never under the floor, nor over
        the cap)."""
        size = self._sizes.get(n_rows)
        if size is None:
            nbytes = self.table.request_bytes(n_rows)
            cap_s = links.deadline_cap_s(nbytes, nbytes, n_rows, 1)
            size = self._sizes[n_rows] = (nbytes, cap_s, min(
                links.DEFAULT_CONFIG.deadline_floor_s, cap_s))
        return size

    def _resend_entry(self, layer: int, x: torch.Tensor, groups: Groups, entry: _Pending,
                      pending: dict, failed: set) -> None:
        """A request that failed (its agent now marked dead): its rows to other replicas."""
        parts = entry.parts if entry.parts is not None else \
            [(e, *groups[e]) for e, _ in entry.counts]
        self._resend(layer, x, parts, entry.tried | {id(entry.agent)}, pending, failed)

    def _resend(self, layer: int, x: torch.Tensor, parts: list, tried: frozenset,
                pending: dict, failed: set) -> None:
        """Send each part [(expert, token_idx, slot)] to a live replica of its expert not yet
        tried (one request per replica); an expert with none left has failed."""
        table = self.table
        if not table.replicated:
            failed.update(expert for expert, _, _ in parts)
            return
        again: dict[int, tuple] = {}
        for part in parts:
            other = table.other_holder(part[0], tried)
            if other is None:
                failed.add(part[0])
            else:
                again.setdefault(id(other), (other, []))[1].append(part)
        for agent, mine in again.values():
            self.stats.replica_retries += len(mine)
            self._send_parts(layer, x, agent, mine, tried, pending, failed)

    def _estimate(self, entries) -> bool:
        """Give the entries still holding the floor their estimate's deadline (the one the
        estimate at the send gives); returns whether there were any."""
        changed = False
        for entry in entries:
            if not entry.estimated:
                nbytes, cap_s, _ = self._sizes[entry.tokens]
                entry.expected_by_s = entry.sent_s + links.deadline_s(
                    entry.state, nbytes, nbytes, entry.tokens, 1, links.DEFAULT_CONFIG, cap_s)
                entry.estimated = changed = True
        return changed

    def _send_prefetch(self, hints: dict) -> None:
        """The hints of agents this layer does not call, as PREFETCH messages."""
        for agent, fields in hints.values():
            if agent.alive:
                try:
                    self.client.send(agent.peer, P.PREFETCH, **fields)
                except PeerUnreachable:
                    pass

    def _compute_locally(self, layer: int, x: torch.Tensor, expert: int, group
                         ) -> ExpertOutput:
        fallback = self.table.fallback
        token_idx, slot = group
        y = expert_forward(x[token_idx].to(fallback.device, fallback.dtype),
                           fallback.weights[expert][layer])
        self.stats.expert_calls += int(token_idx.numel())
        return expert, token_idx, slot, y.to(x.dtype)

    def _look_at_late(self, pending: dict[int, _Pending], now_s: float) -> list[_Pending]:
        """Past its estimate's deadline a request is late, not lost: it is given up only when
        its agent's connection is gone (closed, reset, or silent past the heartbeat timeout)
        or at the cap of a request this size. A live agent is waited for; its reply, when it
        comes, teaches the estimate, and WLR avoids it by policy from then on. Returns the
        requests given up (their agents marked dead)."""
        given_up = []
        for request_id, entry in list(pending.items()):
            if now_s < entry.expected_by_s:
                continue
            peer = entry.agent.peer
            why = give_up_reason(now_s, entry.cap_s, lambda peer=peer: self.client.connected(peer))
            if why is None:
                if not entry.late:
                    entry.late = True
                    self.stats.late_replies_waited += 1
                # looked at again soon: a connection that goes while it is late is noticed
                # within LATE_LOOK_S, not at the cap
                entry.expected_by_s = now_s + LATE_LOOK_S
                continue
            del pending[request_id]
            self.table.fail(entry.agent, why, now_s)
            given_up.append(entry)
        return given_up

    def _take(self, reply, entry: _Pending, arrived_s: float) -> torch.Tensor | str:
        """The reply's [n, H] tensor, the agent's estimate and counters taught by it (one call
        per reply: decode has the base station's tightest budget); or why it is not a valid
        answer to this request, nothing learnt."""
        try:
            message = reply.message  # decoded once, every field checked (wire/messages.py)
        except (P.ProtocolError, ValueError, TypeError, RuntimeError) as e:
            return f"malformed {reply.kind} reply ({e})"
        if not isinstance(message, M.ExpertReply):
            return f"{reply.kind} reply: {str(getattr(message, 'message', ''))[:80]}"
        round_trip_s = arrived_s - entry.sent_s
        compute_s = message.compute_s
        # sane_compute_s inlined for a float (NaN and inf fail the comparisons), else called
        if type(compute_s) is not float or not 0.0 <= compute_s <= round_trip_s + CLOCK_SLACK_S:
            compute_s = sane_compute_s(compute_s, round_trip_s)
            if compute_s is None:
                return f"compute_s {str(message.compute_s)[:20]} is not believable"
        y = message.tensor
        rows, width = y.shape  # [n, H]: the decode made it two-dimensional
        if rows != entry.tokens or width != self.hidden_size:
            return f"shape {list(y.shape)}, asked for {[entry.tokens, self.hidden_size]}"
        if refused(y, entry.request):
            return ("values a layer cannot produce (non-finite, or a row over "
                    f"{MAX_EXPERT_GAIN:g}x its input's norm)")
        nbytes = entry.nbytes
        self.table.answered(entry.agent, links.LinkSample(  # positional: half the cost
            round_trip_s, compute_s, nbytes, nbytes, rows, 1, arrived_s), message.cache)
        return y
