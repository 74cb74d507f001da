"""The shared cell's scheduling rules (pure): each busy link's share of a pool, the rate a
share gives, the control channel's allocation datagram, and the fluid processor-sharing pool.

A pool is one direction of the cell (downlink or uplink) and its bandwidth B. A link that has
bytes queued in that direction is *busy*; each busy link is served at the rate its share x
gives, r = x B log2(1 + snr / (x B)) / slowdown (Eqs. 2-3 with the noise growing with the
bandwidth: snr_hz = P g^2 / N0), its queued chunks in order. No clocks, no sockets: times are
passed in, so every rule is checked with hand-computed numbers.
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from basestation.channel_model import BITS_PER_BYTE, shannon_rate_bits_per_s

POLICIES = ("static", "shared", "joint")
DEFAULT_ALLOCATION_TTL_S = 0.5  # an allocation older than this no longer holds idle links back
SHARE_SUM_SLACK = 1e-6  # an allocation's shares may sum to 1 + this (float rounding)
MAX_ALLOCATION_BYTES = 4096  # a datagram larger than this is not an allocation
DONE_BITS = 1e-6  # a chunk with fewer bits than this left is through (float rounding)


# -- shares ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Allocation:
    """The joint policy's latest word from the base station: link index -> share of a pool."""

    seq: int
    shares: dict[int, float]
    received_s: float  # monotonic time the cell took it


def joint_in_force(allocation: Allocation | None, busy: Iterable[int], now_s: float,
                   ttl_s: float) -> bool:
    """The allocation decides while it is younger than TTL_S and a link it gives a share to
    still has bytes queued; after that the pool is shared, so idle links' heartbeats and
    probes wait at most TTL_S (ZMTP heartbeats time out after seconds)."""
    # the same sum as pool_shares' valid-until time, so the two never disagree by a rounding
    if allocation is None or now_s >= allocation.received_s + ttl_s:
        return False
    return any(allocation.shares.get(link, 0.0) > 0 for link in busy)


def pool_shares(policy: str, num_links: int, busy: frozenset[int],
                allocation: Allocation | None, now_s: float,
                ttl_s: float = DEFAULT_ALLOCATION_TTL_S) -> tuple[dict[int, float], float]:
    """(share of the pool for each busy link, the time until which these shares hold).

    static: each link owns 1/num_links, busy or not (the paper's even split).
    shared: the busy links split the pool evenly (work-conserving).
    joint: the allocation's shares while it is in force (links it leaves out wait), scaled up
    over the allocated links still busy: what one leaves idle (its reply not ready yet, its
    request through) goes to the others in proportion, as a real scheduler would not leave
    allocated spectrum unused; else shared.
    The shares change otherwise only when a link turns busy or idle."""
    if not busy:
        return {}, math.inf
    if policy == "static":
        return {link: 1.0 / num_links for link in busy}, math.inf
    if policy == "joint" and joint_in_force(allocation, busy, now_s, ttl_s):
        held = {link: allocation.shares.get(link, 0.0) for link in busy}
        total = sum(held.values())
        if total > 0:
            return ({link: share / total for link, share in held.items()},
                    allocation.received_s + ttl_s)
    if policy in ("shared", "joint"):
        return {link: 1.0 / len(busy) for link in busy}, math.inf
    raise ValueError(f"policy {policy!r}: expected one of {', '.join(POLICIES)}")


def rate_bits_per_s(share: float, total_bandwidth_hz: float, snr_hz: float,
                    slowdown: float = 1.0) -> float:
    """The rate of SHARE of the pool: x B log2(1 + snr / (x B)) / slowdown; 0 for no share."""
    if share <= 0 or snr_hz <= 0:
        return 0.0
    # snr_hz = P g^2 / N0, so power = snr_hz with unit gain and noise gives Eqs. 2-3's SNR.
    return float(shannon_rate_bits_per_s(share * total_bandwidth_hz, snr_hz, 1.0, 1.0)) / slowdown


