"""The base station's side of the cell's `joint` policy (issue 23): a `MoeRuntime.before_dispatch`
hook that, after selection and before the layer's bytes leave, splits the cell's bandwidth among
the boxes this layer calls so that they finish together (basestation.bandwidth.allocate), and
tells the cell (testbed.links.cell.AllocationSender: one UDP datagram); and, for θ > 0, a
`MoeRuntime.box_latency_override` that lets WLR select on the latencies that allocation gives
(basestation.bandwidth.select_and_allocate), whose allocation is then the one sent.

A box's demand is what the cell will charge it: our request and reply bytes at the cell's rate,
which is the Shannon rate of its share divided by the slowdown, so bits x slowdown at the plain
Shannon rate; its fixed part is the agent's paced compute for its tokens plus the link's delay
each way. θ = 0 still calls every selected expert: the allocation only changes time.

What a layer costs the base station (bench/bandwidth.py): the shares of a called set are
memoised per channel epoch (the cell's settings: the scenario's SNRs change only then), and a
datagram goes out only when the shares, in whole percent, differ from the last one sent or that
one is half way to the cell's allocation TTL; the cell also wakes only for those.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

from basestation.bandwidth import BoxLink, ShannonRate, allocate, select_and_allocate
from testbed.links.cell import AllocationSender
from testbed.links.cell_policy import DEFAULT_ALLOCATION_TTL_S, format_shares

PERCENT = 100  # shares go to the cell in whole percent: finer than the cell's timing noise


def box_link(request_bytes: int, slowdown: float, pace_us: tuple[float, float],
             delay_ms: float, snr_down_hz: float, snr_up_hz: float) -> BoxLink:
    """One cell box as the allocator sees it (pure): REQUEST_BYTES each way per (token,
    expert) pair, charged x SLOWDOWN by the cell; the agent paces a call to max(per call,
    pairs x per token) µs (scenarios.agent_pacing_us); the link's delay each way."""
    per_call_us, per_token_us = pace_us
    bits = 8.0 * request_bytes * slowdown
    return BoxLink(2 * delay_ms / 1e3, per_token_us / 1e6, bits, bits, ShannonRate(snr_down_hz),
                   ShannonRate(snr_up_hz), min_compute_s=per_call_us / 1e6)


def percent_shares(shares: dict[int, float]) -> dict[int, int]:
    """SHARES (fractions, > 0 kept) as whole percents summing to 100, none below 1 (pure):
    largest remainders first, so no share moves by a whole percent or more. {} when none."""
    positive = {k: v for k, v in shares.items() if v > 0}
    total = sum(positive.values())
    if not positive or not total > 0:
        return {}
    exact = {k: PERCENT * v / total for k, v in positive.items()}
    out = {k: max(1, int(v)) for k, v in exact.items()}
    remainder = {k: v - int(v) for k, v in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (-remainder[k], k))
    left = PERCENT - sum(out.values())
    for k in itertools.islice(itertools.cycle(by_remainder), max(0, left)):
        out[k] += 1
    while left < 0:  # the 1 % floors took more than the remainders held: trim the largest
        k = max(out, key=lambda k: (out[k], -k))
        out[k] -= 1
        left += 1
    return out


@dataclass(frozen=True)
class Message:
    """One allocation as it goes to the cell: the shares (link -> fraction, for the record),
    and the same in whole percent, encoded once (cell_policy.format_shares)."""

    shares: dict[int, float]
    percents: tuple[tuple[int, int], ...]
    shares_json: bytes


def message(shares: dict[int, float]) -> Message | None:
    """SHARES' message to the cell; None when no link has a share (pure)."""
    percents = percent_shares(shares)
    if not percents:
        return None
    return Message(shares, tuple(sorted(percents.items())),
                   format_shares({link: p / PERCENT for link, p in percents.items()}))


class JointAllocator:
    """before_dispatch(layer, box_of_expert [E], experts [T, K], keep [T, K]) and
    box_latencies(layer, boxes, experts, weights, theta) (the runtime's box_latency_override);
    both do nothing unless `active` (the cell runs `joint`). link_of_box[b]: the cell's link
    of the session's box b (None: the local fallback, not on the cell). base_latency_s(boxes,
    experts): the runtime's own estimates, kept for boxes off the cell."""

    def __init__(self, bed, link_of_box: list[int | None], request_bytes, pace_us: dict,
                 base_latency_s=None, clock=time.monotonic):
        self.bed = bed  # cell_bed.CellBed: its current settings (snr, slowdown, B), control
        self.link_of_box = link_of_box
        self.request_bytes = request_bytes  # tokens -> our bytes each way (AgentTable's)
        self.pace_us = pace_us  # agent -> (per call, per token) µs
        self.base_latency_s = base_latency_s
        self.clock = clock
        self.active = False
        self.sender: AllocationSender | None = None  # opened on the first allocation
        self.seq = itertools.count()
        self.sent = 0  # datagrams sent
        self.unchanged = 0  # layers whose shares the cell already had (no datagram)
        self.layers = 0  # layers allocated
        self.share_sums: dict[int, float] = {}  # link -> sum of shares allocated (the record)
        self.share_counts: dict[int, int] = {}
        self._last: Message | None = None
        self._last_sent_s = -math.inf
        # (called links' slots) -> Message, at the settings it was made for: decode layers
        # call a few of the same pairs of boxes over and over, and the solve (~0.1 ms) and
        # the encoding are on every layer's path; _by_shares: ((link, share), ...) -> Message
        self._memo: dict = {}
        self._by_shares: dict = {}
        self._memo_settings: dict | None = None
        self._resend_s = DEFAULT_ALLOCATION_TTL_S / 2
        self._links: dict[int, BoxLink] = {}  # link -> its model at the memo's settings
        self._cell: dict[int, BoxLink] = {}  # box -> the same, for select_and_allocate
        # (layer, experts, Message): select_and_allocate's allocation for the layer whose
        # latencies box_latencies gave, sent by the before_dispatch that follows
        self._pending: tuple | None = None

    def reset_counts(self) -> None:
        self.share_sums, self.share_counts = {}, {}

    def _settings(self) -> dict:
        settings = self.bed.current
        if settings is not self._memo_settings:  # a new epoch or policy: new channels
            self._memo, self._by_shares, self._memo_settings = {}, {}, settings
            self._resend_s = settings.get("allocation_ttl_s", DEFAULT_ALLOCATION_TTL_S) / 2
            self._links = {
                link: box_link(self.request_bytes(1), settings["slowdown"],
                               self.pace_us.get(link, (0.0, 0.0)), spec["delay_ms"],
                               spec["snr_down_hz"], spec["snr_up_hz"])
                for link, spec in enumerate(settings["links"])}
            self._cell = {box: self._links[link] for box, link in enumerate(self.link_of_box)
                          if link is not None and link in self._links}
        return settings

    def shares(self, pairs: dict[int, int]) -> dict[int, float]:
        """The min-max shares of the called links (link -> kept slots), at the cell's current
        settings."""
        return self._message(pairs).shares

    def _message(self, pairs: dict[int, int]) -> Message:
        settings = self._settings()
        key = tuple(sorted(pairs.items()))
        found = self._memo.get(key)
        if found is None:
            demands = {link: self._links[link].demand(n) for link, n in pairs.items()}
            allocation = allocate(demands, None, settings["total_bandwidth_hz"])
            found = self._memo[key] = message({link: allocation.shares[link] for link in pairs})
        return found

    def box_latencies(self, layer, boxes, experts, weights, theta):
        """The runtime's box_latency_override under `joint`: WLR and allocation alternated
        (select_and_allocate) on the cell's model of each box; returns the latencies the last
        selection was made on (select() on them selects the same), and keeps that selection's
        allocation for this layer's before_dispatch."""
        base = self.base_latency_s(boxes, experts)
        if not self.active:
            return base
        settings = self._settings()
        joint = select_and_allocate(experts, weights, boxes.box_of_expert, base, theta,
                                    self._cell, settings["total_bandwidth_hz"], boxes.available)
        links = self.link_of_box
        shares = tuple((links[box], share) for box, share in joint.allocation.shares.items()
                       if share > 0)
        found = self._by_shares.get(shares)  # the same called set gives the same shares
        if found is None:
            found = self._by_shares[shares] = message(dict(shares))
        self._pending = (layer, experts, found)
        return joint.latency_s

    def __call__(self, layer, box_of_expert, experts, keep) -> None:
        if not self.active:
            return
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == layer and pending[1] is experts:
            found = pending[2]  # what WLR selected on: its allocation
        else:
            pairs: dict[int, int] = {}
            box_of = box_of_expert.tolist()  # E ints: cheaper than indexing the tensor per slot
            links = self.link_of_box
            for expert, kept in zip(experts.reshape(-1).tolist(), keep.reshape(-1).tolist()):
                if kept:
                    box = box_of[expert]
                    link = links[box] if box < len(links) else None
                    if link is not None:
                        pairs[link] = pairs.get(link, 0) + 1
            found = self._message(pairs) if pairs else None
        if found is None:
            return
        self._send(found)
        self.layers += 1
        for link, share in found.shares.items():
            self.share_sums[link] = self.share_sums.get(link, 0.0) + share
            self.share_counts[link] = self.share_counts.get(link, 0) + 1

    def _send(self, found: Message) -> None:
        """One datagram, unless the cell holds these shares already (in whole percent) from a
        send younger than half its allocation TTL."""
        now_s = self.clock()
        last = self._last
        if last is not None and now_s - self._last_sent_s < self._resend_s \
                and (last is found or last.percents == found.percents):
            self.unchanged += 1
            return
        if self.sender is None:
            self.sender = AllocationSender(self.bed.control)
        self.sender.send_encoded(next(self.seq), found.shares_json)
        self._last, self._last_sent_s = found, now_s
        self.sent += 1

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None

    def mean_shares(self) -> dict[str, float]:
        return {str(link): self.share_sums[link] / self.share_counts[link]
                for link in sorted(self.share_sums)}