def snr_hz_for(rate_bits_per_s_wanted: float, bandwidth_hz: float) -> float:
    """The snr_hz at which BANDWIDTH_HZ carries the wanted rate (the inverse of Eqs. 2-3)."""
    return (2.0 ** (rate_bits_per_s_wanted / bandwidth_hz) - 1.0) * bandwidth_hz


# -- the control channel's datagram --------------------------------------------------------------

def format_allocation(seq: int, shares: dict[int, float]) -> bytes:
    """The datagram that tells a cell the joint shares: {"seq": N, "shares": {"0": 0.75, ...}}."""
    return frame_allocation(seq, format_shares(shares))


def format_shares(shares: dict[int, float]) -> bytes:
    """The "shares" part of an allocation datagram, to encode once and send with many seqs."""
    return json.dumps({str(int(k)): float(v) for k, v in shares.items()}).encode()


def frame_allocation(seq: int, shares_json: bytes) -> bytes:
    """The datagram of SEQ and shares already encoded by format_shares."""
    return b'{"seq": %d, "shares": %s}' % (int(seq), shares_json)


def parse_allocation(datagram: bytes, num_links: int) -> tuple[int, dict[int, float]]:
    """(seq, shares) from a control datagram. Raises ValueError for anything else: too big, not
    JSON, unknown links, negative or non-finite shares, shares summing to more than 1."""
    if len(datagram) > MAX_ALLOCATION_BYTES:
        raise ValueError(f"datagram of {len(datagram)} bytes (at most {MAX_ALLOCATION_BYTES})")
    try:
        message = json.loads(datagram.decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("not a JSON datagram") from None
    if not isinstance(message, dict) or not isinstance(message.get("shares"), dict):
        raise ValueError('expected {"seq": N, "shares": {LINK: FRACTION}}')
    seq = message.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ValueError("seq: expected an integer")
    shares = {}
    for key, value in message["shares"].items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < num_links):
            raise ValueError(f"link {key!r}: expected an index below {num_links}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"link {key}: share {value!r} is not a number")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"link {key}: share {value!r} is not a fraction")
        shares[int(key)] = float(value)
    if sum(shares.values()) > 1.0 + SHARE_SUM_SLACK:
        raise ValueError(f"shares sum to {sum(shares.values()):.6g} > 1")
    return seq, shares


def accept_allocation(current: Allocation | None, seq: int, now_s: float,
                      ttl_s: float = DEFAULT_ALLOCATION_TTL_S) -> bool:
    """A datagram overtaken on the way (a lower seq) is stale while the one in force is young;
    once that has expired any seq is taken, so a restarted base station counting from 0 is
    heard."""
    return current is None or seq >= current.seq or now_s - current.received_s >= ttl_s


# -- the fluid pool ------------------------------------------------------------------------------

@dataclass
class FlowStats:
    """One link in one pool, for the records: what it sent and the shares it was given."""

    bytes_served: float = 0.0
    busy_s: float = 0.0  # time with bytes queued
    share_s: float = 0.0  # integral of its share over its busy time

    def as_dict(self) -> dict:
        mean = self.share_s / self.busy_s if self.busy_s > 0 else None
        return {"bytes_served": round(self.bytes_served), "busy_s": round(self.busy_s, 6),
                "share_s": round(self.share_s, 6), "mean_share": mean}


@dataclass
class _Chunk:
    bits_left: float
    bits: float
    item: object


@dataclass
class FluidPool:
    """Processor sharing as a fluid: every busy link is served at once, each at its share's
    rate, its chunks in order; a chunk is done the instant its last bit is served. Time only
    moves when a caller passes it in (add, advance), so the completion times are exact
    however late the caller is, and can be checked by hand.

    shares_of(busy, now_s) -> (shares, valid_until_s); rate_of(link, share) -> bits/s."""

    shares_of: Callable[[frozenset[int], float], tuple[dict[int, float], float]]
    rate_of: Callable[[int, float], float]
    now_s: float = 0.0
    queues: dict[int, collections.deque] = field(default_factory=dict)
    stats: dict[int, FlowStats] = field(default_factory=lambda: collections.defaultdict(FlowStats))

    def busy(self) -> frozenset[int]:
        return frozenset(link for link, queue in self.queues.items() if queue)

    def add(self, at_s: float, link: int, num_bytes: int, item: object) -> list:
        """Queue a chunk of NUM_BYTES for LINK read at AT_S (earlier than the pool's clock
        counts as now). Returns the chunks done up to then, as advance does."""
        done = self.advance(at_s)
        self.queues.setdefault(link, collections.deque()).append(
            _Chunk(num_bytes * BITS_PER_BYTE, num_bytes * BITS_PER_BYTE, item))
        done += self._pop_done(link)  # a chunk of no bits (an end of stream) at the head
        return done

    def rates(self) -> tuple[dict[int, float], dict[int, float], float]:
        """(shares, rates, valid_until_s) of the busy links now."""
        shares, until_s = self.shares_of(self.busy(), self.now_s)
        return shares, {link: self.rate_of(link, share) for link, share in shares.items()}, until_s

    def next_event_s(self) -> float:
        """When the next chunk completes or the shares change (inf: nothing will happen)."""
        _, rates, until_s = self.rates()
        return min(until_s, self.now_s + _first_completion(self.queues, rates)[1])

    def advance(self, to_s: float) -> list[tuple[float, int, object]]:
        """Serve up to TO_S; returns (done_s, link, item) of every chunk done, in time order."""
        done: list[tuple[float, int, object]] = []
        while self.now_s < to_s:
            shares, rates, until_s = self.rates()
            first_link, first_s = _first_completion(self.queues, rates)
            first_done_s = self.now_s + first_s
            step_to_s = min(to_s, until_s, first_done_s)
            elapsed_s = step_to_s - self.now_s
            for link, share in shares.items():
                served_bits = min(rates[link] * elapsed_s, self.queues[link][0].bits_left)
                if link == first_link and first_done_s <= step_to_s:
                    served_bits = self.queues[link][0].bits_left  # exactly, not to float error
                self._serve(link, served_bits, share, elapsed_s)
            self.now_s = step_to_s
            for link in shares:
                done += self._pop_done(link)
        return done

    def discard(self, at_s: float, link: int, dropped: Callable[[object], bool]) -> list:
        """Forget LINK's queued chunks whose item is DROPPED (a connection that closed: its
        bytes must not hold the pool). Returns the chunks done up to AT_S, as advance does."""
        done = self.advance(at_s)
        queue = self.queues.get(link)
        if queue:
            self.queues[link] = collections.deque(c for c in queue if not dropped(c.item))
            done += self._pop_done(link)
        return done

    def _serve(self, link: int, bits: float, share: float, elapsed_s: float) -> None:
        # One chunk per step: the step ends when the first head chunk completes.
        self.queues[link][0].bits_left -= bits
        stats = self.stats[link]
        stats.bytes_served += bits / BITS_PER_BYTE
        stats.busy_s += elapsed_s
        stats.share_s += share * elapsed_s

    def _pop_done(self, link: int) -> list[tuple[float, int, object]]:
        queue, done = self.queues[link], []
        while queue and queue[0].bits_left <= DONE_BITS:
            done.append((self.now_s, link, queue.popleft().item))
        return done


def _first_completion(queues: dict[int, collections.deque],
                      rates: dict[int, float]) -> tuple[int | None, float]:
    """(the link whose head chunk completes first at RATES, in how many seconds); (None, inf)
    when no busy link is served."""
    best_link, best_s = None, math.inf
    for link, rate in rates.items():
        if rate > 0 and queues[link]:
            after_s = queues[link][0].bits_left / rate
            if after_s < best_s:
                best_link, best_s = link, after_s
    return best_link, best_s
